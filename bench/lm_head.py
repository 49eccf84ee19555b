"""The LM head + cross-entropy alone, three ways, at one shape: time of forward + backward and the memory
it adds. Phi-2 at the SFT benchmark's shape: 4 x 2048 tokens, hidden 2560, vocabulary 51200, fp16.

- `plain`: logits = h W^T + b in full ([tokens, vocab]), then cross-entropy (what a model's own loss does);
- `trl-fused`: TRL 1.16's fused LM head kernel (`ChunkedLogProbFunction`, what SFTTrainer / DPOTrainer run
  with `fused_lm_head=True`): log-probs tile by tile, never the full logits;
- `liger-flce`: Liger's fused linear cross-entropy (`LigerFusedLinearCrossEntropyLoss`), CUDA only.

TRL 1.16 refuses Liger's fused linear cross-entropy inside its trainers (its own fused head replaces it),
and Liger has no kernels for Phi-2's `phi` model type, so this is where the two fused heads can be put
side by side. The base is frozen (LoRA): the weight needs no gradient, the hidden states do.

    python bench/lm_head.py [--small]      # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def measure(variant: str, tokens: int, hidden: int, vocab: int, dtype, device: str, repeats: int = 5) -> dict:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    h0 = (torch.randn(tokens, hidden, generator=g, device=device) * 0.5).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=g, device=device) * hidden**-0.5).to(dtype)
    bias = torch.zeros(vocab, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)

    if variant == "plain":

        def loss_of(h):
            return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias).float(), labels)
    elif variant == "trl-fused":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer import utils as trl_utils

        chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 4096)

        def loss_of(h):
            out = ChunkedLogProbFunction.apply(h, weight, bias, labels, 1.0, chunk, None, 1.0, ("log_probs",))
            return -out[0].mean()
    elif variant == "liger-flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def loss_of(h):
            return flce(weight, h, labels, bias)
    else:
        raise ValueError(variant)

    def once() -> float:
        h = h0.detach().requires_grad_(True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss_of(h).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2 if repeats > 1 else 1):  # warm-up
        once()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = [once() for _ in range(repeats)]
    result = {
        "variant": variant,
        "seconds": statistics.median(times),
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if device == "cuda":
        result["added_peak_memory_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def heads(small: bool = False) -> dict:
    """Every variant at the GPU shape (or a CPU-size one); a variant that cannot run says why."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if small or device == "cpu":
        shape = dict(tokens=64, hidden=128, vocab=51200, dtype=torch.float32)
    else:
        shape = dict(tokens=4 * 2048, hidden=2560, vocab=51200, dtype=torch.float16)
    results = []
    for variant in ("plain", "trl-fused", "liger-flce"):
        if variant == "liger-flce" and device != "cuda":
            results.append({"variant": variant, "skipped": "Liger's kernels are Triton kernels: CUDA only"})
            continue
        try:
            results.append(measure(variant, device=device, repeats=1 if small else 5, **shape))
        except Exception as e:  # noqa: BLE001  (a missing or failing kernel is a finding, not a crash)
            results.append({"variant": variant, "skipped": f"{type(e).__name__}: {e}"[:300]})
    return {"device": device, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a CPU-size shape (the GPU script's dry run)")
    args = p.parse_args(argv)
    print(json.dumps(heads(args.small)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
