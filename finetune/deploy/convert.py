"""Run llama.cpp's convert_hf_to_gguf.py with two additions; `finetune.deploy.gguf` starts it as

    python -m finetune.deploy.convert CONVERTER_DIR END_OF_TURN_ID -- [convert_hf_to_gguf.py arguments]

in a child process (the converter puts its own gguf-py on sys.path and holds the whole model).

1. The end-of-turn token id goes into the GGUF metadata (`tokenizer.ggml.eot_token_id`), so a GGUF
   runtime stops where we do. The converter reads bos/eos/pad/... from the tokenizer files but an
   end-of-turn token only from a tokenizer post-processor; our templates declare it themselves.
2. A byte-level BPE tokenizer whose pre-tokenizer is exactly GPT-2's (tokenizers' ByteLevel with its
   regex, as Phi-2's and every tokenizer trained with `ByteLevel()` has) is converted with llama.cpp's
   "gpt-2" pre-tokenizer when the converter does not know the tokenizer's hash. The converter identifies
   pre-tokenizers by hashing the token ids of a test string, so it knows published tokenizers only
   (microsoft/phi-2 is "phi-2", which llama.cpp handles as "gpt-2"); a tokenizer trained on your own
   corpus with the same pre-tokenizer gets another hash. Anything else keeps the converter's own error.
   The parity test checks that llama.cpp then tokenises our prompts to the same ids as transformers.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """Whether the folder's tokenizer.json is a BPE whose pre-tokenizer is GPT-2's split, nothing more."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (spec.get("model") or {}).get("type") == "BPE" and all(pre.get(k) == v for k, v in GPT2_SPLIT.items())


def main(argv: list[str]) -> int:
    converter_dir, eot_id, rest = Path(argv[0]), int(argv[1]), argv[3:]
    sys.path.insert(0, str(converter_dir))
    import convert_hf_to_gguf  # noqa: E402  (the converter puts its own gguf-py first on sys.path)
    import gguf
    from conversion.base import TextModel

    add_to_gguf = gguf.SpecialVocab.add_to_gguf

    def with_end_of_turn(self, gw, quiet: bool = False):
        self.special_token_ids["eot"] = eot_id
        return add_to_gguf(self, gw, quiet)

    gguf.SpecialVocab.add_to_gguf = with_end_of_turn

    known_pre = TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer):
        if not gpt2_pre_tokenizer(self.dir_model):
            return known_pre(self, tokenizer)
        quiet = logging.getLogger("hf-to-gguf")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the converter's banner for an unknown hash, which we answer
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("finetune.deploy").info("tokenizer: GPT-2 byte-level pre-tokenizer (not a known hash)")
            return "gpt-2"
        finally:
            quiet.setLevel(level)

    TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv = ["convert_hf_to_gguf.py", *rest]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
