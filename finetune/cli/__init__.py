"""The `finetune` command and its front-ends: one entry point for every stage and tool.

`finetune --help` lists the stages from the stage registry (finetune.recipe.stages) and the tools
below. A stage runs through finetune.launch: in this process, or re-run as
`accelerate launch --config_file <launch.accelerate_config> finetune/<stage>.py RECIPE ...` when the
recipe names an accelerate config (exactly the command a user would type), unless it is already
running under a launcher.
"""

from __future__ import annotations

import sys

from finetune.errors import UserError
from finetune.launch import run_stage
from finetune.recipe import STAGES, dump_recipe, load_recipe

# (command, arguments, what it does); the stages come from the registry.
TOOLS = [
    ("config", "RECIPE [key=value ...]", "print the fully resolved recipe"),
    ("pipeline", "RECIPE [key=value ...] [--force]", "every stage in order, skipping finished ones"),
    ("report", "OUTPUT_DIR [--out FILE]", "write the run's report.html (one file: open it in a browser)"),
    ("chat", "MODEL_DIR_OR_RECIPE", "talk to the model in the terminal (/reset, /exit)"),
    ("generate", "MODEL_DIR_OR_RECIPE --prompts FILE --out FILE.jsonl", "answer every prompt of a file (greedy)"),
    (
        "azureml",
        "submit RECIPE --stage STAGE [--dry-run] [--stream] [key=value ...]",
        "run a stage (or --stage pipeline) as an Azure ML job; docs/azureml.md",
    ),
    (
        "azureml",
        "register EXPORT_DIR_OR_RECIPE [--dry-run] [--model-name N]",
        "register an export as an Azure ML model asset",
    ),
    ("tiny", "build OUT [--force] | write-data FOLDER", "rebuild the offline default's tiny base, or its task data"),
]


def help_text() -> str:
    lines = ["finetune: turn a Phi base model into an instruct model with LoRA.", "", "stages (pipeline order):"]
    for stage in STAGES:
        lines.append(f"  finetune {stage.name} RECIPE [key=value ...]".ljust(48) + stage.help)
    lines += ["", "tools:"]
    for name, args, what in TOOLS:
        usage = f"  finetune {name} {args}"
        lines.append(usage.ljust(48) + what if len(usage) < 48 else f"{usage}\n{'':48}{what}")
    lines += [
        "",
        "Every stage also takes --print-config (print the resolved recipe and exit). A recipe naming",
        "launch.accelerate_config runs its stages under `accelerate launch` (export always in-process).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = [*STAGES.names(), *dict.fromkeys(name for name, _, _ in TOOLS)]
    usage = f"usage: finetune {{{','.join(commands)}}} RECIPE [key=value ...]  (finetune --help for more)"
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text() if argv else usage)
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
            from finetune.cli import azureml

            return azureml.main(rest)
        if command == "pipeline":
            from finetune.cli import pipeline

            return pipeline.main(rest)
        if command == "report":
            from finetune.cli import report

            return report.main(rest)
        if command in ("chat", "generate"):
            from finetune.cli import chat

            return chat.main(command, rest)
        if command == "tiny":
            from finetune.cli import tiny

            return tiny.main(rest)
    except UserError as e:
        print(f"finetune {command}: error:\n{e}", file=sys.stderr)
        return 2
    print(f"finetune: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
