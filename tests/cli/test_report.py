"""report.html: one self-contained page of the run, checked as a browser renders it (headless Chromium, Debian's
package; tests/setup/runtimes.sh installs it where it runs as root) and not only as a file."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no chromium here: tests/setup/runtimes.sh installs Debian's package when run as root")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    cmd += [f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_the_pipeline_writes_one_self_contained_page(pipeline_run):
    page = pipeline_run["out"] / "report.html"
    text = page.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)  # nothing fetched
    assert "<script" not in text and "@import" not in text and "url(" not in text
    for link in links:
        assert base64.b64decode(link.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"page: {page}" in pipeline_run["second"].stdout


def test_report_renders_in_chromium_with_every_stage_samples_and_curves(pipeline_run, tmp_path):
    import numpy as np
    from PIL import Image

    out = pipeline_run["out"]
    page = out / "report.html"
    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    stages = [r["stage"] for r in pipeline_run["report"]["stages"]]
    table = html[html.index("<h2>Stages</h2>") : html.index("<h2>Training curves</h2>")]
    for stage in stages:
        assert f"<b>{stage}</b>" in table
    curves = re.findall(r'<img alt="(\w+) training curves" src="data:image/png', html)
    assert curves == ["sft", "reward", "dpo", "ppo"]  # every stage that trains, from its logs
    samples = html[html.index('<table class="samples">') :]
    samples = samples[: samples.index("</table>")]
    header = re.findall(r"<th>(.*?)</th>", samples)
    assert header == ["prompt", "base", "sft", "dpo", "ppo", "export"]
    rows = re.findall(r"<tr>(.*?)</tr>", samples[samples.index("<tbody>") :], re.S)
    expected = [json.loads(x) for x in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(expected) > 0
    first = re.findall(r"<td>(.*?)</td>", rows[0], re.S)
    assert first[0] == expected[0]["prompt"] and first[2] == expected[0]["sft"].replace("&", "&amp;").replace(
        "<", "&lt;"
    )
    assert "Dropped rows" in html and "Versions" in html and "Recipe (resolved)" in html

    shot = tmp_path / "report.png"
    done = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,1400", "--hide-scrollbars")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    print(f"report screenshot: {shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)

    def near(colour):
        return int((np.abs(pixels - colour).max(axis=1) < 25).sum())

    # the curves' own line colours (matplotlib's tab:blue and tab:red) on screen: the images rendered
    blue, red, text = near((31, 119, 180)), near((214, 39, 40)), int((pixels.sum(axis=1) < 200).sum())
    assert blue > 200 and red > 50 and text > 2000, (blue, red, text)


def test_finetune_report_rewrites_it_for_an_existing_run(pipeline_run, tmp_path):
    target = tmp_path / "again.html"
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "report", str(pipeline_run["out"]), "--out", str(target)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    samples = lambda t: t[t.index('<table class="samples">') :]  # noqa: E731
    assert samples(target.read_text()) == samples((pipeline_run["out"] / "report.html").read_text())
    missing = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "report", str(tmp_path / "nothing")],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_sample_columns_come_from_the_stage_registry(tmp_path, monkeypatch):
    """A stage added to the registry (as grpo / kto / orpo will be) gets its column with no edit to the report."""
    from finetune.cli.report import sample_columns
    from finetune.recipe import STAGES, Stage, load_recipe
    from finetune.recipe.sections import Section
    from tests.conftest import TINY_RECIPE

    class LaterSection(Section):
        pass

    STAGES.register(Stage("later", "nowhere", LaterSection, "a later chat stage", has_data=False), before="export")
    try:
        recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"])
        rows = {
            "sft": {"prompt": "q", "messages": [{"role": "user", "content": "q"}], "base": "b0", "sft": "s1"},
            "later": {"prompt": "q", "messages": [{"role": "user", "content": "q"}], "start": "s1", "later": "l2"},
        }
        for stage, row in rows.items():
            (tmp_path / stage).mkdir()
            (tmp_path / stage / "samples.jsonl").write_text(json.dumps(row) + "\n")
        columns, replies, order = sample_columns(recipe, STAGES.names())
    finally:
        STAGES.unregister("later")
    assert columns == ["base", "sft", "later"]
    assert replies[order[0]] == {"prompt": "q", "base": "b0", "sft": "s1", "later": "l2"}
