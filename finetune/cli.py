"""The `finetune` command: one entry point for every stage and tool.

    finetune config RECIPE [key=value ...]       print the fully resolved recipe
    finetune sft RECIPE [key=value ...]          run the SFT stage
    finetune reward RECIPE [key=value ...]       train the reward model (from the SFT output)
    finetune dpo RECIPE [key=value ...]          run DPO (from the SFT output)
    finetune ppo RECIPE [key=value ...]          run PPO (policy from the DPO output, reward from the reward model)
    finetune export RECIPE [key=value ...] [--force]
                                                 merge the last stage's adapters into the base: a plain HF model folder
    finetune pipeline RECIPE [key=value ...] [--force]
                                                 sft -> reward -> dpo -> ppo -> export, skipping finished stages
    finetune chat MODEL_DIR_OR_RECIPE            talk to the model in the terminal (/reset, /exit)
    finetune generate MODEL_DIR_OR_RECIPE --prompts FILE --out FILE.jsonl
                                                 answer every prompt of a file (greedy), write jsonl
    finetune azureml submit RECIPE --stage STAGE [--dry-run] [--stream] [key=value ...]
                                                 run a stage (or --stage pipeline) as an Azure ML job; docs/azureml.md

Every stage also takes --print-config (print the resolved recipe and exit).

A stage whose recipe names `launch.accelerate_config` re-runs itself as
`accelerate launch --config_file <that> finetune/<stage>.py RECIPE ...`, exactly the command a user
would type, unless it is already running under a launcher. Export never needs a launcher (no DeepSpeed,
no GPU) and always runs in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from finetune.recipe import RecipeError, dump_recipe, load_recipe

STAGES = ("sft", "reward", "dpo", "ppo", "export")
TOOLS = ("config", "pipeline", "chat", "generate", "azureml")
PACKAGE_DIR = Path(__file__).resolve().parent


def launched() -> bool:
    """True inside `accelerate launch` / torchrun (they set these for every process)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCH" in os.environ


def stage_command(stage: str, recipe_path: str, overrides: list[str], accelerate_config: str | None,
                  num_processes: int | None, python: str = sys.executable,
                  package_dir: str | Path = PACKAGE_DIR) -> list[str]:
    """The command line that runs a stage: plain python, or accelerate launch with its config.

    `python` and `package_dir` default to this interpreter and this checkout; an Azure ML job builds
    the same command with `python` and the path inside its code snapshot (finetune.azureml)."""
    script = str(Path(package_dir) / f"{stage}.py")
    if accelerate_config is None:
        return [python, script, recipe_path, *overrides]
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, script, recipe_path, *overrides]


def run_stage(stage: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"finetune.{stage}")
    if stage == "export" or "--print-config" in argv or launched() or not argv:
        return module.main(argv)
    recipe_path, overrides = argv[0], argv[1:]
    recipe = load_recipe(recipe_path, overrides)
    if recipe.launch.accelerate_config is None:
        return module.main(argv)
    cmd = stage_command(stage, recipe_path, overrides, recipe.resolve_path(recipe.launch.accelerate_config),
                        recipe.launch.num_processes)
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: finetune {{{','.join(STAGES + TOOLS)}}} RECIPE [key=value ...]  (finetune --help for more)"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "config":
            if not rest:
                print("usage: finetune config RECIPE [key=value ...]", file=sys.stderr)
                return 2
            print(dump_recipe(load_recipe(rest[0], rest[1:])), end="")
            return 0
        if command in STAGES:
            return run_stage(command, rest)
        if command == "azureml":
            from finetune import azureml

            return azureml.main(rest)
        if command == "pipeline":
            from finetune import pipeline

            return pipeline.main(rest)
        if command in ("chat", "generate"):
            from finetune import chat

            return chat.main(command, rest)
    except RecipeError as e:
        print(f"finetune: recipe error:\n{e}", file=sys.stderr)
        return 2
    print(f"finetune: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
