"""finetune: turn a Phi base model into an instruct model with LoRA (SFT, reward, DPO, PPO, export)."""

__version__ = "0.1.0"
