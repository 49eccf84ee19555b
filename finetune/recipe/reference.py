"""The recipe reference (docs/recipe_reference.md), generated from the schema and the stage registry.

python -m finetune.recipe > docs/recipe_reference.md
"""

from __future__ import annotations

import typing

from pydantic import BaseModel

from .schema import recipe_model
from .stages import STAGES
from .trl_fields import OWNED_ELSEWHERE, type_name

PATH_RULE = {"recipe": "relative to the recipe file", "cwd": "relative to the directory you run from"}


def _stage_lines() -> list[str]:
    lines = [
        "## Stages",
        "",
        "In pipeline order. `starts from` is what the stage's keys default to.",
        "",
        "| stage | section takes | starts from | output |",
        "|---|---|---|---|",
    ]
    for s in STAGES:
        takes = f"`{s.trl_config[0]}.{s.trl_config[1]}` fields too" if s.trl_config else "its own keys only"
        starts = ", ".join(f"`{s.name}.{key}` = `<output_dir>/{earlier}`" for earlier, key in s.inputs.items() if key)
        if s.takes_models:
            starts = "every earlier model stage's output"
        output = "a chat model (exportable)" if s.chat_model else "a model folder" if s.model_folder else "an adapter"
        if s.takes_models and not s.model_folder:
            output = "figures"
        lines.append(f"| `{s.name}` | {takes} | {starts or '-'} | {output} |")
    return lines


def reference_markdown() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from `finetune/recipe/` by `python -m finetune.recipe > docs/recipe_reference.md`; a test keeps "
        "it in step with the code.",
        "",
        "Paths follow one rule by kind: inputs that travel with the recipe (data files, `.jinja` templates, the "
        "DeepSpeed and accelerate configs, a local model folder, the Azure ML config) are relative to the recipe "
        "file; run outputs (`output_dir`, and `start_from`, `reward_from`, `export.output`, a `resume` checkpoint "
        "path) are relative to the directory you run from. The table marks each path key. "
        f'`start_from` / `reward_from` take `{"none"}` for "no adapter".',
        "",
        "Stage sections of TRL-trained stages also take any field of the stage's TRL config (`sft`: "
        "`trl.SFTConfig`, e.g. `sft.max_steps`, `sft.max_length`, `sft.packing`; finetune's SFT default is "
        "`packing: true`, padding-free packs, and DPO's `padding_free: true`, padding-free pairs, which TRL 1.16 "
        "itself switches off; see docs/benchmarks.md), and `training` takes "
        "`transformers.TrainingArguments` fields shared by every stage. These keys are owned by the recipe "
        "elsewhere and refused in training sections:",
        "",
    ]
    lines += [f"- `{k}` → {v}" for k, v in OWNED_ELSEWHERE.items()]
    lines += ["", *_stage_lines(), "", "## Keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            ann = field.annotation
            sub = next(
                (a for a in [ann, *typing.get_args(ann)] if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
            inner = next(  # a list of sections, optional or not
                (typing.get_args(a)[0] for a in [ann, *typing.get_args(ann)] if typing.get_origin(a) is list),
                None,
            )
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                sub, name = inner, f"{name}[]"
            default = (
                "required"
                if field.is_required()
                else (
                    ""
                    if field.default_factory is not None and sub
                    else repr(field.get_default(call_default_factory=True))
                )
            )
            kind = (field.json_schema_extra or {}).get("path") if isinstance(field.json_schema_extra, dict) else None
            meaning = (field.description or "") + (f" Path {PATH_RULE[kind]}." if kind else "")
            lines.append(
                f"| `{prefix}{name}` | {'section' if sub else type_name(ann).replace('|', 'or')} | {default} | "
                f"{meaning.replace('|', '/')} |"
            )
            if sub:
                walk(sub, f"{prefix}{name}.")

    walk(recipe_model(), "")
    return "\n".join(lines) + "\n"
