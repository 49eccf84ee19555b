"""The package's shape: no import cycles, imports point one way (front-ends -> stages -> core), and a
stage is one registry entry plus its module."""

import ast
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE

PACKAGE = ROOT / "finetune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports, at module level or inside functions. `from X import y` counts
    as an import of X.y when that is a module; importing X.y also runs the __init__ of every package on
    the way that is not already one of `name`'s own parents."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import finetune.x.y` names a module; attributes are not
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and not (name == step or name.startswith(step + ".")):
                    found.add(step)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_import_walk_sees_in_function_imports():
    assert "finetune.cli.pipeline" in GRAPH["finetune.cli"]  # imported inside main()
    assert "finetune.core.lineage" in GRAPH["finetune.core.training"]


def test_no_import_cycles_in_the_package():
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def package_of(module: str) -> str:
    """The unit a module belongs to for package-level loops: its subpackage (finetune.core, finetune.tiny, ...),
    or the module itself for the top-level ones (finetune.sft, finetune.launch, ...)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and is_package(module)):
        return ".".join(parts[:2])
    return module


def test_no_import_cycles_between_packages():
    """A loop between packages that no single file shows (core.memory imports finetune.tiny while a module of
    finetune.tiny imports core) is a loop all the same: neither package can be understood, or moved, alone."""
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        here = package_of(name)
        graph.setdefault(here, set()).update(package_of(t) for t in targets if package_of(t) not in (here, "finetune"))
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_imports_point_one_way():
    from finetune.recipe import STAGES

    stages = {s.module for s in STAGES}
    front = {m for m in MODULES if m == "finetune.cli" or m.startswith("finetune.cli.")}
    core = set(MODULES) - stages - front - {"finetune.launch"}
    wrong = [f"{m} -> {t}" for m in core for t in GRAPH[m] if t in stages | front | {"finetune.launch"}]
    wrong += [f"{m} -> {t}" for m in stages for t in GRAPH[m] if t in (stages - {m}) | front]
    wrong += [f"finetune.launch -> {t}" for t in GRAPH["finetune.launch"] if t in stages | front]
    assert not wrong, "imports against the layers (core <- stages <- front-ends):\n" + "\n".join(sorted(wrong))


def test_nothing_cites_notes_outside_the_repository():
    # spelt in pieces so that this list is not itself a citation for a grep of the repository
    pattern = (
        "/".join(("shared", "design")),
        " ".join(("design", "note")),
        *(" ".join(("pitfall", str(n))) for n in range(1, 10)),
        " ".join(("section", "1.")),
    )
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    hits = [
        f"{f.relative_to(ROOT)}: {p}"
        for f in files
        if f.name != "test_structure.py"
        for p in pattern
        if p in f.read_text().lower()
    ]
    assert not hits, hits


ENTRY_MODULE = """
from finetune.recipe import STAGES, DataSection, Stage
from finetune.recipe.sections import TRL_STAGE_CONFIG, FromEarlierStage, TrlStage
from finetune.recipe.stages import Memory
from pydantic import Field


class NoopSection(TrlStage, FromEarlierStage):
    model_config = TRL_STAGE_CONFIG
    data: DataSection = Field(description="conversations")
    say: str = "hello"


if "noop" not in STAGES:
    STAGES.register(
        Stage(
            "noop",
            "noop_stage",
            NoopSection,
            "a throwaway stage",
            trl_config=("trl", "SFTConfig"),
            inputs={"sft": "start_from"},
            chat_model=True,
            headline=("said", None, "said"),
            correctness=("correct_rate_before", "correct_rate_after"),
            memory=Memory(),
        ),
        before="export",
    )
"""

STAGE_MODULE = """
import sys

import noop_entry  # noqa: F401  the registry entry, in every process that runs this stage
from finetune.core.data import tokenize_conversations, train_eval_rows
from finetune.core.evaluation import held_out_correctness
from finetune.core.lineage import start_chain
from finetune.core.modeling import add_lora, load_model, load_tokenizer, template_for
from finetune.core.training import save_stage, train, trl_config
from finetune.launch import stage_main


def run(recipe):
    from trl import SFTConfig, SFTTrainer

    section = recipe.section("noop")
    start = start_chain(recipe, "noop")
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    args = trl_config(recipe, "noop", SFTConfig, eval_strategy="no", packing=False)
    rows, held_out, report, held_report = train_eval_rows(section.data, recipe, recipe.seed)
    data = tokenize_conversations(rows, tokenizer, template, args.max_length, "drop", report, "train")
    model = add_lora(load_model(recipe, merge=start), recipe)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trained = train(trainer, model, recipe, "noop", None)
    correct, _ = held_out_correctness(model, tokenizer, template, held_out, 8, 8)
    metrics = {"said": section.say, "correct_rate_after": correct, "start_from": start, **trained}
    save_stage(trainer, recipe, "noop", tokenizer, metrics, reports={"train": report, "eval": held_report})
    return metrics


def main(argv=None):
    return stage_main("noop", run, argv)


if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.fixture
def noop_stage(tmp_path, monkeypatch):
    """A throwaway TRL-backed stage with data: one registry entry plus its module, nothing else edited. Child
    processes (the pipeline's stages, the export) learn of it the way the package's own stages are known to every
    process, by importing the registry: here through a sitecustomize on their PYTHONPATH."""
    from finetune.recipe import STAGES

    # inside the repository (build/ is ignored by git): an Azure ML job runs a snapshot of it, so a stage's module
    # must live there
    plugin = ROOT / "build" / f"noop-plugin-{os.getpid()}"
    plugin.mkdir(parents=True)
    (plugin / "noop_entry.py").write_text(ENTRY_MODULE)
    (plugin / "noop_stage.py").write_text(STAGE_MODULE)
    (plugin / "sitecustomize.py").write_text("import noop_entry  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin), str(ROOT)]))
    import noop_entry  # noqa: F401

    yield
    STAGES.unregister("noop")
    sys.modules.pop("noop_entry", None)
    sys.modules.pop("noop_stage", None)
    shutil.rmtree(plugin)


def test_a_registered_stage_appears_everywhere_with_no_other_edit(noop_stage, sft_run, tmp_path, capsys):
    """Pipeline, --plan, the memory estimate, the Azure ML dry run and export take a new TRL-backed stage from its
    registry entry alone."""
    import yaml

    from finetune.cli import azureml, main
    from finetune.core.memory import estimate_stage, model_shape, stage_settings
    from finetune.recipe import STAGES, load_recipe

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text):
        assert main(["--help"]) == 0
    assert "finetune noop RECIPE" in help_text.getvalue() and "a throwaway stage" in help_text.getvalue()
    assert "noop" in next(a for a in azureml.parser()._actions if a.dest == "stage").choices

    out = tmp_path / "run"
    shutil.copytree(sft_run[2], out / "sft")  # the session's SFT output: the pipeline skips that stage
    train = ROOT / "data" / "tiny" / "sft_train.jsonl"
    overrides = [
        f"output_dir={out}",
        f"noop.data={{train: [{{path: {train}}}], eval_fraction: 0.1}}",
        "noop.say=hi",
        "noop.max_steps=1",
        "noop.per_device_train_batch_size=4",
        "noop.max_length=128",
        "pipeline.stages=[sft, noop, export]",
        "export.parity_prompts=2",
        "samples.count=0",
    ]
    recipe = load_recipe(TINY_RECIPE, overrides)
    assert recipe.pipeline_stages() == ["sft", "noop", "export"]
    assert STAGES.inputs("export")["noop"] is None  # export reads every model stage, derived

    shape, _ = model_shape(recipe)
    estimate = estimate_stage("noop", shape, stage_settings(recipe, "noop", "cpu", 1))
    assert {"weights", "adapters", "activations"} <= set(estimate.parts)  # its profile, not a fallback

    assert main(["pipeline", str(TINY_RECIPE), *overrides, "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "[2/3] noop" in plan and "1; 4 rows per step" in plan and "noop_stage.py" in plan
    assert plan.split("[2/3] noop")[1].split("[3/3]")[0].count("memory:") == 1

    jobs = tmp_path / "jobs"
    assert main(["azureml", "submit", str(TINY_RECIPE), *overrides, "--stage", "pipeline", "--dry-run",
                 "--compute", "cpu", "--out", str(jobs)]) == 0  # fmt: skip
    spec = yaml.safe_load(next(jobs.glob("*-pipeline.yaml")).read_text())
    assert "sft" in spec["jobs"]["noop"]["inputs"] and "data_train_0" in spec["jobs"]["noop"]["inputs"]
    assert "noop" in spec["jobs"]["export"]["inputs"]

    assert main(["pipeline", str(TINY_RECIPE), *overrides]) == 0, capsys.readouterr().err[-3000:]
    metrics = json.loads((out / "noop" / "metrics.json").read_text())
    assert metrics["said"] == "hi" and STAGES["noop"].key_metrics(metrics)["after"] == "hi"
    exported = json.loads((out / "export" / "metrics.json").read_text())
    assert exported["stage"] == "noop" and [Path(a).name for a in exported["adapters"]] == ["sft", "noop"]
    assert exported["parity_max_abs_diff_fp32"] < 1e-4


# ----------------------------------------------------------------------------- stage facts live in the registry


def _is_stage_text(node, names) -> bool:
    return isinstance(node, ast.Constant) and node.value in names


def stage_name_branches(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    """Places in `path` that branch on, index by or reach for a stage by its literal name: a comparison or
    membership test with a stage name, `recipe.<stage>`, `recipe.section("<stage>")`, `stage_dir("<stage>")`,
    `STAGES["<stage>"]` (or a table of steps, jobs or outputs indexed by one), and a dict keyed by two or more
    stage names (a table of per-stage facts)."""
    tree = ast.parse(path.read_text())
    hits = []

    def where(node, what):
        hits.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: {what}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            flat = parts + [e for p in parts if isinstance(p, ast.Tuple | ast.List | ast.Set) for e in p.elts]
            if any(_is_stage_text(p, names) for p in flat):
                where(node, ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr in names:
            if isinstance(node.value, ast.Name) and node.value.id == "recipe":
                where(node, ast.unparse(node))
        elif isinstance(node, ast.Call) and node.args and _is_stage_text(node.args[0], names):
            func = ast.unparse(node.func)
            if func.endswith(("section", "stage_dir", "checkpoint_dir", "key_metrics", "correctness_after")):
                where(node, ast.unparse(node))
        elif isinstance(node, ast.Subscript) and _is_stage_text(node.slice, names):
            # STAGES["dpo"], steps["export"], outputs["sft"]; a split's name ("eval") indexes other tables
            if any(w in ast.unparse(node.value).lower() for w in ("stage", "step", "output", "job")):
                where(node, ast.unparse(node))
        elif isinstance(node, ast.Dict) and sum(_is_stage_text(k, names) for k in node.keys if k is not None) >= 2:
            where(node, "a dict keyed by stage names")
    return [text for _, text in sorted(hits)]


def test_no_stage_is_named_outside_the_registry_and_its_own_module():
    """A fact about a stage lives in its registry entry (or in its own module, which may name itself): code
    anywhere else that branches on a literal stage name is a fact that escaped the registry."""
    from finetune.recipe import STAGES

    names = set(STAGES.names())
    own = {MODULES[s.module]: s.name for s in STAGES}
    registry = PACKAGE / "recipe" / "stages.py"
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == registry:
            continue
        # a stage module may name itself (its section, its summary title); naming another stage is the same escape
        others = names - {own[path]} if path in own else names
        hits += stage_name_branches(path, others)
    assert not hits, "stage facts outside the registry:\n" + "\n".join(hits)


def test_the_stage_name_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(recipe, stage, r):\n"
        "    if stage == 'ppo':\n        pass\n"
        "    if r['stage'] in ('sft', 'dpo'):\n        pass\n"
        "    x = recipe.export.stage\n"
        "    y = recipe.section('sft')\n"
        "    z = STAGES['dpo']\n"
        "    t = {'sft': 1, 'dpo': 2}\n"
        "    ok = 'sft' + stage\n"
        "    split = ('train', 'eval')\n"
        "    rows = pairs['eval']\n"
        "    job = steps['export']\n"
    )
    hits = stage_name_branches(sample, {"sft", "dpo", "ppo", "export", "eval"}, root=tmp_path)
    assert [h.split(": ", 1)[0] for h in hits] == [f"sample.py:{n}" for n in (2, 4, 6, 7, 8, 9, 13)], hits
