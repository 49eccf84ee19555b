"""Export stage: merge a stage's adapter chain into the base and write a plain Hugging Face model folder.

    finetune export RECIPE [key=value ...] [--force] [--push-to-hub REPO_ID] [--gguf q8_0,q4_k_m]
    python finetune/export.py RECIPE [key=value ...] [--force]

choose the stage (export.stage; auto = the last finished of ppo, dpo, sft) -> its adapter chain ->
base in fp32 with the chain merged (core.modeling.load_model, one copy of the model) -> parity logits and
held-out correctness -> cast to export.dtype -> sharded safetensors, config, generation config (EOS =
the template's end-of-turn token), tokenizer with the chat template, model card -> parity reference
(base + the same adapters unmerged, loaded after the merged model is freed) -> rename into place.

The chain of a stage output is the adapters it was trained on top of (its metrics.json `start_from`)
and then its own (finetune.core.lineage). For PPO that is sft + ppo: the PPO policy adapter began as
a copy of the adapter it started from (DPO's, which it replaces) or as a new LoRA on the SFT model; GRPO's is
sft + grpo (a new policy LoRA on the SFT model). No
DeepSpeed and no GPU: merging runs on the CPU in fp32 (fp16 merges lose precision: peft#2368).
"""

from __future__ import annotations

import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.chat_template import encode, end_of_turn_ids, render
from finetune.core import lineage, ownership
from finetune.core.data import train_eval_rows
from finetune.core.evaluation import Samples, held_out_correctness
from finetune.core.lineage import chat_model_stage, fp32_recipe, model_chain
from finetune.core.modeling import DTYPES, load_model, load_stacked, load_tokenizer, template_for
from finetune.core.outputs import atomic_dir, read_metrics, write_json, write_samples
from finetune.core.progress import progress
from finetune.core.publishing import push_folder
from finetune.core.summary import figure, print_summary, rate
from finetune.deploy import gguf
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError, dump_recipe

log = logging.getLogger("finetune.export")

# Conversations whose logits the parity check compares (any template renders them; the last has a
# reply, so the check covers assistant tokens and the end-of-turn token too).
PARITY_CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [
        {"role": "system", "content": "Reply with the answer only."},
        {"role": "user", "content": "What letter comes after q?"},
    ],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "user", "content": "What is the opposite of hot?"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "And of big?"},
    ],
]


def parity_inputs(tokenizer, count: int) -> list[list[int]]:
    conversations = (PARITY_CONVERSATIONS * (count // len(PARITY_CONVERSATIONS) + 1))[:count]
    return [
        encode(tokenizer, render(tokenizer, c, add_generation_prompt=c[-1]["role"] == "user")) for c in conversations
    ]


@torch.no_grad()
def logits_of(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits of each input (one at a time: no padding to get wrong)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- where the export goes


def is_export_folder(folder: Path) -> bool:
    """A complete `finetune export` output: finetune's mark says so, and its metrics.json (written last) is there."""
    return ownership.kind_of(folder) == ownership.stage_kind("export") and (Path(folder) / "metrics.json").is_file()


def check_export_target(recipe: Recipe, target: Path, force: bool) -> None:
    """Refuse, before anything loads, an export target that is not absent, empty or an earlier export
    (core.ownership: never a user's folder, the output_dir, a stage's output or checkpoints, nor a folder inside
    one), an earlier export without `force`, and a target whose parent cannot be written."""
    key = "export.output"
    t = Path(target).expanduser()
    try:
        ownership.check_target(t, ownership.stage_kind("export"), "Export to a folder of its own (the default is "
                               "<output_dir>/export)")  # fmt: skip
    except ownership.NotOurs as e:
        raise RecipeError(f"{recipe.source}: {key}: {e}") from None
    if t.is_dir() and any(t.iterdir()) and not force:
        raise RecipeError(
            f"{recipe.source}: {key}: {target} already exists; pass --force (or export.force=true) to replace it, "
            "or export.output=<another folder>"
        )
    t.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=t.parent, prefix=f".{t.name}.probe"):
        pass


def held_out_rows(recipe: Recipe) -> tuple[list[dict], int, int, float | None]:
    """The held-out rows and generation settings of the recipe's first chat-model stage with data (SFT): the
    rows on which that stage measured the base model, so the exported model's figure compares with it one to
    one; and that stage's figure for the base (None when it measured none)."""
    first = recipe.question_stage()
    if first is None:
        return [], 0, 0, None
    section = recipe.section(first)
    limit = section.eval_generate_rows if recipe.export.eval_generate_rows is None else recipe.export.eval_generate_rows
    if limit == 0:
        return [], 0, 0, None
    _, eval_rows, _, _ = train_eval_rows(section.data, recipe, recipe.seed)
    base = STAGES[first].key_metrics(read_metrics(recipe.stage_dir(first)))["correct_before"]
    return eval_rows, limit, section.max_new_tokens, base


def model_card(recipe: Recipe, stage: str, chain: list[str], metrics: dict, eot: str) -> str:
    """README.md of the exported folder: what it is, how to use it, the stages and their figures, the recipe."""
    out = Path(recipe.output_dir)
    outputs = {name: read_metrics(recipe.stage_dir(name)) for name in STAGES.names() if name != "export"}
    rows = []
    for name, m in outputs.items():
        if not m:
            continue
        folder = str(recipe.stage_dir(name).resolve())  # a relative output_dir spells some folders relatively

        # an RL stage records the adapter its policy started as a copy of, and the reward model it scored with
        started, scored = (
            [other for other, o in outputs.items() if o.get(key) and str(Path(o[key]).resolve()) == folder]
            for key in ("policy_initialised_from", "reward_from")
        )
        if folder in {str(Path(c).resolve()) for c in chain}:
            role = "merged into this model"
        elif started and started[0] == stage:
            role = f"initialised the {stage.upper()} policy, which replaced it"
        elif scored and stage in scored:
            role = f"scored {stage.upper()}'s samples (not part of this model)"
        else:
            role = "not part of this model"
        k = STAGES[name].key_metrics(m)
        rows.append(
            f"| {name} | {role} | {k['metric']}: {figure(k['before'], k['metric'])} → "
            f"{figure(k['after'], k['metric'])} | "
            f"{rate(k['correct_before'])} → {rate(k['correct_after'])} |"
        )
    base = recipe.model.name_or_path
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [finetune, lora-merged, {', '.join(Path(c).name for c in chain)}]",
    ]
    if not base.startswith("builtin:") and not Path(base).exists():
        front.append(f"base_model: {base}")
    front.append("---")
    parity = [
        f"- fp32 merged vs base + unmerged adapters: max |Δ logit| = {figure(metrics['parity_max_abs_diff_fp32'])}"
        if metrics.get("parity_max_abs_diff_fp32") is not None
        else "- not checked (export.parity_prompts: 0)"
    ]
    if metrics.get("parity_max_abs_diff_export_dtype") is not None and metrics["dtype"] != "fp32":
        parity.append(
            f"- exported {metrics['dtype']} weights vs the fp32 reference: max |Δ logit| = "
            f"{figure(metrics['parity_max_abs_diff_export_dtype'])}"
        )
    lines = [
        *front,
        "",
        f"# {out.name or 'model'}: {stage} model, adapters merged",
        "",
        f"Made with finetune from `{base}`: the LoRA adapters {' → '.join(f'`{c}`' for c in chain)} were merged "
        f"into the base in fp32, in that order, and the result cast to {metrics['dtype']}. Chat template "
        f"`{recipe.template.name}` is embedded in the tokenizer; generation stops at `{eot}` "
        "(generation_config.json).",
        "",
        "## Use (plain transformers)",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is 2 plus 3?'}],",
        "                              add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## Stages",
        "",
        "| stage | role | key metric (before → after) | held-out correct (start → end) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Held-out correctness of this exported model: {rate(metrics.get('correct_rate_after'))} "
        f"(the base: {rate(metrics.get('correct_rate_base'))}).",
        "",
        "## Parity",
        "",
        *parity,
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def summarise(recipe: Recipe, metrics: dict, parity_checked: bool, target: Path) -> None:
    """The export's closing summary, from its metrics."""
    chain, dtype_name = metrics["adapters"], metrics["dtype"]
    parity = (
        f"max |Δ logit| fp32 {metrics['parity_max_abs_diff_fp32']:.2e}, "
        f"{dtype_name} {metrics['parity_max_abs_diff_export_dtype']:.2e}"
        if parity_checked
        else "not checked"
    )
    print_summary(
        STAGES["export"].summary_title,
        [
            ("model", f"{metrics['stage']}: {' + '.join(chain)} merged into {recipe.model.name_or_path}"),
            ("dtype", f"{dtype_name} ({len(metrics['shards'])} safetensors shard(s), max {metrics['max_shard_size']})"),
            ("parity", parity),
            (
                "held-out correct",
                f"{rate(metrics['correct_rate_base'])} (base) -> {rate(metrics['correct_rate_after'])} (exported)",
            ),
            ("sample reply", repr(metrics["sample_reply"])),
            ("stops at", f"{metrics['end_of_turn']} (generation_config eos_token_id {metrics['eos_token_id']})"),
            ("output", str(target)),
        ],
    )


def run(recipe: Recipe) -> dict:
    section = recipe.export
    target = recipe.stage_dir("export")
    if section.gguf:
        gguf.check_installed()  # before the merge, not after it
    if not section.force and (section.push_to_hub or section.gguf) and is_export_folder(target):
        log.info("%s is a finished export: using it unchanged (--force exports again first)", target)
        if section.gguf:
            gguf.export_gguf(recipe, target, section.gguf, *held_out_rows(recipe)[:3])
        if section.push_to_hub:
            print(f"pushed {target} to {push_folder(target, section.push_to_hub, section.hub_private)}")
        return read_metrics(target)
    check_export_target(recipe, target, section.force)  # --force replaces an earlier export, nothing else
    started = time.time()
    stage = chat_model_stage(recipe, section.stage, "export.stage")
    chain = model_chain(recipe, stage, "export.stage")
    dtype_name = recipe.precision if section.dtype == "auto" else section.dtype
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    stop = end_of_turn_ids(tokenizer, template)
    eot = template.end_of_turn_token(tokenizer)
    log.info(
        "exporting %s: merging %s into %s (fp32), then casting to %s",
        stage,
        " + ".join(chain),
        recipe.model.name_or_path,
        dtype_name,
    )

    full = fp32_recipe(recipe)
    model = load_model(full, merge=chain)
    inputs = parity_inputs(tokenizer, section.parity_prompts)
    merged32 = logits_of(model, inputs)
    model.to(DTYPES[dtype_name])
    exported = logits_of(model, inputs)
    rows, limit, max_new, correct_base = held_out_rows(recipe)
    correct, replies = held_out_correctness(model, tokenizer, template, rows, limit, max_new) if limit else (None, [])
    samples = Samples(recipe)
    samples.answer("export", model, tokenizer, template)  # the exported weights (export.dtype), as served

    gen = model.generation_config
    gen.eos_token_id = stop[0] if len(stop) == 1 else stop
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    metrics = {
        "stage": stage,
        "adapters": chain,
        "base_model": recipe.model.name_or_path,
        "dtype": dtype_name,
        "max_shard_size": section.max_shard_size,
        "eos_token_id": gen.eos_token_id,
        "end_of_turn": eot,
        "correct_rate_base": correct_base,
        "correct_rate_after": correct,
        "sample_reply": replies[0] if replies else None,
    }
    with atomic_dir(target, ownership.stage_kind("export")) as tmp:
        with progress(f"export: writing {dtype_name} safetensors"):
            model.save_pretrained(str(tmp), max_shard_size=section.max_shard_size)
        tokenizer.save_pretrained(str(tmp))  # with the chat template
        del model
        gc.collect()  # the merged copy goes before the reference loads: never two models at once
        if inputs:
            reference = load_stacked(full, chain)
            ref = logits_of(reference, inputs)
            del reference
            metrics["parity_max_abs_diff_fp32"] = max_abs_diff(merged32, ref)
            metrics["parity_max_abs_diff_export_dtype"] = max_abs_diff(exported, ref)
            metrics["parity_tokens"] = sum(map(len, inputs))
            if dtype_name != "fp32":  # the pipeline's table shows it beside the fp32 figure
                metrics["headline_note"] = f"{dtype_name}: {figure(metrics['parity_max_abs_diff_export_dtype'])}"
        metrics["export_runtime_s"] = time.time() - started
        metrics["shards"] = sorted(p.name for p in tmp.glob("*.safetensors"))
        (tmp / "README.md").write_text(model_card(recipe, stage, chain, metrics, eot))
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        write_samples(tmp, samples.rows())
        metrics = lineage.stamp(recipe, "export", metrics, {"stage": chain})
        write_json(tmp / "metrics.json", metrics)  # last: its presence marks a complete export
        for f in tmp.iterdir():
            f.chmod(0o644)  # shards are written 0600 (temp files): a served model is read by other users
    summarise(recipe, metrics, bool(inputs), target)
    if section.gguf:
        gguf.export_gguf(recipe, target, section.gguf, rows, limit, max_new, reference=replies)
    if section.push_to_hub:
        print(f"pushed {target} to {push_folder(target, section.push_to_hub, section.hub_private)}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--force" in argv:  # the flag is the override export.force=true
        argv = [a for a in argv if a != "--force"] + ["export.force=true"]
    if "--push-to-hub" in argv:  # the flag is the override export.push_to_hub=REPO_ID
        i = argv.index("--push-to-hub")
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            print("finetune export: --push-to-hub needs a repository id (user/name)", file=sys.stderr)
            return 2
        argv = argv[:i] + argv[i + 2 :] + [f"export.push_to_hub={argv[i + 1]}"]
    if "--gguf" in argv:  # the flag is the override export.gguf=[TYPES]
        i = argv.index("--gguf")
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            print("finetune export: --gguf needs GGUF types, e.g. --gguf q8_0,q4_k_m", file=sys.stderr)
            return 2
        argv = argv[:i] + argv[i + 2 :] + [f"export.gguf=[{argv[i + 1]}]"]
    return stage_main("export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
