"""Recipe schema, loading, overrides and validation: the one source of truth for every stage.

A recipe is one YAML file describing a whole pipeline. Shared sections (model, template, lora,
precision, deepspeed, logging, output_dir, training defaults) apply to every stage; each stage has
its own section (`sft`, later `reward`, `dpo`, `ppo`, `export`, `azureml`) that holds the stage's
own keys plus any field of the stage's TRL config, overriding the shared `training:` defaults.

Everything is validated before any model loads: unknown keys, wrong types and impossible
combinations raise `RecipeError` naming the file, the key path and the nearest valid key.
Training fields are those of the matching TRL / transformers config class (SFTConfig, ...) so
users keep the vocabulary they know; they are checked against those dataclasses here.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"


class RecipeError(ValueError):
    """A recipe problem the user must fix; the message names file, key and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Hub id (microsoft/phi-2), local folder (relative to the recipe when it exists there), or "
        "`builtin:tiny-phi` (made offline in code)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you need it.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel. auto/flash_attention_2 use FlashAttention-2 when flash-attn and CUDA "
        "are present, else SDPA. eager at fp16 runs with fp32 scores (Phi fp16 overflow guard).",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: quantise the frozen base to 4-bit NF4 (needs CUDA).")


class TemplateSection(_Section):
    name: str = Field(
        "phi_instruct",
        description="Chat template: a name shipped in finetune/templates (phi_instruct, phi3) or a .jinja path.",
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0, description="LoRA rank; higher adds capacity and memory.")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="Modules to adapt. auto = every linear layer of the model family "
        "(phi: q_proj k_proj v_proj dense fc1 fc2; phi3: qkv_proj o_proj gate_up_proj down_proj).",
    )


class LaunchSection(_Section):
    accelerate_config: str | None = Field(
        None,
        description="accelerate config (path relative to the recipe). When set, `finetune <stage>` re-runs "
        "itself under `accelerate launch --config_file` with it.",
    )
    num_processes: int | None = Field(None, gt=0, description="Processes for accelerate launch (default: its config).")


class LoggingSection(_Section):
    logging_steps: int = Field(10, gt=0, description="Log training metrics every N optimiser steps.")
    report_to: list[str] = Field(default_factory=list, description="Trackers (tensorboard, mlflow, wandb...).")


class DataSource(_Section):
    path: str = Field(description="Local jsonl/json/parquet/csv file (relative to the recipe) or a hub dataset id.")
    config: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Split to read.")
    weight: float = Field(
        1.0, gt=0, description="Share of this source's rows to use: 0.5 takes half, 2.0 repeats it twice."
    )
    format: Literal["auto", "messages", "prompt_completion", "preference", "prompt"] = Field(
        "auto", description="Row format; auto detects it from the columns."
    )


class DataSection(_Section):
    train: list[DataSource] = Field(description="Training sources (a mixture when several).")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources; empty = split from train.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of train held out when `eval` is empty.")
    skip_bad_rows: bool = Field(
        False, description="Skip malformed rows (and report how many) instead of stopping at the first one."
    )
    on_overlong: Literal["error", "drop"] = Field(
        "drop", description="Rows longer than max_length: drop them (counted and reported) or stop."
    )
    max_eval_rows: int | None = Field(None, gt=0, description="Cap on held-out rows used for evaluation.")


# Keys of the TRL / transformers training configs that the recipe owns elsewhere: setting them in a
# training block would create a second source of truth, so it is an error naming the right place.
OWNED_ELSEWHERE = {
    "output_dir": "output_dir (top level)",
    "seed": "seed (top level)",
    "data_seed": "seed (top level)",
    "fp16": "precision (top level)",
    "bf16": "precision (top level)",
    "half_precision_backend": "precision (top level)",
    "deepspeed": "deepspeed (top level)",
    "logging_steps": "logging.logging_steps",
    "report_to": "logging.report_to",
    "resume_from_checkpoint": "<stage>.resume",
    "training": "the stage section itself (TRL fields go directly under it, e.g. sft.max_steps)",
    "chat_template_path": "template.name",
    "assistant_only_loss": "the chat template (assistant-only loss is always on)",
    "completion_only_loss": "the chat template (assistant-only loss is always on)",
    "dataset_text_field": "<stage>.data",
    "eos_token": "template.name (the template's end-of-turn token)",
    "pad_token": "the tokenizer (pad is set by finetune)",
    "model_init_kwargs": "model",
    "eval_strategy": "nothing (finetune evaluates the held-out set itself before and after training)",
    "ref_model_init_kwargs": "model",
    "model_adapter_name": "<stage>.start_from",
    "ref_adapter_name": "<stage>.start_from (the reference is the start model, adapters disabled)",
}


class _StageSection(_Section):
    """A stage section: the project's own keys below, plus any field of the stage's TRL config
    (e.g. `sft.max_steps`, `sft.learning_rate`), which overrides the shared `training` block."""

    model_config = ConfigDict(extra="allow", validate_default=True)


class SftSection(_StageSection):
    data: DataSection = Field(description="Conversations or prompt/completion rows.")
    resume: bool | str = Field(
        True, description="true: continue from the newest checkpoint if any; false: start over; or a checkpoint path."
    )
    eval_generate_rows: int = Field(
        64, ge=0, description="Held-out prompts answered greedily before and after training to measure correctness."
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for the correctness check and the sample.")


class PreferenceStageSection(_StageSection):
    data: DataSection = Field(description="Preference rows: prompt / chosen / rejected.")
    start_from: str | None = Field(
        None, description="Adapter folder merged into the base before training (default: <output_dir>/sft; "
        "'base' for none; relative to the cwd like output_dir). Its recipe must name the same base model and "
        "template.",
    )
    resume: bool | str = Field(
        True, description="true: continue from the newest checkpoint if any; false: start over; or a checkpoint path."
    )
    eval_generate_rows: int = Field(
        64, ge=0, description="Held-out prompts answered greedily to measure correctness (rows with an `answer`).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for the correctness check.")


class RewardSection(PreferenceStageSection):
    """Reward model: a LoRA sequence-classification head on the SFT model (trl.RewardConfig fields too)."""


class DpoSection(PreferenceStageSection):
    """DPO (trl.DPOConfig fields too: beta, loss_type, precompute_ref_log_probs, ...)."""


class PpoSection(_Section):
    """PPO with a learned and/or rule-based reward (finetune's own trainer; defaults from
    shared/design/ppo.md). Not a TRL config: TRL no longer has a PPOTrainer."""

    data: DataSection = Field(description="Prompts: prompt-only rows ({'prompt': ...}), conversations (the turns "
                              "before the last assistant reply) or preference rows (their prompt).")
    start_from: str | None = Field(
        None, description="Policy start: an adapter folder (default: <output_dir>/dpo; e.g. <output_dir>/sft). Its "
        "recorded chain (the adapters it was trained on) is merged into the base; 'base' for the plain base.")
    reward_from: str | None = Field(
        None, description="Reward-model stage output (default: <output_dir>/reward), or 'none' to use only "
        "`reward_function`. Must share the policy's base (both trained on the same SFT output).")
    reward_function: str | None = Field(
        None, description="Rule-based reward `module:function` called as f(prompt, response) or "
        "f(prompt, response, example) -> float (example = the data row, e.g. its 'answer'); added to the learned "
        "reward. Modules beside the recipe are importable.")
    reward_function_weight: float = Field(1.0, description="Weight of the rule-based reward in the score.")
    unique_prompts: bool = Field(True, description="Keep one copy of a repeated prompt (preference data repeats "
                                 "it once per pair); the count is reported.")
    updates: int = Field(100, gt=0, description="PPO updates (each: rollout, score, optimise).")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per update per process.")
    mini_batches: int = Field(1, gt=0, description="Minibatches per PPO epoch (one optimiser step each).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward (gradient accumulation).")
    ppo_epochs: int = Field(4, gt=0, description="Optimisation passes over each rollout.")
    response_length: int = Field(53, gt=0, description="Maximum new tokens per response.")
    max_prompt_length: int = Field(256, gt=0, description="Longer prompts are dropped and counted (never truncated).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (top_k=0, top_p=1: no hidden filtering).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip epsilon.")
    vf_coef: float = Field(0.1, gt=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient beta (initial value when adaptive).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator.")
    adaptive_kl: bool = Field(False, description="Adapt beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Target KL (nats per sequence) for the adaptive controller.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon of the adaptive KL controller (episodes).")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of a response that never "
                                       "reached the end-of-turn token.")
    normalize_reward: bool = Field(True, description="Normalise the learned reward with its mean/std over the start "
                                   "policy's first rollout (kept fixed after).")
    score_clip: float | None = Field(None, gt=0, description="Clip the shaped score to +-this (OpenRLHF uses 10).")
    learning_rate: float = Field(1e-5, gt=0, description="Policy adapter learning rate.")
    value_learning_rate: float = Field(5e-5, gt=0, description="Value adapter and value head learning rate.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule over updates.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-5, gt=0, description="AdamW epsilon (N+ implementation detail).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient norm clip (per optimiser); null for none.")
    value_init: Literal["reward", "new"] = Field(
        "reward", description="Value adapter + head: a copy of the reward model's (design note) or fresh.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the optimisation passes "
                                         "(never during generation).")
    save_every: int = Field(10, gt=0, description="Checkpoint every N updates (resume continues from the newest).")
    resume: bool = Field(True, description="Continue from the newest checkpoint of the same run if any.")
    eval_generate_rows: int = Field(64, ge=0, description="Held-out prompts answered greedily before and after.")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for the held-out correctness check.")


EXPORTABLE_STAGES = ("sft", "dpo", "ppo")  # stages whose output is a chat model (the reward model is not)
PIPELINE_STAGES = ("sft", "reward", "dpo", "ppo", "export")


class ExportSection(_Section):
    """Merge a stage's adapter chain into the base and write a plain Hugging Face model folder."""

    stage: Literal["auto", "sft", "dpo", "ppo"] = Field(
        "auto", description="Which stage's model to export: its adapter chain (the adapters it was trained on, then "
        "its own) is merged into the base. auto = the last finished of ppo, dpo, sft.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype of the exported weights (merging always runs in fp32 first). auto = precision.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard (transformers size string: 500MB, 2GB).")
    output: str | None = Field(None, description="Target folder (default: <output_dir>/export; relative to the cwd "
                               "like output_dir).")
    force: bool = Field(False, description="Replace an existing target (also `finetune export RECIPE --force`).")
    parity_prompts: int = Field(4, ge=0, description="Prompts on which the merged model's logits are compared with "
                                "base + unmerged adapters (recorded in the model card); 0 skips the check.")
    eval_generate_rows: int | None = Field(
        None, ge=0, description="Held-out SFT prompts the exported model answers greedily to measure correctness "
        "(default: sft.eval_generate_rows; 0 skips).")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise ValueError("not a size; write e.g. 500MB or 2GB") from None
        return value


class PipelineSection(_Section):
    stages: list[Literal["sft", "reward", "dpo", "ppo", "export"]] | None = Field(
        None, description="Stages `finetune pipeline` runs, always in the order sft, reward, dpo, ppo, export. "
        "Default: every stage this recipe has a section for, then export.")
    force: bool = Field(False, description="Run every stage even when its finished output exists (also "
                        "`finetune pipeline RECIPE --force`).")


class AzureMLSection(_Section):
    """Where and how `finetune azureml submit` runs a stage on Azure ML; the flags of the same name
    (--compute, --instance-count, ...) override these. Never put a secret here: the job YAML needs none."""

    subscription_id: str | None = Field(None, description="Azure subscription id of the workspace.")
    resource_group: str | None = Field(None, description="Resource group of the workspace.")
    workspace_name: str | None = Field(None, description="Azure ML workspace name.")
    config: str | None = Field(
        None, description="The workspace's config.json (as the Azure portal downloads it; relative to the recipe), "
        "instead of the three ids above. Default: ./config.json or ./.azureml/config.json when present.")
    compute: str | None = Field(None, description="Compute cluster name (required to submit).")
    instance_count: int = Field(1, gt=0, description="Nodes; each runs gpus_per_node processes.")
    gpus_per_node: int = Field(1, gt=0, description="Processes per node (PyTorch distribution "
                               "process_count_per_instance): one per GPU.")
    environment: str | None = Field(
        None, description="A registered Azure ML environment (name:version or name@latest); default: build "
        "azureml/Dockerfile from this repository.")
    datastore: str = Field("workspaceblobstore", description="Datastore for stage outputs (adapters, export).")
    output_path: str | None = Field(
        None, description="Folder on the datastore; each stage writes <output_path>/<stage>/ and later stages "
        "read from there. Default: finetune/<last part of output_dir>.")
    experiment_name: str = Field("finetune", description="Azure ML experiment the jobs are filed under.")


class Recipe(_Section):
    output_dir: str = Field(description="Where every stage writes `<output_dir>/<stage>/` (relative to the cwd).")
    seed: int = Field(42, description="Seed for data order, LoRA init and sampling.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Base weights dtype and mixed precision. fp16/bf16 keep LoRA adapters fp32."
    )
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (relative to the recipe), e.g. ZeRO-2.")
    model: ModelSection
    template: TemplateSection = Field(default_factory=TemplateSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    training: dict[str, Any] = Field(
        default_factory=dict, description="Shared transformers.TrainingArguments defaults for every stage."
    )
    sft: SftSection | None = None
    reward: RewardSection | None = None
    dpo: DpoSection | None = None
    ppo: PpoSection | None = None
    azureml: AzureMLSection = Field(default_factory=AzureMLSection)
    export: ExportSection = Field(default_factory=ExportSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)

    # Where the recipe came from; set by load_recipe, not by YAML.
    source: str = Field("<memory>", exclude=True, description="internal")

    @model_validator(mode="after")
    def _combinations(self):
        if self.model.load_in_4bit and self.precision == "fp32":
            raise ValueError("model.load_in_4bit needs precision fp16 or bf16 (the 4-bit compute dtype)")
        if self.model.load_in_4bit and self.deepspeed:
            raise ValueError("model.load_in_4bit cannot be combined with deepspeed (ZeRO cannot shard 4-bit weights)")
        for stage in self.pipeline.stages or ():
            if stage != "export" and getattr(self, stage) is None:
                raise ValueError(f"pipeline.stages lists {stage!r}, but the recipe has no {stage} section")
        return self

    # ---- paths resolved against the recipe file ----
    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source != "<memory>" else Path.cwd()

    def resolve_path(self, p: str | None) -> str | None:
        """A relative path in a recipe is relative to the recipe file (not the cwd)."""
        if p is None or p.startswith(BUILTIN_PREFIX):
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (self.base_dir / path).resolve())

    def model_path(self) -> str:
        """model.name_or_path: builtin, hub id, or a folder (relative to the recipe if it exists there)."""
        name = self.model.name_or_path
        if name.startswith(BUILTIN_PREFIX) or Path(name).is_absolute():
            return name
        beside = self.base_dir / name
        return str(beside.resolve()) if beside.is_dir() else name

    def stage_dir(self, stage: str) -> Path:
        if stage == "export" and self.export.output:
            return Path(self.export.output).expanduser()
        return Path(self.output_dir) / stage

    def pipeline_stages(self) -> list[str]:
        """The stages `finetune pipeline` runs, in pipeline order."""
        wanted = self.pipeline.stages or [s for s in PIPELINE_STAGES if s == "export" or getattr(self, s) is not None]
        return [s for s in PIPELINE_STAGES if s in wanted]

    def start_adapters(self, stage: str) -> list[str]:
        """Adapter folders a stage merges into the base before training (default: the SFT output)."""
        start = getattr(self, stage).start_from
        if start == "base":
            return []
        return [str(self.stage_dir("sft") if start is None else Path(start).expanduser())]

    def training_args(self, stage: str) -> dict[str, Any]:
        """TRL/transformers fields for a stage: shared `training` defaults overlaid with the stage section."""
        section = getattr(self, stage)
        return {**self.training, **((section.model_extra or {}) if section is not None else {})}


STAGE_CONFIG_CLASSES = {"sft": ("trl", "SFTConfig"), "reward": ("trl", "RewardConfig"), "dpo": ("trl", "DPOConfig")}


def _stage_config_class(stage: str):
    module, name = STAGE_CONFIG_CLASSES[stage]
    import importlib

    return getattr(importlib.import_module(module), name)


def _nearest(key: str, candidates) -> str:
    candidates = [c for c in candidates if c != "source"]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{match[0]}'?"
    return f"; valid keys: {', '.join(candidates)}" if len(candidates) <= 12 else ""


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _type_ok(tp, value) -> bool:
    """Loose structural check of a YAML value against a dataclass field annotation."""
    if tp is Any or tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            # `SchedulerType | str` and the like: the str is for typing, the values are the enum's
            return any(_type_ok(e, value) for e in enums)
        return any(_type_ok(a, value) for a in args)
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple, set):
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return value in {m.value for m in tp} or value in tp.__members__
        if tp is bool:
            return isinstance(value, bool)
        if tp is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if tp is str:
            return isinstance(value, str)
        if tp in (list, tuple):
            return isinstance(value, list)
        if tp is dict:
            return isinstance(value, dict)
        return True
    return True


def check_training_block(block: dict, config_cls, where: str, source: str, own_keys=()) -> None:
    """Validate keys and value types of a training block against a TRL/transformers dataclass."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    for key, value in block.items():
        if key in OWNED_ELSEWHERE:
            raise RecipeError(f"{source}: {where}.{key}: set this with {OWNED_ELSEWHERE[key]} instead")
        if key not in fields:
            raise RecipeError(
                f"{source}: {where}.{key}: unknown key (neither a finetune key nor a {config_cls.__name__} field)"
                f"{_nearest(key, [*own_keys, *fields])}"
            )
        if isinstance(value, str) and fields[key].type in (float, int):
            # YAML reads 5e-6 as a string; accept numbers written that way (ints only if whole).
            try:
                number = float(value)
                if fields[key].type is float or number.is_integer():
                    value = block[key] = fields[key].type(number)
            except ValueError:
                pass
        if not _type_ok(fields[key].type, value):
            choices = [m.value for a in typing.get_args(fields[key].type)
                       if isinstance(a, type) and issubclass(a, enum.Enum) for m in a]
            expected = f"one of {choices}" if choices else _type_name(fields[key].type)
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise RecipeError(f"{source}: {where}.{key}: expected {expected}, got {type(value).__name__} {value!r}"
                              + (f"; did you mean '{close[0]}'?" if close else ""))


def _format_pydantic_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc) or "<top>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(Recipe, e["loc"][:-1])
            hint = _nearest(loc[-1], parent.model_fields) if parent else ""
            lines.append(f"{source}: {path}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {path}: required key is missing")
        else:
            lines.append(f"{source}: {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _model_at(model, loc):
    """The pydantic section class at a key path, for suggesting valid keys."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        for arg in list(candidates):
            candidates.extend(typing.get_args(arg))
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE, e.g. sft.max_steps=20")
        key, raw = item.split("=", 1)
        parsed.append((key.strip().split("."), yaml.safe_load(raw) if raw != "" else None))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override {'.'.join(path)}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError before anything heavy happens."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (give a path such as recipes/tiny_chat.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return validate_recipe(apply_overrides(raw, overrides or []), source=str(path))


def validate_recipe(raw: dict, source: str = "<memory>") -> Recipe:
    if "source" in raw:
        raise RecipeError(f"{source}: source: unknown key")
    try:
        recipe = Recipe.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise RecipeError(_format_pydantic_error(e, source)) from None
    from transformers import TrainingArguments

    check_training_block(recipe.training, TrainingArguments, "training", source)
    for stage in STAGE_CONFIG_CLASSES:
        section = getattr(recipe, stage)
        if section is not None:
            check_training_block(section.model_extra or {}, _stage_config_class(stage), stage, source,
                                 own_keys=type(section).model_fields)
    for key in ("deepspeed",):
        value = recipe.resolve_path(getattr(recipe, key))
        if value is not None and not Path(value).is_file():
            raise RecipeError(f"{source}: {key}: file not found: {value} (paths are relative to the recipe file)")
    if recipe.launch.accelerate_config is not None:
        value = recipe.resolve_path(recipe.launch.accelerate_config)
        if not Path(value).is_file():
            raise RecipeError(f"{source}: launch.accelerate_config: file not found: {value}")
    return recipe


def resolved_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe (defaults filled in) as plain data."""
    return recipe.model_dump(mode="json", exclude={"source"})


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False)


def recipe_from_argv(argv: list[str], stage: str, prog: str) -> Recipe | None:
    """`RECIPE [key=value ...] [--print-config]` as every stage script and `finetune <stage>` take it.

    Returns None when --print-config asked only for the resolved recipe (printed here)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=f"Run the {stage} stage of a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_chat.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/tmp/run sft.max_steps=20")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return None
    if getattr(recipe, stage, None) is None:
        raise RecipeError(f"{args.recipe}: {stage}: section missing; this recipe has no {stage} stage")
    return recipe


def stage_main(stage: str, run, argv: list[str] | None) -> int:
    """What every stage script's main() does: parse `RECIPE [overrides] [--print-config]`, then run."""
    import sys

    from .chat_template import TemplateError
    from .data import DataError

    try:
        recipe = recipe_from_argv(sys.argv[1:] if argv is None else argv, stage, f"finetune {stage}")
        if recipe is not None:
            run(recipe)
    except (RecipeError, DataError, TemplateError) as e:  # the user's input, not a bug: no traceback
        print(f"finetune {stage}: error:\n{e}", file=sys.stderr)
        return 2
    return 0


def reference_markdown() -> str:
    """The recipe reference (docs/recipe_reference.md), generated from the schema above."""
    lines = ["# Recipe reference", "",
             "Generated from `finetune/recipe.py` by `python -m finetune.recipe > docs/recipe_reference.md`; "
             "a test keeps it in step with the code.", "",
             "Relative paths in a recipe are relative to the recipe file, except `output_dir` (relative to the "
             "directory you run from). Stage sections also take any field of the stage's TRL config "
             "(`sft`: `trl.SFTConfig`, e.g. `sft.max_steps`, `sft.max_length`, `sft.packing`; finetune's SFT default is "
             "`packing: true`, padding-free packs, see docs/benchmarks.md), and `training` "
             "takes `transformers.TrainingArguments` fields shared by every stage. These keys are owned by "
             "the recipe elsewhere and refused in training sections:", ""]
    lines += [f"- `{k}` → {v}" for k, v in OWNED_ELSEWHERE.items()]
    lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            ann = field.annotation
            sub = next((a for a in [ann, *typing.get_args(ann)] if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)
            inner = typing.get_args(ann)[0] if typing.get_origin(ann) is list and typing.get_args(ann) else None
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                sub, name = inner, f"{name}[]"
            default = "required" if field.is_required() else (
                "" if field.default_factory is not None and sub else repr(field.get_default(call_default_factory=True)))
            type_name = _type_name(ann).replace("|", "or")
            lines.append(f"| `{prefix}{name}` | {'section' if sub else type_name} | {default} | "
                         f"{(field.description or '').replace('|', '/')} |")
            if sub:
                walk(sub, f"{prefix}{name}.")

    walk(Recipe, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
