"""Baseline SFT: what a user writes with TRL alone. Same model, LoRA, batch, max_length and rows as
our stage.

- `tuned=False`: TRL's defaults (conversational rows tokenized by TRL, padded batches, no packing,
  gradient checkpointing on): what most scripts run.
- `tuned=True`: everything TRL 1.16 offers for this job switched on: packing (`bfd`, whole
  conversations, which makes TRL padding-free: every batch flattened into one row with position ids
  restarting per sequence), gradient checkpointing off, the same attention kernel as ours (the model
  is built by bench/models.py for both), and TRL's fused LM head (always on in 1.16: log-probs in tiles,
  never the full logits). `packing=False` with the rest tuned is `tuned="nopack"` (padded batches),
  the better TRL choice on SDPA, where one flattened row of B*L tokens attends over (B*L)^2.
- `liger=True`: `use_liger_kernel=True`, the only Liger switch TRL 1.16 has (it refuses Liger's fused
  linear cross-entropy, which its own fused LM head replaces; Liger has layer kernels for Phi-3, none
  for Phi-2's `phi` model type).
"""

from __future__ import annotations


def make_trainer(*common, tuned: bool | str = False, **kwargs):
    """The baseline trainer: `common` and `kwargs` are bench.trl_baseline.build's (model, tokenizer, rows, batch,
    max_length, steps, precision, output_dir, callbacks, liger)."""
    from trl import SFTConfig, SFTTrainer

    from bench.trl_baseline import build

    extra = {}
    if tuned:
        extra = dict(packing=tuned != "nopack", packing_strategy="bfd", gradient_checkpointing=False)
    return build(SFTTrainer, SFTConfig, "CAUSAL_LM", *common, **kwargs, **extra)
