"""The GRPO peer: TRL 1.16's GRPOTrainer, set up as its documentation shows for LoRA with a reward model
(`GRPOTrainer(model, reward_funcs=<AutoModelForSequenceClassification>, args=GRPOConfig(...),
peft_config=LoraConfig(...))`): the policy is the base with a LoRA adapter (the reference, with beta > 0, the
same model with the adapter disabled), and the reward model is a second, separate copy of the base with a score
head. Runs in the project's environment (TRL 1.16 is the project's TRL).

Same prompts (the same rendered chat prompts ours tokenizes), group size, completion length (every completion
runs the full length: min_new_tokens = max_completion_length, as ours is given a stop id it cannot sample),
temperature, LoRA, learning rate and one optimiser step per update on every completion at once. Timing hooks:
`_generate` (generation), `_generate_and_score_completions` minus generation (rewards, log-probs: scoring),
the rest of the step (optimisation).
"""

from __future__ import annotations

import time


def make_trainer(model, reward_model, tokenizer, prompts: list[list[dict]], s: dict, steps: int, out: str, precision):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    k, batch = s["grpo_generations"], s["ppo_batch"]
    args = GRPOConfig(
        output_dir=out,
        num_generations=k,
        per_device_train_batch_size=batch * k,  # every completion of an update in one step, as ours
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=s["response_length"],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=1e-4,
        max_steps=steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not __import__("torch").cuda.is_available(),
        generation_kwargs={"min_new_tokens": s["response_length"]},
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        peft_config=lora,
    )


class Timer:
    """Seconds per update spent generating, scoring and optimising, from hooks on the trainer."""

    def __init__(self, trainer, sync):
        from transformers import TrainerCallback

        self.generate, self.score, self.steps = [], [], []
        self.sync = sync
        timer = self
        inner_generate, inner_score = trainer._generate, trainer._generate_and_score_completions

        def generate(*a, **kw):
            sync()
            t = time.perf_counter()
            out = inner_generate(*a, **kw)
            sync()
            timer.generate.append(time.perf_counter() - t)
            return out

        def score(*a, **kw):
            sync()
            t = time.perf_counter()
            out = inner_score(*a, **kw)
            sync()
            timer.score.append(time.perf_counter() - t - timer.generate[-1])
            return out

        trainer._generate, trainer._generate_and_score_completions = generate, score

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                timer._start, timer._cpu = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                timer.steps.append((time.perf_counter() - timer._start, time.process_time() - timer._cpu))

        trainer.add_callback(Callback())
