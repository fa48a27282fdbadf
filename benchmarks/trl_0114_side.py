"""The trl 0.11.4 side of benchmarks/ppo_vs_trl.py: the blog's PPO loop, timed step by step.

Runs in its own virtual environment (trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.1.1, CPU torch), so
it imports nothing of rlhf. It reads the job the parent wrote (model, classifier, prompts, settings), runs
`warmup + steps` PPO steps the way the blog's script does (`ppo_trainer.generate` -> sentiment pipeline ->
`ppo_trainer.step`), and prints one `RESULT {json}` line.

    python trl_0114_side.py JOB.json batched|one-at-a-time
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tokenizer_from(path: str):
    """The fixtures' tokenizer_config.json names a transformers 5 class; the tokenizer.json itself loads anywhere."""
    from transformers import PreTrainedTokenizerFast

    special = json.loads((Path(path) / "tokenizer_config.json").read_text())
    kwargs = {k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special.get(k)}
    return PreTrainedTokenizerFast(
        tokenizer_file=str(Path(path) / "tokenizer.json"), model_input_names=["input_ids", "attention_mask"], **kwargs
    )


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    mode = sys.argv[2]
    s = job["settings"]

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, pipeline
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(0)
    t_setup = time.perf_counter()
    tokenizer = tokenizer_from(job["model"])
    tokenizer.pad_token = tokenizer.eos_token  # as the blog does
    config = PPOConfig(
        model_name=job["model"],
        learning_rate=s["learning_rate"],
        batch_size=s["batch_size"],
        mini_batch_size=s["mini_batch_size"],
        ppo_epochs=s["ppo_epochs"],
        gradient_accumulation_steps=1,
        init_kl_coef=s["init_kl_coef"],
        adap_kl_ctrl=True,
        target=s["target_kl"],
        horizon=s["kl_horizon"],
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        max_grad_norm=s["max_grad_norm"],
        seed=0,
        log_with=None,
    )
    lora = LoraConfig(
        r=s["lora_rank"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=0.0,
        target_modules=s["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        job["model"], peft_config=lora, torch_dtype=getattr(torch, s["dtype"])
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    classifier = AutoModelForSequenceClassification.from_pretrained(job["classifier"])
    sentiment = pipeline(
        "sentiment-analysis", model=classifier, tokenizer=tokenizer_from(job["classifier"]), device="cpu"
    )
    setup = time.perf_counter() - t_setup
    n = s["new_tokens"]
    # Exactly n tokens per response on both sides: EOS is held off until n (min_new_tokens) and nothing is cut.
    gen_kwargs = dict(
        top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=tokenizer.eos_token_id,
        max_new_tokens=n, min_new_tokens=n,
    )  # fmt: skip
    rows = []
    for step, prompts in enumerate(job["prompts"][: s["warmup"] + s["steps"]]):
        queries = [torch.tensor(p) for p in prompts]
        t0 = time.perf_counter()
        if mode == "batched":
            responses = trainer.generate(
                queries, batch_size=len(queries), return_prompt=False, remove_padding=False, **gen_kwargs
            )
        else:  # the blog's loop: one query at a time
            responses = [trainer.generate(q, return_prompt=False, **gen_kwargs).squeeze(0) for q in queries]
        t1 = time.perf_counter()
        texts = [tokenizer.decode(q) + tokenizer.decode(r) for q, r in zip(queries, responses)]
        outputs = sentiment(texts, top_k=None, function_to_apply="none", batch_size=s["reward_batch_size"])
        rewards = [torch.tensor(next(o["score"] for o in out if o["label"] == "POSITIVE")) for out in outputs]
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, rewards)
        t3 = time.perf_counter()
        tokens = sum(len(r) for r in responses)
        rows.append(
            {
                "total": t3 - t0,
                "generate": t1 - t0,
                "reward": t2 - t1,
                "forward": float(stats["time/ppo/forward_pass"]),
                "train": float(stats["time/ppo/optimize_step"]),
                "tokens": tokens,
                "kl": float(stats["objective/kl"]),
            }
        )
        print(f"   trl {mode} step {step}: {rows[-1]['total']:.2f} s", flush=True)
    measured = rows[s["warmup"] :]
    import peft
    import transformers
    import trl

    print(
        "RESULT "
        + json.dumps(
            {
                "side": f"trl-{mode}",
                "steps": measured,
                "warmup": sum(r["total"] for r in rows[: s["warmup"]]),
                "setup": setup,
                "peak_rss": peak_rss(),
                "versions": {
                    "trl": trl.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "torch": torch.__version__,
                },
            }
        ),
        flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
