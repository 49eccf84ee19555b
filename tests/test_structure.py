"""The package's shape: no import cycles, imports point one way (front-ends -> stages -> core), and a
stage is one registry entry plus its module."""

import ast
import contextlib
import io
import json
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


NOOP_MODULE = """
from finetune.core.outputs import atomic_dir, write_json
from finetune.launch import stage_main


def run(recipe):
    with atomic_dir(recipe.stage_dir("noop")) as tmp:
        write_json(tmp / "metrics.json", {"said": recipe.noop.say})


def main(argv=None):
    return stage_main("noop", run, argv)
"""


@pytest.fixture
def noop_stage(tmp_path, monkeypatch):
    """A throwaway stage: one registry entry plus its module, nothing else edited."""
    from finetune.recipe import STAGES, Stage
    from finetune.recipe.sections import Section

    class NoopSection(Section):
        say: str = "hello"

    (tmp_path / "noop_stage.py").write_text(NOOP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    STAGES.register(
        Stage("noop", "noop_stage", NoopSection, "a throwaway stage", has_data=False, headline=("said", None, "said")),
        before="export",
    )
    yield
    STAGES.unregister("noop")


def test_a_registered_stage_appears_everywhere_with_no_other_edit(noop_stage, tmp_path):
    from finetune.cli import azureml, main
    from finetune.core.outputs import key_metrics
    from finetune.recipe import load_recipe

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text):
        assert main(["--help"]) == 0
    assert "finetune noop RECIPE" in help_text.getvalue() and "a throwaway stage" in help_text.getvalue()

    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}/run", "noop.say=hi", "pipeline.stages=null"])
    assert recipe.pipeline_stages() == ["sft", "reward", "dpo", "ppo", "grpo", "noop", "export", "eval"]
    assert "noop" not in load_recipe(TINY_RECIPE, ["pipeline.stages=null"]).pipeline_stages()  # only with its section

    stage_choices = next(a for a in azureml.parser()._actions if a.dest == "stage").choices
    assert "noop" in stage_choices

    assert main(["noop", str(TINY_RECIPE), f"output_dir={tmp_path}/run", "noop.say=hi"]) == 0
    metrics = json.loads((tmp_path / "run" / "noop" / "metrics.json").read_text())
    assert metrics == {"said": "hi"} and key_metrics("noop", metrics)["after"] == "hi"
