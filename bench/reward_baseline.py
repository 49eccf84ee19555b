"""Baseline reward model: what a user writes with TRL alone. Same model (a one-output sequence-classification
head on the same backbone), LoRA, batch, max_length and pairs as our stage.

- `tuned=False`: TRL's defaults (TRL tokenizes the conversational rows; padded batches; gradient
  checkpointing on).
- `tuned=True`: everything TRL 1.16 offers for this job: gradient checkpointing off and the same attention
  kernel as ours. RewardConfig has no padding-free or packing option, so batches are padded to their
  longest sequence (`pad_to_multiple_of` stays off: rounding up only adds padding).
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
    from trl import RewardConfig, RewardTrainer

    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type="SEQ_CLS",
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    )
    extra = dict(gradient_checkpointing=False) if tuned else {}
    if liger:
        extra["use_liger_kernel"] = True
    args = RewardConfig(
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
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
