"""The run report: one self-contained HTML file a person opens in a browser.

    finetune report OUTPUT_DIR [--out FILE]      (the pipeline writes <output_dir>/report.html itself)

One file, nothing fetched: inline CSS, no scripts, the curves as PNG data: URIs. It shows the stage table
(pipeline_report.json's rows, or each finished stage's metrics), every stage's training curves (the
pipeline's own plot, one stage per figure), held-out figures before and after, the sample replies side by
side (one column per model, read from each stage's samples.jsonl), dropped rows with the first examples,
the GGUF files of the export, the recipe, the library versions and the timings. The stages come from the
stage registry: a new stage's outputs appear with no edit here.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from finetune.core.outputs import DROPPED_ROWS, read_metrics, write_text
from finetune.core.summary import figure, rate
from finetune.errors import UserError
from finetune.recipe import STAGES, Recipe, load_recipe

REPORT_HTML = "report.html"
PIPELINE_REPORT = "pipeline_report.json"  # the pipeline's figures (finetune.cli.pipeline writes it)
CURVES = "pipeline_curves.png"  # every stage's curves in one figure (plot_curves, called by the pipeline)
SAMPLES = "samples.jsonl"
EXAMPLES = 3  # dropped rows shown per stage
LIBRARIES = (
    "finetune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "datasets",
    "llama-cpp-python",
)

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 24px 48px;
color:#1d2330;background:#fff}
h1{font-size:26px;margin:24px 0 4px}
h2{font-size:20px;margin:36px 0 10px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}.meta{color:#5b6475}
table{border-collapse:collapse;margin:6px 0 12px;width:100%}
th,td{border:1px solid #dde2ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9;font-weight:600}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.samples td{white-space:pre-wrap;word-break:break-word;font-size:14px}.samples td:first-child{background:#fafbfd}
.bar{display:inline-block;height:9px;background:#4c78a8;border-radius:2px;vertical-align:middle;margin-left:6px}
.ok{color:#1b7f3b}.bad{color:#b42318}.curves{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #dde2ea;padding:6px}figure img{width:560px;max-width:100%;display:block}
figcaption{font-size:13px;color:#5b6475;text-align:center}
pre{background:#f6f8fa;border:1px solid #dde2ea;padding:10px;overflow:auto;font-size:13px}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape text with esc)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def find_recipe(out: Path) -> Recipe:
    """The run's recipe: pipeline_report.json names it and its overrides; else the resolved copy a stage saved."""
    report = _read_json(out / PIPELINE_REPORT) or {}
    if report.get("recipe") and Path(report["recipe"]).is_file():
        overrides = [o for o in report.get("overrides", []) if not o.startswith("output_dir=")]
        return load_recipe(report["recipe"], [*overrides, f"output_dir={out}"])
    for stage in STAGES.names():
        saved = out / stage / "recipe.yaml"
        if saved.is_file():
            return load_recipe(saved, [f"output_dir={out}"])
    raise UserError(f"{out}: no pipeline_report.json and no stage output with a recipe.yaml; is it an output_dir?")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def stage_rows(recipe: Recipe, report: dict | None) -> list[dict]:
    """The pipeline's rows (status and time included), or one row per finished stage for a run of single stages."""
    if report and report.get("stages"):
        return report["stages"]
    rows = []
    for stage in STAGES.names():
        m = read_metrics(recipe.stage_dir(stage))
        if m:
            rows.append({"stage": stage, "status": "finished", **STAGES[stage].key_metrics(m), "seconds": None})
            rows[-1]["output"] = str(recipe.stage_dir(stage))
    return rows


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f} s"


def section_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        correct = (
            "n/a"
            if r.get("correct_before") is None and r.get("correct_after") is None
            else f"{rate(r.get('correct_before'))} → {rate(r.get('correct_after'))}"
            + (
                f'<span class="bar" style="width:{int(100 * r["correct_after"])}px"></span>'
                if r.get("correct_after")
                else ""
            )
        )
        change = (
            f"{esc(figure(r.get('before'), r.get('metric')))} → {esc(figure(r.get('after'), r.get('metric')))}"
            if r.get("metric") and r.get("before") is not None
            else esc(figure(r.get("after"), r.get("metric")))
        )
        status = esc(r.get("status"))
        ok = r.get("status") in ("ran", "skipped", "finished")
        seconds = _seconds(r.get("seconds"))
        body.append(
            [
                f"<b>{esc(r['stage'])}</b>",
                f'<span class="{"ok" if ok else "bad"}">{status}</span>',
                esc(r.get("metric") or "n/a"),
                change,
                correct,
                f'<span class="num">{seconds}</span>',
                esc(r.get("output")),
            ]
        )
    return table(["stage", "status", "key metric", "before → after", "held-out correct", "time", "output"], body)


def plot_curves(recipe: Recipe, stages: list[str], path: Path) -> list[str]:
    """One panel per stage with recorded curves: training loss per step (the TRL stages' log_history.json) and
    the headline figure (PPO's score, GRPO's reward) and KL per update (the RL stages' updates.jsonl). Returns the
    stages drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = {}
    for stage in stages:
        folder = recipe.stage_dir(stage)
        if (folder / "updates.jsonl").is_file():
            rows = [json.loads(x) for x in (folder / "updates.jsonl").read_text().splitlines() if x.strip()]
            first = STAGES[stage].headline[2].rsplit("_", 1)[0]  # score_end -> score (PPO), reward_end -> reward (GRPO)
            curves[stage] = ("update", {k: [(r["update"], r[k]) for r in rows if k in r] for k in (first, "kl")})
        elif (folder / "log_history.json").is_file():
            rows = json.loads((folder / "log_history.json").read_text())
            curves[stage] = ("step", {"loss": [(r["step"], r["loss"]) for r in rows if "loss" in r]})
    if not curves:
        return []
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (stage, (xlabel, series)) in zip(axes[0], curves.items()):
        first = True
        for (name, points), color in zip(series.items(), ("tab:blue", "tab:red")):
            target = ax if first else ax.twinx()
            if points:
                target.plot(*zip(*points), color=color, label=name)
            target.set_ylabel(name, color=color)
            first = False
        ax.set_title(stage)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return list(curves)


def curve_images(recipe: Recipe, stages: list[str]) -> list[tuple[str, str]]:
    """(stage, data: URI) of each stage's curves, drawn by the pipeline's own plot, one stage per figure."""
    images = []
    with tempfile.TemporaryDirectory() as d:
        for stage in stages:
            path = Path(d) / f"{stage}.png"
            if plot_curves(recipe, [stage], path):
                images.append((stage, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()))
    return images


def held_out_section(recipe: Recipe, stages: list[str]) -> str:
    """Every held-out figure a stage recorded before and after training (metrics.json: X_before with X_after or X,
    X_start with X_end or X_after)."""
    rows = []
    for stage in stages:
        m = read_metrics(recipe.stage_dir(stage))
        pairs = {}
        for key, value in m.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            for before, after in (("_before", "_after"), ("_before", ""), ("_start", "_end"), ("_start", "_after")):
                stem = key[: -len(before)]
                if key.endswith(before) and stem not in pairs and isinstance(m.get(stem + after), int | float):
                    pairs[stem] = (value, m[stem + after])
        for stem, (a, b) in sorted(pairs.items()):
            fmt = rate if "rate" in stem or "accuracy" in stem else figure
            rows.append([f"<b>{esc(stage)}</b>", esc(stem), f'<span class="num">{esc(fmt(a))} → {esc(fmt(b))}</span>'])
    return table(["stage", "figure", "before → after"], rows) if rows else "<p>No held-out figures recorded.</p>"


def sample_columns(recipe: Recipe, stages: list[str]) -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    """Columns (models) and replies per prompt from every stage's samples.jsonl, in pipeline order.

    A stage's own model is the key named after the stage; the first stage with samples also brings the
    models it was compared with before training (sft: `base`). Later stages' `start` is the model an earlier
    column already shows."""
    columns: list[str] = []
    replies: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for stage in stages:
        rows = _jsonl(recipe.stage_dir(stage) / SAMPLES)
        for row in rows:
            key = json.dumps(row.get("messages") or row.get("prompt"), sort_keys=True)
            if key not in replies:
                replies[key] = {"prompt": row.get("prompt", "")}
                order.append(key)
            for model, text in row.items():
                if model in ("prompt", "messages"):
                    continue
                if model == stage or not columns:
                    replies[key][model] = text
        if rows:
            first_new = [k for k in rows[0] if k not in ("prompt", "messages") and (k == stage or not columns)]
            columns += [c for c in first_new if c not in columns]
    return columns, replies, order


def samples_section(recipe: Recipe, stages: list[str]) -> str:
    columns, replies, order = sample_columns(recipe, stages)
    if not columns:
        return "<p>No samples.jsonl in any stage output (samples.count: 0?).</p>"
    body = [[esc(replies[k]["prompt"]), *(esc(replies[k].get(c, "—")) for c in columns)] for k in order]
    return table(["prompt", *map(esc, columns)], body, "samples")


def dropped_section(recipe: Recipe, stages: list[str]) -> str:
    parts = []
    for stage in stages:
        rows = _jsonl(recipe.stage_dir(stage) / DROPPED_ROWS)
        if not rows:
            continue
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r.get("kind", "?")] = kinds.get(r.get("kind", "?"), 0) + 1
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        examples = [
            [esc(r.get("split")), esc(r.get("source")), esc(r.get("row")), esc(r.get("kind")), esc(r.get("reason"))]
            for r in rows[:EXAMPLES]
        ]
        parts.append(
            f"<h3>{esc(stage)}: {len(rows)} row(s) not used ({esc(counts)})</h3>"
            + table(["split", "source", "row", "kind", "reason"], examples)
            + f'<p class="meta">All of them: {esc(recipe.stage_dir(stage) / DROPPED_ROWS)}</p>'
        )
    return "".join(parts) or "<p>No stage dropped a row.</p>"


def gguf_section(recipe: Recipe) -> str:
    """The exported model's GGUF files (finetune.deploy), when it has them."""
    stage = STAGES.model_folder_stage()
    folder = recipe.stage_dir(stage) / "gguf" if stage else None
    gguf = _read_json(folder / "gguf.json") if folder else None
    if not gguf:
        return ""
    rows = [
        [
            esc(f["type"]),
            esc(f["file"]),
            f'<span class="num">{f["bytes"] / 1e6:.1f} MB</span>',
            esc(rate(f.get("correct_rate"))),
            esc(
                f"{f['replies_equal_export']}/{gguf.get('held_out_prompts')}" if "replies_equal_export" in f else "n/a"
            ),
        ]
        for f in gguf.get("files", [])
    ]
    return (
        "<h2>GGUF and Ollama</h2>"
        + table(["type", "file", "size", "held-out correct (llama.cpp)", "replies equal to the export's"], rows)
        + f'<p class="meta">Modelfile: {esc(folder / "Modelfile")} '
        f"(template checked with {esc(gguf.get('modelfile', {}).get('template_checked_with'))}); docs/deploy.md</p>"
    )


def versions() -> list[list[str]]:
    rows = [["python", esc(platform.python_version())], ["platform", esc(platform.platform())]]
    for name in LIBRARIES:
        try:
            rows.append([esc(name), esc(metadata.version(name))])
        except metadata.PackageNotFoundError:
            continue
    return rows


def render_report(out: Path, recipe: Recipe | None = None) -> str:
    """The report's HTML for the run in `out` (its output_dir)."""
    from finetune.recipe import dump_recipe

    out = Path(out)
    recipe = recipe or find_recipe(out)
    report = _read_json(out / PIPELINE_REPORT)
    rows = stage_rows(recipe, report)
    stages = [s for s in STAGES.names() if recipe.stage_dir(s).is_dir()]
    curves = "".join(
        f'<figure><img alt="{esc(stage)} training curves" src="{uri}"><figcaption>{esc(stage)}</figcaption></figure>'
        for stage, uri in curve_images(recipe, stages)
    )
    total = report.get("seconds") if report else None
    timings = [[esc(r["stage"]), f'<span class="num">{_seconds(r.get("seconds"))}</span>'] for r in rows]
    if total is not None:
        timings.append(["<b>pipeline</b>", f'<span class="num">{total:.1f} s</span>'])
    status = "complete" if report and report.get("complete") else "incomplete or single stages"
    title = f"finetune run: {out.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">output {esc(out)} · recipe {esc(report.get("recipe") if report else recipe.source)} · {esc(status)} ·
written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>
<h2>Stages</h2>
{section_table(rows)}
<h2>Training curves</h2>
<div class="curves">{curves or "<p>No stage recorded curves.</p>"}</div>
<h2>Held-out figures</h2>
{held_out_section(recipe, stages)}
<h2>Samples: the same held-out prompts, answered by each model (greedy)</h2>
{samples_section(recipe, stages)}
<h2>Dropped rows</h2>
{dropped_section(recipe, stages)}
{gguf_section(recipe)}
<h2>Timings</h2>
{table(["stage", "time"], timings)}
<h2>Versions</h2>
{table(["library", "version"], versions())}
<h2>Recipe (resolved)</h2>
<pre>{esc(dump_recipe(recipe))}</pre>
</body></html>
"""


def write_page(out: Path, target: Path | None = None, recipe: Recipe | None = None) -> Path:
    """Write the report (atomically) to `target` (default <out>/report.html) and return its path."""
    target = Path(target) if target else Path(out) / REPORT_HTML
    write_text(target, render_report(out, recipe))
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="finetune report", description="Write a run's report.html.")
    parser.add_argument("output_dir", help="the run's output_dir, e.g. runs/tiny_chat")
    parser.add_argument("--out", help="where to write it (default OUTPUT_DIR/report.html)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    if not out.is_dir():
        print(f"finetune report: error: {out} is not a folder; name a run's output_dir", file=sys.stderr)
        return 2
    print(f"report: {write_page(out, args.out)}")
    return 0
