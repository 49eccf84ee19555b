"""Baseline DPO: what a user writes with TRL alone. Same model, LoRA, batch, max_length and pairs as
our stage.

- `tuned=False`: TRL's defaults (TRL tokenizes the conversational rows; the reference is the base
  with the adapter disabled, run every step; gradient checkpointing on).
- `tuned=True`: everything TRL 1.16 offers for this job: reference log-probs precomputed once before
  training (`precompute_ref_log_probs`, one process), gradient checkpointing off, the same attention
  kernel as ours, the fused LM head (always on). Padding-free DPO is disabled in TRL 1.16 (trl#6972:
  it logs a fallback to padding), so it is not switched on.
- `liger=True`: `use_liger_kernel=True` (see sft_baseline.py: no Liger fused cross-entropy in TRL 1.16).
"""

from __future__ import annotations


def make_trainer(*common, tuned: bool = False, **kwargs):
    """The baseline trainer: `common` and `kwargs` are bench.trl_baseline.build's (model, tokenizer, rows, batch,
    max_length, steps, precision, output_dir, callbacks, liger)."""
    from trl import DPOConfig, DPOTrainer

    from bench.trl_baseline import build

    extra = dict(precompute_ref_log_probs=True, gradient_checkpointing=False) if tuned else {}
    return build(DPOTrainer, DPOConfig, "CAUSAL_LM", *common, **kwargs, **extra)
