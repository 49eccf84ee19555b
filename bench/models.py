"""The models the benchmark trains: the offline tiny Phi, or the Phi-2 architecture with random weights.

Random weights are fine for speed (the FLOPs and memory traffic of a step do not depend on the values);
nothing is downloaded. Every model uses the tiny tokenizer (ids < 493), which changes no FLOP count: the
LM head is full-vocabulary.
"""

from __future__ import annotations

import torch

# sizes per model: sequence length, batch, precision; phi2 is the GPU target (seq 2048, fp16)
SETTINGS = {
    "tiny": dict(
        max_length=256, batch=16, precision="fp32", rows=1024, ppo_batch=16, response_length=48, max_prompt_length=96
    ),
    "phi2-small": dict(
        max_length=256, batch=4, precision="fp32", rows=256, ppo_batch=4, response_length=16, max_prompt_length=64
    ),
    "phi2": dict(
        max_length=2048, batch=4, precision="fp16", rows=512, ppo_batch=64, response_length=256, max_prompt_length=512
    ),
}


def phi2_config(small: bool = False):
    """Phi-2's architecture (microsoft/phi-2 config.json); `small` keeps its shape rules (partial
    rotary 0.4, untied head, full 51200 vocabulary) at a size a CPU test can run."""
    from transformers import PhiConfig

    size = (
        dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
        if small
        else dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32)
    )
    return PhiConfig(
        vocab_size=51200,
        max_position_embeddings=2048,
        partial_rotary_factor=0.4,
        rope_theta=10000.0,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        resid_pdrop=0.1,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        **size,
    )


def build_model(name: str, recipe, task: str = "causal_lm"):
    """The frozen base for a benchmark arm, on the GPU when there is one."""
    from finetune.core.modeling import DTYPES, choose_attention, load_model

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
