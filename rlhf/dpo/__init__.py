"""`rlhf dpo`: direct preference optimisation on the merged model (step.py: the command; trainer.py: the loop;
loss.py: the maths; data.py: the pairs)."""
