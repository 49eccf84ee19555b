import pytest
import torch

from finetune.core.modeling import (
    FP32_QK_EAGER,
    add_lora,
    base_fingerprint,
    choose_attention,
    load_model,
    resolve_model_path,
)
from finetune.recipe import RecipeError, validate_recipe


def phi_recipe(path, **model):
    return validate_recipe(
        {"output_dir": "o", "precision": model.pop("precision", "fp32"), "model": {"name_or_path": str(path), **model}}
    )


@pytest.fixture(scope="module")
def overflowing_phi(tmp_path_factory):
    """A 2-layer Phi whose q/k weights are scaled x600: plain fp16 eager attention overflows
    (QK^T > 65504), the failure Phi-2 shows at fp16 (transformers#28163)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(
        PhiConfig(
            vocab_size=256,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
            partial_rotary_factor=0.4,
        )
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 600
            layer.self_attn.k_proj.weight *= 600
        for p in model.parameters():  # fp16-representable weights, so fp32 is an exact reference
            p.copy_(p.half().float())
    path = tmp_path_factory.mktemp("overflowing_phi")
    model.save_pretrained(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("attn", ["auto", "eager", "sdpa"])
def test_fp16_guard_keeps_attention_finite_and_matches_fp32(overflowing_phi, attn):
    from transformers import PhiForCausalLM

    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = logits(
        PhiForCausalLM.from_pretrained(overflowing_phi, dtype=torch.float32, attn_implementation="eager"), ids
    )
    plain = logits(
        PhiForCausalLM.from_pretrained(overflowing_phi, dtype=torch.float16, attn_implementation="eager"), ids
    )
    assert not torch.isfinite(plain).all(), "the overflow this guard exists for no longer happens here"

    ours = load_model(phi_recipe(overflowing_phi, precision="fp16", attn_implementation=attn))
    assert ours.dtype == torch.float16
    got = logits(ours, ids)
    assert torch.isfinite(got).all()
    # fp16 activations round; relative to the logits' scale the paths agree closely
    assert (got - reference).abs().max() / reference.abs().max() < 2e-2


def test_fp32_qk_eager_matches_fp32_attention_directly():
    from finetune.core.modeling import fp32_qk_eager_attention

    class M(torch.nn.Module):
        training = False

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=g) * s for s in (300, 300, 1))
    out16, _ = fp32_qk_eager_attention(M(), q.half(), k.half(), v.half(), None, scaling=32**-0.5)
    out32, _ = fp32_qk_eager_attention(
        M(), q.half().float(), k.half().float(), v.half().float(), None, scaling=32**-0.5
    )
    naive = torch.matmul(q.half(), k.half().transpose(2, 3))
    assert not torch.isfinite(naive).all()
    assert torch.isfinite(out16).all() and (out16.float() - out32).abs().max() < 1e-2


@pytest.mark.parametrize(
    "requested, dtype, cuda, expected",
    [
        ("auto", torch.float16, False, "sdpa"),
        ("flash_attention_2", torch.float16, False, "sdpa"),
        ("eager", torch.float16, False, FP32_QK_EAGER),
        ("eager", torch.float32, False, "eager"),
        ("sdpa", torch.float16, True, "sdpa"),
    ],
)
def test_attention_choice(requested, dtype, cuda, expected):
    impl, reason = choose_attention(requested, dtype, cuda=cuda)
    assert impl == expected and reason


def test_lora_on_all_six_phi_linears_stays_fp32_on_fp16_base(tiny_base):
    recipe = phi_recipe(tiny_base, precision="fp16")
    model = add_lora(load_model(recipe), recipe)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in frozen if p.dim() > 1)


def test_base_fingerprint_sees_one_bit(tiny_base):
    model = load_model(phi_recipe(tiny_base))
    before = base_fingerprint(model)
    with torch.no_grad():
        w = model.model.layers[0].mlp.fc1.weight
        w.view(-1).view(torch.int32)[0] ^= 1
    assert base_fingerprint(model) != before


def test_qlora_without_cuda_or_the_cpu_backend_is_a_clear_error(tiny_base, monkeypatch):
    import finetune.core.modeling as modeling

    recipe = phi_recipe(tiny_base, precision="bf16", load_in_4bit=True)
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.setattr(modeling, "bitsandbytes_cpu", lambda: False)  # e.g. an old bitsandbytes: CUDA only
    with pytest.raises(
        RecipeError, match="4-bit QLoRA needs bitsandbytes with a CUDA GPU or its CPU.*set model.load_in_4bit=false"
    ):
        load_model(recipe)


def test_qlora_on_the_cpu_backend_quantises_the_linear_layers_to_nf4(tiny_base):
    """bitsandbytes 0.50 runs NF4 on the CPU (plain torch ops): the decoder's linear layers load as 4-bit,
    the LM head stays in the compute dtype, and the quantised model's logits stay close to the bf16 model's."""
    import bitsandbytes as bnb

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU script covers 4-bit there")
    recipe = phi_recipe(tiny_base, precision="bf16", load_in_4bit=True)
    model = load_model(recipe)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 4 * 6 and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.layers[0].mlp.fc1.weight.quant_state.quant_type == "nf4"
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    full = load_model(phi_recipe(tiny_base, precision="bf16"))
    with torch.no_grad():
        a, b = model(ids).logits.float(), full(ids).logits.float()
    assert 0 < (a - b).abs().mean() < 0.5 * b.abs().mean()  # quantised (not equal), yet the same model


def test_safetensors_only(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickle weights: code can run on load
    with pytest.raises(RecipeError, match="model.name_or_path: cannot load .*no file named model.safetensors"):
        load_model(phi_recipe(tmp_path))  # refused as one message, the pickle never read


def test_unknown_builtin_model():
    with pytest.raises(RecipeError, match="unknown builtin model 'huge'"):
        resolve_model_path("builtin:huge")


def test_a_full_disk_while_loading_from_the_hub_is_not_called_a_bad_id(monkeypatch):
    import errno

    from finetune.core.hub import hub_load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as caught:
        with hub_load("model.name_or_path", "microsoft/phi-2", "r.yaml"):
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/model.safetensors")
    assert caught.value.errno == errno.ENOSPC  # left for the stage's fault report ("no space left ...")
    with pytest.raises(RecipeError, match="microsoft/phi-2 is a hub id and the hub is offline"):
        with hub_load("model.name_or_path", "microsoft/phi-2", "r.yaml"):
            raise OSError("not in the cache")
