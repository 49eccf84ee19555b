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

import importlib.util
import logging

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
    precision: peft#2368).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = DTYPES[recipe.precision]
    if merge and recipe.model.load_in_4bit:
        raise RecipeError(
            f"{recipe.source}: model.load_in_4bit: a 4-bit base cannot have earlier stages' adapters "
            "merged into it; run later stages on the fp16/bf16 base"
        )
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
        device_map = device_map or {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    name = recipe.model.name_or_path
    source = base_model_source(recipe)
    with (
        hub_load("model.name_or_path", name, recipe.source),
        progress(f"loading {name} ({kwargs['dtype']}, {attn})".replace("torch.", ""), announce=True),
    ):
        if task == "causal_lm":
            model = cls.from_pretrained(source, **kwargs, **extra)
        else:
            model = _load_classifier(cls, source, **kwargs, **extra)
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
            for folder in merge:
                config = PeftConfig.from_pretrained(folder)
                config.task_type = None  # a causal-LM adapter merges into a sequence-classifier's backbone too
                model = PeftModel.from_pretrained(model, folder, config=config).merge_and_unload()
                log.info("merged adapter %s into the base", folder)
                p.update(1)
        model = model.to(dtype)
    return model


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
    """The base with `adapters` loaded unmerged and all active at once (their LoRA updates add up):
    what merging them in order must equal, the reference of the export's parity check."""
    from peft import PeftModel

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


def quantization_config(recipe: Recipe):
    if not torch.cuda.is_available():
        raise RecipeError(
            f"{recipe.source}: model.load_in_4bit: 4-bit QLoRA needs a CUDA GPU (bitsandbytes), and none is "
            "visible; set model.load_in_4bit=false to train the fp16/bf16 base instead"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[recipe.precision],
    )


def lora_targets(recipe: Recipe, model_type: str) -> list[str]:
    if recipe.lora.target_modules != "auto":
        return list(recipe.lora.target_modules)
    if model_type not in LORA_TARGETS:
        raise RecipeError(
            f"{recipe.source}: lora.target_modules: 'auto' knows {sorted(LORA_TARGETS)}, not {model_type!r}; "
            "list the linear module names explicitly"
        )
    return LORA_TARGETS[model_type]


def add_lora(model, recipe: Recipe, task: str = "causal_lm", adapter_name: str = "default"):
    """Wrap the base with a fresh LoRA adapter; the base is frozen and adapters stay fp32."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if recipe.model.load_in_4bit:
        # Only for a quantised base: on a plain fp16 base it would upcast every weight to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=lora_targets(recipe, model.config.model_type),
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )
    # autocast_adapter_dtype=True keeps adapter weights fp32 (no "unscale FP16 gradients" under AMP).
    return get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_fingerprint(model) -> str:
    """sha256 of every frozen base parameter's name, dtype and bytes: equal fingerprints = bitwise-equal
    base. LoRA weights and trained copies of heads (PEFT modules_to_save) are not part of the base."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if "lora_" in name or ".modules_to_save." in name:
            continue
        # PEFT prefixes names (base_model.model.); strip it so a bare base compares equal.
        h.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
