#!/usr/bin/env bash
# The PPO peer's virtual environment: TRL 1.12.0, the last TRL release with a PPOTrainer
# (trl.experimental.ppo; 1.13.0 removed it), beside the same torch / transformers / peft / accelerate /
# datasets versions the project runs, so the comparison differs in the trainer only.
#
#   bash bench/peer_env.sh                 # makes $FINETUNE_BENCH_PEER_VENV (default below), ~1 minute
#   bash bench/peer_env.sh --wheels DIR    # offline: install only from wheels in DIR (the GPU bundle)
#
# It lives outside the repository (~/.cache/finetune-bench/trl112-venv unless FINETUNE_BENCH_PEER_VENV
# says otherwise); bench/run.py --stage ppo --arms ours,peer finds it there. torch is named with its
# exact version first so pip takes the CPU wheel here; on a GPU machine the venv is made with
# --system-site-packages and torch is not installed at all: the machine's own CUDA torch is used.
set -euo pipefail

VENV="${FINETUNE_BENCH_PEER_VENV:-$HOME/.cache/finetune-bench/trl112-venv}"
PYTHON="${PYTHON:-python3}"
WHEELS=""
if [ "${1:-}" = "--wheels" ]; then WHEELS="$2"; fi

# the versions ours runs (pyproject.toml ranges; CI's pins) -- only trl differs
TRL_PEER="trl==1.12.0"
SAME=("transformers==5.23.0" "peft==0.21.2" "accelerate==1.15.0" "datasets==5.2.0")

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # GPU machine: reuse its CUDA torch (never let pip replace it)
  "$PYTHON" -m venv --system-site-packages "$VENV"
  TORCH=()
else
  "$PYTHON" -m venv "$VENV"
  TORCH=("torch==2.13.0")
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if [ -n "$WHEELS" ]; then
  PIP+=(--no-index --find-links "$WHEELS")
fi
"${PIP[@]}" "${TORCH[@]}" "$TRL_PEER" "${SAME[@]}"
"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401  (the point of this venv)
print(f"peer venv ok: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF
echo "$VENV"
