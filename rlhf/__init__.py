"""rlhf: RLHF-tune a 20B language model on one 24 GB GPU — 8-bit LoRA SFT, a streaming merge, PPO, a memory budget."""

import logging as _logging

# bitsandbytes logs at import that an optional CPU 4-bit kernel package is missing; rlhf does not use it.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

__version__ = "0.1.0"
