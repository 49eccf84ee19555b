"""How much memory a stage needs, estimated before anything loads, and the check that stops a stage that
cannot fit (instead of an out-of-memory kill halfway through).

The estimate is a sum of parts, each a small pure function of the model's shape and the stage's
settings (docs/memory.md has the table for Phi-2 and how it was calibrated):
- runtime: Python, torch, transformers, TRL (host RAM) or the CUDA context, kernels' workspace and the
  caching allocator's slack (GPU);
- weights: parameters x bytes of the dtype (4-bit: ~0.56 byte for each quantised linear weight);
- loading: transformers reads the checkpoint through a memory map, so while a model loads the host holds
  the file's pages (parameters x the checkpoint's dtype, fp16 for Phi-2) on top of the weights; a stage
  that starts from earlier adapters loads the base in fp32 to merge them (peft#2368) before casting:
  parameters x 4 on the host. Measured on CPU (bench/memory.py): peak = runtime + weights + file, for 2-
  and 4-layer Phi-2-width models within 2%, and within 5% of the issue's full-size Phi-2 figures;
- adapters: LoRA parameters, their gradients and AdamW state (16 bytes each; gradients and optimiser
  state sharded over the processes under ZeRO-2, ZeRO-3 and FSDP, the weights too under ZeRO-3 and FSDP);
  PPO holds policy, value, reward and reference adapters and two optimisers, whole in every process (plain
  data parallel: docs/scaling.md); a stage that merges earlier adapters holds one of them (fp32) while it
  merges;
- sharding: under ZeRO-3 and FSDP each process holds 1/N of the frozen base while it trains; before training
  it holds the whole base (loaded whole, merged, fingerprinted and evaluated before the engine partitions it),
  so the larger of the two phases is the peak;
- LoRA activations: each adapted layer keeps its rank-r intermediate x @ A (tokens x r, fp32) for the
  backward pass, and an fp32 copy of its input when the base is 16-bit or LoRA dropout is on. At r = 16
  this is a few percent of the activations; it grows with r and is what a huge rank runs out of memory on
  (r = 100000 on the tiny model: 20 GB at batch 16 x 128 tokens);
- activations: 34 bytes per token, layer and hidden unit in 16-bit (twice in fp32) without gradient
  checkpointing, as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", table 2) count a transformer layer when attention runs in a fused kernel (no attention
  matrix: flash attention / SDPA); with checkpointing, each layer's input plus one layer recomputed;
- logits: tokens x vocabulary x (dtype + fp32 copy + fp32 gradient) for the language-model loss;
- generation: the KV cache (2 x layers x key/value width x dtype per token) for PPO's rollouts and the
  held-out samples;
- export: the fp32 merged model (and its checkpoint's pages while it loads), then the unmerged reference.
Evaluation peaks (held-out loss, DPO log-probs, generation) and training peaks do not coexist; the
estimate takes the larger.

`FINETUNE_AVAILABLE_MEMORY_GB` (GiB) overrides what the check sees as available: on a GPU machine the free
memory of each GPU, on a CPU machine the RAM for all of this machine's processes. `FINETUNE_MEMORY_CHECK=off`
skips the check (the estimate is still logged).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.readers import read_yaml
from finetune.recipe import BUILTIN_PREFIX, STAGES, Recipe, RecipeError
from finetune.tiny import tiny_config

from .modeling import LORA_TARGETS, whole_weights

log = logging.getLogger(__name__)

GIB = 2**30
ENV_AVAILABLE = "FINETUNE_AVAILABLE_MEMORY_GB"
ENV_CHECK = "FINETUNE_MEMORY_CHECK"

# What a stage process holds besides its model on a CPU run (interpreter, torch, transformers, TRL, datasets,
# tokenizer, data) is each stage's `Memory.runtime_cpu_gib` in the registry, calibrated on CPU (bench/memory.py,
# docs/memory.md): 0.53 GiB in SFT and DPO, 0.45 in PPO, 0.64 in export, measured on 2- and 4-layer
# Phi-2-width models (fp32, seq <= 128).
# GPU: CUDA context and kernel workspaces, then the caching allocator's fragmentation on top of what is used.
RUNTIME_GPU_GIB = 1.0
ALLOCATOR_SLACK = 0.10
ACTIVATION_BYTES_16BIT = 34  # per token, layer and hidden unit (Korthikanti et al. 2022, fused attention)
SAMPLE_PROMPT_TOKENS = 256  # the held-out sample prompts are first user turns: far shorter than max_length


class MemoryCheckError(UserError):
    """A stage that would not fit in the memory it has; the message says how much it needs and what to change."""


# ----------------------------------------------------------------------------- what is estimated


@dataclass(frozen=True)
class ModelShape:
    params: int  # base parameters
    layers: int
    hidden: int
    kv_width: int  # key (= value) width per token and layer: kv heads x head dim
    vocab: int
    linear_params: int  # parameters of the decoder's linear layers (what 4-bit quantises)
    lora_params: int  # one LoRA adapter of the recipe's rank on its target modules
    head_params: int = 0  # the LM head (a sequence classifier, the reward model, has none)
    file_bytes_per_param: int = 4  # the checkpoint's dtype on disk (Phi-2: fp16)
    source: str = ""  # where the shape came from
    lora_rank: int = 0  # the recipe's lora.r
    lora_layers: int = 0  # adapted layers (all decoder layers together)
    lora_inputs: int = 0  # input features summed over the adapted layers


@dataclass(frozen=True)
class StageSettings:
    device: str  # "cpu" or "cuda"
    dtype_bytes: int  # bytes per weight while training (4 fp32, 2 fp16/bf16)
    processes: int = 1  # processes on this machine (one per GPU)
    zero_shards: int = 1  # processes sharing gradients and optimiser state (ZeRO-2, ZeRO-3, FSDP), else 1
    weight_shards: int = 1  # processes the weights are partitioned over while training (ZeRO-3, FSDP), else 1
    sharding: str = ""  # the scheme in words, e.g. "ZeRO-3 over 16 processes" ("" for none)
    batch: int = 1  # sequences per micro-batch per process (pairs for reward and DPO)
    seq: int = 1024  # max_length
    eval_batch: int = 8
    grad_ckpt: bool = False
    merges: bool = False  # starts from earlier adapters: the base loads in fp32 on the host to merge them
    four_bit: bool = False
    rollout: int = 0  # RL prompts per update per process
    generations: int = 1  # responses sampled per prompt (GRPO's group size; PPO: 1)
    prompt_len: int = 0  # PPO max_prompt_length
    response_len: int = 0
    micro: int = 0  # PPO sequences per forward/backward
    samples: int = 0  # held-out sample prompts answered greedily
    sample_tokens: int = 0
    lora_dropout: bool = False  # LoRA dropout on: each adapted layer keeps a dropped-out copy of its input


@dataclass
class Estimate:
    stage: str
    device: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes on the device (GPU) or in RAM (CPU), per process
    host_parts: dict[str, float] = field(default_factory=dict)  # host RAM per process on a GPU run

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values()) / GIB

    @property
    def host_gib(self) -> float:
        return sum(self.host_parts.values()) / GIB if self.host_parts else self.total_gib

    def breakdown(self) -> str:
        return ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GIB)


# ----------------------------------------------------------------------------- the parts (pure)


def weight_bytes(shape: ModelShape, dtype_bytes: int, four_bit: bool = False) -> float:
    """The frozen base: 4-bit NF4 quantises the decoder's linear weights (0.5 byte + its block scales,
    double-quantised: ~0.56); embeddings, head and norms stay in the compute dtype."""
    if four_bit:
        return shape.linear_params * 0.56 + (shape.params - shape.linear_params) * dtype_bytes
    return shape.params * dtype_bytes


def adapter_bytes(
    lora_params: int, adapters: int = 1, trained: int = 1, zero_shards: int = 1, weight_shards: int = 1
) -> float:
    """LoRA weights (fp32) of `adapters` adapters, and for `trained` of them fp32 gradients plus AdamW's two
    moments, gradients and moments sharded over `zero_shards` processes (ZeRO-2/3, FSDP), the weights over
    `weight_shards` (ZeRO-3, FSDP)."""
    return lora_params * (4 * adapters / weight_shards + trained * 12 / zero_shards)


def load_bytes(shape: ModelShape, dtype_bytes: int, merges: bool) -> float:
    """Host memory while a base loads: the memory-mapped checkpoint's pages plus the weights in
    `dtype_bytes`; to merge earlier adapters the base loads in fp32 and is cast after, both copies alive, and
    each adapter (fp32, taken to have the recipe's rank) is held while it is merged."""
    pages = shape.params * shape.file_bytes_per_param
    adapter = shape.lora_params * 4 if merges else 0
    if merges and dtype_bytes != 4:
        return shape.params * 4 + max(pages, shape.params * dtype_bytes) + adapter
    return shape.params * (4 if merges else dtype_bytes) + pages + adapter


def lora_activation_bytes(tokens: int, shape: ModelShape, dtype_bytes: int, dropout: bool, grad_ckpt: bool) -> float:
    """What LoRA adds to the activations kept for the backward pass of `tokens` tokens. peft's lora.Linear
    computes B(A(dropout(x.to(fp32)))), under autocast in the 16-bit compute dtype: every adapted layer keeps
    A's output (tokens x r) for B's gradient, and the input A reads when that is a new tensor: autocast's
    16-bit copy of the fp32-cast input, and with dropout on, a dropped-out copy per adapted layer plus its
    mask (q, k and v each drop their own copy of the same input; torchtune#1492 turned LoRA dropout off for this
    copy, peft#2196 measures LoRA's activations near twice full fine-tuning's). Measured with torch's
    saved-tensor hooks on the tiny model (docs/memory.md): r 8 -> 128 adds what r x dtype bytes predicts within
    10%, dropout within 16%. With gradient checkpointing only one decoder layer's adapted layers at a time."""
    per_token = shape.lora_layers * shape.lora_rank * dtype_bytes
    per_token += shape.lora_inputs * ((dtype_bytes if dtype_bytes != 4 else 0) + (dtype_bytes + 1 if dropout else 0))
    if grad_ckpt:
        per_token /= max(shape.layers, 1)
    return tokens * per_token


def activation_bytes(tokens: int, shape: ModelShape, dtype_bytes: int, grad_ckpt: bool) -> float:
    """Activations kept for the backward pass of `tokens` tokens through every layer."""
    per_unit = ACTIVATION_BYTES_16BIT * dtype_bytes / 2
    if grad_ckpt:  # each layer's input kept, one layer's activations at a time recomputed
        return tokens * shape.hidden * (dtype_bytes * shape.layers + per_unit)
    return tokens * shape.hidden * shape.layers * per_unit


def logits_bytes(tokens: int, vocab: int, dtype_bytes: int, grad: bool = True) -> float:
    """Vocabulary logits of `tokens` positions: in the model dtype, the fp32 copy the loss takes, and with
    `grad` its fp32 gradient."""
    return tokens * vocab * (dtype_bytes + 4 + (4 if grad else 0))


def kv_cache_bytes(sequences: int, length: int, shape: ModelShape, dtype_bytes: int) -> float:
    return sequences * length * shape.layers * 2 * shape.kv_width * dtype_bytes


def estimate_stage(stage: str, shape: ModelShape, s: StageSettings) -> Estimate:
    """Peak memory of one process of `stage`: on the GPU (and the host RAM it needs while loading), or in
    RAM on a CPU run. What the stage holds is its registry entry's `Memory` profile."""
    m = STAGES[stage].memory
    b = s.dtype_bytes
    gpu = s.device == "cuda"
    if m.merge_only:  # always on the CPU in fp32: the merged model
        s = dataclasses.replace(s, device="cpu", dtype_bytes=4, merges=True, four_bit=False)
        gpu, b = False, 4
    if m.lm_eval and not gpu:  # on a CPU the model loads in fp32 (finetune.core.serving)
        s = dataclasses.replace(s, dtype_bytes=4)
        b = 4
    if m.score_head:  # a sequence classifier: a one-output score head instead of the LM head
        shape = dataclasses.replace(shape, params=shape.params - shape.head_params, head_params=0)
    whole = weight_bytes(shape, b, s.four_bit)
    weights = whole / s.weight_shards  # ZeRO-3 / FSDP: this process's share while training
    runtime = RUNTIME_GPU_GIB if gpu else m.runtime_cpu_gib
    parts = {"runtime": runtime * GIB, "weights": weights}
    # host memory while the base loads: the checkpoint's pages (memory-mapped) and the loaded weights; for a
    # merge the base in fp32, then the cast copy while the fp32 one still exists
    load_host = load_bytes(shape, b, s.merges)

    train, evaluation = 0.0, 0.0
    generate = kv_cache_bytes(s.samples, SAMPLE_PROMPT_TOKENS + s.sample_tokens, shape, b) if s.samples else 0.0

    def lora(tokens: int) -> float:
        return lora_activation_bytes(tokens, shape, b, s.lora_dropout, s.grad_ckpt)

    if m.rollout:  # its adapters on one base, trained without ZeRO; rollouts then micro-batches of them
        length = s.prompt_len + s.response_len
        sequences = s.rollout * s.generations
        parts["adapters"] = adapter_bytes(shape.lora_params, adapters=m.adapters, trained=m.trained)
        generate = max(generate, kv_cache_bytes(sequences, length, shape, b) + sequences * shape.vocab * 4 * 2)
        tokens = s.micro * length
        train = activation_bytes(tokens, shape, b, s.grad_ckpt) + lora(tokens)
        train += logits_bytes(s.micro * s.response_len, shape.vocab, 4)  # response positions only, fp32
        train += sequences * length * 8 * 4  # the rollout's ids, masks, log-probs, values, advantages
    elif m.lm_eval:  # lm-eval: one model at a time (the base after the trained one), no gradients
        tokens = s.eval_batch * s.seq
        evaluation = logits_bytes(tokens, shape.vocab, b, grad=False) + activation_bytes(tokens, shape, b, True)
        generate = 0.0
    elif m.merge_only:
        # the reference (base + unmerged adapters) loads only after the merged model is freed, and safetensors
        # writes each shard tensor by tensor (measured: no shard-sized buffer), so loading is the peak
        generate = 0.0
    else:  # a TRL stage: `sequences` per row forwarded with gradients, a score head or vocabulary logits
        tokens = m.sequences * s.batch * s.seq
        parts["adapters"] = adapter_bytes(
            shape.lora_params, m.adapters, m.trained, zero_shards=s.zero_shards, weight_shards=s.weight_shards
        )
        train = activation_bytes(tokens, shape, b, s.grad_ckpt) + lora(tokens)
        if m.lm_logits:
            train += logits_bytes(tokens, shape.vocab, b)
        if m.reference:  # the reference's log-probs (adapters off, no gradients)
            train += logits_bytes(tokens, shape.vocab, b, grad=False)
        if m.held_out_loss:
            evaluation = logits_bytes(s.eval_batch * s.seq, shape.vocab, b, grad=False)
    # before training the whole base sits in each process (the sharding engine starts with training), so the
    # held-out checks and samples before it carry the part of the base that training does not
    before = whole - weights
    evaluation, generate = evaluation + before, generate + before if generate else generate
    # loading comes before training: the larger of the two transients is the peak (on a CPU run, where
    # both are in RAM; on a GPU run loading happens in host RAM)
    peak = max(train, evaluation, generate)
    name = "activations" if peak == train else "evaluation"
    if peak == generate and not m.merge_only:
        name = "generation"
    host = {}
    if gpu:
        parts[name] = peak
        used = sum(parts.values()) - parts["runtime"]
        parts["allocator slack"] = ALLOCATOR_SLACK * used
        host = {"runtime": m.runtime_cpu_gib * GIB, "loading": load_host}
    elif load_host - weights > peak:
        parts["loading (checkpoint pages)"] = load_host - weights
    else:
        parts[name] = peak
    return Estimate(stage, "cuda" if gpu else "cpu", parts, host)


# ----------------------------------------------------------------------------- from a recipe


def shape_from_config(config, targets: list[str], rank: int, source: str = "") -> ModelShape:
    """A model's shape from its transformers config, counting parameters on the meta device (no memory,
    no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), whole_weights():  # a ZeRO-3 config left by an earlier stage would partition it
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    on_disk = getattr(config, "dtype", None)
    file_bytes = on_disk.itemsize if isinstance(on_disk, torch.dtype) else 4  # unknown: assume fp32
    linear, lora, lora_layers, lora_inputs = 0, 0, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith(".lm_head"):
            linear += module.weight.numel()
            if name.rsplit(".", 1)[-1] in targets:
                lora += rank * (module.in_features + module.out_features)
                lora_layers += 1
                lora_inputs += module.in_features
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        params=params,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        kv_width=kv_heads * head_dim,
        vocab=config.vocab_size,
        linear_params=linear,
        lora_params=lora,
        head_params=head,
        file_bytes_per_param=file_bytes,
        source=source,
        lora_rank=rank,
        lora_layers=lora_layers,
        lora_inputs=lora_inputs,
    )


# The published configs of the Phi models the recipes name (their config.json on the hub), so an estimate
# needs no network: the shape is all the estimate reads.
KNOWN_CONFIGS = {
    "microsoft/phi-2": (
        "PhiConfig",
        dict(
            vocab_size=51200,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            partial_rotary_factor=0.4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="float16",
        ),
    ),
    "microsoft/phi-1_5": (
        "PhiConfig",
        dict(
            vocab_size=51200,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            partial_rotary_factor=0.5,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="float16",
        ),
    ),
    "microsoft/Phi-3.5-mini-instruct": (
        "Phi3Config",
        dict(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
    ),
}


def model_config(recipe: Recipe):
    """(config, where it came from) without reading weights or building anything: a local folder's or the
    hub cache's config.json, the published config of a known Phi model, the tiny builtin's config, or the
    hub (config.json only). None when none of these can be had."""
    import transformers
    from transformers import AutoConfig

    name = recipe.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        return tiny_config(512), "the builtin tiny model's config"
    kwargs = dict(revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    path = recipe.model_path()
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs), f"{path} config.json"
    except (OSError, ValueError):
        pass
    if name in KNOWN_CONFIGS:
        cls, values = KNOWN_CONFIGS[name]
        return getattr(transformers, cls)(**values), f"{name}'s published config"
    if Path(path).exists():
        return None, f"{path}: no config.json"
    try:
        return AutoConfig.from_pretrained(path, **kwargs), f"{path} config.json (hub)"
    except (OSError, ValueError) as e:
        return None, f"{path}: config not available ({str(e).splitlines()[0][:120]})"


def model_shape(recipe: Recipe) -> tuple[ModelShape | None, str]:
    config, source = model_config(recipe)
    if config is None:
        return None, source
    targets = (
        LORA_TARGETS.get(config.model_type, [])
        if recipe.lora.target_modules == "auto"
        else list(recipe.lora.target_modules)
    )
    return shape_from_config(config, targets, recipe.lora.r, source), source


def stage_settings(recipe: Recipe, stage: str, device: str, processes: int, world: int | None = None) -> StageSettings:
    """The settings of `stage` that size its memory, read from the recipe (no model, no data). `processes`: on
    this machine; `world`: in the whole run (every node), what ZeRO and FSDP shard over (default: processes)."""
    entry = STAGES[stage]
    m, section = entry.memory, recipe.section(stage)
    dtype_bytes = 4 if recipe.precision == "fp32" else 2
    common = dict(
        device=device,
        dtype_bytes=dtype_bytes,
        processes=processes,
        four_bit=recipe.model.load_in_4bit,
        # these answer the held-out sample prompts: the chat-model stages and export (the merged model)
        samples=recipe.samples.count if entry.chat_model or m.merge_only else 0,
        sample_tokens=recipe.samples.max_new_tokens,
        lora_dropout=recipe.lora.dropout > 0,
    )
    starts = section is not None and "start_from" in type(section).model_fields
    merges = starts and recipe.input_dir(stage, "start_from") is not None
    if m.merge_only:
        return StageSettings(**common, merges=True)
    if m.lm_eval:  # lm-eval's batch at the context it assumes (the model's: 2048 for Phi-2)
        choice = getattr(section, entry.model_choice) if entry.model_choice else "auto"
        # a stage's chain merged in memory, unless it scores a merged folder (auto prefers the export)
        merges = choice != "auto" and not STAGES[choice].takes_models
        seq = getattr(section, "max_length", None) or 2048
        return StageSettings(
            **{**common, "samples": 0}, merges=merges, eval_batch=getattr(section, "batch_size", 8), seq=seq
        )
    scheme, weight_shards, state_shards = sharding(recipe, stage, world or processes)
    if m.rollout:
        return StageSettings(
            **{**common, "lora_dropout": False},  # PPO trains with every dropout off (finetune.rl.engine)
            sharding=scheme,
            merges=merges,
            grad_ckpt=section.gradient_checkpointing,
            rollout=section.rollout_batch_size,
            generations=getattr(section, "num_generations", 1),
            prompt_len=section.max_prompt_length,
            response_len=section.response_length,
            micro=section.micro_batch_size,
        )

    def setting(name: str, default):
        return recipe.trl_setting(stage, name, processes, default)

    return StageSettings(
        **common,
        zero_shards=state_shards,
        weight_shards=weight_shards,
        sharding=scheme,
        merges=merges,
        batch=setting("per_device_train_batch_size", 8),
        seq=setting("max_length", None),
        eval_batch=setting("per_device_eval_batch_size", 8),
        grad_ckpt=bool(setting("activation_checkpointing", False)),
    )


def sharding(recipe: Recipe, stage: str, world: int) -> tuple[str, int, int]:
    """(scheme in words, processes the weights are partitioned over, processes gradients and optimiser state are
    partitioned over) for a stage run by `world` processes: ZeRO-2 shards the state, ZeRO-3 and FSDP (FULL_SHARD,
    FSDP2's default) the weights too. Only stages trained by a TRL trainer use DeepSpeed or FSDP; the others
    (PPO's engine) run plain data parallel, one whole model per process (docs/scaling.md)."""
    import json

    if world <= 1:
        return "", 1, 1
    fsdp = recipe.training_args(stage).get("fsdp") or _accelerate_config(recipe).get("distributed_type") == "FSDP"
    if STAGES[stage].trl_config is None:
        return ("plain data parallel, the whole model in each process" if recipe.deepspeed or fsdp else ""), 1, 1
    if recipe.deepspeed:
        try:
            config = json.loads(Path(recipe.resolve_path(recipe.deepspeed)).read_text())
            zero = int((config.get("zero_optimization") or {}).get("stage", 0))
        except (OSError, ValueError, TypeError):
            zero = 2  # unreadable here: the stage itself reports it; assume the shipped config
        if zero >= 3:
            return f"ZeRO-3 over {world} processes", world, world
        if zero >= 1:
            return f"ZeRO-{zero} over {world} processes", 1, world
        return "", 1, 1
    if fsdp:
        return f"FSDP over {world} processes", world, world
    return "", 1, 1


def _accelerate_config(recipe: Recipe) -> dict:
    if not recipe.launch.accelerate_config:
        return {}
    return read_yaml(recipe.resolve_path(recipe.launch.accelerate_config), RecipeError) or {}


def planned_world(recipe: Recipe, stage: str) -> int:
    """Processes of a stage in the whole run: per machine (planned_processes) x the accelerate config's machines."""
    machines = int(_accelerate_config(recipe).get("num_machines") or 1) if STAGES[stage].launcher else 1
    return planned_processes(recipe, stage) * machines


def estimate_recipe(recipe: Recipe, stage: str, device: str, processes: int) -> Estimate | None:
    shape, _ = model_shape(recipe)
    if shape is None:
        return None
    return estimate_stage(stage, shape, stage_settings(recipe, stage, device, processes))


def local_processes() -> int:
    """Processes of this run on this machine (set by accelerate launch / torchrun), else 1."""
    for key in ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def planned_processes(recipe: Recipe, stage: str) -> int:
    """Processes a stage will run as, per machine: launch.num_processes, else the accelerate config's."""
    if not STAGES[stage].launcher or recipe.launch.accelerate_config is None:
        return 1
    if recipe.launch.num_processes:
        return recipe.launch.num_processes
    config = read_yaml(recipe.resolve_path(recipe.launch.accelerate_config), RecipeError) or {}
    return int(config.get("num_processes") or 1) // int(config.get("num_machines") or 1) or 1


def planned_device(recipe: Recipe) -> str:
    """The device a recipe's training stages are meant for: this machine's GPU, else a GPU when the
    recipe asks for fp16 or names an accelerate config that is not CPU-only, else the CPU."""
    if torch.cuda.is_available() or recipe.precision == "fp16":
        return "cuda"
    if recipe.launch.accelerate_config:
        config = read_yaml(recipe.resolve_path(recipe.launch.accelerate_config), RecipeError) or {}
        return "cpu" if config.get("use_cpu") else "cuda"
    return "cpu"


# ----------------------------------------------------------------------------- the check


def available_bytes(device: str) -> tuple[float, str]:
    """(bytes available, how it was found): the override, else each GPU's free memory or MemAvailable."""
    override = os.environ.get(ENV_AVAILABLE)
    if override:
        try:
            return float(override) * GIB, f"{ENV_AVAILABLE}={override}"
        except ValueError:
            raise UserError(f"{ENV_AVAILABLE}={override!r}: not a number of GiB (e.g. 70)") from None
    if device == "cuda":
        # this process's GPU (LOCAL_RANK under a launcher; the trainer has not set the device yet)
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        free, _ = torch.cuda.mem_get_info(index)
        return float(free), f"free on GPU {index} (torch.cuda.mem_get_info)"
    return host_available_bytes(), "MemAvailable in /proc/meminfo"


def host_available_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def remedies(stage: str, shape: ModelShape, s: StageSettings, need: float, gpu: bool) -> list[str]:
    """What to change, each with the estimate it would give (GiB per process)."""
    m = STAGES[stage].memory
    trains = not (m.merge_only or m.lm_eval)
    out = []

    def option(text: str, **change):
        after = estimate_stage(stage, shape, dataclasses.replace(s, **change)).total_gib
        if after < need:
            out.append(f"{text} (-> {after:.1f} GiB)")

    if not gpu and s.processes > 1:
        out.append(f"fewer processes on this machine (launch.num_processes; each needs {need:.1f} GiB)")
    if trains and not s.grad_ckpt:
        # the RL engine's own key; the TRL stages take transformers' under `training`
        key = f"{stage}.gradient_checkpointing=true" if m.rollout else "training.gradient_checkpointing=true"
        option(key, grad_ckpt=True)
    if trains and not m.rollout and s.batch > 1:
        option(f"{stage}.per_device_train_batch_size=1 with more gradient_accumulation_steps", batch=1)
    if m.rollout and s.micro > 1:
        option(f"a smaller {stage}.micro_batch_size", micro=max(1, s.micro // 2))
    if m.rollout and s.rollout > 8:
        option(f"a smaller {stage}.rollout_batch_size", rollout=max(1, s.rollout // 2))
    if gpu and not s.four_bit and not m.merge_only:
        option("model.load_in_4bit=true (QLoRA; not with deepspeed)", four_bit=True)
    if not gpu and s.dtype_bytes == 4 and not m.merge_only:
        option("precision=bf16 (CPUs run it too)", dtype_bytes=2)
    out.append(f"a bigger {'GPU' if gpu else 'machine'} (at least {need:.1f} GiB {'free per GPU' if gpu else 'free'})")
    return out


def preflight(recipe: Recipe, stage: str) -> Estimate | None:
    """Estimate `stage`'s memory and stop with a MemoryCheckError when it cannot fit: on a GPU run each GPU's
    free memory and the host RAM for this machine's processes while they load; on a CPU run the RAM for all
    of them. Runs before any model or data loads; logs the estimate either way."""
    gpu = torch.cuda.is_available() and not STAGES[stage].memory.merge_only  # merges run on the CPU, always
    device = "cuda" if gpu else "cpu"
    shape, source = model_shape(recipe)
    if shape is None:
        log.info("memory check skipped for %s: no model config to estimate from (%s)", stage, source)
        return None
    processes = local_processes()
    world = int(os.environ.get("WORLD_SIZE", processes))
    settings = stage_settings(recipe, stage, device, processes, world)
    est = estimate_stage(stage, shape, settings)
    have, how = available_bytes(device)
    per = "per GPU" if gpu else "per process"
    log.info(
        "memory estimate for %s: %.1f GiB %s (%s%s; %d parameters from %s); available: %.1f GiB (%s)",
        stage,
        est.total_gib,
        per,
        est.breakdown(),
        f"; {settings.sharding}" if settings.sharding else "",
        shape.params,
        source,
        have / GIB,
        how,
    )
    if os.environ.get(ENV_CHECK, "").lower() in ("off", "0", "false", "no"):
        return est
    need = est.total_gib * (1 if gpu else processes) * GIB
    problems = []
    if need > have:
        where = (
            f"{processes} processes x {est.total_gib:.1f} GiB" if processes > 1 and not gpu else f"{need / GIB:.1f} GiB"
        )
        problems.append(
            f"needs about {where} {'on each GPU' if gpu else 'of RAM'} ({est.breakdown()}), and {have / GIB:.1f} "
            f"GiB is available ({how})"
        )
    if gpu:
        host_have = host_available_bytes()
        host_need = est.host_gib * processes * GIB
        if host_need > host_have:
            problems.append(
                f"while loading, {processes} processes need about {processes} x {est.host_gib:.1f} GiB of host RAM "
                f"(the base is read {'in fp32 to merge the earlier adapters' if settings.merges else 'on the CPU'} "
                f"before it moves to the GPU), and {host_have / GIB:.1f} GiB is available"
            )
    if not problems:
        return est
    fixes = remedies(stage, shape, settings, est.total_gib, gpu)
    if gpu and len(problems) > 1 or (gpu and "host RAM" in problems[-1]):
        fixes.insert(0, "fewer processes per node (launch.num_processes) for the host RAM")
    raise MemoryCheckError(
        f"{recipe.source}: {stage} would run out of memory: it "
        + "; and ".join(problems)
        + ". Change one of: "
        + "; ".join(fixes)
        + f". (An estimate, docs/memory.md; {ENV_CHECK}=off skips this check.)"
    )
