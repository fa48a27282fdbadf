"""How rlhf checkpoints activations: `rlhf.modeling` enables it with these arguments, and the memory budget reads them
to predict what a training step keeps. Torch-free, so that `rlhf budget` need not import torch to know."""

# Reentrant checkpointing: bitsandbytes keeps each int8 matmul's input on its autograd ctx rather than through
# save_for_backward, which non-reentrant checkpointing cannot drop, so every layer's input would stay alive
# (3.6 GiB on gpt-neox-20b at 1024 tokens).
CHECKPOINT_KWARGS = {"use_reentrant": True}
