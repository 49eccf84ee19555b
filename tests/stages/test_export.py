"""Export of the pipeline's model: a plain Hugging Face folder, logit parity with base + adapters, atomic
writes, and talking to it (finetune chat / generate). Uses the one pipeline run of the session."""

import json
import subprocess
import sys

import pytest
import torch

from finetune.recipe import RecipeError, load_recipe
from tests.conftest import PIPELINE_QUICK, ROOT, TINY_RECIPE, subprocess_env, write_jsonl

# The first test here pays for the session's one pipeline run (minutes on 2 busy cores).
pytestmark = pytest.mark.timeout(2400)

PLAIN_TRANSFORMERS = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
out = []
for q in prompts:
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=16, do_sample=False)  # EOS from generation_config.json only
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    out.append({"prompt": tok.decode(ids["input_ids"][0]), "new": new,
                "reply": tok.decode(new, skip_special_tokens=True).strip()})
print(json.dumps({"finetune_imported": "finetune" in sys.modules, "eos": model.generation_config.eos_token_id,
                  "replies": out}))
"""


@pytest.fixture(scope="module")
def exported(pipeline_run):
    out = pipeline_run["out"]
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={out}", *PIPELINE_QUICK])
    return recipe, out / "export", json.loads((out / "export" / "metrics.json").read_text())


def held_out(n=None):
    rows = [json.loads(x) for x in (ROOT / "data/tiny/sft_eval.jsonl").read_text().splitlines() if x.strip()]
    return rows[:n] if n else rows


def test_export_is_a_complete_hf_folder_of_the_ppo_chain(exported):
    from transformers import AutoTokenizer, GenerationConfig

    recipe, folder, metrics = exported
    out = recipe.output_dir
    # the tiny recipe's PPO starts from SFT (a new policy LoRA on it): sft + ppo; DPO is beside it, not under it
    assert metrics["stage"] == "ppo" and metrics["adapters"] == [f"{out}/sft", f"{out}/ppo"]
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "README.md",
        "recipe.yaml",
        "metrics.json",
    } <= {p.name for p in folder.iterdir()}
    assert metrics["shards"] and all((folder / s).is_file() for s in metrics["shards"])
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == (ROOT / "finetune/templates/phi_instruct.jinja").read_text()
    assert GenerationConfig.from_pretrained(folder).eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "## Stages" in card and "name_or_path: builtin:tiny-phi" in card
    assert "| ppo | merged into this model |" in card and "| dpo | not part of this model |" in card
    assert "| reward | scored PPO's samples (not part of this model) |" in card
    assert not list(folder.parent.glob(".export.tmp*"))
    assert metrics["correct_rate_after"] > metrics["correct_rate_base"]  # better than the tiny base


def test_plain_transformers_in_a_process_without_finetune_answers_and_stops(exported, tmp_path):
    _, folder, metrics = exported
    rows = held_out()
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_TRANSFORMERS,
            str(folder),
            json.dumps([r["messages"][0]["content"] for r in rows]),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["finetune_imported"] is False
    eos = result["eos"]
    replies = result["replies"]
    assert all(r["prompt"] == f"Instruct: {row['messages'][0]['content']}\nOutput:" for r, row in zip(replies, rows))
    stopped = [r for r in replies if r["new"] and r["new"][-1] == eos and len(r["new"]) < 16]
    assert len(stopped) == len(replies)  # every reply ends at the end-of-turn token, none runs to the budget
    rate = sum(r["reply"] == row["answer"] for r, row in zip(replies, rows)) / len(rows)
    assert rate > metrics["correct_rate_base"] + 0.3, replies  # the tiny base answers (almost) none
    assert rate == pytest.approx(metrics["correct_rate_after"], abs=0.1)  # what the export itself measured


def test_merged_logits_equal_base_plus_stacked_adapters(exported, tiny_base):
    from transformers import AutoModelForCausalLM

    from finetune.core.modeling import load_model, load_stacked, load_tokenizer
    from finetune.export import logits_of, max_abs_diff, parity_inputs

    recipe, folder, metrics = exported
    tok = load_tokenizer(recipe)
    inputs = parity_inputs(tok, 8)
    reference = logits_of(load_stacked(recipe, metrics["adapters"]), inputs)
    base_only = logits_of(load_model(recipe).eval(), inputs)
    merged32 = logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), inputs)
    merged16 = logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval(), inputs)
    fp32, fp16 = max_abs_diff(merged32, reference), max_abs_diff(merged16, reference)
    print(
        f"\nparity max |logit diff| vs base + stacked adapters: fp32 {fp32:.2e}, fp16 {fp16:.2e}; "
        f"adapters' own effect {max_abs_diff(base_only, reference):.2f}"
    )
    assert max_abs_diff(base_only, reference) > 0.1  # the adapters matter, so parity is not trivially true
    assert fp32 <= 1e-4
    assert fp16 < 0.1 * max_abs_diff(base_only, reference)  # fp16 rounding, far below the adapters' effect
    assert metrics["parity_max_abs_diff_fp32"] <= 1e-4  # the export's own check agrees


def quick(recipe_out, target, *extra):
    return load_recipe(
        TINY_RECIPE,
        [
            f"output_dir={recipe_out}",
            f"export.output={target}",
            "export.eval_generate_rows=0",
            "export.parity_prompts=1",
            *extra,
        ],
    )


def test_existing_target_is_refused_unless_forced(exported, tmp_path):
    from finetune import export

    recipe, _, _ = exported
    target = tmp_path / "model"
    first = export.run(quick(recipe.output_dir, target, "export.stage=dpo", "export.max_shard_size=1MB"))
    assert first["adapters"] == [f"{recipe.output_dir}/sft", f"{recipe.output_dir}/dpo"]
    assert len(first["shards"]) > 1 and (target / "model.safetensors.index.json").is_file()
    with pytest.raises(RecipeError, match="already exists; pass --force .*export.force=true"):
        export.run(quick(recipe.output_dir, target))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "export",
            str(TINY_RECIPE),
            f"output_dir={recipe.output_dir}",
            f"export.output={target}",
            "export.eval_generate_rows=0",
            "export.parity_prompts=1",
            "--force",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    replaced = json.loads((target / "metrics.json").read_text())
    assert replaced["stage"] == "ppo" and len(replaced["shards"]) == 1  # the new export, 2GB shards
    assert not (target / "model.safetensors.index.json").exists()  # nothing left over from the old one


def test_a_failure_mid_write_leaves_no_target_and_keeps_an_old_one(exported, tmp_path, monkeypatch):
    from finetune import export

    recipe, _, _ = exported

    def broken(*a, **k):
        assert list(target.parent.glob(".model.tmp/*.safetensors"))  # the weights were already written
        raise OSError("disk full (simulated)")

    target = tmp_path / "model"
    monkeypatch.setattr(export, "model_card", broken)
    with pytest.raises(OSError, match="simulated"):
        export.run(quick(recipe.output_dir, target))
    assert not target.exists() and not list(tmp_path.iterdir())  # no target, no staging folder left

    monkeypatch.undo()
    export.run(quick(recipe.output_dir, target))
    before = (target / "metrics.json").read_text()
    monkeypatch.setattr(export, "model_card", broken)
    with pytest.raises(OSError, match="simulated"):
        export.run(quick(recipe.output_dir, target, "export.force=true"))
    assert (target / "metrics.json").read_text() == before  # the complete old export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_export_refuses_missing_stage_and_bad_shard_size(tmp_path, exported):
    from finetune import export

    recipe, _, _ = exported
    with pytest.raises(RecipeError, match="export.max_shard_size: .*not a size; write e.g. 500MB"):
        load_recipe(TINY_RECIPE, ["export.max_shard_size=big"])
    with pytest.raises(RecipeError, match="export.stage: no finished sft, dpo, .* or grpo output"):
        export.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"]))
    assert not (tmp_path / "export").exists()


def test_generate_writes_a_reply_per_prompt(exported, tmp_path):
    _, folder, metrics = exported
    rows = held_out()
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in rows]
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "generate",
            str(folder),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(rows) and all(set(o) >= {"prompt", "response", "answer"} for o in out)
    rate = sum(o["response"] == o["answer"] for o in out) / len(out)
    assert rate == pytest.approx(metrics["correct_rate_after"], abs=0.1)  # what the export measured
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt here"}])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "generate",
            str(folder),
            "--prompts",
            str(bad),
            "--out",
            str(tmp_path / "x.jsonl"),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and f"{bad}: row 2: cannot find a prompt" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


def questions(n):
    rows = [json.loads(x) for x in (ROOT / "data/tiny/sft_train.jsonl").read_text().splitlines() if x.strip()]
    return [r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "user"][:n]


def test_chat_driven_through_stdin_streams_replies_and_resets(exported):
    from finetune.cli.chat import ChatSession, load_for_chat

    _, folder, _ = exported
    q1, q2 = questions(2)
    loaded = load_for_chat(str(folder), [])
    fresh = [ChatSession(loaded, max_new_tokens=8).send(q) for q in (q1, q2)]  # each as a new conversation
    res = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "chat", str(folder), "--max-new-tokens", "8"],
        input=f"{q1}\n/reset\n{q2}\n/exit\nnever read\n",
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # the streamed text is the reply; after /reset the second question is answered as in a new conversation
    assert res.stdout == f"you> assistant> {fresh[0]}\nyou> (new conversation)\nyou> assistant> {fresh[1]}\nyou> "
    assert "/reset starts a new conversation" in res.stderr


def test_chat_session_keeps_the_conversation_and_a_recipe_merges_in_memory(exported, tmp_path):
    from finetune.cli.chat import ChatSession, load_for_chat

    recipe, folder, _ = exported
    q1, q2 = questions(2)
    session = ChatSession(load_for_chat(str(folder), []), max_new_tokens=8)
    r1 = session.send(q1)
    r2 = session.send(q2)
    assert r1 and r2 and session.messages[-1] == {"role": "assistant", "content": r2}
    tok = session.loaded.tokenizer
    assert tok.decode(session.prompt()["input_ids"][0]).startswith(
        f"Instruct: {q1}\nOutput: {r1}<|endoftext|>\nInstruct: {q2}\nOutput: {r2}<|endoftext|>\n"
    )
    session.reset()
    assert session.messages == []
    # a recipe whose export folder is absent: the same chain merged in memory answers the same
    from_recipe = load_for_chat(
        str(TINY_RECIPE), [f"output_dir={recipe.output_dir}", f"export.output={tmp_path / 'none'}"]
    )
    assert "merged in memory" in from_recipe.description
    assert ChatSession(from_recipe, max_new_tokens=8).send(q1) == r1
