"""What every RL step (PPO, GRPO) shares: data parallelism, prompts, the policy's passes, rollouts, checkpoints and
evaluation. The algorithms live beside it (`rlhf.ppo`); none of this knows which one is running."""
