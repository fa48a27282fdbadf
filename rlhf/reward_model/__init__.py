"""`rlhf reward`: a reward model learned from preference pairs, as a LoRA adapter + score head on the merged model.

loss.py     the maths, pure functions on score tensors: the pairwise loss, accuracy, margins
data.py     preference pairs (prompt/chosen/rejected) loaded, checked and tokenized with the policy's tokenizer
files.py    what a reward model directory holds (read without torch)
model.py    the score head, scoring the last real token, the base's fingerprint, and the reward PPO uses: the
            adapter switched on in the policy's own model (`SharedBaseReward`)
trainer.py  the training loop: setup, steps, checkpoints, evaluation
step.py     the command's flow: checks, budget, train, save, evaluate before and after
"""
