"""Model and tokenizer loading and LoRA setup: one place for every stage.

- hub id, local folder or `builtin:tiny-phi`; safetensors only; trust_remote_code off unless asked.
- dtype from the recipe's precision; LoRA adapters stay fp32 on an fp16/bf16 base.
- attention: FlashAttention-2 when asked for and usable, else SDPA; the choice is logged once.
- Phi fp16 overflow guard (docs/failure_modes.md, transformers#28163): plain eager attention computes QK^T in
  fp16 and overflows to inf/NaN on Phi-2 weights. At fp16 we never run plain eager: the default is
  a kernel that accumulates scores in fp32 (flash-attn / SDPA), and an explicit `eager` request runs
  `fp32_qk_eager_attention`, which upcasts q and k before QK^T as the transformers fix did.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from finetune.chat_template import load_template, prepare_tokenizer
from finetune.recipe import BUILTIN_PREFIX, Recipe, RecipeError
from finetune.tiny import base_path

from .hub import check_local_model, hub_load
from .logs import DropMessages
from .progress import progress

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_QK_EAGER = "fp32_qk_eager"

# Every linear layer of each family (PEFT's own default for phi adapts only q_proj v_proj fc1 fc2).
LORA_TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def fp32_qk_eager_attention(
    module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs
):
    """Eager attention with QK^T, mask and softmax in fp32; output in the value dtype."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query.float() * scaling, key.float().transpose(2, 3))
    if attention_mask is not None:
        # The eager mask is additive with the fp16 minimum (-65504), too small to mask fp32 scores of
        # the size this guard exists for: mask by position instead.
        masked = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask < 0
        scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_guard():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FP32_QK_EAGER, fp32_qk_eager_attention)
    AttentionMaskInterface.register(FP32_QK_EAGER, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


_register_guard()
_logged_attention: set[str] = set()


def choose_attention(requested: str, dtype: torch.dtype, cuda: bool | None = None) -> tuple[str, str]:
    """(implementation, reason). Pure function of the request, dtype and what is installed."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested in ("auto", "flash_attention_2"):
        if cuda and has_flash and dtype in (torch.float16, torch.bfloat16):
            return "flash_attention_2", "flash-attn and CUDA present"
        missing = "CUDA" if not cuda else "flash-attn" if not has_flash else "an fp16/bf16 base"
        return "sdpa", f"{requested} asked, but {missing} missing: using SDPA"
    if requested == "eager" and dtype == torch.float16:
        return FP32_QK_EAGER, "eager at fp16 overflows on Phi: eager with fp32 QK^T (overflow guard)"
    return requested, "as the recipe asks"


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name != "tiny-phi":
            raise RecipeError(
                f"model.name_or_path: unknown builtin model {name!r}; the builtin model is builtin:tiny-phi"
            )
        return str(base_path())  # shipped in the package: no build, no cache
    return name_or_path


def load_tokenizer(recipe: Recipe, path: str | None = None):
    """Tokenizer of the base (or of a stage output folder), with the recipe's chat template installed."""
    from transformers import AutoTokenizer

    if path:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
        return prepare_tokenizer(tokenizer, template_for(recipe))
    source = base_model_source(recipe)
    with hub_load("model.name_or_path", recipe.model.name_or_path, recipe.source):
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    return prepare_tokenizer(tokenizer, template_for(recipe))


def base_model_source(recipe: Recipe) -> str:
    """What from_pretrained loads the base from: the builtin's cached folder, a local folder (which must
    exist) or a hub id."""
    source = resolve_model_path(recipe.model_path())
    check_local_model(recipe.model.name_or_path, source, recipe.source)
    return source


def template_for(recipe: Recipe):
    """The recipe's chat template (a shipped name, or a .jinja path relative to the recipe)."""
    name = recipe.template.name
    return load_template(recipe.resolve_path(name) if name.endswith(".jinja") else name)


def load_model(recipe: Recipe, task: str = "causal_lm", device_map=None, merge: list[str] = (), **extra):
    """The frozen base model as the recipe describes it (task: causal_lm or seq_cls).

    `merge`: adapter folders of earlier stages (e.g. the SFT output), merged into the base in
    memory in order, so a new adapter starts from that model and "adapters disabled" means it.
    Merging runs in fp32 and the result is then cast to the recipe's dtype (fp16 merges lose
    precision: peft#2368). With `model.load_in_4bit` the merge runs on the original (unquantised) weights
    and the merged model is then quantised (quantised_merge).
    """
    if merge and recipe.model.load_in_4bit:
        return quantised_merge(recipe, task, device_map, merge, **extra)
    return _load(recipe, base_model_source(recipe), task, device_map, merge, **extra)


def quantised_merge(recipe: Recipe, task: str, device_map, merge: list[str], **extra):
    """QLoRA for a stage that starts from earlier adapters: merge them into the original weights in fp32
    (never into NF4 codes: a merge there would be rounded to the 4-bit grid, and PEFT refuses it for DoRA),
    cast to the compute dtype, then quantise that model to NF4, through a temporary safetensors copy that
    transformers loads with the quantisation config (how every 4-bit base is made; TMPDIR holds it for the
    seconds of the reload, about 2 bytes per parameter). Every stage of a 4-bit chain so trains on the
    quantised form of the same merged model; the export merges the same adapters into the fp32 original."""
    import gc
    import tempfile

    whole = recipe.model_copy(update={"model": recipe.model.model_copy(update={"load_in_4bit": False})})
    merged = _load(whole, base_model_source(recipe), task, "cpu", merge, **extra)
    with tempfile.TemporaryDirectory(prefix="finetune-4bit-") as tmp:
        with progress("saving the merged model for 4-bit quantisation"):
            merged.save_pretrained(tmp)
        del merged
        gc.collect()
        extra = {k: v for k, v in extra.items() if k != "num_labels"}  # the saved config has it
        return _load(recipe, tmp, task, device_map, (), reload=True, **extra)


def _load(recipe: Recipe, source: str, task: str, device_map, merge, reload: bool = False, **extra):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = DTYPES[recipe.precision]
    attn, reason = choose_attention(recipe.model.attn_implementation, dtype)
    if attn not in _logged_attention:
        _logged_attention.add(attn)
        log.info("attention kernel: %s (%s)", attn, reason)
    kwargs = dict(
        dtype=torch.float32 if merge else dtype,
        attn_implementation=attn,
        use_safetensors=True,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=recipe.model.revision,
    )
    if recipe.model.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(recipe)
        device_map = device_map or {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    name = recipe.model.name_or_path
    what = "the merged model" if reload else name
    with (
        hub_load("model.name_or_path", name, recipe.source),
        progress(
            f"loading {what} ({'4-bit NF4' if recipe.model.load_in_4bit else kwargs['dtype']}, {attn})".replace(
                "torch.", ""
            ),
            announce=True,
        ),
        whole_weights(),
    ):
        if task == "causal_lm" or reload:
            model = cls.from_pretrained(source, **kwargs, **extra)
        else:
            model = _load_classifier(cls, source, **kwargs, **extra)
    if recipe.model.load_in_4bit and not torch.cuda.is_available():
        keep_cpu_weights_trainable(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        # what the tokenizer's pad is (prepare_tokenizer: pad = eos when a base has none); set here, the
        # Trainer would align it and warn about "new PAD/BOS/EOS tokens" on every stage
        generation.pad_token_id = model.config.pad_token_id
    if merge:
        from peft import PeftConfig, PeftModel

        with progress(f"merging {len(merge)} adapter(s) into the base (fp32)", total=len(merge), unit="adapters") as p:
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            for folder in merge:
                config = PeftConfig.from_pretrained(folder)
                config.task_type = None  # a causal-LM adapter merges into a sequence-classifier's backbone too
                if getattr(config, "modules_to_save", None):  # e.g. an SFT lm_head: a classifier has none
                    config.modules_to_save = [m for m in config.modules_to_save if m in present] or None
                model = PeftModel.from_pretrained(model, folder, config=config).merge_and_unload()
                log.info("merged adapter %s into the base", folder)
                p.update(1)
        model = model.to(dtype)
    return model


@contextlib.contextmanager
def whole_weights():
    """Load the base whole even when a ZeRO-3 config is active. transformers partitions a model at load
    (deepspeed.zero.Init) whenever TrainingArguments with a ZeRO-3 config exist, which the stages create first;
    but the stages merge earlier adapters into the base, fingerprint it and evaluate it before training, which
    needs every weight. DeepSpeed partitions the parameters when its engine starts (it converts the parameters
    it finds), so the GPUs hold their share for training all the same; the host holds one whole copy per process
    while loading, as with ZeRO-2 (docs/memory.md). The config is set again after loading: the Trainer reads it
    (saving gathers the partitioned weights; generation syncs the processes)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; set/unset are public
    config = active() if active is not None else None
    if config is None or not config.is_zero3():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _load_classifier(cls, path: str, **kwargs):
    """A sequence classifier from a causal-LM checkpoint. Its new score head and the unused LM head are
    expected, so transformers' load report table (a warning on every reward run) becomes one line here;
    any other missing or unexpected weight is still a warning."""
    # A filter, not a level: transformers runs its tensor-parallel plan check (more warnings) whenever
    # this logger's own level is WARNING or above (modeling_utils.from_pretrained).
    reporter = logging.getLogger("transformers.modeling_utils")
    report = DropMessages("LOAD REPORT")
    reporter.addFilter(report)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        reporter.removeFilter(report)
    head = model.base_model_prefix + "."
    missing = [k for k in info["missing_keys"] if k.startswith(head)]  # the backbone must be complete
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("lm_head.")]
    new = sorted(set(info["missing_keys"]) - set(missing))
    log.info("classification head %s newly initialised (trained by this stage); the LM head is not used", new)
    if missing or unexpected or info.get("mismatched_keys"):
        log.warning(
            "%s: loading it as %s left backbone weights missing %s, unexpected %s, mismatched %s",
            path,
            cls.__name__,
            missing,
            unexpected,
            info.get("mismatched_keys"),
        )
    return model


def load_stacked(recipe: Recipe, adapters: list[str]):
    """The model the last adapter of `adapters` was trained on, with that adapter unmerged: the reference of the
    export's parity check.

    Plain LoRA updates add up (W + B1A1 + B2A2), so the whole chain is loaded unmerged, all adapters active at
    once: what merging them in order must equal. When an adapter's update depends on the weight it was trained
    on (DoRA rescales each column of W + BA to a learned magnitude, so it is not additive) or it replaces a whole
    module (modules_to_save), stacking is not the trained model: the earlier adapters are merged (fp32, as every
    stage does) and only the last one stays unmerged."""
    from peft import PeftModel

    if len(adapters) > 1 and any(not_additive(folder) for folder in adapters):
        model, adapters = load_model(recipe, merge=adapters[:-1]), adapters[-1:]
    else:
        model = load_model(recipe)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    device = str(next(model.parameters()).device)
    for i, (folder, name) in enumerate(zip(adapters, names)):
        if i == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=name, torch_device=device)
        else:
            model.load_adapter(folder, adapter_name=name, torch_device=device)
    if names:
        model.base_model.set_adapter(names, inference_mode=True)
    return model.eval()


def not_additive(folder: str | Path) -> bool:
    """Whether an adapter's effect is more than a weight delta that adds up with others: DoRA, or modules it
    trained in full (a score head aside)."""
    import json

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    full = [m for m in config.get("modules_to_save") or [] if m not in ("score", "classifier")]
    return bool(config.get("use_dora") or full)


def quantization_config(recipe: Recipe):
    """NF4 with double quantisation (QLoRA, Dettmers et al. 2023) and the recipe's compute dtype. On a GPU
    bitsandbytes' CUDA kernels run it; without one its CPU backend does (bitsandbytes 0.50 quantises and
    multiplies NF4 in plain torch ops on the CPU; its note about the `kernels` package concerns optional faster
    CPU kernels fetched from the Hugging Face Hub, which finetune neither needs nor installs), which is how CI
    trains a 4-bit chain."""
    if not torch.cuda.is_available() and not bitsandbytes_cpu():
        raise RecipeError(
            f"{recipe.source}: model.load_in_4bit: 4-bit QLoRA needs bitsandbytes with a CUDA GPU or its CPU "
            "backend, and neither is usable here; set model.load_in_4bit=false to train the fp16/bf16 base instead"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[recipe.precision],
    )


def keep_cpu_weights_trainable(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight for a faster kernel at its first
    forward in eval mode without gradients, and keeps it so; a later training forward then takes that
    inference-only kernel and fails in autograd ("a view of a leaf Variable ... in-place operation",
    bitsandbytes/autograd/_functions.py matmul_4bit). The stages evaluate before they train, so the repacking
    is turned off: every forward uses the trainable NF4 path (slower evaluation on such CPUs, same numbers)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bitsandbytes_cpu() -> bool:
    """Whether bitsandbytes is installed with NF4 support on the CPU (its multi-backend builds, 0.46 on)."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import quantize_4bit
    except Exception:  # an import failure of any kind means: not usable here
        return False
    try:
        quantize_4bit(torch.ones(64, 64), quant_type="nf4")
    except Exception:
        return False
    return True


def lora_targets(recipe: Recipe, model_type: str) -> list[str] | str:
    """The modules the recipe's LoRA adapts: its list, PEFT's "all-linear", or the family's linear layers."""
    targets = recipe.lora.target_modules
    if targets == "all-linear":
        return "all-linear"  # PEFT resolves it: every nn.Linear (and Conv1D) but the output head
    if targets != "auto":
        return list(targets)
    if model_type not in LORA_TARGETS:
        raise RecipeError(
            f"{recipe.source}: lora.target_modules: 'auto' knows {sorted(LORA_TARGETS)}, not {model_type!r}; "
            "list the linear module names explicitly, or use all-linear"
        )
    return LORA_TARGETS[model_type]


def meta_model(config):
    """The model a config describes, built on the meta device (no memory, no weights read): for looking at its
    layers before loading it."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    # Under ZeRO-3 transformers builds every model inside deepspeed.zero.Init, whose weight initialisation copies
    # into the meta buffers and fails ("Cannot copy out of meta tensor"); a model that is only looked at needs no
    # partitioning, so the ZeRO-3 switch is off while it is built and restored after.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _adaptable(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt (peft: Linear, Embedding, Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 style
        return tuple(module.weight.shape)
    return None


def lora_problem(model, targets: list[str], rank: int, name: str) -> str | None:
    """Why LoRA with `targets` and `rank` cannot be put on `model` (a loaded or a meta-device model), or None.

    Targets match module names as peft matches a list: the full name or its last dotted parts. A target that
    matches nothing, or only layers LoRA cannot adapt (a norm, a whole block), is named with the layers the
    model has. A rank above min(in, out) of every adapted matrix is refused: the update B @ A has rank at most
    min(r, in, out) (Hu et al. 2021, "LoRA", section 4), so a larger r only adds parameters, memory and time."""
    modules = dict(model.named_modules())
    adaptable = {n: shape for n, m in modules.items() if (shape := _adaptable(m)) is not None}
    names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    if isinstance(targets, str):  # "all-linear": PEFT adapts every linear layer but the output head
        head = model.get_output_embeddings()
        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear) and m is not head}
        )
    unknown, not_layers, matched = [], [], {}
    for target in targets:
        hits = [n for n in modules if n == target or n.endswith(f".{target}")]
        usable = {n: adaptable[n] for n in hits if n in adaptable}
        if not hits:
            unknown.append(target)
        elif not usable:
            not_layers.append(target)
        matched.update(usable)
    if unknown or not_layers:
        said = []
        if unknown:
            said.append(f"{', '.join(map(repr, unknown))} {'matches' if len(unknown) == 1 else 'match'} no module")
        if not_layers:
            verb = "is" if len(not_layers) == 1 else "are"
            said.append(f"{', '.join(map(repr, not_layers))} {verb} not a layer LoRA can adapt")
        return (
            f"lora.target_modules: in {name} ({model.config.model_type}), {' and '.join(said)}; the layers LoRA can "
            f"adapt there are named {', '.join(names)} (or set target_modules: auto)"
        )
    cap = max((min(shape) for shape in matched.values()), default=0)
    if cap and rank > cap:
        return (
            f"lora.r: {rank} is more than any adapted matrix of {name} can use: the largest has rank {cap} "
            f"(min(in, out)), and a LoRA update has rank at most min(r, in, out), so a larger r only adds "
            f"parameters, memory and time. Set lora.r to at most {cap} (8 to 64 is usual)"
        )
    return None


def lora_config(recipe: Recipe, model_type: str, task: str | None = "causal_lm", dropout: float | None = None):
    """The recipe's `lora` section as a PEFT LoraConfig (task None: no task head, as PPO's adapters)."""
    from peft import LoraConfig, TaskType

    lora = recipe.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout if dropout is None else dropout,
        target_modules=lora_targets(recipe, model_type),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type=None if task is None else TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )


def add_lora(model, recipe: Recipe, task: str = "causal_lm", adapter_name: str = "default"):
    """Wrap the base with a fresh LoRA adapter; the base is frozen and adapters stay fp32."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(recipe, model.config.model_type)
    problem = lora_problem(model, targets, recipe.lora.r, recipe.model.name_or_path)
    if problem:  # also checked before loading (core.limits), when the model's config could be read then
        raise RecipeError(f"{recipe.source}: {problem}")

    if recipe.model.load_in_4bit:
        # Only for a quantised base: on a plain fp16 base it would upcast every weight to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = lora_config(recipe, model.config.model_type, task)
    # autocast_adapter_dtype=True keeps adapter weights fp32 (no "unscale FP16 gradients" under AMP).
    return get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True)


def context_length(config) -> int | None:
    """The positions a model was trained with (its config's max_position_embeddings; n_positions in GPT-2-style
    configs), None when the config does not say. Past them a rotary model still runs, on positions it never
    saw, and writes garbage without an error: every token budget is checked against this."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class LoraPlusOptimizer:
    """LoRA+ for the Trainer: a factory (transformers' `optimizer_cls_and_kwargs` protocol: called with no
    argument, the result is called with the model) that asks the Trainer for its usual optimiser class and
    arguments (AdamW, lr, betas, eps from the TrainingArguments) and groups the parameters with PEFT's
    create_loraplus_optimizer: lora_B (and 1-d parameters) at lr x ratio, the rest at lr. The Trainer calls it
    from create_optimizer, which DeepSpeed and FSDP also go through, so it works under every launcher."""

    def __init__(self, args, ratio: float):
        self.args, self.ratio = args, ratio

    def __call__(self):
        return self.build

    def build(self, model, **_):
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        return create_loraplus_optimizer(
            model, cls, loraplus_lr_ratio=self.ratio, loraplus_weight_decay=self.args.weight_decay, **kwargs
        )


def use_loraplus(trainer, recipe: Recipe) -> None:
    """Give a TRL trainer the LoRA+ optimiser when the recipe asks for it (lora.loraplus_lr_ratio)."""
    ratio = recipe.lora.loraplus_lr_ratio
    if ratio is not None:
        trainer.optimizer_cls_and_kwargs = (LoraPlusOptimizer(trainer.args, ratio), {})
        log.info("LoRA+: lora_B learns at %g x the learning rate", ratio)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def whole_parameter(p):
    """A parameter's whole tensor, also when it is partitioned over the processes: gathered from a DeepSpeed
    ZeRO-3 partition (a collective: every process must ask for the same parameters) or an FSDP2 shard."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            yield p.data
        return
    from torch.distributed.tensor import DTensor

    yield p.full_tensor() if isinstance(p, DTensor) else p


def base_fingerprint(model) -> str:
    """sha256 of every frozen base parameter's name, dtype and bytes: equal fingerprints = bitwise-equal
    base. LoRA weights and trained copies of heads (PEFT modules_to_save) are not part of the base. Under ZeRO-3
    and FSDP the parameters are gathered (every process must call this)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if "lora_" in name or ".modules_to_save." in name:
            continue
        # PEFT prefixes names (base_model.model.) and renames what it wraps (.base_layer; .original_module for
        # a module it trains a copy of): strip them so a bare base compares equal.
        bare = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        h.update(bare.encode())
        h.update(str(p.dtype).encode())
        with whole_parameter(p) as full:
            h.update(full.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
