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


def make_trainer(
    model,
    tokenizer,
    rows,
    batch,
    max_length,
    steps,
    precision,
    output_dir,
    callbacks=(),
    tuned: bool = False,
    liger: bool = False,
):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    )
    extra = dict(precompute_ref_log_probs=True, gradient_checkpointing=False) if tuned else {}
    if liger:
        extra["use_liger_kernel"] = True
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_length=max_length,
        max_steps=steps,
        learning_rate=1e-4,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        save_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=42,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
