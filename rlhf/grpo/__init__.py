"""`rlhf grpo`: critic-free RL (GRPO or RLOO advantages) on the machinery of `rlhf ppo` (rlhf.rl), without a value head.

Why not trl 1.16's GRPOTrainer / RLOOTrainer (read in site-packages, 2026-12). They would take our 8-bit PEFT model,
use the disabled adapter as the reference and score with a classifier of its own tokenizer; what they cannot give:
- exact resume after kill -9: the HF Trainer writes checkpoint-N in place, not in one rename, and trl regenerates a
  generation window after a resume (`_buffered_inputs` is None, its own comment says so), so a resumed run samples
  other responses than the uninterrupted one; here prompts and samples are a function of (seed, step, rank);
- our budget: trl generates with transformers' `generate` and scores with its own log-softmax; the pre-flight models
  rlhf's passes (KV-cache loop with one position's logits, chunked fp32 log-probs), so it would predict another program;
- LLM.int8's batch dependence: old log-probs must come from the update's own micro-batches (rlhf.rl.rollout.score);
- the run directory: checkpoints/step-N, metrics.jsonl with PPO's keys, eval.json before/after, the report.
So the loop is ours (rlhf.rl) and so is the maths (core.py); tests check it against trl's own loss code on tensors.
"""
