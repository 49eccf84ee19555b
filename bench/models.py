"""The models the benchmark trains: the offline tiny Phi, or the Phi-2 architecture with random weights.

Random weights are fine for speed (same FLOPs and memory traffic); nothing is downloaded. Every model
uses the tiny tokenizer (ids < 493), which changes no FLOP count: the LM head is full-vocabulary.
"""

from __future__ import annotations

import torch

# sizes per model: sequence length, batch, precision; phi2 is the GPU target (seq 2048, fp16)
# PPO: rollout batch, micro-batch of the optimisation passes (gradient accumulation over the rest), PPO epochs.
SETTINGS = {
    "tiny": dict(
        max_length=256,
        batch=16,
        precision="fp32",
        rows=1024,
        ppo_batch=16,
        ppo_micro_batch=16,
        ppo_epochs=1,
        response_length=48,
        max_prompt_length=96,
        grpo_generations=8,
    ),
    # the GPU script's dry run in CI time: short rows (the 51,200-token LM head dominates a CPU step)
    "phi2-small": dict(
        max_length=128,
        batch=2,
        precision="fp32",
        rows=16,
        ppo_batch=2,
        ppo_micro_batch=1,
        ppo_epochs=1,
        response_length=8,
        max_prompt_length=32,
        grpo_generations=2,
    ),
    # CPU at Phi-2's width: its hidden size, heads, partial rotary, FFN and 51,200-token vocabulary with 2 layers
    # (phi2_config("phi2-width")), so each token costs what it costs per layer and in the head at Phi-2 size
    # while a 2-core step stays in seconds. Batch 4 pairs / rows of the same long-tailed lengths as tiny; the
    # DPO reference pre-pass covers `rows`, so they are few. With 2 layers the LM head is ~45% of a token's
    # matmul FLOPs (~5% at Phi-2's 32): what padding costs in the head weighs more here than it would there.
    "phi2-width": dict(
        max_length=256,
        batch=4,
        precision="fp32",
        rows=32,
        ppo_batch=4,
        ppo_micro_batch=4,
        ppo_epochs=1,
        response_length=16,
        max_prompt_length=64,
    ),
    # micro-batch 8: a LoRA backward through Phi-2 keeps ~3 MB of activations per token, so 64 rows of up to
    # 768 tokens at once would not fit; 8 at a time (8 accumulation steps) does, for ours and the peer alike
    "phi2": dict(
        max_length=2048,
        batch=4,
        precision="fp16",
        rows=512,
        ppo_batch=64,
        ppo_micro_batch=8,
        ppo_epochs=1,
        response_length=256,
        max_prompt_length=512,
        grpo_generations=8,  # 64 prompts x 8 = 512 completions per update
    ),
}


def phi2_config(size: str = "phi2"):
    """Phi-2's architecture: its published shape as finetune's memory estimate holds it (microsoft/phi-2
    config.json), plus the fields the estimate does not need. `phi2-width` keeps all of it but 2 layers;
    `phi2-small` keeps its shape rules (partial rotary 0.4, untied head, full 51200 vocabulary) at a size a
    CPU test can run."""
    from transformers import PhiConfig

    from bench.ours import PHI2_PUBLISHED

    shape = {k: v for k, v in PHI2_PUBLISHED.items() if k != "dtype"}  # the dtype is the benchmark's choice
    if size == "phi2-small":
        shape.update(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    elif size == "phi2-width":
        shape.update(num_hidden_layers=2)
    elif size != "phi2":
        raise ValueError(f"unknown Phi-2 size {size!r}")
    return PhiConfig(
        **shape,
        rope_theta=10000.0,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        resid_pdrop=0.1,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
    )


def build_model(name: str, recipe, task: str = "causal_lm"):
    """The frozen base for a benchmark arm, on the GPU when there is one: a causal LM, or (task "seq_cls")
    the same backbone with a one-output score head, as the reward stage loads it."""
    from bench.ours import DTYPES, choose_attention, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    labels = {"num_labels": 1} if task == "seq_cls" else {}
    if name == "tiny":
        return load_model(recipe, task=task, **labels).to(device)
    from transformers import PhiForCausalLM, PhiForSequenceClassification

    torch.manual_seed(0)
    attn, _ = choose_attention(recipe.model.attn_implementation, DTYPES[recipe.precision])
    config = phi2_config(name)
    config.pad_token_id = config.eos_token_id
    config.update(labels)
    cls = PhiForSequenceClassification if task == "seq_cls" else PhiForCausalLM
    with torch.device(device):
        model = cls._from_config(config, attn_implementation=attn, dtype=DTYPES[recipe.precision])
    return model.eval()


def flops_per_token(config, seq_len: int, lora_r: int = 16, lora_modules: int = 6) -> dict:
    """Model FLOPs per trained token with a frozen base and LoRA (docs/benchmarks.md, "How MFU is counted"):
    forward 2N + backward 2N (activation gradients only: frozen weights need no weight gradients)
    + attention 12*L*d*T + LoRA 6*P_lora, N = matmul parameters (blocks + LM head; embeddings are a lookup).
    Also the forward alone (2N + 4*L*d*T), what a reference or rollout-scoring pass costs."""
    L, d, ffn, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    N = L * (4 * d * d + 2 * d * ffn) + d * V
    # LoRA r on q, k, v, dense (d x d) and fc1, fc2 (d x ffn): r * (in + out) each
    P_lora = L * lora_r * (4 * 2 * d + 2 * (d + ffn)) if lora_modules == 6 else 0
    attention = 12 * L * d * seq_len
    return {
        "matmul_params": N,
        "lora_params": P_lora,
        "train": 4 * N + attention + 6 * P_lora,
        "forward": 2 * N + attention // 3,
    }
