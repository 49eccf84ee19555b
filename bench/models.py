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


def phi2_config(small: bool = False):
    """Phi-2's architecture: its published shape as finetune's memory estimate holds it (microsoft/phi-2
    config.json), plus the fields the estimate does not need; `small` keeps its shape rules (partial
    rotary 0.4, untied head, full 51200 vocabulary) at a size a CPU test can run."""
    from transformers import PhiConfig

    from bench.ours import PHI2_PUBLISHED

    shape = {k: v for k, v in PHI2_PUBLISHED.items() if k != "dtype"}  # the dtype is the benchmark's choice
    if small:
        shape.update(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
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
    """The frozen base for a benchmark arm, on the GPU when there is one."""
    from bench.ours import DTYPES, choose_attention, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "tiny":
        return load_model(recipe).to(device)
    from transformers import PhiForCausalLM

    torch.manual_seed(0)
    attn, _ = choose_attention(recipe.model.attn_implementation, DTYPES[recipe.precision])
    config = phi2_config(small=name == "phi2-small")
    config.pad_token_id = config.eos_token_id
    with torch.device(device):
        model = PhiForCausalLM._from_config(config, attn_implementation=attn, dtype=DTYPES[recipe.precision])
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
