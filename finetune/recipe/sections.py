"""The recipe's sections: every key, its type, default and meaning, defined once.

Shared sections (model, template, lora, launch, logging, data) apply to every stage; each stage has
its own section (declared with the stage in `finetune.recipe.stages`). Fields shared by several
stages live in one base class here, so they cannot drift apart.

Path keys carry `json_schema_extra={"path": ...}`: "recipe" for inputs that travel with the recipe
(data files, templates, configs: relative to the recipe file) and "cwd" for run outputs
(`output_dir` and the keys that name stage outputs: relative to the directory you run from).
`finetune.recipe.reference` prints that rule next to every such key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import NO_ADAPTER

BUILTIN_PREFIX = "builtin:"
RECIPE_PATH = {"path": "recipe"}  # relative to the recipe file
CWD_PATH = {"path": "cwd"}  # relative to the working directory, like output_dir


class Section(BaseModel):
    """A recipe section: unknown keys are errors (the loader names the nearest valid key)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def input_ref(self, key: str) -> str | None:
        """The value of a key that names an earlier stage's output (start_from, reward_from): None for the
        default stage's output, 'none' for no adapter, else a folder. A section whose key is derived from
        others (the RL stages' `rewards`) overrides this."""
        return getattr(self, key)


class ModelSection(Section):
    name_or_path: str = Field(
        description="Hub id (microsoft/phi-2), local folder (relative to the recipe when it exists there), or "
        "`builtin:tiny-phi` (shipped with finetune, offline).",
        json_schema_extra=RECIPE_PATH,
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you need it.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel. auto/flash_attention_2 use FlashAttention-2 when flash-attn and CUDA "
        "are present, else SDPA. eager at fp16 runs with fp32 scores (Phi fp16 overflow guard).",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: quantise the frozen base to 4-bit NF4 (needs CUDA).")


class TemplateSection(Section):
    name: str = Field(
        "phi_instruct",
        description="Chat template: a name shipped in finetune/templates (phi_instruct, phi3) or a .jinja path.",
        json_schema_extra=RECIPE_PATH,
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank; higher adds capacity and memory.")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="Modules to adapt. auto = every linear layer of the model family "
        "(phi: q_proj k_proj v_proj dense fc1 fc2; phi3: qkv_proj o_proj gate_up_proj down_proj).",
    )


class LaunchSection(Section):
    accelerate_config: str | None = Field(
        None,
        description="accelerate config. When set, `finetune <stage>` re-runs itself under "
        "`accelerate launch --config_file` with it.",
        json_schema_extra=RECIPE_PATH,
    )
    num_processes: int | None = Field(None, gt=0, description="Processes for accelerate launch (default: its config).")


class LoggingSection(Section):
    logging_steps: int = Field(10, gt=0, description="Log training metrics every N optimiser steps.")
    report_to: list[str] = Field(
        default_factory=list,
        description="Trackers every stage reports to: tensorboard, mlflow, wandb (written by finetune, one naming "
        "scheme, see docs/tracking.md); other names transformers knows (comet_ml, trackio, ...) go to the TRL "
        "stages' trainers. Inside an Azure ML job mlflow is added; [none] turns every tracker off.",
    )
    verbose: bool = Field(
        False,
        description="Also print the raw detail: the Trainer's log dictionaries beside the one-line step logs, "
        "library warnings finetune silences as not actionable, and the libraries' own progress bars. "
        "`--verbose` on a stage command or `finetune pipeline` sets it.",
    )
    project: str | None = Field(
        None,
        description="MLflow experiment and W&B project (default: $MLFLOW_EXPERIMENT_NAME / $WANDB_PROJECT, else "
        "finetune).",
    )
    run_name: str | None = Field(
        None,
        description="Name of the run (the pipeline's parent run; stage runs add the stage). Default: the "
        "last part of output_dir.",
    )
    tensorboard_dir: str | None = Field(
        None,
        description="TensorBoard log folder; each stage writes <tensorboard_dir>/<stage>/ (default: "
        "<output_dir>/tensorboard).",
        json_schema_extra=CWD_PATH,
    )

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, value: list[str]) -> list[str]:
        if "all" in value:
            raise ValueError("name the trackers (e.g. [tensorboard, mlflow]); 'all' would report everything twice")
        if "none" in value and len(value) > 1:
            raise ValueError("'none' turns every tracker off: use it alone")
        return value


class DataSource(Section):
    path: str = Field(
        description="Local jsonl/json/parquet/csv file, a local dataset folder (a clone of a hub dataset repository: "
        "its README names the splits) or a hub dataset id.",
        json_schema_extra=RECIPE_PATH,
    )
    config: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Split to read.")
    weight: float = Field(
        1.0, gt=0, description="Share of this source's rows to use: 0.5 takes half, 2.0 repeats it twice."
    )
    format: Literal[
        "auto", "messages", "prompt_completion", "preference", "unpaired", "prompt", "sharegpt", "alpaca", "hh"
    ] = Field(
        "auto",
        description="Row format; auto detects it from the columns. messages (ultrachat_200k too), "
        "prompt_completion, preference (prompt/chosen/rejected; ultrafeedback_binarized's whole conversations "
        "too), unpaired (prompt/completion/label, KTO), prompt (PPO), sharegpt (`conversations` of from/value: "
        "human, gpt, system), alpaca (instruction/input/output), hh (Anthropic HH-RLHF chosen/rejected "
        "transcripts).",
    )


class DataSection(Section):
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


# ----------------------------------------------------------------------------- stage sections


class TrainedStage(Section):
    """Keys every training stage has: resuming and the held-out generation check."""

    resume: bool | str = Field(
        True,
        description="true: continue from the newest complete checkpoint of the same run (refused, with the "
        "differences named, if the data or training settings changed); false: start over (the old checkpoints "
        "are removed); or a checkpoint path.",
        json_schema_extra=CWD_PATH,
    )
    eval_generate_rows: int = Field(
        64,
        ge=0,
        description="Held-out prompts answered greedily before and after training to measure correctness "
        "(rows with a reference `answer`).",
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for the held-out correctness check.")


def _adapter_ref(value: str | None, key: str) -> str | None:
    """One spelling for "no adapter": none. 'base' was the old spelling of start_from."""
    if value is not None and value.strip().lower() == "base":
        raise ValueError(f"'base' is now spelt '{NO_ADAPTER}': set {key}: {NO_ADAPTER} to start from no adapter")
    return value


TRL_STAGE_CONFIG = ConfigDict(extra="allow", validate_default=True)


class TrlStage(TrainedStage):
    """A stage trained by a TRL trainer: the project's own keys below, plus any field of the stage's TRL
    config (e.g. `sft.max_steps`, `sft.learning_rate`), which overrides the shared `training` block."""

    model_config = TRL_STAGE_CONFIG


class FromEarlierStage(Section):
    """A stage that starts from an earlier stage's adapter."""

    start_from: str | None = Field(
        None,
        description="Adapter folder this stage starts from (default: the earlier stage's output, see the stage "
        f"list); '{NO_ADAPTER}' for the plain base. Its recorded chain (the adapters it was trained on) is merged "
        "into the base first; its recipe must name the same base model and template.",
        json_schema_extra=CWD_PATH,
    )

    @field_validator("start_from")
    @classmethod
    def _start_spelling(cls, value):
        return _adapter_ref(value, "start_from")


class SftSection(TrlStage):
    """SFT (trl.SFTConfig fields too: max_steps, max_length, packing, ...)."""

    data: DataSection = Field(description="Conversations or prompt/completion rows.")


class RewardSection(TrlStage, FromEarlierStage):
    """Reward model: a LoRA sequence-classification head (trl.RewardConfig fields too)."""

    model_config = TRL_STAGE_CONFIG  # with several bases pydantic would take FromEarlierStage's

    data: DataSection = Field(description="Preference rows: prompt / chosen / rejected.")


class DpoSection(TrlStage, FromEarlierStage):
    """DPO (trl.DPOConfig fields too: beta, loss_type, precompute_ref_log_probs, ...)."""

    model_config = TRL_STAGE_CONFIG  # with several bases pydantic would take FromEarlierStage's

    data: DataSection = Field(description="Preference rows: prompt / chosen / rejected.")


class KtoSection(TrlStage, FromEarlierStage):
    """KTO (trl.KTOConfig fields too: beta, desirable_weight, undesirable_weight, loss_type, ...): unpaired replies
    marked desirable or not, from the SFT output; the reference is the start model (adapters disabled)."""

    model_config = TRL_STAGE_CONFIG  # with several bases pydantic would take FromEarlierStage's

    data: DataSection = Field(
        description="Unpaired rows: prompt / completion / label (true: desirable), TRL's unpaired preference format; "
        "or preference rows (prompt / chosen / rejected), each split into a desirable and an undesirable row."
    )


class OrpoSection(TrlStage):
    """ORPO (trl.experimental.orpo.ORPOConfig fields too: beta, ...): supervised fine-tuning on the chosen reply and
    an odds-ratio preference term in one stage, from the base: no SFT stage and no reference model."""

    data: DataSection = Field(description="Preference rows: prompt / chosen / rejected.")


class PpoAlgorithm(Section):
    """The PPO engine's knobs (finetune.rl.engine reads this section directly). Defaults and their
    sources: docs/ppo.md."""

    response_length: int = Field(53, gt=0, description="Maximum new tokens per response.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (top_k=0, top_p=1: no hidden filtering).")
    ppo_epochs: int = Field(4, gt=0, description="Optimisation passes over each rollout.")
    mini_batches: int = Field(1, gt=0, description="Minibatches per PPO epoch (one optimiser step each).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward (gradient accumulation).")
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
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="Subtracted from the score of a response that never reached the end-of-turn token."
    )
    score_clip: float | None = Field(None, gt=0, description="Clip the shaped score to +-this (OpenRLHF uses 10).")
    learning_rate: float = Field(
        1e-5, ge=0, description="Policy adapter learning rate; 0 keeps the policy as it starts (a control run)."
    )
    value_learning_rate: float = Field(5e-5, gt=0, description="Value adapter and value head learning rate.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule over updates."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-5, gt=0, description="AdamW epsilon (N+ implementation detail).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient norm clip (per optimiser); null for none.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the optimisation passes (never during generation)."
    )


REWARD_EXTRAS = ("stopped", "response_tokens", "response_limit", "special_tokens")  # see finetune/rl/rewards.py


class RewardTerm(Section):
    """One term of an RL stage's reward: a rule function, or the learned reward model, with its weight."""

    function: str | None = Field(
        None,
        description="Rule reward `module:function`, called as f(prompt, response, example) -> float (or "
        "f(prompt, response)); keywords it declares by name among stopped, response_tokens, response_limit, "
        "special_tokens are passed in (docs/rewards.md). Shipped: finetune.rl.rewards:exact_answer, numeric_answer, "
        "format_reward, length_penalty. Modules beside the recipe are importable; the code runs with your "
        "permissions: name only code you trust.",
    )
    model: str | None = Field(
        None,
        description="An entry without `function` is the learned reward: the reward stage's output folder "
        "(default: <output_dir>/reward), scored on the policy's shared base and normalised (normalize_reward).",
        json_schema_extra=CWD_PATH,
    )
    weight: float = Field(1.0, description="Weight of this term in the score (the terms are summed).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the function (e.g. {tolerance: 0.01})."
    )

    @model_validator(mode="after")
    def _one_kind(self):
        if self.function is not None and self.model is not None:
            raise ValueError(
                "a rewards entry is either a rule {function: module:name, weight: w} or the learned reward "
                "{model: <reward stage output>, weight: w}, not both"
            )
        if self.function is None and self.kwargs:
            raise ValueError("kwargs are for a rule function; the learned reward ({model: ...}) takes none")
        if self.model is not None and self.model.strip().lower() == NO_ADAPTER:
            raise ValueError(f"model: {NO_ADAPTER} is no reward: leave the learned reward's entry out instead")
        clash = sorted(set(self.kwargs) & set(REWARD_EXTRAS))
        if clash:
            raise ValueError(
                f"kwargs {clash}: the stage itself passes {', '.join(REWARD_EXTRAS)} to a function that declares them"
            )
        return self

    def label(self) -> str:
        """The term's name in logs and metrics: the function's name, or 'learned'."""
        return self.function.rpartition(":")[2] if self.function else "learned"


class RlRewards(Section):
    """The reward of an RL stage (PPO, GRPO): rule functions and/or the learned reward model, weighted and
    summed (finetune.rl.scoring). Defined once here so every RL stage takes the same `rewards:` list."""

    rewards: list[RewardTerm] | None = Field(
        None,
        description="The reward, a weighted sum of terms: each {function: module:name, weight: w, kwargs: {...}} "
        "(a rule) or {model: <reward stage output; null = <output_dir>/reward>, weight: w} (the learned reward, "
        "at most one). Default: the learned reward of the reward stage alone. Each term's mean is logged "
        "separately (reward_<name>).",
    )

    @field_validator("rewards")
    @classmethod
    def _terms(cls, value):
        if value is None:
            return value
        if not value:
            raise ValueError("an empty list is no reward: give at least one term, or leave rewards out")
        if sum(t.function is None for t in value) > 1:
            raise ValueError("at most one learned reward ({model: ...}) per stage: the stage loads one reward adapter")
        return value

    def reward_terms(self) -> list[tuple[str, RewardTerm]]:
        """(recipe key for messages, term) of every term of the stage's reward, in order."""
        terms = self.rewards if self.rewards is not None else [RewardTerm()]
        return [(f"rewards[{i}]", t) for i, t in enumerate(terms)]

    def input_ref(self, key: str) -> str | None:
        if key != "reward_from":
            return super().input_ref(key)
        model = next((t for _, t in self.reward_terms() if t.function is None), None)
        return NO_ADAPTER if model is None else model.model


class PpoSection(TrainedStage, FromEarlierStage, PpoAlgorithm, RlRewards):
    """PPO with a learned and/or rule-based reward: finetune's own trainer (TRL no longer has a
    PPOTrainer), so these keys are the project's own, not a TRL config's."""

    data: DataSection = Field(
        description="Prompts: prompt-only rows ({'prompt': ...}), conversations (the turns before the last "
        "assistant reply) or preference rows (their prompt)."
    )
    reward_from: str | None = Field(
        None,
        description=f"The older spelling of the learned reward (kept working; use `rewards`): reward-model stage "
        f"output (default: <output_dir>/reward), or '{NO_ADAPTER}' to use only `reward_function`. Must share the "
        "policy's base (both trained on the same SFT output).",
        json_schema_extra=CWD_PATH,
    )
    reward_function: str | None = Field(
        None,
        description="The older spelling of a rule reward (kept working; use `rewards`): `module:function` added "
        "to the learned reward with weight `reward_function_weight`.",
    )
    reward_function_weight: float = Field(1.0, description="Weight of `reward_function` in the score.")
    unique_prompts: bool = Field(
        True,
        description="Keep one copy of a repeated prompt (preference data repeats it once per pair); the count "
        "is reported.",
    )
    updates: int = Field(100, gt=0, description="PPO updates (each: rollout, score, optimise).")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per update per process.")
    max_prompt_length: int = Field(256, gt=0, description="Longer prompts are dropped and counted (never truncated).")
    normalize_reward: bool = Field(
        True,
        description="Normalise the learned reward with its mean/std over the start policy's first rollout "
        "(kept fixed after).",
    )
    value_init: Literal["reward", "new"] = Field(
        "reward", description="Value adapter + head: a copy of the reward model's (docs/ppo.md) or fresh."
    )
    save_every: int = Field(10, gt=0, description="Checkpoint every N updates (resume continues from the newest).")
    eval_prompts: int = Field(
        64,
        ge=0,
        description="Held-out prompts (data.eval) the policy samples for before and after training, with a fixed "
        "seed: their raw learned reward, KL to the reference, EOS rate and length go to metrics.json "
        "(eval_score_before/after, ...); 0 skips.",
    )

    @field_validator("reward_from")
    @classmethod
    def _reward_spelling(cls, value):
        return _adapter_ref(value, "reward_from")

    @model_validator(mode="after")
    def _one_reward_form(self):
        older = [
            k
            for k, v, unset in (
                ("reward_from", self.reward_from, None),
                ("reward_function", self.reward_function, None),
                ("reward_function_weight", self.reward_function_weight, 1.0),
            )
            if v != unset
        ]
        if self.rewards is not None and older:
            raise ValueError(
                f"both rewards and {', '.join(older)} are set: they are two spellings of the reward; keep rewards "
                "and move the others into it ({model: <reward_from>}, {function: <reward_function>, weight: "
                "<reward_function_weight>})"
            )
        return self

    def reward_terms(self) -> list[tuple[str, RewardTerm]]:
        """The `rewards` list, or the older keys translated into it (reward_from -> the learned term unless
        'none'; reward_function -> a rule term of weight reward_function_weight)."""
        if self.rewards is not None:
            return super().reward_terms()
        terms = []
        if self.reward_from is None or self.reward_from.strip().lower() != NO_ADAPTER:
            terms.append(("reward_from", RewardTerm(model=self.reward_from)))
        if self.reward_function:
            terms.append(
                ("reward_function", RewardTerm(function=self.reward_function, weight=self.reward_function_weight))
            )
        return terms


class ExportSection(Section):
    """Merge a stage's adapter chain into the base and write a plain Hugging Face model folder."""

    stage: str = Field(
        "auto",
        description="Which stage's model to export (a stage whose output is a chat model): its adapter chain is "
        "merged into the base. auto = the last finished such stage in pipeline order.",
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype of the exported weights (merging always runs in fp32 first). auto = precision."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard (transformers size string: 500MB, 2GB).")
    output: str | None = Field(
        None, description="Target folder (default: <output_dir>/export).", json_schema_extra=CWD_PATH
    )
    force: bool = Field(False, description="Replace an existing target (also `finetune export RECIPE --force`).")
    parity_prompts: int = Field(
        4,
        ge=0,
        description="Prompts on which the merged model's logits are compared with base + unmerged adapters "
        "(recorded in the model card); 0 skips the check.",
    )
    eval_generate_rows: int | None = Field(
        None,
        ge=0,
        description="Held-out SFT prompts the exported model answers greedily to measure correctness "
        "(default: sft.eval_generate_rows; 0 skips).",
    )

    push_to_hub: str | None = Field(
        None,
        description="Hugging Face Hub repository (user/name) to upload the export folder to after it is written "
        "(also `finetune export RECIPE --push-to-hub user/name`). Token: HF_TOKEN or `hf auth login`.",
    )
    hub_private: bool = Field(True, description="Create the Hub repository private (false: public).")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise ValueError("not a size; write e.g. 500MB or 2GB") from None
        return value


class SamplesSection(Section):
    """Replies a person can read stage by stage: every chat-model stage (sft, dpo, ppo, export) answers the
    same held-out prompts greedily, before and after it trains, and saves them to `<stage>/samples.jsonl`."""

    count: int = Field(
        8, ge=0, description="How many held-out prompts (the first distinct ones of `data`); 0 turns samples off."
    )
    data: list[DataSource] = Field(
        default_factory=list,
        description="Where the prompts come from (any row a PPO prompt can come from; each prompt is its first "
        "user turn, with any system turn before it). Default: the held-out rows of the first stage with data "
        "(sft.data.eval, or its held-out split), so every stage answers the same prompts.",
    )
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per reply (greedy).")


class EvalTask(Section):
    """One lm-evaluation-harness task (or group) and how to run it."""

    name: str = Field(
        description="Task or group name as lm-eval knows it (ifeval, gsm8k, mmlu, ...) or one "
        "defined in eval.include_path."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (default: the task's own).")
    apply_chat_template: bool | None = Field(
        None,
        description="Render prompts with the tokenizer's chat template (few-shot examples as turns). Default: "
        "eval.apply_chat_template.",
    )
    limit: float | None = Field(
        None, gt=0, description="Documents to score (a share when below 1); for quick checks, not for reporting."
    )


class EvalSection(Section):
    """Benchmarks with lm-evaluation-harness (`pip install 'finetune[eval]'`): the trained model and the base,
    side by side, on the same tasks and settings."""

    tasks: list[EvalTask] = Field(
        min_length=1, description="Tasks to run: names, or {name, num_fewshot, apply_chat_template, limit}."
    )
    include_path: str | None = Field(
        None,
        description="Folder of extra lm-eval task YAMLs (e.g. ../data/tiny/eval for the offline tiny task).",
        json_schema_extra=RECIPE_PATH,
    )
    model: str = Field(
        "auto",
        description="Which model to score: auto = the export when complete, else the last finished chat stage's "
        "adapter chain merged in memory; or export, or a chat stage (sft, dpo, ppo).",
    )
    base: bool = Field(True, description="Score the base model too (same tasks, same settings).")
    apply_chat_template: bool = Field(
        True, description="Default for the tasks' apply_chat_template: the template the model was trained with."
    )
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")
    max_length: int | None = Field(
        None, gt=0, description="Context length lm-eval assumes (default: the model config's)."
    )
    output: str | None = Field(
        None, description="Results folder (default: <output_dir>/eval).", json_schema_extra=CWD_PATH
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, value):
        if isinstance(value, str):
            value = [value]
        return [{"name": t} if isinstance(t, str) else t for t in value] if isinstance(value, list) else value


class PipelineSection(Section):
    stages: list[str] | None = Field(
        None,
        description="Stages `finetune pipeline` runs, always in pipeline order (see the stage list). "
        "Default: every stage this recipe has a section for, then export.",
    )
    force: bool = Field(
        False,
        description="Run every stage even when its finished output exists (also `finetune pipeline RECIPE --force`).",
    )


class AzureMLSection(Section):
    """Where and how `finetune azureml submit` runs a stage on Azure ML; the flags of the same name
    (--compute, --instance-count, ...) override these. Never put a secret here: the job YAML needs none."""

    subscription_id: str | None = Field(None, description="Azure subscription id of the workspace.")
    resource_group: str | None = Field(None, description="Resource group of the workspace.")
    workspace_name: str | None = Field(None, description="Azure ML workspace name.")
    config: str | None = Field(
        None,
        description="The workspace's config.json (as the Azure portal downloads it), instead of the three ids "
        "above. Default: ./config.json or ./.azureml/config.json when present.",
        json_schema_extra=RECIPE_PATH,
    )
    compute: str | None = Field(None, description="Compute cluster name (required to submit).")
    instance_count: int = Field(1, gt=0, description="Nodes; each runs gpus_per_node processes.")
    gpus_per_node: int = Field(
        1, gt=0, description="Processes per node (PyTorch distribution process_count_per_instance): one per GPU."
    )
    environment: str | None = Field(
        None,
        description="A registered Azure ML environment (name:version or name@latest); default: build "
        "azureml/Dockerfile from this repository.",
    )
    datastore: str = Field("workspaceblobstore", description="Datastore for stage outputs (adapters, export).")
    output_path: str | None = Field(
        None,
        description="Folder on the datastore; each stage writes <output_path>/<stage>/ and later stages read "
        "from there. Default: finetune/<last part of output_dir>.",
    )
    experiment_name: str = Field("finetune", description="Azure ML experiment the jobs are filed under.")
    register_model: bool = Field(
        True,
        description="The pipeline job's last step registers the export as a model asset (custom_model), which a "
        "managed online endpoint deploys (docs/azureml.md).",
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$",
        description="Name of the registered model (default: the recipe file's name, e.g. phi2_chat).",
    )
    model_version: str | None = Field(
        None, description="Version of the registered model (default: the workspace's next version)."
    )

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
