"""Baseline DPO: what a user writes with TRL alone. Same model, LoRA, batch, max_length and pairs as
our stage; TRL's defaults otherwise (TRL tokenizes the conversational rows; the reference is the base
with the adapter disabled, run every step)."""

from __future__ import annotations


def make_trainer(model, tokenizer, rows, batch, max_length, steps, precision, output_dir, callbacks=()):
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
    )
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
