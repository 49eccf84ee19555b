"""Stand-ins for the Phi bases, built in code: each recipe's own architecture and vocabulary size with two
layers, a tiny hidden size and random weights, and an offline byte-level BPE tokenizer that has the
family's special tokens. What the dress rehearsals (tests/recipes/test_phi_rehearsal.py) run the shipped
recipes on instead of downloading microsoft/phi-2, microsoft/phi-1_5 or microsoft/Phi-3.5-mini-instruct.
"""

from __future__ import annotations

from pathlib import Path

# Per recipe: the transformers class, the published config values that shape the model (vocabulary,
# partial rotary, RoPE scaling, untied head), and the tokenizer's special tokens.
FAMILIES = {
    "phi2": {  # microsoft/phi-2 config.json
        "cls": "PhiForCausalLM",
        "config": dict(vocab_size=51200, partial_rotary_factor=0.4, max_position_embeddings=2048, layer_norm_eps=1e-5),
        "specials": ["<|endoftext|>"],
        "roles": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
    },
    "phi1_5": {  # microsoft/phi-1_5 config.json
        "cls": "PhiForCausalLM",
        "config": dict(vocab_size=51200, partial_rotary_factor=0.5, max_position_embeddings=2048, layer_norm_eps=1e-5),
        "specials": ["<|endoftext|>"],
        "roles": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
    },
    "phi3_5": {  # microsoft/Phi-3.5-mini-instruct config.json and tokenizer_config.json
        "cls": "Phi3ForCausalLM",
        "config": dict(
            vocab_size=32064,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            sliding_window=262144,
            rms_norm_eps=1e-5,
        ),
        "specials": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        "roles": dict(bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"),
    },
}
HIDDEN, HEADS, LAYERS = 64, 4, 2


def build_tokenizer(family: str, texts: list[str]):
    """A byte-level BPE (GPT-2 pre-tokenisation, like Phi-2's) trained on `texts`, with the family's
    special tokens as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, "Instruct: Output: System: "], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **spec["roles"])


def build_model(family: str, tokenizer, seed: int = 0):
    """Two layers of the family's architecture at hidden size 64, random weights."""
    import torch
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    size = dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if spec["cls"] == "Phi3ForCausalLM":
        half = HIDDEN // HEADS // 2  # longrope factors: one per rotary frequency, as Phi-3.5's 48 for head_dim 96
        config = transformers.Phi3Config(
            **spec["config"],
            **size,
            **ids,
            num_key_value_heads=HEADS,
            rope_scaling={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.01 * i for i in range(half)],
                "long_factor": [1.0 + 0.5 * i for i in range(half)],
            },
        )
    else:
        config = transformers.PhiConfig(**spec["config"], **size, **ids, resid_pdrop=0.1)
    return getattr(transformers, spec["cls"])(config).eval()


def write_base(folder: Path, family: str, texts: list[str]) -> Path:
    """Model + tokenizer saved as a hub model folder (safetensors, config.json, tokenizer files)."""
    tokenizer = build_tokenizer(family, texts)
    model = build_model(family, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentencepiece_base(folder: Path, family: str, texts: list[str]) -> Path:
    """Like write_base, with a SentencePiece tokenizer (tokenizer.model) as Phi-3.5 ships: llama.cpp's converter
    reads Phi-3's vocabulary from tokenizer.model, not tokenizer.json. The family's special tokens are pieces of
    their own (byte fallback on, as Llama's)."""
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*texts, "Instruct: Output: System: "] * 4),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=[s for s in spec["specials"] if s not in ("<unk>", "<s>", "</s>")],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # at most 400 pieces: a tiny corpus has fewer merges
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **spec["roles"]}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    build_model(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
