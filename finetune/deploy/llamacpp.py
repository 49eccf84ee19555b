"""A GGUF file run by llama.cpp (through llama-cpp-python): greedy replies, as a GGUF runtime serves them.

Prompts are our chat template's text (the same string transformers tokenises), tokenised by llama.cpp
from the GGUF's own vocabulary with special tokens parsed and no BOS added (our templates write every
special token themselves); generation is greedy (temperature 0, no repeat penalty) and stops at the
end-of-turn token or the budget, like finetune.core.evaluation.generate_answers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from finetune.errors import UserError

INSTALL = "pip install 'finetune[gguf]'"


class DeployError(UserError):
    """GGUF or Ollama output that cannot be made: a missing library, an unsupported model, a failed tool."""


def require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DeployError(f"{what} needs {module}, which is not installed: {INSTALL} (docs/deploy.md)")


@contextlib.contextmanager
def quiet_native(log: list[str]):
    """Send what native code writes to stderr (llama.cpp's per-tensor log lines) to a file; its text is
    appended to `log`, for the error message when the call fails."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.append(sink.read().decode("utf-8", "replace"))


class GgufModel:
    """One GGUF file loaded by llama.cpp on the CPU."""

    def __init__(self, path: Path, n_ctx: int = 1024, threads: int | None = None, logits_all: bool = False):
        require("llama_cpp", "running a GGUF file")
        from llama_cpp import Llama

        log: list[str] = []
        try:
            with quiet_native(log):
                self.llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_threads=threads or os.cpu_count(),
                    logits_all=logits_all,  # keep every position's logits (for comparing them), not only sample
                    seed=0,
                    verbose=False,
                )
        except ValueError as e:
            raise DeployError(f"llama.cpp cannot load {path}: {e}\n{''.join(log)[-2000:]}") from None
        self.path = Path(path)

    def logits(self, ids: list[int]):
        """fp32 next-token logits after `ids` (a numpy array; needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[len(ids) - 1].copy()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy(self, prompt: str, stop_ids: list[int], max_new_tokens: int):
        """(reply text, stop): stop is "end_of_turn" or "max_new_tokens", as a Reply's."""
        tokens, out = self.tokenize(prompt), []
        self.llm.reset()
        for token in self.llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if token in stop_ids:
                return self.detokenize(out), "end_of_turn"
            out.append(token)
            if len(out) >= max_new_tokens:
                break
        return self.detokenize(out), "max_new_tokens"

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace").strip()

    def close(self) -> None:
        self.llm.close()


def greedy_replies(
    path: Path, prompts: list[str], stop_ids: list[int], max_new_tokens: int, desc: str, n_ctx: int = 1024
) -> list:
    """Greedy Reply of the GGUF file to each prompt string (one at a time: no padding to get wrong)."""
    from finetune.core.evaluation import Reply
    from finetune.core.progress import track

    model = GgufModel(path, n_ctx=n_ctx)
    try:
        return [Reply(*model.greedy(p, stop_ids, max_new_tokens)) for p in track(prompts, desc, unit="prompts")]
    finally:
        model.close()
