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
# GGUF file types `export.gguf` accepts: the converter's own output types (f32, f16, bf16) and llama.cpp's
# quantisations of them (the names `llama-quantize --help` lists, lower-cased).
GGUF_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0",
    "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
)  # fmt: skip


class Section(BaseModel):
    """A recipe section: unknown keys are errors (the loader names the nearest valid key); numbers must be finite
    (pydantic takes .inf and .nan for a float unless told not to)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

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
    alpha: int = Field(
        32, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="Modules to adapt. auto = every linear layer of the model family "
        "(phi: q_proj k_proj v_proj dense fc1 fc2; phi3: qkv_proj o_proj gate_up_proj down_proj); all-linear = "
        "PEFT's every linear layer but the output head, for any architecture; or a list of module names.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA (Liu et al. 2024, arXiv:2402.09353): a learned magnitude per output unit on top of the LoRA "
        "direction update. Slower per step than plain LoRA; merges into the base like LoRA.",
    )
    use_rslora: bool = Field(
        False,
        description="rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scale the update by alpha / sqrt(r) instead of "
        "alpha / r, so a high rank still learns.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [lm_head] or [embed_tokens] after "
        "adding tokens); their trained copy replaces the original on export. The reward stage's score head is "
        "always saved. Not with PPO.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices learn this many times faster than "
        "the A matrices (the paper suggests 16); null = one learning rate. PEFT's create_loraplus_optimizer builds "
        "the optimiser (AdamW); PPO applies it to its policy and value optimisers.",
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
        "auto",
        "messages",
        "prompt_completion",
        "preference",
        "unpaired",
        "prompt",
        "sharegpt",
        "alpaca",
        "hh",
        "question_answer",
    ] = Field(
        "auto",
        description="Row format; auto detects it from the columns. messages (ultrachat_200k too), "
        "prompt_completion, preference (prompt/chosen/rejected; ultrafeedback_binarized's whole conversations "
        "too), unpaired (prompt/completion/label, KTO), prompt (PPO, GRPO), sharegpt (`conversations` of from/value: "
        "human, gpt, system), alpaca (instruction/input/output), hh (Anthropic HH-RLHF chosen/rejected "
        "transcripts), question_answer (question/answer, e.g. openai/gsm8k; the answer is also the reference rule "
        "rewards read).",
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

    def token_budgets(self, stage: str, setting) -> list[tuple[str, int]]:
        """(keys, tokens) this section asks of one sequence, each of which must fit the model's context
        (finetune.core.limits); `setting(name)` reads a TRL field with its defaults."""
        return [(f"{stage}.max_new_tokens", self.max_new_tokens)] if self.eval_generate_rows else []


def _adapter_ref(value: str | None, key: str) -> str | None:
    """One spelling for "no adapter": none. 'base' was the old spelling of start_from."""
    if value is not None and value.strip().lower() == "base":
        raise ValueError(f"'base' is now spelt '{NO_ADAPTER}': set {key}: {NO_ADAPTER} to start from no adapter")
    return value


TRL_STAGE_CONFIG = ConfigDict(extra="allow", validate_default=True, allow_inf_nan=False)


class TrlStage(TrainedStage):
    """A stage trained by a TRL trainer: the project's own keys below, plus any field of the stage's TRL
    config (e.g. `sft.max_steps`, `sft.learning_rate`), which overrides the shared `training` block."""

    model_config = TRL_STAGE_CONFIG

    def token_budgets(self, stage: str, setting) -> list[tuple[str, int]]:
        return [(f"{stage}.max_length", setting("max_length")), *super().token_budgets(stage, setting)]


class FromEarlierStage(Section):
    """A stage that starts from an earlier stage's adapter."""

    start_from: str | None = Field(
        None,
        description="Adapter folder this stage starts from (default: the earlier stage's output, see the stage "
        f"list), or an earlier stage's name for its output (sft); '{NO_ADAPTER}' for the plain base. Its recorded "
        "chain (the adapters it was trained on) is merged into the base first; its recipe must name the same base "
        "model and template.",
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
    padding_free: bool = Field(
        True,
        description="Padding-free batches: the chosen and rejected sequences of a batch packed into rows, each "
        "with its own position ids (no FLOPs on padding; same loss and gradients as padded batches). The name "
        "of DPOConfig's switch (dpo.padding_free), which trl.RewardConfig lacks. See docs/benchmarks.md.",
    )


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


class RlOptimisation(Section):
    """Optimiser keys the RL engines share (finetune.rl.engine reads them directly)."""

    mini_batches: int = Field(1, gt=0, description="Minibatches per pass over a rollout (one optimiser step each).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward (gradient accumulation).")
    learning_rate: float = Field(
        1e-5, ge=0, description="Policy adapter learning rate; 0 keeps the policy as it starts (a control run)."
    )
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule over updates."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-5, gt=0, description="AdamW epsilon (N+ implementation detail).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient norm clip (per optimiser); null for none.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the optimisation passes (never during generation)."
    )
    use_vllm: bool = Field(
        False,
        description="Sample rollouts with vLLM (`pip install 'finetune[vllm]'`, CUDA only) instead of transformers' "
        "generate; the policy's LoRA weights are handed to vLLM after every update (docs/grpo.md). Re-scoring and "
        "training stay in transformers.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Share of the GPU's memory vLLM may take (TRL's default), beside the training model.",
    )


class PpoAlgorithm(RlOptimisation):
    """The PPO engine's knobs (finetune.rl.ppo_engine reads this section directly). Defaults and their
    sources: docs/ppo.md."""

    response_length: int = Field(53, gt=0, description="Maximum new tokens per response.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (top_k=0, top_p=1: no hidden filtering).")
    ppo_epochs: int = Field(4, gt=0, description="Optimisation passes over each rollout.")
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
    value_learning_rate: float = Field(5e-5, gt=0, description="Value adapter and value head learning rate.")


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
        "at most one). Unset: the stage's reward_from / reward_function keys (ppo: the reward stage's learned "
        "reward; grpo: none, so name a rule). Each term's mean is logged separately (reward_<name>).",
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


class GrpoAlgorithm(RlOptimisation):
    """The GRPO engine's knobs (finetune.rl.grpo_engine reads this section directly). Keys that mean what
    they mean in TRL's GRPOConfig carry its names and defaults; docs/grpo.md gives each source."""

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_completion_length: int = Field(512, gt=0, description="Maximum new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (top_k=0, top_p=1: no hidden filtering).")
    beta: float = Field(
        0.0,
        ge=0,
        description="Weight of the k3 KL term to the reference in the loss; 0 (TRL's default) skips the "
        "reference's forward.",
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clip of the ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip: 1 + epsilon_high (DAPO's clip-higher uses 0.28); default epsilon."
    )
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "dapo",
        description="How token losses are averaged: grpo (per completion, then over completions), bnpo (over this "
        "process's tokens), dapo (over every process's tokens; TRL's default), dr_grpo (sum / (completions x "
        "max_completion_length)).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide the group-centred reward by the group's std (group), the batch's (batch) or nothing "
        "(none: Dr. GRPO). For advantage_estimator grpo.",
    )
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = Field(
        "grpo",
        description="Baseline: grpo (group mean, scaled by scale_rewards), rloo (mean of the other completions of "
        "the prompt), reinforce_pp (REINFORCE++: batch mean and std).",
    )
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each rollout (GRPO's mu).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions that never reached the end-of-turn token out of the loss (DAPO)."
    )
    use_bias_correction_kl: bool = Field(
        True, description="Weight the k3 KL term by the importance ratio, as TRL does by default."
    )
    dynamic_sampling: bool = Field(
        False,
        description="Leave out of the update the prompts whose completions all got the same reward (DAPO's dynamic "
        "sampling without refilling); how many is logged as frac_reward_zero_std.",
    )
    overlong_buffer: int = Field(
        0,
        ge=0,
        description="DAPO's soft overlong penalty: completions longer than max_completion_length - overlong_buffer "
        "lose up to overlong_penalty_factor, linearly; 0 turns it off.",
    )
    overlong_penalty_factor: float = Field(1.0, ge=0, description="The soft overlong penalty at full length.")


class RlStage(TrainedStage, FromEarlierStage, RlRewards):
    """What the RL stages share: prompts, rewards, how many updates of how many prompts, checkpoints and the
    held-out rollouts."""

    data: DataSection = Field(
        description="Prompts: prompt-only rows ({'prompt': ...}), conversations (the turns before the last "
        "assistant reply) or preference rows (their prompt)."
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
    updates: int = Field(100, gt=0, description="Updates (each: rollout, score, optimise).")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per update per process.")
    max_prompt_length: int = Field(256, gt=0, description="Longer prompts are dropped and counted (never truncated).")
    save_every: int = Field(10, gt=0, description="Checkpoint every N updates (resume continues from the newest).")
    eval_prompts: int = Field(
        64,
        ge=0,
        description="Held-out prompts (data.eval) the policy samples for before and after training, with a fixed "
        "seed: their raw learned reward, KL to the reference, EOS rate and length go to metrics.json "
        "(eval_score_before/after, ...); 0 skips.",
    )

    def token_budgets(self, stage: str, setting) -> list[tuple[str, int]]:
        # the key of the response budget differs by stage: ppo.response_length, grpo.max_completion_length
        key = "response_length" if "response_length" in type(self).model_fields else "max_completion_length"
        budgets = [(f"{stage}.max_prompt_length + {stage}.{key}", self.max_prompt_length + self.response_length)]
        if self.eval_generate_rows:
            budgets.append(
                (f"{stage}.max_prompt_length + {stage}.max_new_tokens", self.max_prompt_length + self.max_new_tokens)
            )
        return budgets

    @field_validator("reward_from", check_fields=False)
    @classmethod
    def _reward_spelling(cls, value):
        return _adapter_ref(value, "reward_from")

    @model_validator(mode="after")
    def _one_reward_form(self):
        fields = type(self).model_fields  # each stage's own defaults (grpo.reward_from is none, ppo's unset)
        older = [
            k
            for k in ("reward_from", "reward_function", "reward_function_weight")
            if getattr(self, k) != fields[k].default
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


class PpoSection(RlStage, PpoAlgorithm):
    """PPO with a learned and/or rule-based reward: finetune's own trainer (TRL no longer has a
    PPOTrainer), so these keys are the project's own, not a TRL config's."""

    reward_from: str | None = Field(
        None,
        description=f"The older spelling of the learned reward (kept working; use `rewards`): reward-model stage "
        f"output (default: <output_dir>/reward), or '{NO_ADAPTER}' to use only `reward_function`. Must share the "
        "policy's base (both trained on the same SFT output).",
        json_schema_extra=CWD_PATH,
    )
    normalize_reward: bool = Field(
        True,
        description="Normalise the learned reward with its mean/std over the start policy's first rollout "
        "(kept fixed after).",
    )
    value_init: Literal["reward", "new"] = Field(
        "reward", description="Value adapter + head: a copy of the reward model's (docs/ppo.md) or fresh."
    )


class GrpoSection(RlStage, GrpoAlgorithm):
    """GRPO and its critic-free relatives (RLOO, REINFORCE++, Dr. GRPO, DAPO's loss): finetune's engine on one
    shared base (docs/grpo.md says why not TRL's GRPOTrainer); keys named as in TRL's GRPOConfig where they
    mean the same."""

    reward_from: str | None = Field(
        NO_ADAPTER,
        description=f"The older spelling of the learned reward (kept working; use `rewards`): a reward-stage output "
        f"(e.g. <output_dir>/reward) whose adapter and score head score the completions on the shared base, added "
        f"to `reward_function`; default '{NO_ADAPTER}': rule rewards only. Must share the policy's base (both "
        "trained on the same SFT output).",
        json_schema_extra=CWD_PATH,
    )
    normalize_reward: bool = Field(
        False,
        description="Normalise the learned reward with its mean/std over the start policy's first rollout (group "
        "scaling makes this matter only for scale_rewards none).",
    )

    @property
    def response_length(self) -> int:
        """The RL stages' common name for the longest response (the memory estimate and --plan read it)."""
        return self.max_completion_length


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
    gguf: list[str] = Field(
        default_factory=list,
        description="GGUF files to write into <export>/gguf/ with llama.cpp's converter and quantiser, e.g. "
        "[q8_0, q4_k_m] (also `finetune export RECIPE --gguf q8_0,q4_k_m`; needs `pip install 'finetune[gguf]'`): "
        f"any of {', '.join(GGUF_TYPES)}. An Ollama Modelfile is written beside them (FROM the first) and each "
        "file's held-out correctness is measured with llama.cpp. A finished export gets them added without a "
        "new merge. docs/deploy.md.",
    )

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_list(cls, value):
        if isinstance(value, str):  # export.gguf=q8_0,q4_k_m on the command line
            value = [v for v in value.split(",") if v.strip()]
        return value

    @field_validator("gguf")
    @classmethod
    def _gguf_types(cls, value: list[str]) -> list[str]:
        names = [v.strip().lower() for v in value]
        unknown = [v for v in names if v not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {unknown}; use any of {', '.join(GGUF_TYPES)}")
        return list(dict.fromkeys(names))

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

    def token_budgets(self, stage: str, setting) -> list[tuple[str, int]]:
        return [(f"{stage}.max_length", self.max_length)] if self.max_length else []

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
