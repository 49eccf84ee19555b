"""finetune: turn a Phi base model into an instruct model with LoRA (SFT, reward, DPO, PPO, export)."""

import logging

# bitsandbytes warns on every import on CPUs with AVX512-BF16 that an optional hub kernel is
# missing; it is irrelevant unless a 4-bit model runs on the CPU, which finetune never does.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
