"""GGUF files from a finished export, made with llama.cpp's own converter and quantiser.

    <export>/gguf/<name>-<type>.gguf   one file per requested type (export.gguf / --gguf)
    <export>/gguf/Modelfile            Ollama: FROM the first file, our template, stop tokens, decoding
    <export>/gguf/gguf.json            what was made: files, sizes, metadata checked, held-out figures

One pin for every llama.cpp part: llama-cpp-python (finetune[gguf]) is llama.cpp's library at a fixed
llama.cpp commit, built from its source distribution. Its quantiser (`llama_model_quantize`, what
`llama-quantize` runs) makes the quantised files and its runtime measures them. The converter,
convert_hf_to_gguf.py with its `conversion/` package and gguf-py, is not in the built wheel, only in the
same source distribution (vendor/llama.cpp): the first conversion takes it from there (`pip download`
of that exact version, ~76 MB, once) into ~/.cache/finetune/llama.cpp-<version>/, so the converter always
matches the library that reads its files. Offline, point FINETUNE_LLAMA_CPP_DIR at a llama.cpp checkout
of the same commit instead.

Steps: convert the export's safetensors to the base float file (f16 unless only bf16/f32 are asked
for) in a child process (finetune.deploy.convert: adds the end-of-turn token to the metadata); check the
metadata (chat template, end-of-turn and eos ids); quantise the others from it; measure each file's held-out
correctness with llama.cpp; write the Modelfile. Every file is written under a hidden temporary name in
gguf/ and renamed when complete: no half-written file ever carries a final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from finetune.core import ownership
from finetune.core.outputs import write_json
from finetune.core.summary import print_summary, rate
from finetune.recipe import STAGES
from finetune.recipe.sections import GGUF_TYPES

from .llamacpp import DeployError, quiet_native, require
from .ollama import write_modelfile

log = logging.getLogger("finetune.deploy")

GGUF_DIR = "gguf"
MANIFEST = "gguf.json"
CONVERTER_ENV = "FINETUNE_LLAMA_CPP_DIR"
FLOAT_TYPES = ("f32", "f16", "bf16")  # what the converter writes itself; the rest are quantised from one of them
SDIST_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def converter_dir() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (see the module docstring)."""
    explicit = os.environ.get(CONVERTER_ENV)
    if explicit:
        if not (Path(explicit) / "convert_hf_to_gguf.py").is_file():
            raise DeployError(f"{CONVERTER_ENV}={explicit}: no convert_hf_to_gguf.py there; name a llama.cpp checkout")
        return Path(explicit)
    import llama_cpp

    version = llama_cpp.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / f"llama.cpp-{version}"
    if (cache / "convert_hf_to_gguf.py").is_file():
        return cache
    log.info("fetching llama.cpp's converter from the llama-cpp-python %s source distribution (once)", version)
    with tempfile.TemporaryDirectory() as d:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", d]
            + [f"llama-cpp-python=={version}"],
            capture_output=True,
            text=True,
        )
        archives = list(Path(d).glob("*.tar.gz"))
        if got.returncode != 0 or not archives:
            raise DeployError(
                f"cannot fetch llama.cpp's converter (the llama-cpp-python {version} source distribution): "
                f"{got.stderr.strip()[-600:]}\nOffline? Set {CONVERTER_ENV} to a llama.cpp checkout (docs/deploy.md)."
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=_mkdir(cache.parent)))
        with tarfile.open(archives[0]) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and any(parts[1] == p or parts[1].startswith(p) for p in SDIST_PARTS):
                    m.name = parts[1]
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        try:
            os.replace(staging, cache)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return cache


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _partial(folder: Path, name: str) -> Path:
    return folder / f".{name}.partial-{os.getpid()}"


def convert(export_dir: Path, out: Path, outtype: str, eot_id: int) -> None:
    """convert_hf_to_gguf.py on the export folder, writing `out` (a temporary name: the caller renames)."""
    cmd = [sys.executable, "-m", "finetune.deploy.convert", str(converter_dir()), str(eot_id), "--"]
    cmd += [str(export_dir), "--outfile", str(out), "--outtype", outtype]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        raise DeployError(f"llama.cpp's converter could not convert {export_dir}:\n  " + "\n  ".join(tail))


def quantise(source: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's quantiser (llama_model_quantize, as `llama-quantize SOURCE OUT TYPE`)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    native: list[str] = []
    with quiet_native(native):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise DeployError(f"llama.cpp could not quantise {source.name} to {gguf_type}:\n{''.join(native)[-2000:]}")


def metadata(path: Path) -> dict:
    """The GGUF key-value metadata we check and report (gguf-py's reader, memory-mapped)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    keys = {
        "architecture": "general.architecture",
        "chat_template": "tokenizer.chat_template",
        "eot_token_id": "tokenizer.ggml.eot_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "add_bos_token": "tokenizer.ggml.add_bos_token",
        "pre_tokenizer": "tokenizer.ggml.pre",
        "context_length": f"{arch}.context_length",
        "file_type": "general.file_type",
    }
    return {k: fields[v].contents() for k, v in keys.items() if v in fields}


def check_metadata(path: Path, tokenizer, eot_id: int) -> dict:
    """Refuse a file whose runtime would not stop where we do or would prompt differently."""
    meta = metadata(path)
    expected = {
        "chat_template": tokenizer.chat_template,
        "eot_token_id": eot_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(
            f"{k}: {str(got)[:80]!r} in the file, {str(want)[:80]!r} in the export" for k, (got, want) in wrong.items()
        )
        raise DeployError(f"{path.name}: GGUF metadata differs from the export: {detail}")
    return meta


def write_gguf(
    export_dir: Path,
    types: list[str],
    name: str,
    held_out: tuple[list[dict], list[list[dict]], int] | None = None,
    reference: list | None = None,
    generation: dict | None = None,
) -> dict:
    """Write the GGUF files of `types`, the Modelfile and gguf.json into <export_dir>/gguf/.

    held_out: (rows, prompts, max_new_tokens) whose greedy replies measure each file's correctness;
    reference: the export's own replies to those prompts (transformers), to count the replies each file matches.
    """
    from transformers import AutoTokenizer

    from finetune.chat_template import render
    from finetune.core.evaluation import correctness

    from .llamacpp import greedy_replies

    check_installed()
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise DeployError(f"export.gguf: {unknown or 'nothing'} asked for; use any of {', '.join(GGUF_TYPES)}")
    started = time.time()
    export_dir = Path(export_dir)
    metrics = json.loads((export_dir / "metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    eot = metrics["end_of_turn"]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    stop_ids = list(dict.fromkeys([eot_id, tokenizer.eos_token_id]))
    folder = _mkdir(export_dir / GGUF_DIR)
    for stale in folder.glob(".*.partial-*"):  # left by an interrupted run
        stale.unlink()
    floats = [t for t in types if t in FLOAT_TYPES]
    base = "f16" if "f16" in types or not floats else floats[0]
    files = {t: folder / f"{name}-{t}.gguf" for t in types}
    made: dict[str, Path] = {}
    partials: list[Path] = []
    try:
        order = [base, *[t for t in floats if t != base], *[t for t in types if t not in FLOAT_TYPES]]
        for t in order:
            out = _partial(folder, f"{name}-{t}.gguf")
            partials.append(out)
            t0 = time.time()
            if t in FLOAT_TYPES:
                log.info("gguf: converting %s to %s with llama.cpp's converter", export_dir, t)
                convert(export_dir, out, t, eot_id)
                check_metadata(out, tokenizer, eot_id)
            else:
                log.info("gguf: quantising to %s with llama.cpp's quantiser", t)
                quantise(made[base], out, t)
            made[t] = out
            log.info("gguf: %s done in %.0fs (%.1f MB)", t, time.time() - t0, out.stat().st_size / 1e6)
        for t, path in files.items():
            ownership.put_file(made[t], path, ownership.stage_kind(STAGES.model_folder_stage()))
            made[t] = path
    finally:
        for p in partials:
            if p.exists():
                p.unlink()
    meta = check_metadata(made[types[0]], tokenizer, eot_id)
    report = {
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "converter": str(converter_dir()),
        "architecture": meta.get("architecture"),
        "pre_tokenizer": meta.get("pre_tokenizer"),
        "end_of_turn": eot,
        "eot_token_id": eot_id,
        "chat_template_in_metadata": True,
        "files": [],
    }
    rows, prompts, max_new = held_out or ([], [], 0)
    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    for t in types:
        path = made[t]
        entry = {"type": t, "file": path.name, "bytes": path.stat().st_size}
        if texts:
            replies = greedy_replies(
                path,
                texts,
                stop_ids,
                max_new,
                f"gguf {t}: held-out answers",
                min(4096, meta.get("context_length") or 4096),
            )
            entry["correct_rate"] = correctness(rows, replies)
            entry["replies"] = [{"text": str(r), "stop": r.stop} for r in replies]
            if reference is not None:
                entry["replies_equal_export"] = sum(
                    str(a) == str(b) and a.stop == getattr(b, "stop", a.stop) for a, b in zip(replies, reference)
                )
        report["files"].append(entry)
    report["held_out_prompts"] = len(prompts)
    report["modelfile"] = write_modelfile(
        folder, files[types[0]].name, tokenizer, [eot, tokenizer.eos_token], generation or {}
    )
    report["seconds"] = time.time() - started
    write_json(folder / MANIFEST, report)
    summarise(report, folder, reference is not None)
    return report


def summarise(report: dict, folder: Path, compared: bool) -> None:
    lines = []
    for f in report["files"]:
        figures = f"{f['bytes'] / 1e6:.1f} MB"
        if "correct_rate" in f:
            figures += f", held-out correct {rate(f['correct_rate'])} (llama.cpp)"
        if compared and "replies_equal_export" in f:
            figures += f", {f['replies_equal_export']}/{report['held_out_prompts']} replies equal to the export's"
        lines.append((f["type"], f"{f['file']}: {figures}"))
    lines.append(("metadata", f"chat template, end-of-turn {report['end_of_turn']!r} (id {report['eot_token_id']})"))
    lines.append(
        ("ollama", f"{folder / 'Modelfile'} (template checked with {report['modelfile']['template_checked_with']})")
    )
    lines.append(
        ("run", f"ollama create NAME -f {folder / 'Modelfile'}  |  llama-cli -m {folder / report['files'][0]['file']}")
    )
    print_summary("GGUF done", lines)


def check_installed() -> None:
    """One message naming the extra when export.gguf is set and llama.cpp's pieces are missing."""
    require("llama_cpp", "export.gguf")
    require("gguf", "export.gguf")


def export_gguf(
    recipe, export_dir: Path, types: list[str], rows: list[dict], limit: int, max_new_tokens: int, reference=None
) -> dict:
    """The export stage's call: the GGUF `types` for the finished export at `export_dir`, measured on the
    held-out rows the export measured itself (`reference`: its replies, when it has just made them)."""
    from finetune.core.evaluation import held_out_prompts

    kept, prompts = held_out_prompts(rows, limit) if limit else ([], [])
    config = Path(export_dir) / "generation_config.json"
    generation = json.loads(config.read_text()) if config.is_file() else {}
    name = Path(recipe.output_dir).name or "model"
    return write_gguf(export_dir, types, name, (kept, prompts, max_new_tokens), reference or None, generation)
