"""Evaluation metrics as `evaluate` modules shipped with rlhf and loaded by path: hub-hosted metrics do not load
offline (`evaluate.load("name")` fetches code from the hub)."""
