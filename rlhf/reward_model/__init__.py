"""`rlhf reward`: a reward model learned from preference pairs, as a LoRA adapter + score head on the merged model.

loss.py     the maths, pure functions on score tensors: the pairwise loss, accuracy, margins
data.py     preference pairs (prompt/chosen/rejected) loaded, checked and tokenized with the policy's tokenizer
trainer.py  the training loop: setup, steps, checkpoints, evaluation
step.py     the command's flow: checks, budget, train, save, evaluate before and after

What the RL steps also use (the score head, scoring the last real token, the base's fingerprint, the reward adapter
switched on in the policy's own model, what a reward model directory holds) lives in `rlhf.rl.reward` and
`rlhf.rl.reward_files`, so that `rlhf.rl` depends on no step.
"""
