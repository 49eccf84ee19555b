"""The stage registry: every stage declared once.

The recipe schema (its stage sections), the CLI (commands and help), the pipeline (order, what each
stage starts from), export (which outputs are chat models), the summaries (headline metrics) and
Azure ML (job inputs) all read this list. Adding a stage is one `register(Stage(...))` plus the
stage's module, whose `main(argv)` runs it (`finetune.launch.stage_main` does the argument parsing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from .sections import DpoSection, EvalSection, ExportSection, GrpoSection, PpoSection, RewardSection, SftSection


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # importable module whose main(argv) runs the stage; its file is what `accelerate launch` runs
    section: type[BaseModel]  # the recipe section `<name>:`
    help: str  # one line for `finetune --help`
    trl_config: tuple[str, str] | None = None  # (module, class) whose fields the section also takes
    # Earlier stages this one reads: {earlier stage: the section key whose default points at its output}.
    # None marks an output needed only as part of an adapter chain (the DPO adapter was trained on the SFT
    # model, so PPO needs the SFT adapter too).
    inputs: dict[str, str | None] = field(default_factory=dict)
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

    def missing(self) -> list[tuple[str, str]]:
        """The `requires` entries that are not installed here."""
        import importlib.util

        return [(module, install) for module, install in self.requires if importlib.util.find_spec(module) is None]

    def default_input(self, key: str) -> str | None:
        """The earlier stage whose output `key` (e.g. start_from) defaults to."""
        return next((earlier for earlier, k in self.inputs.items() if k == key), None)


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
        return self._stages[name]

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

    def data_stages(self) -> list[str]:
        return [s.name for s in self if s.has_data]


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
        ),
        Stage(
            "export",
            "finetune.export",
            ExportSection,
            "merge the last stage's adapters into the base: a plain HF model folder (--force replaces it)",
            inputs={"sft": None, "dpo": None, "ppo": None, "grpo": None},
            has_data=False,
            default_section=True,
            launcher=False,
            headline=("logit parity max|diff| fp32", None, "parity_max_abs_diff_fp32"),
            correctness=("correct_rate_base", "correct_rate_after"),
            summary_title="export done",
        ),
        Stage(
            "eval",
            "finetune.eval",
            EvalSection,
            "benchmark the model and its base with lm-evaluation-harness (the eval section; or MODEL_DIR --tasks)",
            inputs={"sft": None, "dpo": None, "ppo": None, "grpo": None, "export": None},
            has_data=False,
            launcher=False,
            headline=("benchmark (first task)", "score_base", "score"),
            summary_title="eval done",
            requires=(("lm_eval", "pip install 'finetune[eval]' (lm-evaluation-harness)"),),
        ),
    ]
)
