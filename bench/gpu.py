"""One-shot GPU benchmark: SFT, DPO, reward, PPO and GRPO on the Phi-2 architecture (random weights, fp16), ours against
the strongest peers, in one command that fits about 8 minutes of an H100 / H200, and the table.

    python bench/gpu.py bundle                      # here (PyPI reachable): bench/gpu_bundle/ (wheels, tokenizer)
    python bench/gpu.py run --out DIR               # on the GPU machine (no network), carrying bench/gpu_bundle
    python bench/gpu.py run --dry-run --out DIR     # the same plan at CPU size (tests/bench/test_bench.py runs it)

`run` first checks, in seconds, everything it will need (a CUDA GPU; the project's Python packages at
the versions CI runs, installed from the bundle's wheels into a folder of their own when the machine's
differ; TRL 1.12.0 for the PPO peer, likewise; the tiny tokenizer the benchmark models use; whether
Liger's kernels install and run), measures the GPU's copy bandwidth and matmul rate, and only then
spends time on the runs:

- SFT, seq 2048, batch 4: ours vs TRL 1.16 tuned (bench/run.py --stage sft --arms ours,trl-tuned);
- DPO, seq 2048, batch 4: ours (padding-free pairs) vs TRL 1.16 tuned (precomputed reference log-probs;
  padded, as TRL 1.16 turns padding-free DPO off) vs ours padded (`dpo.padding_free=false`);
- reward model, seq 2048, batch 4: ours (padding-free pairs) vs TRL 1.16's RewardTrainer tuned (padded);
- PPO, batch 64 x 256 new tokens, 1 PPO epoch: ours vs TRL 1.12's PPOTrainer;
- GRPO, 64 prompts x 8 completions x 256 new tokens: ours with transformers' generate and with vLLM rollouts
  (rollout tokens/s of both engines; the vLLM arm runs only where vLLM imports) vs TRL 1.16's GRPOTrainer with a
  reward model passed as a separate model;
- the LM head + loss alone (bench/lm_head.py): full logits vs TRL's fused head vs Liger's fused linear
  cross-entropy (TRL 1.16 refuses Liger's inside its trainers, and Liger has no Phi-2 kernels: this is
  where "with and without Liger" can be measured);
- QLoRA at every stage on bitsandbytes' CUDA kernels: the tiny model's SFT -> reward -> DPO -> PPO -> export
  with model.load_in_4bit (the chain CI runs on bitsandbytes' CPU backend, tests/stages/test_four_bit.py),
  when bitsandbytes is installed on the GPU machine (it is not carried: its wheel is past the carry limit).

Each stage writes its JSON as soon as it ends and the table is rewritten after each, so a run cut short
still leaves what it measured. The table: real tokens/s, MFU (docs/benchmarks.md, "How MFU is counted",
against the GPU's dense fp16 peak), peak memory, and for PPO time per update, generation share and
generated tokens/s against the memory-bandwidth bound (batch x measured bandwidth / weight bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUNDLE = ROOT / "bench" / "gpu_bundle"
SITE = Path("/tmp/finetune-bench/site")  # the bundle's wheels, installed on the GPU machine
PEER_SITE = Path("/tmp/finetune-bench/peer")  # TRL 1.12.0 alone, put in front of SITE for the peer
PEER_TRL = "1.12.0"
# The project's packages bench needs, at the versions CI runs (pyproject.toml). torch is the machine's own.
PINNED = {"transformers": "5.23.0", "trl": "1.16.0", "peft": "0.21.2", "accelerate": "1.15.0", "datasets": "5.2.0"}
# Carried as wheels besides PINNED: what those need that a CUDA PyTorch image may lack or have at another
# version. Large packages such images ship (numpy, pandas, pyarrow) are not carried: the check names them
# if one is missing.
CARRIED = [
    "huggingface-hub",
    "httpx2",
    "httpcore2",
    "truststore",
    "tokenizers",
    "safetensors",
    "dill",
    "multiprocess",
    "xxhash",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "pyyaml",
    "jinja2",
    "markupsafe",
    "tqdm",
    "fsspec",
    "filelock",
    "regex",
    "packaging",
    "psutil",
    "hf-xet",
    "liger-kernel",
]
CARRY_LIMIT_MB = 60  # the device tool carries at most 64 MiB of working tree in all
# Dense fp16/bf16 tensor-core peak (vendor figures, no sparsity) by device name
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]
STAGES = {  # stage -> arms, steps, warmup, seconds allowed
    "sft": (["ours", "trl-tuned"], 6, 2, 150),
    "dpo": (["ours", "trl-tuned", "ours-padded"], 6, 2, 170),
    "reward": (["ours", "trl-tuned"], 6, 2, 100),
    "ppo": (["ours", "peer"], 2, 1, 240),
    # GRPO: ours (transformers generate), ours with vLLM rollouts when a matching vLLM imports, TRL's GRPOTrainer
    "grpo": (["ours", "ours-vllm", "trl"], 2, 1, 240),
}
DRY = {"sft": (1, 1), "dpo": (1, 1), "reward": (1, 1), "ppo": (1, 1), "grpo": (1, 1)}  # steps, warmup in the dry run


def _platforms() -> list[str]:
    tags = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64"]
    return [f"--platform={t}" for t in tags]


# ----------------------------------------------------------------------------- bundle (here, with PyPI)


def bundle(folder: Path, python_version: str) -> int:
    """Download the wheels the GPU run installs into `folder` (the tiny tokenizer ships in the repository)."""
    import importlib.metadata as md

    wheels, peer = folder / "wheels", folder / "peer-wheels"
    for d in (wheels, peer):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    names = {**PINNED, **{n: md.version(n) for n in CARRIED if n != "liger-kernel"}, "liger-kernel": "0.8.5"}
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        f"--python-version={python_version}",
        "--implementation=cp",
        *_platforms(),
    ]
    for name, version in names.items():
        subprocess.run([*pip, "-d", str(wheels), f"{name}=={version}"], check=True)
    subprocess.run([*pip, "-d", str(peer), f"trl=={PEER_TRL}"], check=True)
    (folder / "manifest.json").write_text(
        json.dumps({"python": python_version, "wheels": names, "peer": {"trl": PEER_TRL}}, indent=2)
    )
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"bundle: {folder} ({size:.1f} MiB; carry it: the device tool takes at most {CARRY_LIMIT_MB} MiB here)")
    return 0 if size <= CARRY_LIMIT_MB else 1


# ----------------------------------------------------------------------------- preflight (the GPU machine)


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _env(extra_paths: list[Path]) -> dict:
    env = dict(os.environ)
    path = [*(str(p) for p in extra_paths), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def software_facts() -> dict:
    """Versions, the GPU, flash-attn, and the shipped tiny tokenizer (imports all bench will)."""
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from bench.ours import tiny_base

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "tiny_tokenizer": tiny_base(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


CHECK = "import json; from bench.gpu import software_facts; print(json.dumps(software_facts()))"

PEER_CHECK = r"""
import json, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer
print(json.dumps({"trl": trl.__version__}))
"""

LIGER_CHECK = r"""
import json, torch
from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
h = torch.randn(64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
w = torch.randn(1024, 256, device="cuda", dtype=torch.float16)
y = torch.randint(0, 1024, (64,), device="cuda")
loss = LigerFusedLinearCrossEntropyLoss()(w, h, y)
loss.backward()
import liger_kernel, importlib.metadata as md
print(json.dumps({"liger_kernel": md.version("liger-kernel"), "loss": float(loss)}))
"""

SPEED = r"""
import json, time, torch
x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); copy_s = (time.perf_counter() - t) / 10
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); mm_s = (time.perf_counter() - t) / 10
print(json.dumps({"copy_bandwidth_bytes_per_s": 2 * x.numel() / copy_s, "matmul_fp16_flops": 2 * 8192**3 / mm_s}))
"""


def _json_line(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def preflight(dry_run: bool, bundle_dir: Path) -> tuple[dict, dict, dict]:
    """(facts, env for our runs, env for the peer); raises SystemExit naming what is missing."""
    facts: dict = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    has_bundle = (bundle_dir / "wheels").is_dir()
    paths: list[Path] = []
    if not dry_run and has_bundle:
        # the bundle's wheels into a folder of their own, in front of the machine's packages (never torch)
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        want = manifest["python"]
        have = f"{sys.version_info.major}.{sys.version_info.minor}"
        if want != have:
            raise SystemExit(
                f"gpu: the bundle's wheels are for Python {want}, this machine runs {have}; "
                f"make it with `python bench/gpu.py bundle --python-version {have}`"
            )
        for target, wheels in ((SITE, bundle_dir / "wheels"), (PEER_SITE, bundle_dir / "peer-wheels")):
            shutil.rmtree(target, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(target),
                *map(str, sorted(wheels.glob("*.whl"))),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"gpu: installing the bundle's wheels failed:\n{res.stderr[-3000:]}")
        paths = [SITE]
        facts["bundle"] = manifest
    env = _env(paths)
    if dry_run:  # the dry run checks the code paths in this process (CI time), with this environment
        facts["software"] = info = software_facts()
    else:
        res = _run([sys.executable, "-c", CHECK], env, 180)
        if res.returncode != 0:
            raise SystemExit(
                f"gpu: the project's packages do not import here (carry bench/gpu_bundle, made by "
                f"`python bench/gpu.py bundle`):\n{res.stderr[-3000:]}"
            )
        facts["software"] = info = _json_line(res)
    if not dry_run:
        if not info["cuda"]:
            raise SystemExit("gpu: no CUDA GPU visible (use --dry-run for the CPU-size check)")
        wrong = {k: info[k] for k, v in PINNED.items() if info[k] != v}
        if wrong:
            raise SystemExit(f"gpu: versions differ from the ones CI runs {PINNED}: {wrong}")
    # the PPO peer: TRL 1.12.0 in front of everything else, or the peer venv (bench/peer_env.sh) on a CPU
    from bench.run import peer_python

    peer_env = None
    if not dry_run and has_bundle:
        # bench/run.py puts FINETUNE_BENCH_PEER_SITE in front for the peer's process only: ours keeps TRL 1.16
        peer_env = {**env, "FINETUNE_BENCH_PEER_PYTHON": sys.executable, "FINETUNE_BENCH_PEER_SITE": str(PEER_SITE)}
        check, check_env = [sys.executable, "-c", PEER_CHECK], _env([PEER_SITE, *paths])
    elif peer_python().is_file():
        peer_env, check, check_env = env, [str(peer_python()), "-c", PEER_CHECK], env
    if peer_env is None:
        facts["peer"] = {
            "skipped": "no TRL 1.12 environment: make it with `bash bench/peer_env.sh` (or carry the "
            "bundle to the GPU machine)"
        }
    else:
        res = _run(check, check_env, 180)
        if res.returncode != 0 or _json_line(res)["trl"] != PEER_TRL:
            raise SystemExit(f"gpu: the PPO peer's TRL {PEER_TRL} does not import:\n{res.stderr[-3000:]}")
        facts["peer"] = _json_line(res)
    # vLLM rollouts for GRPO: only with a vLLM that imports here (none matches the project's torch and transformers
    # today: finetune/rl/vllm_rollout.py), never in the dry run (CUDA only)
    if dry_run or not info["cuda"]:
        facts["vllm"] = {"skipped": "vLLM needs CUDA"}
    else:
        res = _run([sys.executable, "-c", "import json, vllm; print(json.dumps({'vllm': vllm.__version__}))"], env, 180)
        facts["vllm"] = _json_line(res) if res.returncode == 0 else {"skipped": res.stderr.strip()[-300:]}
    if dry_run or not info["cuda"]:
        facts["liger"] = {"skipped": "Liger's kernels are Triton kernels: CUDA only"}
        facts["speed"] = None
    else:
        res = _run([sys.executable, "-c", LIGER_CHECK], env, 180)
        facts["liger"] = _json_line(res) if res.returncode == 0 else {"skipped": res.stderr.strip()[-600:]}
        res = _run([sys.executable, "-c", SPEED], env, 120)
        facts["speed"] = _json_line(res) if res.returncode == 0 else None
        facts["peak_flops"] = next((f for name, f in PEAK_FLOPS if name in info["gpu"]), None)
    return facts, env, peer_env


# ----------------------------------------------------------------------------- the runs and the table


def _stage(
    stage: str,
    model: str,
    arms: list[str],
    steps: int,
    warmup: int,
    out: Path,
    env: dict,
    timeout: float,
    rows: int | None,
    dry_run: bool,
) -> dict:
    argv = [
        "--stage",
        stage,
        "--model",
        model,
        "--arms",
        ",".join(arms),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--repeats",
        "1",
        "--out",
        str(out),
    ] + (["--rows", str(rows)] if rows else [])
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), *argv]
    started = time.perf_counter()
    if dry_run:  # arms in this process (bench/run.py --in-process): the code paths, in CI's time
        from bench import run as bench_run

        os.environ.update({k: v for k, v in env.items() if k.startswith("FINETUNE_BENCH_")})
        try:
            bench_run.main([*argv, "--in-process"])
        except (Exception, SystemExit) as e:  # noqa: BLE001  (recorded in the table like a failed GPU stage)
            return {"error": f"{type(e).__name__}: {e}"[-1500:], "command": " ".join(cmd[1:])}
        return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - started}
    try:
        res = _run(cmd, env, timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[1:])}
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip()[-1500:], "command": " ".join(cmd[1:])}
    report = json.loads(out.read_text())
    report["wall_s"] = time.perf_counter() - started
    return report


# The 4-bit chain: tiny sizes, every stage (the same overrides as tests/stages/test_four_bit.py, at fp16).
FOUR_BIT_STAGES = ["sft", "reward", "dpo", "ppo", "export"]
FOUR_BIT = [
    "precision=fp16",
    "model.load_in_4bit=true",
    "samples.count=0",
    "training.per_device_train_batch_size=8",
    "training.warmup_steps=0",
    "sft.max_steps=3",
    "sft.eval_generate_rows=8",
    "reward.max_steps=2",
    "dpo.max_steps=2",
    "dpo.eval_generate_rows=8",
    "ppo.updates=2",
    "ppo.save_every=2",
    "ppo.rollout_batch_size=8",
    "ppo.micro_batch_size=8",
    "ppo.eval_prompts=8",
    "export.eval_generate_rows=8",
]


def four_bit_chain(out: Path, env: dict, timeout: float) -> dict:
    """Each stage of the tiny recipe on a 4-bit base, as a user runs it (`python -m finetune.cli <stage>`), and
    what each one's metrics say: the base unchanged, the steps run, the export's parity."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"error": "not run: bitsandbytes is not installed on this machine (pip install bitsandbytes)"}
    run_dir, started, stages = out / "four_bit_run", time.perf_counter(), {}
    for stage in FOUR_BIT_STAGES:
        left = timeout - (time.perf_counter() - started)
        cmd = [sys.executable, "-m", "finetune.cli", stage, str(ROOT / "recipes" / "tiny_chat.yaml")]
        try:
            res = _run([*cmd, f"output_dir={run_dir}", *FOUR_BIT], env, max(left, 1))
        except subprocess.TimeoutExpired:
            return {"stages": stages, "error": f"{stage}: timed out ({timeout:.0f} s for the chain)"}
        if res.returncode != 0:
            return {"stages": stages, "error": f"{stage}: {(res.stderr or res.stdout).strip()[-1200:]}"}
        m = json.loads((run_dir / stage / "metrics.json").read_text())
        keys = ("base_unchanged", "global_steps", "updates", "parity_max_abs_diff_fp32", "peak_memory_mb")
        stages[stage] = {k: m[k] for k in keys if k in m}
    return {"stages": stages, "wall_s": time.perf_counter() - started}


def _mb(x: float) -> str:
    return f"{x / 1024:,.1f} GB" if x >= 1024 else f"{x:,.0f} MB"


def table(facts: dict, reports: dict, lm_head: dict | None, model: str) -> str:
    from bench.models import flops_per_token, phi2_config

    config = phi2_config(model)
    from bench.models import SETTINGS

    s = SETTINGS[model]
    flops = flops_per_token(config, s["max_length"])
    peak = facts.get("peak_flops")
    speed = facts.get("speed") or {}
    sw = facts["software"]
    lines = [
        f"GPU benchmark ({'dry run, CPU size: ' + model if facts['dry_run'] else sw.get('gpu', '?')}), "
        f"{facts['started']}; torch {sw['torch']}, transformers {sw['transformers']}, trl {sw['trl']}, "
        f"peft {sw['peft']}; flash-attn {sw.get('flash_attn') or 'absent (SDPA)'}",
        "",
    ]
    if speed:
        lines.append(
            f"Measured: device copy {speed['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
            f"fp16 matmul 8192^3 {speed['matmul_fp16_flops'] / 1e12:.0f} TFLOP/s; MFU below is against "
            f"the dense fp16 peak {peak / 1e12:.0f} TFLOP/s"
            if peak
            else "(unknown GPU: no MFU)"
        )
        lines.append("")
    lines += ["| stage | arm | real tokens/s | MFU | peak memory | notes |", "|---|---|---|---|---|---|"]
    for stage in ("sft", "dpo", "reward"):
        r = reports.get(stage)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {stage.upper()} | - | - | - | - | failed: {r['error'].splitlines()[-1][:150]} |")
            continue
        for arm, a in r["arms"].items():
            m = a["median"]
            in_step_ref = stage == "dpo" and "precompute_ref_s" not in m
            per_token = flops["train"] + (flops["forward"] if in_step_ref else 0)
            if stage == "reward":  # a score head of one output instead of the LM head: no 2dV forward + 2dV back
                per_token -= 4 * config.hidden_size * config.vocab_size
            mfu = f"{m['tokens_per_s'] * per_token / peak:.1%}" if peak else "n/a"
            note = (
                "reference in the step"
                if in_step_ref
                else (f"reference precomputed ({m['precompute_ref_s']:.1f} s once)" if stage == "dpo" else "")
            )
            lines.append(
                f"| {stage.upper()} | {arm} | {m['tokens_per_s']:,.0f} | {mfu} | {_mb(m['peak_memory_mb'])} | {note} |"
            )
        for arm, ratio in r.get("ratios", {}).items():
            lines.append(
                f"| {stage.upper()} | ours / {arm} | {ratio['tokens_per_s']:.2f}x | | {ratio['peak_memory']:.2f}x | |"
            )
    for rl_stage in ("ppo", "grpo"):
        lines += _rl_rows(rl_stage, reports.get(rl_stage), flops, config, speed, s)
    if "peer" in facts and "skipped" in facts["peer"]:
        lines.append(f"\nPPO peer skipped: {facts['peer']['skipped']}")
    if facts.get("vllm", {}).get("skipped"):
        lines.append(f"\nGRPO with vLLM skipped: {facts['vllm']['skipped']}")
    four = reports.get("four_bit")
    if four is not None:
        lines += ["", "| 4-bit chain (tiny model, bitsandbytes CUDA) | result |", "|---|---|"]
        for stage, m in four.get("stages", {}).items():
            lines.append(f"| {stage} | {json.dumps(m)} |")
        if "error" in four:
            lines.append(f"| failed | {four['error'].splitlines()[-1][:200]} |")
    return _rest(lines, lm_head, facts)


def _rl_rows(stage: str, r: dict | None, flops: dict, config, speed: dict, s: dict) -> list[str]:
    """The PPO or GRPO table: time per update and its split, generated (rollout) tokens/s against the
    memory-bandwidth bound, peak memory, parameters held."""
    lines = []
    if r is not None:
        lines += [
            "",
            f"| {stage.upper()} arm | s/update | generate / score / optimise s | generation share | generated tok/s | "
            "vs bandwidth bound | peak memory | parameters held |",
            "|---|---|---|---|---|---|---|---|",
        ]
        if "error" in r:
            lines.append(f"| failed: {r['error'].splitlines()[-1][:150]} | | | | | | | |")
        else:
            weight_bytes = 2 * (flops["matmul_params"] + config.vocab_size * config.hidden_size)
            bw = speed.get("copy_bandwidth_bytes_per_s")
            sequences = s["ppo_batch"] * (s["grpo_generations"] if stage == "grpo" else 1)
            bound = sequences * bw / weight_bytes if bw else None
            for arm, a in r["arms"].items():
                m = a["median"]
                vs = f"{m['generated_tokens_per_s'] / bound:.0%} of {bound:,.0f}" if bound else "n/a"
                lines.append(
                    f"| {arm} | {m['seconds_per_update']:.2f} | {m['time_generate_s']:.2f} / {m['time_score_s']:.2f} / "
                    f"{m['time_optimise_s']:.2f} | {m['generation_share']:.0%} | {m['generated_tokens_per_s']:,.0f} "
                    f"| {vs} | {_mb(m['peak_memory_mb'])} | {m.get('parameters_held', 0) / 1e9:.2f}B |"
                )
            for arm, ratio in r.get("ratios", {}).items():
                lines.append(
                    f"| ours / {arm} | {1 / ratio['tokens_per_s']:.2f}x time per update | | | | | "
                    f"{ratio['peak_memory']:.2f}x | |"
                )
    return lines


def _rest(lines: list[str], lm_head: dict | None, facts: dict) -> str:
    if lm_head:
        lines += ["", "| LM head + loss, forward + backward | seconds | added peak memory |", "|---|---|---|"]
        for v in lm_head["results"]:
            if "skipped" in v:
                lines.append(f"| {v['variant']} | skipped: {v['skipped'][:120]} | |")
            else:
                mem = _mb(v["added_peak_memory_mb"]) if "added_peak_memory_mb" in v else "n/a"
                lines.append(
                    f"| {v['variant']} ({v['tokens']} x {v['hidden']} -> {v['vocab']}, {v['dtype']}) | "
                    f"{v['seconds'] * 1e3:.1f} ms | {mem} |"
                )
    liger = facts.get("liger", {})
    ran = f"installed and ran ({liger['liger_kernel']})" if "liger_kernel" in liger else liger.get("skipped", "?")[:300]
    lines.append(f"\nLiger: {ran}")
    return "\n".join(lines) + "\n"


def run(out: Path, dry_run: bool, bundle_dir: Path, budget_s: float) -> int:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    facts, env, peer_env = preflight(dry_run, bundle_dir)
    facts["preflight_s"] = time.perf_counter() - started
    (out / "preflight.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(f"gpu: preflight ok in {facts['preflight_s']:.0f} s: {json.dumps(facts['software'])}", flush=True)
    model = "phi2-small" if dry_run else "phi2"
    if dry_run:
        from bench.lm_head import heads

        lm_head = heads(small=True)
    else:
        res = _run([sys.executable, str(ROOT / "bench" / "lm_head.py")], env, 120)
        lm_head = (
            _json_line(res)
            if res.returncode == 0
            else {"results": [{"variant": "all", "skipped": res.stderr.strip()[-300:]}]}
        )
    (out / "lm_head.json").write_text(json.dumps(lm_head, indent=2) + "\n")
    reports: dict = {}
    for stage, (arms, steps, warmup, allowed) in STAGES.items():
        if stage == "ppo" and peer_env is None:
            arms = ["ours"]
        if stage == "grpo" and (dry_run or "skipped" in facts.get("vllm", {})):
            arms = [a for a in arms if a != "ours-vllm"]
        if dry_run:
            steps, warmup = DRY[stage]
        left = budget_s - (time.perf_counter() - started)
        if left < 30:
            reports[stage] = {"error": f"not run: the {budget_s:.0f} s budget was spent"}
            continue
        stage_env = {**(peer_env or env)} if stage == "ppo" else env
        rows = 64 if stage == "dpo" and not dry_run else None  # the precompute pass covers the whole dataset
        reports[stage] = _stage(
            stage, model, arms, steps, warmup, out / f"{stage}.json", stage_env, min(allowed, left), rows, dry_run
        )
        print(
            f"gpu: {stage} {'failed: ' + reports[stage]['error'][-300:] if 'error' in reports[stage] else 'done'}"
            f" ({time.perf_counter() - started:.0f} s in)",
            flush=True,
        )
        (out / "gpu_table.md").write_text(table(facts, reports, lm_head, model))
    left = budget_s - (time.perf_counter() - started)
    if not dry_run:  # on the CPU, tests/stages/test_four_bit.py runs the same chain
        reports["four_bit"] = (
            four_bit_chain(out, env, min(180, left)) if left >= 60 else {"error": "not run: the budget was spent"}
        )
        (out / "four_bit.json").write_text(json.dumps(reports["four_bit"], indent=2) + "\n")
        (out / "gpu_table.md").write_text(table(facts, reports, lm_head, model))
    summary = {
        "facts": facts,
        "wall_s": time.perf_counter() - started,
        "stages": {
            k: (
                {"error": v["error"]}
                if "error" in v
                else v
                if k == "four_bit"
                else {"ratios": v.get("ratios"), "medians": {a: x["median"] for a, x in v["arms"].items()}}
            )
            for k, v in reports.items()
        },
    }
    (out / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print((out / "gpu_table.md").read_text())
    return 0 if all("error" not in r for r in reports.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="download the wheels the GPU run installs into bench/gpu_bundle")
    b.add_argument("--dir", type=Path, default=BUNDLE)
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    r = sub.add_parser("run", help="preflight, then SFT, DPO, reward and PPO, then the table")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu"))
    r.add_argument("--dry-run", action="store_true", help="CPU, Phi-2 shape rules at CPU size, 1 step per arm")
    r.add_argument("--bundle", type=Path, default=BUNDLE)
    r.add_argument("--budget-s", type=float, default=510, help="stop starting stages after this many seconds")
    args = p.parse_args(argv)
    if args.command == "bundle":
        return bundle(args.dir, args.python_version)
    return run(args.out, args.dry_run, args.bundle, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
