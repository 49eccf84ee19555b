"""The whole recipe: shared sections, then one section per registered stage.

`Recipe` holds the shared keys and the path rules; `recipe_model()` adds a field for every stage in
`finetune.recipe.stages.STAGES` (rebuilt when the registry changes), so a new stage's section needs
no edit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from .errors import NO_ADAPTER, RecipeError
from .sections import (
    BUILTIN_PREFIX,
    CWD_PATH,
    RECIPE_PATH,
    AzureMLSection,
    LaunchSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    PipelineSection,
    SamplesSection,
    Section,
    TemplateSection,
)
from .stages import STAGES
from .trl_fields import RENAMED, TRL_DEFAULTS, config_class


class Recipe(Section):
    output_dir: str = Field(description="Where every stage writes `<output_dir>/<stage>/`.", json_schema_extra=CWD_PATH)
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        description="Seed for data order, LoRA init and sampling (0 to 2**32 - 1, numpy's range).",
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Base weights dtype and mixed precision. fp16/bf16 keep LoRA adapters fp32."
    )
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config, e.g. ZeRO-2.", json_schema_extra=RECIPE_PATH
    )
    model: ModelSection
    template: TemplateSection = Field(default_factory=TemplateSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    training: dict[str, Any] = Field(
        default_factory=dict, description="Shared transformers.TrainingArguments defaults for every stage."
    )
    azureml: AzureMLSection = Field(default_factory=AzureMLSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)

    # Where the recipe came from; set by load_recipe, not by YAML.
    source: str = Field("<memory>", exclude=True, description="internal")

    @model_validator(mode="after")
    def _combinations(self):
        if self.model.load_in_4bit and self.precision == "fp32":
            raise ValueError("model.load_in_4bit needs precision fp16 or bf16 (the 4-bit compute dtype)")
        if self.model.load_in_4bit and self.deepspeed:
            raise ValueError("model.load_in_4bit cannot be combined with deepspeed (ZeRO cannot shard 4-bit weights)")
        for stage in self.pipeline.stages or ():
            if stage not in STAGES:
                raise ValueError(f"pipeline.stages: unknown stage {stage!r}; stages are {', '.join(STAGES.names())}")
            if self.section(stage) is None:
                raise ValueError(f"pipeline.stages lists {stage!r}, but the recipe has no {stage} section")
        for stage in STAGES:  # a key naming which model a stage takes (export.stage): auto or a stage that makes one
            section = self.section(stage.name)
            if section is None or stage.model_choice is None:
                continue
            value = getattr(section, stage.model_choice)
            # an earlier stage that takes models makes one too (eval may score the export)
            choices = [s for s in STAGES.names()[: STAGES.names().index(stage.name)] if s in STAGES.model_stages()]
            if value != "auto" and value not in choices:
                raise ValueError(
                    f"{stage.name}.{stage.model_choice}: {value!r} is not a model this recipe makes (a stage whose "
                    f"output is a model); use auto or one of {', '.join(choices)}"
                )
        return self

    # ---- sections by stage name ----
    def section(self, stage: str):
        """The recipe's section for `stage` (None when the recipe has no such stage); an unknown stage name is an
        error, never a silent None."""
        if stage not in STAGES:
            raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES.names())}")
        return getattr(self, stage, None)

    # ---- paths: one rule per kind (see finetune.recipe.sections) ----
    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source != "<memory>" else Path.cwd()

    def resolve_path(self, p: str | None) -> str | None:
        """An input path (data, template, config) in a recipe is relative to the recipe file."""
        if p is None or p.startswith(BUILTIN_PREFIX):
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (self.base_dir / path).resolve())

    @staticmethod
    def output_path(p: str) -> Path:
        """An output path (output_dir, start_from, reward_from, export.output) is relative to the cwd."""
        return Path(p).expanduser()

    def model_path(self) -> str:
        """model.name_or_path: builtin, hub id, or a folder (relative to the recipe if it exists there)."""
        name = self.model.name_or_path
        if name.startswith(BUILTIN_PREFIX) or Path(name).is_absolute():
            return name
        beside = self.base_dir / name
        return str(beside.resolve()) if beside.is_dir() else name

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes: `<output_dir>/<stage>`, or the folder its section's output key names."""
        key, section = STAGES[stage].output_key, self.section(stage)
        if key and section is not None and getattr(section, key):
            return self.output_path(getattr(section, key))
        return self.output_path(self.output_dir) / stage

    def checkpoint_dir(self, stage: str) -> Path:
        return self.output_path(self.output_dir) / f"{stage}-checkpoints"

    def pipeline_stages(self) -> list[str]:
        """The stages `finetune pipeline` runs, in pipeline order."""
        wanted = self.pipeline.stages or [s.name for s in STAGES if self.section(s.name) is not None]
        return [s for s in STAGES.names() if s in wanted]

    def question_stage(self) -> str | None:
        """The first stage of this recipe with data whose output is a chat model (SFT): its held-out rows are the
        questions every model of the pipeline is measured on (export's held-out correctness)."""
        return next((s.name for s in STAGES if s.chat_model and s.has_data and self.section(s.name) is not None), None)

    def input_dir(self, stage: str, key: str) -> Path | None:
        """The folder a stage's `key` (start_from, reward_from) names: the default earlier stage's output when
        unset, another stage's output when it is a stage's name (`ppo.start_from: sft`; write ./sft for a
        folder of that name), a folder, or None for 'none' (no adapter)."""
        value = self.section(stage).input_ref(key)
        if value is not None and value.strip().lower() == NO_ADAPTER:
            return None
        earlier = self.input_stage(stage, key)
        if earlier is not None:
            return self.stage_dir(earlier)
        return None if value is None else self.output_path(value)

    def input_stage(self, stage: str, key: str) -> str | None:
        """The stage whose output a stage's `key` reads when it names one (unset: the registry's default; or a
        stage's name), else None (a folder, or none)."""
        value = self.section(stage).input_ref(key)
        if value is None:
            return STAGES[stage].default_input(key)
        named = value.strip()
        if named not in STAGES.names():
            return None
        if named == stage:
            raise RecipeError(
                f"{self.source}: {stage}.{key}: {named} is this stage itself; name an earlier stage "
                f"({', '.join(STAGES.inputs(stage))}), a folder, or {NO_ADAPTER}"
            )
        return named

    def training_args(self, stage: str) -> dict[str, Any]:
        """TRL/transformers fields a recipe sets for a stage: shared `training` defaults overlaid with the stage
        section, old field names as their new ones (RENAMED; both given: the new name wins, as in transformers)."""
        section = self.section(stage)
        args = {**self.training, **((section.model_extra or {}) if section is not None else {})}
        for old, new in RENAMED.items():
            if old in args:
                args.setdefault(new, args.pop(old))
        return args

    def trl_settings(self, stage: str, processes: int = 1) -> dict[str, Any]:
        """The TRL config values this recipe gives `stage`, in the one order of precedence every reader uses
        (training, the memory check, --plan): finetune's defaults for every TRL stage, the stage's own
        defaults (its registry entry), then the recipe (`training`, then the stage section). Fields none of
        them sets keep the TRL config's default (trl_setting)."""
        return {**TRL_DEFAULTS, **STAGES[stage].trl_defaults(processes), **self.training_args(stage)}

    def trl_setting(self, stage: str, name: str, processes: int = 1, default=None):
        """One TRL setting of a stage: trl_settings, else the stage's TRL config's default, else `default`."""
        settings = self.trl_settings(stage, processes)
        if name in settings:
            return settings[name]
        spec = STAGES[stage].trl_config
        if spec is not None:
            import dataclasses

            fields = {f.name: f for f in dataclasses.fields(config_class(spec))}
            if name in fields and fields[name].default is not dataclasses.MISSING:
                return fields[name].default
        return default


_models: dict[int, type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """`Recipe` with one field per registered stage (`sft: SftSection | None = None`, ...)."""
    if STAGES.version not in _models:
        fields = {}
        for stage in STAGES:
            if stage.default_section:
                fields[stage.name] = (stage.section, Field(default_factory=stage.section))
            else:
                fields[stage.name] = (stage.section | None, None)
        _models.clear()
        _models[STAGES.version] = create_model("Recipe", __base__=Recipe, **fields)
    return _models[STAGES.version]
