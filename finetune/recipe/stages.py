"""The stage registry: every stage declared once, with every fact about it.

The recipe schema (its stage sections), the CLI (commands and help), the pipeline (order, what each
stage starts from, `--plan`'s figures), export and eval (which outputs are models), the summaries
(headline metrics, step lines), the memory estimate (what a stage holds), the TRL settings
(finetune's defaults, value ranges) and Azure ML (job inputs) all read this list. Adding a stage is one
`register(Stage(...))` plus the stage's module, whose `main(argv)` runs it (`finetune.launch.stage_main`
does the argument parsing); nothing outside the registry and the stage's own module names a stage
(tests/test_structure.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .sections import (
    DpoSection,
    EvalSection,
    ExportSection,
    GrpoSection,
    KtoSection,
    OrpoSection,
    PpoSection,
    RewardSection,
    SftSection,
)
from .trl_fields import Range, positive


@dataclass(frozen=True)
class Memory:
    """What one process of a stage holds, for the memory estimate (finetune.core.memory reads it; the
    arithmetic of each part is there, docs/memory.md)."""

    sequences: int = 1  # sequences forwarded per training row (2: chosen and rejected of a pair)
    lm_logits: bool = True  # vocabulary logits with gradients (False: a one-output score head)
    score_head: bool = False  # a sequence classifier: the LM head is not loaded
    reference: bool = False  # a reference forward without gradients beside the policy's (DPO, KTO)
    adapters: int = 1  # LoRA adapters held
    trained: int = 1  # ... of which trained (fp32 gradients + AdamW moments)
    rollout: bool = False  # samples responses (KV cache) and trains on micro-batches of them (PPO)
    merge_only: bool = False  # no training: merges adapters into the base on the CPU in fp32 (export)
    lm_eval: bool = False  # no training: benchmarks one model at a time (eval)
    held_out_loss: bool = True  # a held-out pass with vocabulary logits (loss, log-probs)
    runtime_cpu_gib: float = 0.55  # interpreter + libraries + data on a CPU run (calibrated: docs/memory.md)


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # importable module whose main(argv) runs the stage; its file is what `accelerate launch` runs
    section: type[BaseModel]  # the recipe section `<name>:`
    help: str  # one line for `finetune --help`
    trl_config: tuple[str, str] | None = None  # (module, class) whose fields the section also takes
    # Earlier stages this one reads: {earlier stage: the section key whose default points at its output}.
    # None marks an output needed only as part of an adapter chain (the DPO adapter was trained on the SFT
    # model, so PPO needs the SFT adapter too). Stages with `takes_models` read every model stage instead.
    inputs: dict[str, str | None] = field(default_factory=dict)
    takes_models: bool = False  # reads every earlier model stage's output (export, eval): inputs are derived
    chat_model: bool = False  # its output is a chat model (exportable, answers held-out prompts)
    has_data: bool = True  # the section has a `data:` block
    default_section: bool = False  # present with defaults when the recipe has no section (export)
    launcher: bool = True  # may run under `accelerate launch` (export never needs it)
    # (label, metrics.json key before, key after) of the headline figure; correctness keys (start, end).
    headline: tuple[str, str | None, str] | None = None
    correctness: tuple[str, str] | None = None
    summary_title: str = ""
    # Optional libraries the stage imports: (module, how to install it). The pipeline checks them before
    # it runs anything, so a missing one stops it at once instead of after the stages before it.
    requires: tuple[tuple[str, str], ...] = ()
    # finetune's defaults over the stage's TRL config (a recipe value wins); `one_process_defaults` apply only
    # when the stage runs as one process (DPO's precomputed reference log-probs fail under several in TRL 1.16).
    defaults: dict[str, Any] = field(default_factory=dict)
    one_process_defaults: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, Range] = field(default_factory=dict)  # this stage's own value ranges (e.g. DPO's beta)
    step_figures: tuple[tuple[str, str], ...] = ()  # (Trainer log key, label) on the one-line step log
    memory: Memory = field(default_factory=Memory)
    unit: str = "rows"  # what one training row is, in --plan ("rows", "pairs", "prompts")
    output_key: str | None = None  # a section key that moves the stage's output folder (export.output)
    model_choice: str | None = None  # a section key naming which model stage it takes (export.stage), "auto" default
    model_folder: bool = False  # its output is a complete model folder, served as it is (export)

    def missing(self) -> list[tuple[str, str]]:
        """The `requires` entries that are not installed here."""
        import importlib.util

        return [(module, install) for module, install in self.requires if importlib.util.find_spec(module) is None]

    def default_input(self, key: str) -> str | None:
        """The earlier stage whose output `key` (e.g. start_from) defaults to."""
        return next((earlier for earlier, k in self.inputs.items() if k == key), None)

    def key_metrics(self, metrics: dict) -> dict:
        """The headline figures of this stage's metrics.json (None where it has no such figure)."""
        name, before, after = self.headline or (None, None, None)
        c_before, c_after = self.correctness or (None, None)
        return {
            "metric": name,
            "before": metrics.get(before) if before else None,
            "after": metrics.get(after) if after else None,
            "correct_before": metrics.get(c_before) if c_before else None,
            "correct_after": metrics.get(c_after) if c_after else None,
            "note": metrics.get("headline_note"),
        }

    def trl_defaults(self, processes: int) -> dict[str, Any]:
        """finetune's defaults over the TRL config for a run of `processes` processes."""
        return {**self.defaults, **(self.one_process_defaults if processes == 1 else {})}


class Registry:
    """Stages in pipeline order."""

    def __init__(self, stages: list[Stage]):
        self._stages: dict[str, Stage] = {s.name: s for s in stages}
        self.version = 0  # bumped on every change, so the recipe schema is rebuilt

    def register(self, stage: Stage, before: str | None = None) -> None:
        """Add a stage (at the end, or before the named one)."""
        if stage.name in self._stages:
            raise ValueError(f"stage {stage.name!r} is already registered")
        order = list(self._stages.values())
        at = len(order) if before is None else [s.name for s in order].index(before)
        order.insert(at, stage)
        self._stages = {s.name: s for s in order}
        self.version += 1

    def unregister(self, name: str) -> None:
        del self._stages[name]
        self.version += 1

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(self._stages)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def __iter__(self):
        return iter(list(self._stages.values()))

    def names(self) -> list[str]:
        return list(self._stages)

    def missing_libraries(self, names: list[str]) -> list[str]:
        """One line per optional library that a stage of `names` needs and this machine lacks."""
        return [
            f"the {name} stage needs {module}, which is not installed: {install}"
            for name in names
            for module, install in self[name].missing()
        ]

    def chat_model_stages(self) -> list[str]:
        return [s.name for s in self if s.chat_model]

    def model_stages(self) -> list[str]:
        """Stages whose output is a model one can serve: the chat-model stages and those that take them
        (export's merged folder)."""
        return [s.name for s in self if s.chat_model or s.takes_models]

    def model_folder_stage(self) -> str | None:
        """The stage whose output is a complete model folder (the export), if one is registered."""
        return next((s.name for s in self if s.model_folder), None)

    def data_stages(self) -> list[str]:
        return [s.name for s in self if s.has_data]

    def first_chat_data_stage(self) -> str | None:
        """The first chat-model stage with data: its held-out rows are the questions every model of the
        pipeline is measured on (export's held-out correctness, the samples' default prompts)."""
        return next((s.name for s in self if s.chat_model and s.has_data), None)

    def inputs(self, name: str) -> dict[str, str | None]:
        """The earlier stages `name` reads (see Stage.inputs); derived for stages that take every model:
        each earlier model stage, as part of an adapter chain."""
        stage = self[name]
        if not stage.takes_models:
            return dict(stage.inputs)
        earlier = self.names()[: self.names().index(name)]
        return {e: None for e in earlier if e in self.model_stages()}

    def correctness_after(self, name: str, metrics: dict) -> float | None:
        """A stage's held-out correctness at its end (None for a stage that measures none)."""
        return self[name].key_metrics(metrics)["correct_after"]


# Figures of the Trainer's logs each TRL stage's step line shows, after loss and learning rate.
# The input key whose adapters a stage's own adapter sits on (its adapter chain); other keys (reward_from) are
# read while training only.
CHAIN_KEY = "start_from"
GRAD_NORM = ("grad_norm", "grad norm")
PREFERENCE_FIGURES = (("rewards/accuracies", "reward acc"), ("rewards/margins", "margin"), GRAD_NORM)

STAGES = Registry(
    [
        Stage(
            "sft",
            "finetune.sft",
            SftSection,
            "run the SFT stage",
            trl_config=("trl", "SFTConfig"),
            chat_model=True,
            headline=("eval loss", "eval_loss_before", "eval_loss_after"),
            correctness=("correct_rate_before", "correct_rate_after"),
            summary_title="SFT done",
            # padding-free packs with position ids per sequence: on chat data most of a padded batch is padding
            # (docs/benchmarks.md)
            defaults={"packing": True},
            step_figures=(("mean_token_accuracy", "token acc"), GRAD_NORM),
        ),
        Stage(
            "reward",
            "finetune.reward",
            RewardSection,
            "train the reward model (from the SFT output)",
            trl_config=("trl", "RewardConfig"),
            inputs={"sft": "start_from"},
            headline=("pair accuracy", "eval_accuracy_before", "eval_accuracy"),
            summary_title="reward model done",
            step_figures=(("accuracy", "pair acc"), ("margin", "margin"), GRAD_NORM),
            memory=Memory(sequences=2, lm_logits=False, score_head=True, held_out_loss=False),
            unit="pairs",
        ),
        Stage(
            "dpo",
            "finetune.dpo",
            DpoSection,
            "run DPO (from the SFT output)",
            trl_config=("trl", "DPOConfig"),
            inputs={"sft": "start_from"},
            chat_model=True,
            headline=("reward accuracy", "eval_rewards_accuracy_before", "eval_rewards_accuracy"),
            correctness=("correct_rate_start", "correct_rate_after"),
            summary_title="DPO done",
            # The reference log-probs are computed once, in a pass before training, instead of by a reference
            # forward in every step: what tuned TRL runs, and without it our step was slower
            # (docs/benchmarks.md). One process only: TRL 1.16's precompute fails under several.
            one_process_defaults={"precompute_ref_log_probs": True},
            # Padding-free pairs (DPOConfig.padding_free, which TRL 1.16 itself switches off: finetune.dpo packs
            # them): the same loss and gradients, no FLOPs on padding (tests/stages/test_padding_free.py,
            # docs/benchmarks.md).
            defaults={"padding_free": True},
            ranges={"beta": (positive, "a number > 0", "DPO's beta 0 makes the loss constant: nothing is learnt")},
            step_figures=PREFERENCE_FIGURES,
            memory=Memory(sequences=2, reference=True),
            unit="pairs",
        ),
        Stage(
            "kto",
            "finetune.kto",
            KtoSection,
            "run KTO: unpaired desirable / undesirable replies (from the SFT output)",
            trl_config=("trl", "KTOConfig"),
            inputs={"sft": "start_from"},
            chat_model=True,
            headline=("reward margin", "eval_rewards_margin_before", "eval_rewards_margin"),
            correctness=("correct_rate_start", "correct_rate_after"),
            summary_title="KTO done",
            ranges={"beta": (positive, "a number > 0", "KTO's beta 0 makes the loss constant: nothing is learnt")},
            step_figures=(("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable"), GRAD_NORM),
            # each row's completion and, for the KL estimate, a mismatched one (TRL's KL dataset), with a reference
            memory=Memory(sequences=2, reference=True),
        ),
        Stage(
            "orpo",
            "finetune.orpo",
            OrpoSection,
            "run ORPO: SFT and preference in one stage, from the base (no reference model)",
            trl_config=("trl.experimental.orpo", "ORPOConfig"),
            chat_model=True,
            headline=("reward accuracy", "eval_rewards_accuracy_before", "eval_rewards_accuracy"),
            correctness=("correct_rate_before", "correct_rate_after"),
            summary_title="ORPO done",
            step_figures=PREFERENCE_FIGURES,
            memory=Memory(sequences=2),
            unit="pairs",
        ),
        Stage(
            "ppo",
            "finetune.ppo",
            PpoSection,
            "run PPO (policy from the DPO output, reward from the reward model)",
            inputs={"sft": None, "dpo": "start_from", "reward": "reward_from"},
            chat_model=True,
            headline=("score", "score_start", "score_end"),
            correctness=("correct_rate_before", "correct_rate_after"),
            summary_title="PPO done",
            # policy, value, reward and reference adapters on one base; policy and value trained
            memory=Memory(adapters=4, trained=2, rollout=True, held_out_loss=False, runtime_cpu_gib=0.45),
            unit="prompts",
        ),
        Stage(
            "grpo",
            "finetune.grpo",
            GrpoSection,
            "run GRPO (policy from the SFT output; rule rewards and/or a reward model)",
            # reward_from defaults to none in the section: `<output_dir>/reward` (or null) names the reward stage
            inputs={"sft": "start_from", "reward": "reward_from"},
            chat_model=True,
            headline=("reward", "reward_start", "reward_end"),
            correctness=("correct_rate_before", "correct_rate_after"),
            summary_title="GRPO done",
            # policy, reward and reference adapters on one base (no value model); the policy trained; the rollout
            # is every completion: rollout_batch_size x num_generations
            memory=Memory(adapters=3, trained=1, rollout=True, held_out_loss=False, runtime_cpu_gib=0.45),
            unit="prompts",
        ),
        Stage(
            "export",
            "finetune.export",
            ExportSection,
            "merge the last stage's adapters into the base: a plain HF model folder (--force replaces it)",
            takes_models=True,
            has_data=False,
            default_section=True,
            launcher=False,
            headline=("logit parity max|diff| fp32", None, "parity_max_abs_diff_fp32"),
            correctness=("correct_rate_base", "correct_rate_after"),
            summary_title="export done",
            memory=Memory(merge_only=True, held_out_loss=False, runtime_cpu_gib=0.65),
            output_key="output",
            model_choice="stage",
            model_folder=True,
        ),
        Stage(
            "eval",
            "finetune.eval",
            EvalSection,
            "benchmark the model and its base with lm-evaluation-harness (the eval section; or MODEL_DIR --tasks)",
            takes_models=True,
            has_data=False,
            launcher=False,
            headline=("benchmark (first task)", "score_base", "score"),
            summary_title="eval done",
            requires=(("lm_eval", "pip install 'finetune[eval]' (lm-evaluation-harness)"),),
            memory=Memory(lm_eval=True, held_out_loss=False),
            output_key="output",
            model_choice="model",
        ),
    ]
)
