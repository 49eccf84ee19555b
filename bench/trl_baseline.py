"""What the three TRL baselines (sft_baseline.py, dpo_baseline.py, reward_baseline.py) share: the LoRA every arm
trains, the TrainingArguments they all set the same way, and the trainer built as TRL's docs show it (the
model, its config, the rows as a datasets.Dataset, the LoRA as `peft_config`). Each baseline adds only what
its trainer offers for the job (`extra`)."""

from __future__ import annotations

PHI_MODULES = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]  # ours: lora.target_modules auto on phi


def build(
    trainer_class,
    config_class,
    task: str,
    model,
    tokenizer,
    rows,
    batch: int,
    max_length: int,
    steps: int,
    precision: str,
    output_dir: str,
    callbacks=(),
    liger: bool = False,
    **extra,
):
    """`trainer_class(model, args=config_class(...), train_dataset, processing_class, peft_config)` with the
    LoRA and settings every arm shares (r 16, alpha 32, lr 1e-4, no saving, no logging) plus `extra`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type=task, target_modules=PHI_MODULES)
    if liger:
        extra["use_liger_kernel"] = True
    args = config_class(
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
    return trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
