"""Baseline reward model: what a user writes with TRL alone. Same model (a one-output sequence-classification
head on the same backbone), LoRA, batch, max_length and pairs as our stage.

- `tuned=False`: TRL's defaults (TRL tokenizes the conversational rows; padded batches; gradient
  checkpointing on).
- `tuned=True`: everything TRL 1.16 offers for this job: gradient checkpointing off and the same attention
  kernel as ours. RewardConfig has no padding-free or packing option, so batches are padded to their
  longest sequence (`pad_to_multiple_of` stays off: rounding up only adds padding).
"""

from __future__ import annotations


def make_trainer(*common, tuned: bool = False, **kwargs):
    """The baseline trainer: `common` and `kwargs` are bench.trl_baseline.build's (model, tokenizer, rows, batch,
    max_length, steps, precision, output_dir, callbacks, liger)."""
    from trl import RewardConfig, RewardTrainer

    from bench.trl_baseline import build

    extra = dict(gradient_checkpointing=False) if tuned else {}
    return build(RewardTrainer, RewardConfig, "SEQ_CLS", *common, **kwargs, **extra)
