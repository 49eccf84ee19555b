"""Trainer settings shared by the TRL-based stages: one mapping from recipe to TRL config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune.readers import read_json
from finetune.recipe import STAGES, Recipe, RecipeError

from . import distributed, lineage, ownership, stopping, tracking
from .batching import PACKED_KEYS, PackingCollator, row_tokens
from .data import to_preference, tokenize_preferences, train_eval_rows
from .lineage import start_chain
from .modeling import base_fingerprint, load_tokenizer, template_for, use_loraplus
from .outputs import commit_dir, discard, save_adapter, staging_dir, write_json, write_stage_files
from .progress import Progress, duration, library_bars_off, progress, step_line
from .resume import choose_checkpoint, hf_beyond, run_identity

log = logging.getLogger(__name__)


def check_precision(recipe: Recipe) -> None:
    """fp16 / bf16 mixed precision needs hardware that has it; say so before loading anything."""
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            f"{recipe.source}: precision: fp16 training needs a CUDA GPU and none is visible; on CPU override "
            "precision=fp32 (or bf16)"
        )


def trackers(recipe: Recipe) -> list[str] | str:
    """The report_to of a TRL config: only the trackers finetune does not write itself. tensorboard,
    mlflow and wandb (mlflow added inside an Azure ML job) are written by finetune.core.tracking, fed by
    `train` below, with the names and grouping every stage shares."""
    return tracking.for_transformers(recipe)


def trl_config(recipe: Recipe, stage: str, config_cls, **fixed):
    """The stage's TRL config: the keys the recipe owns elsewhere (output_dir, seed, precision, ...), then the
    stage's TRL settings in their one order of precedence (Recipe.trl_settings: finetune's defaults, the
    stage's registry defaults, the recipe), then `fixed`."""
    kwargs = dict(
        output_dir=str(recipe.checkpoint_dir(stage)),
        seed=recipe.seed,
        data_seed=recipe.seed,
        fp16=recipe.precision == "fp16",
        bf16=recipe.precision == "bf16",
        # the file as finetune.readers read it when the recipe loaded (a byte-order mark accepted, a key given
        # twice refused); transformers' own json.load would fail on the one and keep the last of the other
        deepspeed=read_json(recipe.resolve_path(recipe.deepspeed), RecipeError) if recipe.deepspeed else None,
        logging_steps=recipe.logging.logging_steps,
        report_to=trackers(recipe),
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(recipe.trl_settings(stage, distributed.world_size()))
    kwargs.update(fixed)
    config = config_cls(**kwargs)
    config.device  # noqa: B018 (sets up the processes: torch.distributed is initialised from here on)
    if not config.save_on_each_node and distributed.node_local(recipe.output_path(recipe.output_dir)):
        # Each node has its own output folder: the Trainer saves checkpoints on every node's local rank 0
        # (and tells DeepSpeed checkpoint.use_node_local_storage), so a resumed run finds them on every node.
        # Built again because TrainingArguments reads it into the DeepSpeed config as it is made.
        config = config_cls(**{**kwargs, "save_on_each_node": True})
        log.info("%s: output_dir is on each node's own disk: every node saves its checkpoints and output", stage)
        if config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            log.warning(
                "%s: FSDP's sharded checkpoints cannot be resumed from node-local folders (torch.distributed"
                ".checkpoint writes its index on rank 0 only); the run and its output are fine, a resume is refused. "
                "Share the output folder between the nodes to resume, or use DeepSpeed",
                stage,
            )
    return config


def place_for_eval(model, args, recipe: Recipe):
    """Put the model on the training device before the pre-training held-out checks. The Trainer
    leaves the model where it is under DeepSpeed until train() starts, which would run the
    "before" evaluation of Phi-2 on the CPU (and all-reduce a CPU tensor over NCCL)."""
    if not recipe.model.load_in_4bit:  # a 4-bit model is placed by its device_map and cannot move
        model.to(args.device)
    return model


def resume_checkpoint(recipe: Recipe, stage: str, args, rows: list[dict], start: list[str]) -> Path | None:
    """The checkpoint a TRL stage continues from (core.resume's rules: the newest complete one of the same
    run), decided before the model loads so that a refusal comes at once."""
    identity = run_identity(recipe, stage, rows, start)
    return choose_checkpoint(
        recipe, stage, recipe.section(stage).resume, identity, beyond=hf_beyond(recipe, stage, args)
    )


class StepLog(TrainerCallback):
    """The Trainer's progress and logs in finetune's one style (finetune.core.progress): a bar at a
    terminal or timed lines elsewhere, and at each logging step one line
    `dpo     step 10/40  loss 0.3545  lr 9.6e-04  reward acc 0.9  margin 1.2  grad norm 0.8`
    instead of transformers' ProgressCallback / PrinterCallback dictionaries (which `verbose` prints too)."""

    def __init__(self, stage: str, verbose: bool = False):
        self.stage, self.verbose = stage, verbose
        self.bar: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress(
                f"{self.stage} training", total=state.max_steps, initial=state.global_step, unit="steps", announce=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.set(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "train_runtime" in logs:  # the Trainer's closing summary
            line = (
                f"{self.stage:<7} trained {state.global_step} steps in {duration(logs['train_runtime'])}, "
                f"mean loss {logs.get('train_loss', float('nan')):.4g}"
            )
        else:
            lr = logs.get("learning_rate")
            figures = {"loss": logs.get("loss"), "lr": None if lr is None else f"{lr:.2e}"}
            figures.update({label: logs.get(key) for key, label in STAGES[self.stage].step_figures})
            figures["epoch"] = round(logs["epoch"], 2) if "epoch" in logs else None
            line = step_line(self.stage, state.global_step, state.max_steps, figures)
            if logs.get("loss") is not None:
                self.bar.postfix = {"loss": f"{logs['loss']:.4g}"}
        self.bar.write(line)
        if self.verbose:
            self.bar.write(str({k: v for k, v in logs.items() if k != "total_flos"}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class DeepSpeedLatestOnEveryNode(TrainerCallback):
    """DeepSpeed writes a checkpoint's `latest` file (the tag its loader reads) on global rank 0 only, also with
    checkpoint.use_node_local_storage (deepspeed/runtime/engine.py, save_checkpoint). With an output folder on
    each node's own disk the other nodes' checkpoints would then have none, and a resumed run would refuse them
    (finetune.core.resume) or DeepSpeed would load nothing. Each node's local rank 0 writes it after the save."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_local_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tag = f"global_step{state.global_step}"
        if (folder / tag).is_dir() and not (folder / "latest").is_file():
            (folder / "latest").write_text(tag)


def use_step_log(trainer, stage: str, verbose: bool = False) -> None:
    """Swap the Trainer's own progress and log printing for StepLog (idempotent)."""
    for cls in (ProgressCallback, PrinterCallback, StepLog):
        trainer.remove_callback(cls)
    trainer.add_callback(StepLog(stage, verbose))


LOSS_LEDGER = "finetune_loss.json"  # in each Trainer checkpoint: the training loss summed over every step so far


class StopAndLedger(TrainerCallback):
    """Two things the Trainer does not do. SIGTERM (core.stopping): at the end of the step, save a checkpoint
    and stop. A resumed run's training loss: the Trainer reports the mean over the steps of this session only
    (transformers Trainer._finalize_training: `_total_loss_scalar` restarts at 0 on resume), so each checkpoint
    records the sum over every step so far, and the resumed run adds to it: the figure equals an unbroken run's."""

    def __init__(self, trainer, before: float):
        self.trainer, self.before, self.stopped = trainer, before, False

    def session_sum(self) -> float:
        return self.trainer._total_loss_scalar + self.trainer._tr_loss.item()

    def on_step_end(self, args, state, control, **kwargs):
        if stopping.stop_now(args.device):
            control.should_save = control.should_training_stop = self.stopped = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(folder / LOSS_LEDGER, {"loss_sum": self.before + self.session_sum(), "step": state.global_step})


def loss_before(checkpoint: Path | None) -> float:
    """The training loss summed over the steps a checkpoint has trained: its ledger, else (a checkpoint written
    before ledgers) the logged window means times their widths from its trainer_state.json."""
    if checkpoint is None:
        return 0.0
    ledger = Path(checkpoint) / LOSS_LEDGER
    if ledger.is_file():
        return float(json.loads(ledger.read_text())["loss_sum"])
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    total, last = 0.0, 0
    for row in state.get("log_history", []):
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - last)
            last = row["step"]
    return total


def train(trainer, model, recipe: Recipe, stage: str, checkpoint: Path | None) -> dict:
    """Run the trainer (from `checkpoint` when given: see resume_checkpoint) and report it, including
    whether the frozen base stayed bitwise equal (sha256 of its parameters before and after). A resumed run
    reports the training loss over every step, as an unbroken run does; SIGTERM stops it after a checkpoint."""
    use_step_log(trainer, stage, recipe.logging.verbose)
    use_loraplus(trainer, recipe)
    if trainer.args.save_on_each_node and trainer.is_deepspeed_enabled:
        trainer.add_callback(DeepSpeedLatestOnEveryNode())
    fingerprint = base_fingerprint(model)
    if tracking.current().active:
        trainer.add_callback(tracking.trainer_callback(tracking.current()))
    before = loss_before(checkpoint)
    watch = StopAndLedger(trainer, before)
    trainer.add_callback(watch)
    started = time.time()
    with stopping.checkpointable():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.time() - started
    if watch.stopped:
        raise stopping.Terminated(f"{stage} saved a checkpoint at step {trainer.state.global_step}")
    after = base_fingerprint(model)
    if after != fingerprint:
        log.error("%s: the frozen base changed during training (fingerprint %s -> %s)", stage, fingerprint, after)
    steps = trainer.state.global_step
    session = result.training_loss * (steps - trainer._initial_global_step)
    return {
        "train_loss": (before + session) / max(steps, 1),
        "train_runtime_s": runtime,
        "global_steps": steps,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "base_fingerprint": fingerprint,
        "base_unchanged": after == fingerprint,
    }


class PaddingFree:
    """Padding-free batches for a TRL preference trainer (DPO, reward): mixed in before the trainer class,
    with `packed_forward` given by the stage.

    The trainer's own collator is wrapped in batching.PackingCollator, so a batch is TRL's padded batch plus
    the same sequences packed. Where the trainer runs its model on a batch, the subclass wraps the call in
    `packed(batch)`: the packed tensors leave the batch, and for that call the innermost model's forward
    becomes `packed_forward(model, original forward, packed)`, which runs the packed sequences and returns
    what the original returns for the padded batch (per-sequence figures laid back out in its shape). TRL's
    loss, metrics and every loss type run unchanged on that; only the FLOPs spent on padding are gone.

    Rows hold several sequences each on SDPA / eager (block-diagonal mask from the position ids), up to
    batching.row_tokens; with a FlashAttention kernel everything is one row (varlen needs one row: with
    several, FlashAttention would treat each row as one causal sequence)."""

    _pack_batches = False  # set from the recipe before the trainer's __init__ (TRL reads the collator in it)

    def _use_packing(self) -> None:
        """Wrap the collator TRL built (idempotent: TRL's reference pre-pass runs inside its __init__)."""
        if self._pack_batches and not isinstance(self.data_collator, PackingCollator):
            config = self._inner(self.model).config
            attn = str(getattr(config, "_attn_implementation", ""))
            pad_id = self.processing_class.pad_token_id
            capacity = row_tokens(config.get_text_config())
            self.data_collator = PackingCollator(self.data_collator, pad_id, one_row="flash" in attn, capacity=capacity)

    def _inner(self, model):
        """The transformers model under accelerate's and PEFT's wrappers: the one whose forward runs the layers."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @contextlib.contextmanager
    def packed(self, batch: dict):
        """Within this block, model calls on `batch` (which loses its packed keys) run on its packed form."""
        packed = {key: batch.pop(key) for key in PACKED_KEYS if key in batch}
        if not packed:
            yield
            return
        ref = getattr(self, "ref_model", None)  # DPO with an explicit reference model
        models = {id(m): m for m in (self._inner(self.model), ref and self._inner(ref)) if m is not None}
        swapped = []
        try:
            for model in models.values():
                own = model.__dict__.get("forward")  # TRL's fused LM head is an instance attribute; else the class's
                model.forward = self.packed_forward(model, model.forward, packed)
                swapped.append((model, own))
            yield
        finally:
            for model, own in swapped:
                if own is None:
                    del model.forward
                else:
                    model.forward = own

    def packed_forward(self, model, original, packed: dict):
        raise NotImplementedError


class ReferenceIsTheStart:
    """Mixin for TRL's DPOTrainer and KTOTrainer on a new LoRA adapter, whose reference is the start model
    (the adapters disabled): TRL's reference pass (`precompute_ref_log_probs`) reported like every other phase,
    and no copied "ref" adapter in the reference forwards."""

    _ref_bar = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_copied_reference_adapter()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's pass of the reference over the data, reported like every other phase: its own tqdm bar is off
        (it reads TQDM_DISABLE) and batches are counted in compute_ref_log_probs below."""
        batches = -(-len(dataset) // (batch_size * distributed.world_size()))
        self._drop_copied_reference_adapter()  # runs inside the trainer's __init__, after TRL's copy
        stage = getattr(self, "finetune_stage", "reference")
        try:
            with (
                library_bars_off(),
                progress(f"{stage} reference log-probs ({name})", total=batches, unit="batches") as self._ref_bar,
            ):
                return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._ref_bar = None

    def compute_ref_log_probs(self, model, batch):
        out = super().compute_ref_log_probs(model, batch)
        if self._ref_bar is not None:
            self._ref_bar.update(1)
        return out

    def _drop_copied_reference_adapter(self):
        """Given a PeftModel, TRL 1.16 copies its adapter into a frozen "ref" adapter and runs every reference
        forward through it. Our adapter is new (lora_B = 0), so that copy is exactly the model with adapters
        disabled, at the price of the LoRA matmuls in every reference forward (bench/run.py --stage dpo: the
        reference pass took 1.5x as long). Without "ref", TRL disables the adapters for the reference, the
        reference these stages document. A copy of a trained adapter (any lora_B non-zero) is kept: then it
        is the reference."""
        model = self.accelerator.unwrap_model(self.model)
        if "ref" not in getattr(model, "peft_config", {}):
            return
        if any(p.detach().any() for n, p in model.named_parameters() if ".ref." in n and "lora_B" in n):
            return
        model.delete_adapter("ref")


@dataclass
class PreferenceSetup:
    """What the preference stages (reward, DPO, KTO, ORPO) share before their model is built."""

    stage: str
    start: list[str]
    template: object
    tokenizer: object
    args: object
    pairs: dict  # name -> datasets.Dataset of tokenized rows (prompt_ids / chosen_ids / rejected_ids, or KTO's)
    eval_rows: list[dict]
    reports: dict  # name -> DataReport
    checkpoint: Path | None = None  # where training continues from (None: from the start)

    @property
    def main_process(self) -> bool:
        return distributed.is_main()

    def data_metrics(self) -> dict:
        train, evals = self.reports["train"], self.reports["eval"]
        unit = STAGES[self.stage].unit  # pairs, or rows (KTO's unpaired replies)
        return {
            f"train_{unit}": len(self.pairs["train"]),
            f"eval_{unit}": len(self.pairs["eval"]),
            "skipped_bad_rows": train.skipped_bad + evals.skipped_bad,
            "skipped_identical_pairs": train.skipped_useless + evals.skipped_useless,
            "dropped_overlong_rows": train.dropped_overlong + evals.dropped_overlong,
            "eval_rows_left_out": evals.left_out,
            "start_from": self.start,
        }

    def data_summary(self) -> str:
        return "; ".join(report.summary(name) for name, report in self.reports.items())


def prepare_preference_stage(
    recipe: Recipe, stage: str, config_cls, convert=to_preference, tokenize=tokenize_preferences
) -> PreferenceSetup:
    """Checks, seed, tokenizer, TRL config and tokenized rows for a preference stage: rows read with `convert`
    (default: preference pairs) and tokenized with `tokenize`. A stage with a `start_from` key starts from that
    adapter chain; one without (ORPO) from the base."""
    from transformers import set_seed

    section = recipe.section(stage)
    check_precision(recipe)
    start = start_chain(recipe, stage) if "start_from" in type(section).model_fields else []
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    args = trl_config(recipe, stage, config_cls, eval_strategy="no")
    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed, convert)
    reports = {"train": train_report, "eval": eval_report}
    pairs = {
        name: tokenize(rows, tokenizer, template, args.max_length, section.data.on_overlong, reports[name], name)
        for name, rows in (("train", train_rows), ("eval", eval_rows))
    }
    checkpoint = resume_checkpoint(recipe, stage, args, train_rows, start)
    setup = PreferenceSetup(stage, start, template, tokenizer, args, pairs, eval_rows, reports, checkpoint)
    log.info(setup.data_summary())
    return setup


def save_stage(
    trainer,
    recipe: Recipe,
    stage: str,
    tokenizer,
    metrics: dict,
    *,
    samples: list[dict] | None = None,
    reports: dict | None = None,
) -> Path:
    """Write `<output_dir>/<stage>/` atomically: adapter (and any saved head), tokenizer with its chat
    template, resolved recipe, metrics.json (with what the output is made from: core.lineage.stamp),
    log_history.json, dropped_rows.jsonl (from `reports`). Every launched process calls this; the main one
    writes."""
    out, kind = recipe.stage_dir(stage), ownership.stage_kind(stage)
    writer = distributed.writes_output(recipe.output_path(recipe.output_dir))
    # every writer (one per node when each node has its own output folder) writes the main process's figures
    metrics, samples = distributed.broadcast_from_main((metrics, samples))
    tmp = staging_dir(out, kind, reset=writer)
    trainer.accelerator.wait_for_everyone()
    # adapter only (PEFT); every process takes part under DeepSpeed ZeRO-3 and FSDP (the weights are gathered),
    # and the Trainer writes on rank 0, or on every node's local rank 0 with save_on_each_node
    save_adapter(trainer, tmp)
    failure, error = None, None
    if writer:
        try:
            tokenizer.save_pretrained(str(tmp))  # includes the chat template
            # the training curves (loss, lr, ... per logging step), for the pipeline's plot
            write_json(tmp / "log_history.json", trainer.state.log_history)
            stamped = lineage.stamp(recipe, stage, metrics, lineage.upstream(recipe, stage))
            write_stage_files(tmp, recipe, stamped, samples=samples, reports=reports)
            commit_dir(tmp, out, kind)
        except Exception as e:  # tell the other processes instead of leaving them waiting at the barrier
            failure, error = f"{type(e).__name__}: {e}", e
            discard(tmp)  # a half-written staging folder only takes space
    failure = distributed.broadcast_from_main(failure)
    if error is not None:
        raise error  # the original (its errno says e.g. "disk full")
    if failure:
        raise RuntimeError(f"saving {out} failed on the main process: {failure}")
    return out
