"""GGUF export, measured by a real GGUF runtime: llama.cpp (llama-cpp-python, built from its source distribution by
tests/setup/runtimes.sh) runs the files llama.cpp's converter and quantiser made from the tiny pipeline's export,
and its greedy replies to the held-out questions equal transformers'. The converter is also run on 2-layer models
of each Phi recipe's architecture, and llama.cpp's logits compared with transformers'."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

pytest.importorskip("llama_cpp", reason="llama-cpp-python (llama.cpp) is not installed: bash tests/setup/runtimes.sh")
pytest.importorskip("gguf", reason="gguf-py is not installed: pip install -e '.[gguf]'")

TYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def gguf_run(pipeline_run, tmp_path_factory):
    """`finetune export RECIPE --gguf f16,q8_0,q4_k_m` on a copy of the pipeline's finished export (the export
    stage adds GGUF files to a finished export without merging again)."""
    export = tmp_path_factory.mktemp("gguf") / "export"
    shutil.copytree(pipeline_run["out"] / "export", export)
    cmd = [sys.executable, "-m", "finetune.cli", "export", str(TINY_RECIPE), f"output_dir={pipeline_run['out']}"]
    cmd += [f"export.output={export}", "--gguf", ",".join(TYPES)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return export, done, pipeline_run["out"].name


@pytest.fixture(scope="module")
def transformers_replies(gguf_run):
    """The export's greedy replies to the held-out questions, by transformers (what `finetune export` measures)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.chat_template import load_template
    from finetune.core.evaluation import generate_answers, held_out_prompts
    from finetune.export import held_out_rows
    from finetune.recipe import load_recipe

    export = gguf_run[0]
    recipe = load_recipe(TINY_RECIPE)
    rows, limit, max_new, _ = held_out_rows(recipe)
    rows, prompts = held_out_prompts(rows, limit)
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    replies = generate_answers(model, tokenizer, load_template(recipe.template.name), prompts, max_new)
    return rows, prompts, max_new, tokenizer, replies


def test_gguf_files_are_written_whole_with_template_and_end_of_turn(gguf_run):
    from finetune.deploy.gguf import metadata

    export, done, name = gguf_run
    folder = export / "gguf"
    manifest = json.loads((folder / "gguf.json").read_text())
    names = sorted(p.name for p in folder.iterdir())  # nothing half-written or temporary left beside them
    assert names == sorted(["Modelfile", "gguf.json", *(f"{name}-{t}.gguf" for t in TYPES)])
    assert [f["type"] for f in manifest["files"]] == TYPES
    chat_template = (
        json.loads((export / "tokenizer_config.json").read_text()).get("chat_template")
        or (export / "chat_template.jinja").read_text()
    )
    for f in manifest["files"]:
        meta = metadata(folder / f["file"])
        assert meta["architecture"] == "phi2"
        assert meta["chat_template"] == chat_template
        assert meta["eot_token_id"] == manifest["eot_token_id"] == meta["eos_token_id"]  # phi_instruct: eot is eos
    assert "FROM ./" + manifest["files"][0]["file"] in (folder / "Modelfile").read_text()
    assert "GGUF done" in done.stderr


def test_f16_and_q8_0_greedy_replies_equal_transformers(gguf_run, transformers_replies):
    from finetune.chat_template import render
    from finetune.deploy.llamacpp import GgufModel

    export = gguf_run[0]
    rows, prompts, max_new, tokenizer, reference = transformers_replies
    manifest = json.loads((export / "gguf" / "gguf.json").read_text())
    files = {f["type"]: f for f in manifest["files"]}
    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    llama = GgufModel(export / "gguf" / files["f16"]["file"])
    try:  # llama.cpp reads the prompt string to the same token ids (the GPT-2 pre-tokenizer mapping is right)
        assert [llama.tokenize(t) for t in texts] == [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    finally:
        llama.close()
    expected = [(str(r), r.stop) for r in reference]
    assert len(expected) == 31 and any(stop == "end_of_turn" for _, stop in expected)
    for t in ("f16", "q8_0"):
        got = [(r["text"], r["stop"]) for r in files[t]["replies"]]
        assert got == expected, f"{t}: llama.cpp's greedy replies differ from transformers'"
    q4 = files["q4_k_m"]["correct_rate"]
    assert 0.0 <= q4 <= 1.0
    print(
        f"held-out correct (llama.cpp): f16 {files['f16']['correct_rate']:.0%}, "
        f"q8_0 {files['q8_0']['correct_rate']:.0%}, q4_k_m {q4:.0%} "
        f"({sum(a == b for a, b in zip([(r['text'], r['stop']) for r in files['q4_k_m']['replies']], expected))}"
        f"/{len(expected)} replies equal to transformers')"
    )


def test_an_interrupted_conversion_leaves_no_file_under_a_final_name(pipeline_run, tmp_path, monkeypatch):
    from finetune.deploy import gguf

    export = tmp_path / "export"
    shutil.copytree(pipeline_run["out"] / "export", export, ignore=shutil.ignore_patterns("gguf"))

    def half_written(export_dir, out, outtype, eot_id):
        out.write_bytes(b"GGUF" + b"\0" * 64)  # what a killed converter leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "convert", half_written)
    with pytest.raises(KeyboardInterrupt):
        gguf.write_gguf(export, ["q8_0"], "tiny")
    assert list((export / "gguf").iterdir()) == []


@pytest.mark.parametrize("family", ["phi2", "phi1_5", "phi3_5"])
def test_each_phi_architecture_converts_and_runs_like_transformers(family, tmp_path):
    """phi2 / phi1_5: PhiForCausalLM (byte-level BPE); phi3_5: Phi3ForCausalLM with longrope and a SentencePiece
    tokenizer, as the shipped recipes' bases. llama.cpp's next-token logits on the converted f32 file equal
    transformers' on the same ids."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.deploy.gguf import convert, metadata
    from finetune.deploy.llamacpp import GgufModel
    from tests.phi_models import write_base, write_sentencepiece_base

    texts = ["Instruct: What is 2 plus 3?\nOutput: 5", "the sea is blue and wide", "System: be brief"]
    folder = tmp_path / family
    if family == "phi3_5":
        write_sentencepiece_base(folder, family, texts)
    else:
        write_base(folder, family, texts)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = tmp_path / f"{family}.gguf"
    convert(folder, out, "f32", model.config.eos_token_id)
    assert metadata(out)["architecture"] == ("phi3" if family == "phi3_5" else "phi2")
    ids = [5, 17, 42, 8, 99, 3, 250, 11, 64, 7]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    llama = GgufModel(out, n_ctx=64, logits_all=True)
    try:
        got = llama.logits(ids)[: expected.shape[0]]
    finally:
        llama.close()
    assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
