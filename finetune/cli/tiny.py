"""`finetune tiny build OUT` / `finetune tiny write-data FOLDER`: pre-train the tiny Phi on the corpus of
`finetune.tiny` and write it with its build record; the task's data files too. What `finetune/tiny/base/` ships
was made by this code (see the record); a test checks the key still matches. A front-end, not part of
`finetune.tiny`: that package (the corpus, config, tokenizer and the shipped base) is what core reads, so it
imports nothing of core, and this command, which uses core (logging, progress, atomic folders), lives here."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

from finetune.core.fingerprints import sha256_file
from finetune.core.logs import setup_logging
from finetune.core.outputs import atomic_dir
from finetune.core.ownership import TINY_BASE, NotOurs, check_target
from finetune.core.progress import progress
from finetune.tiny import (
    BUILD_THREADS,
    BUILD_VERSION,
    PRETRAIN_STEPS,
    RECORD,
    TINY_CONFIG,
    build_tokenizer,
    corpus_documents,
    tiny_config,
    write_data,
)

log = logging.getLogger(__name__)


def pretrain(model, tokenizer, steps: int, seed: int, block: int = 64, batch: int = 32) -> list[float]:
    """Full-parameter causal-LM pre-training on the corpus (documents joined by eos, cut in blocks)."""
    import torch

    rng = random.Random(seed)
    docs = corpus_documents()
    stream: list[int] = []
    need = steps * batch * block // 4  # enough distinct blocks; reused cyclically
    with progress("tokenizing the tiny corpus", total=need, unit="tokens") as bar:
        while len(stream) < need:
            rng.shuffle(docs)
            for d in docs:
                stream += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
                bar.set(min(len(stream), need))
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    with progress("pre-training tiny-phi", total=steps, unit="steps", announce=True) as bar:
        for _ in range(steps):
            idx = torch.randint(len(blocks), (batch,), generator=gen)
            out = model(input_ids=blocks[idx], labels=blocks[idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            bar.update(1, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


def _build_key(steps: int = PRETRAIN_STEPS, seed: int = 0) -> str:
    """What the build makes, as a hash: build version, steps, seed, corpus and model config."""
    payload = json.dumps([BUILD_VERSION, steps, seed, corpus_documents(), TINY_CONFIG], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def loss_windows(losses: list[float], size: int = 100) -> list[float]:
    """Mean pre-training loss of each `size` steps (the curve, kept small in the record)."""
    return [round(sum(w) / len(w), 4) for w in (losses[i : i + size] for i in range(0, len(losses), size))]


def build(out: str | Path, steps: int = PRETRAIN_STEPS, seed: int = 0, threads: int = BUILD_THREADS) -> Path:
    """Build the tiny base into `out` (written beside it and renamed at the end) with its build record.

    Bit-exact for the same thread count, torch build and CPU instruction set; the shipped base was
    made with `threads` = BUILD_THREADS (its record says which torch and CPU)."""
    import tokenizers
    import torch
    import transformers
    from transformers import PhiForCausalLM

    out = Path(out)
    started, previous = time.time(), torch.get_num_threads()
    torch.set_num_threads(threads)  # the reduction order, hence the bits, depend on it
    try:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        model = PhiForCausalLM(tiny_config(len(tokenizer)))
        losses = pretrain(model, tokenizer, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(previous)
    with atomic_dir(out, TINY_BASE) as tmp:  # replaces only an earlier build (core.ownership)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {
            "what": "builtin:tiny-phi, the pre-trained tiny base (finetune/cli/tiny.py)",
            "command": f"finetune tiny build OUT --threads {threads}",
            "build_key": _build_key(steps, seed),
            "build_version": BUILD_VERSION,
            "steps": steps,
            "seed": seed,
            "threads": threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "build_seconds": round(time.time() - started),
            "loss_first_20": sum(losses[:20]) / len(losses[:20]),
            "loss_last_20": sum(losses[-20:]) / len(losses[-20:]),
            "loss_per_100_steps": loss_windows(losses),
            "model_sha256": sha256_file(tmp / "model.safetensors"),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors are written 0600; a package's files are read by every user
    log.info("tiny-phi pre-training loss %.3f -> %.3f", record["loss_first_20"], record["loss_last_20"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune tiny", description="The offline default's data and base.")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("write-data", help="write the tiny task's jsonl files into FOLDER")
    data.add_argument("folder")
    b = sub.add_parser("build", help="pre-train the tiny base into OUT (what finetune/tiny/base/ ships)")
    b.add_argument("out", help="output folder, e.g. finetune/tiny/base")
    b.add_argument(
        "--threads", type=int, default=BUILD_THREADS, help=f"torch threads (default {BUILD_THREADS}, as shipped)"
    )
    b.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help=argparse.SUPPRESS)  # short builds for tests
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "write-data":
        write_data(args.folder)
        return 0
    if Path(args.out).exists() and not args.force:
        print(f"finetune tiny build: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:  # before the build's minutes: it replaces only an earlier build
        check_target(args.out, TINY_BASE, "Build into another folder, or move that one away yourself")
    except NotOurs as e:
        print(f"finetune tiny build: error:\n{e}", file=sys.stderr)
        return 2
    setup_logging()
    print(build(args.out, steps=args.steps, threads=args.threads))
    return 0
