"""Inputs at the limits: exploding YAML, huge rows, absurd LoRA ranks, budgets past the model's context, answers
of every column type. Each class is walked over its members (files, commands, keys, row kinds, types)."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest

from tests.conftest import ROOT, TINY_RECIPE, write_jsonl

from .cases import GOOD, Case, cases, cli, copy_run, nothing_written, refused, snapshot, unchanged

pytestmark = pytest.mark.timeout(900)

TINY_CONTEXT = 256  # max_position_embeddings of builtin:tiny-phi
LAUGHS = "[" + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 9)}]" for i in range(9)) + "]"


def _recipe_with(tmp_path, extra: str, name: str = "r.yaml"):
    """The tiny recipe (its data paths made absolute) with `extra` YAML appended at the top level."""
    text = TINY_RECIPE.read_text().replace("../data/", f"{ROOT}/data/")
    path = tmp_path / name
    path.write_text(text + "\n" + extra + "\n")
    return path


# ============================================================================= YAML that explodes


@cases(
    Case(
        "yaml-aliases-recipe",
        "limits",
        "a recipe whose `training` holds nine levels of nine nested aliases (387M values), `finetune config`",
        "refused at once (no hang, no MemoryError): file, line, the limit, how to fix",
        ("recipe", "config"),
    ),
    Case(
        "yaml-aliases-recipe-stage",
        "limits",
        "the same recipe given to `finetune sft`",
        "refused before anything loads or is written",
        ("recipe", "sft"),
    ),
    Case(
        "yaml-aliases-override",
        "limits",
        "the nested aliases as an override value (`training.lr_scheduler_kwargs=...`)",
        "refused: the override named",
        ("override", "config"),
    ),
    Case(
        "yaml-aliases-accelerate-config",
        "limits",
        "the nested aliases inside the recipe's `launch.accelerate_config` file",
        "refused at load: names launch.accelerate_config and the file",
        ("accelerate", "sft"),
    ),
    Case(
        "yaml-recursive-alias",
        "limits",
        "a recipe value that is an alias of itself (`&a [*a]`)",
        "refused: recursive alias, line named",
        ("recursive", "config"),
    ),
    Case(
        "yaml-deep-nesting",
        "limits",
        "a recipe value nested 5000 lists deep",
        "refused: nested too deeply (no RecursionError)",
        ("deep", "config"),
    ),
)
def test_yaml_is_read_with_bounds_everywhere(case, tmp_path, capsys):
    where, command = case.args
    out = tmp_path / "out"
    args = [f"output_dir={out}"]
    if where == "recipe":
        recipe = _recipe_with(tmp_path, "")  # a valid key: before the bound, validating it never ended
        recipe.write_text(recipe.read_text().replace("  weight_decay: 0.0", f"  lr_scheduler_kwargs: {{x: {LAUGHS}}}"))
        must = [f"{recipe}: refused: line", "more than 100,000 values once its aliases", "fewer nested aliases"]
    elif where == "override":
        recipe = TINY_RECIPE
        args.append(f"training.lr_scheduler_kwargs={{x: {LAUGHS}}}")
        must = ["override 'training.lr_scheduler_kwargs=", "more than 100,000 values once its aliases"]
    elif where == "accelerate":
        config = tmp_path / "accelerate.yaml"
        config.write_text(f"num_processes: 1\nuse_cpu: true\nx: {LAUGHS}\n")
        recipe = TINY_RECIPE
        args.append(f"launch.accelerate_config={config}")
        must = ["launch.accelerate_config:", f"{config}: refused: line", "more than 100,000 values"]
    elif where == "recursive":
        recipe = _recipe_with(tmp_path, "x: &a [*a]")
        must = [f"{recipe}: refused: line", "an alias refers to a node that contains it (recursive)"]
    else:
        recipe = _recipe_with(tmp_path, "x: " + "[" * 5000 + "]" * 5000)
        must = [f"{recipe}: nested too deeply to read"]
    code, err = cli(capsys, command, recipe, *args)
    refused(code, err, *must)
    assert not out.exists()


# ============================================================================= one huge row


HUGE = "What is 2 plus 2? " * 120_000  # 2.2M characters: at least 100k tokens of any vocabulary entry length


@cases(
    Case(
        "huge-row-sft",
        "limits",
        "one conversation of 2.2M characters, `finetune sft` with `data.on_overlong: error`",
        "refused before tokenizing: file, row, 'at least N tokens (not tokenized)', the fix",
        ("sft",),
    ),
    Case(
        "huge-row-reward",
        "limits",
        "one preference pair whose chosen reply is 2.2M characters, `finetune reward` (on_overlong: error)",
        "refused before tokenizing, the row named",
        ("reward",),
    ),
    Case(
        "huge-row-dpo",
        "limits",
        "the same pair, `finetune dpo` (on_overlong: error)",
        "refused before tokenizing, the row named",
        ("dpo",),
    ),
)
def test_a_huge_row_is_refused_before_the_tokenizer_sees_it(case, tmp_path, capsys):
    (stage,) = case.args
    out = tmp_path / "out"
    if stage == "sft":
        row = {"messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "4"}]}
        good = [json.loads(GOOD)] * 3
    else:
        row = {"prompt": "What is 2 plus 2?", "chosen": HUGE, "rejected": "5"}
        good = [{"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}] * 3
    data = write_jsonl(tmp_path / "d.jsonl", [*good, row])
    extra = ["start_from=none"] if stage != "sft" else []
    code, err = cli(
        capsys,
        stage,
        TINY_RECIPE,
        f"output_dir={out}",
        f"{stage}.data.train=[{{path: {data}}}]",
        f"{stage}.data.eval=[{{path: {data}}}]",
        f"{stage}.data.on_overlong=error",
        *(f"{stage}.{e}" for e in extra),
    )
    refused(code, err, f"{data}: row 4: 2,160,0", "characters, at least", "tokens (not tokenized) > max_length 128")
    refused(code, err, "raise max_length or set data.on_overlong: drop")
    assert not (out / stage).exists()


@cases(
    Case(
        "huge-row-counted",
        "limits",
        "the huge rows with `on_overlong: drop`: a conversation, a pair, a PPO prompt",
        "each counted as over-long and named in dropped_rows (not tokenized); the other rows kept",
    )
)
def test_huge_rows_are_counted_when_dropped(case, tokenizer, tiny_recipe):
    from finetune.core.data import DataReport, tokenize_conversations, tokenize_preferences, tokenize_prompts
    from finetune.core.modeling import template_for

    template = template_for(tiny_recipe)
    short = [{"role": "user", "content": "What is 2 plus 2?"}]
    huge = [{"role": "user", "content": HUGE}]
    answer = [{"role": "assistant", "content": "4"}]
    five = [{"role": "assistant", "content": "5"}]
    kinds = {
        "conversation": lambda report: tokenize_conversations(
            [{"messages": short + answer, "where": "d: row 1"}, {"messages": huge + answer, "where": "d: row 2"}],
            tokenizer,
            template,
            128,
            "drop",
            report,
            "train",
        ),
        "pair": lambda report: tokenize_preferences(
            [
                {"prompt": short, "chosen": answer, "rejected": five, "where": "d: row 1"},
                {"prompt": huge, "chosen": answer, "rejected": five, "where": "d: row 2"},
            ],
            tokenizer,
            template,
            128,
            "drop",
            report,
            "train",
        ),
        "prompt": lambda report: tokenize_prompts(
            [{"prompt": short, "where": "d: row 1"}, {"prompt": huge, "where": "d: row 2"}],
            tokenizer,
            template,
            128,
            report,
            "train",
        ),
    }
    for kind, tokenize in kinds.items():
        report = DataReport()
        tokenize(report)
        assert report.dropped_overlong == 1 and report.used == 1, kind
        (drop,) = report.drops
        assert drop["row"] == 2 and drop["kind"] == "overlong" and "(not tokenized)" in drop["reason"], kind


# ============================================================================= LoRA's size


@cases(
    *(
        Case(
            f"lora-rank-absurd-{stage}",
            "limits",
            f"`lora.r=100000` (the tiny model's matrices have rank <= 128), `finetune {stage}`",
            "refused before loading: lora.r, the largest usable rank, why",
            (stage,),
        )
        for stage in ("sft", "reward", "dpo", "kto", "orpo", "ppo", "pipeline")
    )
)
def test_an_absurd_lora_rank_is_refused_by_every_training_command(case, tmp_path, capsys):
    (command,) = case.args
    out = tmp_path / "out"
    code, err = cli(capsys, command, TINY_RECIPE, f"output_dir={out}", "lora.r=100000")
    refused(code, err, "lora.r: 100000 is more than any adapted matrix of builtin:tiny-phi can use")
    refused(code, err, "the largest has rank 128", "Set lora.r to at most 128")
    nothing_written(out)


@cases(
    Case(
        "lora-in-memory-estimate",
        "limits",
        "the memory check of a run whose LoRA activations do not fit (r = 128, 64 x 128-token batch)",
        "counted: the estimate grows with lora.r and the check refuses; r = 8 passes the same limit",
    )
)
def test_the_memory_check_counts_lora(case, tmp_path, capsys, monkeypatch):
    from finetune.core.memory import estimate_recipe
    from finetune.recipe import load_recipe

    batch = ["sft.per_device_train_batch_size=64", "lora.dropout=0.1"]
    small = estimate_recipe(load_recipe(TINY_RECIPE, ["lora.r=8", *batch]), "sft", "cpu", 1).total_gib
    large = estimate_recipe(load_recipe(TINY_RECIPE, ["lora.r=128", *batch]), "sft", "cpu", 1).total_gib
    # per adapted layer and token: r fp32 values of x @ A (24 adapted layers, 64 x 128 tokens)
    assert (large - small) * 2**30 >= 24 * 64 * 128 * (128 - 8) * 4
    monkeypatch.setenv("FINETUNE_AVAILABLE_MEMORY_GB", f"{(small + large) / 2:.4f}")
    out = tmp_path / "out"
    code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={out}", "lora.r=128", *batch)
    refused(code, err, "sft would run out of memory", "activations")
    assert not out.exists()


# ============================================================================= token budgets and the context


@cases(
    *(
        Case(
            f"context-{stage}-{key.split('=')[0].split('.')[-1]}",
            "limits",
            f"`{key}` with the tiny model's {TINY_CONTEXT} positions, `finetune {stage}`",
            f"refused at load: names {name}, the context and the largest value",
            (stage, key, name),
        )
        for stage, key, name in (
            ("sft", "sft.max_length=4096", "sft.max_length"),
            ("reward", "reward.max_length=4096", "reward.max_length"),
            ("dpo", "dpo.max_length=4096", "dpo.max_length"),
            ("kto", "kto.max_length=4096", "kto.max_length"),
            ("orpo", "orpo.max_length=4096", "orpo.max_length"),
            ("sft", "sft.max_new_tokens=300 sft.eval_generate_rows=4", "sft.max_new_tokens"),
            ("ppo", "ppo.response_length=200", "ppo.max_prompt_length + ppo.response_length"),
            ("ppo", "ppo.max_new_tokens=200", "ppo.max_prompt_length + ppo.max_new_tokens"),
            ("eval", "eval.max_length=4096", "eval.max_length"),
            ("pipeline", "dpo.max_length=4096", "dpo.max_length"),
        )
    )
)
def test_budgets_past_the_context_are_refused_at_load(case, small_run, tmp_path, capsys):
    command, key, name = case.args
    run = copy_run(small_run[0], tmp_path)  # a finished run: the refusal leaves it as it was
    before = snapshot(run)
    code, err = cli(capsys, command, TINY_RECIPE, f"output_dir={run}", *small_run[1], *key.split())
    refused(code, err, f"{name}: ", f"more than the {TINY_CONTEXT} positions of builtin:tiny-phi")
    refused(code, err, f"Set {name} to at most {TINY_CONTEXT}")
    unchanged(before, run)


LONG_PROMPT = " ".join(["What is 2 plus 2?"] * 37)  # 228 tokens as a prompt, of the tiny model's 256


@cases(
    Case(
        "context-generate-prompt",
        "limits",
        "`finetune generate` with a prompt of ~240 tokens and `--max-new-tokens 64` (256 positions)",
        "refused before the model loads: every such row named, the largest budget that fits",
        ("generate-explicit",),
    ),
    Case(
        "context-generate-huge-prompt",
        "limits",
        "`finetune generate` with a .txt line of 2.2M characters",
        "refused before the model loads, not tokenized: the line named",
        ("generate-huge",),
    ),
    Case(
        "context-generate-default-budget",
        "limits",
        "`finetune generate` with the ~240-token prompt and no --max-new-tokens",
        "answers within the context and says the budget it used (not 256)",
        ("generate-default",),
    ),
    Case(
        "context-chat-message",
        "limits",
        "a chat message that with the conversation fills the context, and one of 2.2M characters",
        "(not sent), why and /reset; the conversation goes on",
        ("chat",),
    ),
    Case(
        "context-chat-flags",
        "limits",
        "`finetune chat --max-new-tokens 300`, and a --system prompt of ~240 tokens with --max-new-tokens 64",
        "refused before the model loads",
        ("chat-flags",),
    ),
    Case(
        "context-held-out-generation",
        "limits",
        "held-out correctness and the sample replies with prompts that leave no room for max_new_tokens",
        "refused before generating: rows named, the key to lower",
        ("held-out",),
    ),
)
def test_prompts_past_the_context_get_a_clear_answer(case, small_run, tmp_path, capsys):
    out, _, _ = small_run
    (member,) = case.args
    answers = tmp_path / "a.jsonl"
    if member.startswith("generate"):
        prompts = tmp_path / "p.txt"
        prompts.write_text(f"What is 2 plus 2?\n{HUGE if member == 'generate-huge' else LONG_PROMPT}\n")
        budget = ["--max-new-tokens", "64"] if member == "generate-explicit" else []
        code, err = cli(
            capsys, "generate", TINY_RECIPE, f"output_dir={out}", "--prompts", prompts, "--out", answers, *budget
        )
        if member == "generate-default":
            assert code == 0, err
            rows = [json.loads(x) for x in answers.read_text().splitlines()]
            assert len(rows) == 2 and "replies of at most" in err and f"context of {TINY_CONTEXT} positions" in err
            return
        line = f"{prompts}: line 2 ("
        size = "2,159,999 characters, at least" if member == "generate-huge" else "tokens)"
        refused(code, err, "1 prompt(s) leave no room for", "new token(s) (--max-new-tokens)", line, size)
        refused(code, err, "max_position_embeddings")
        assert not answers.exists()
    elif member == "chat":
        from finetune.cli.chat import ChatSession, chat_loop, load_for_chat

        session = ChatSession(load_for_chat(str(TINY_RECIPE), [f"output_dir={out}"]), max_new_tokens=4)
        lines = iter([LONG_PROMPT, LONG_PROMPT, HUGE, "/exit"])  # the second fills the context, the third is huge
        shown = io.StringIO()
        chat_loop(session, read=lambda prompt: next(lines), out=shown)
        said = shown.getvalue()
        assert said.count("(not sent) your message: the conversation would be") == 2, said
        assert "at least" in said and "/reset starts a new conversation" in said
        assert [m["content"] for m in session.messages if m["role"] == "user"] == [LONG_PROMPT]
    elif member == "chat-flags":
        code, err = cli(capsys, "chat", TINY_RECIPE, f"output_dir={out}", "--max-new-tokens", "300")
        refused(code, err, "--max-new-tokens 300: the model has 256 positions")
        code, err = cli(
            capsys, "chat", TINY_RECIPE, f"output_dir={out}", "--system", LONG_PROMPT, "--max-new-tokens", "64"
        )
        refused(code, err, "--system (", "leave no room for 64 new token(s) (--max-new-tokens)")
    else:
        from finetune.core.evaluation import Samples, held_out_correctness
        from finetune.core.modeling import template_for
        from finetune.core.serving import load_for_chat
        from finetune.errors import UserError
        from finetune.recipe import load_recipe

        loaded = load_for_chat(str(TINY_RECIPE), [f"output_dir={out}"])
        recipe = load_recipe(TINY_RECIPE, [f"output_dir={out}"])
        template = template_for(recipe)
        turns = [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": "4"}]
        rows = [{"messages": turns, "answer": "4", "where": "e.jsonl: row 7"}]
        with pytest.raises(UserError, match=r"e\.jsonl: row 7 \(\d+ tokens\).*lower the stage's max_new_tokens"):
            held_out_correctness(loaded.model, loaded.tokenizer, template, rows, 8, 64)
        samples = Samples(recipe, [[{"role": "user", "content": LONG_PROMPT}]])
        samples.max_new_tokens = 64
        with pytest.raises(UserError, match=r"sample prompt 1 \(\d+ tokens\).*samples\.max_new_tokens"):
            samples.answer("x", loaded.model, loaded.tokenizer, template)


# ============================================================================= answers of every type


def _answers_file(tmp_path, kind: str):
    """A file whose answers are 42 in the given column type, plus one unusable answer (row 3) where the type
    has one; returns (path, the unusable answer's description or None)."""
    import pandas as pd

    q = [{"role": "user", "content": "What is 40 plus 2?"}, {"role": "assistant", "content": "42"}]
    rows = [{"messages": q}] * 3
    parquet = {
        "parquet-float-nan": ([42, 42, None], "null (an empty cell)"),  # pandas: float64, NaN; read back: 42.0, null
        "parquet-int": ([42, 42, 42], None),
        "parquet-string": (["42", "42", ""], "empty"),
    }
    if kind in parquet:
        answers, unusable = parquet[kind]
        path = tmp_path / "d.parquet"
        pd.DataFrame({"prompt": ["What is 40 plus 2?"] * 3, "completion": ["42"] * 3, "answer": answers}).to_parquet(
            path
        )
        return path, unusable
    if kind == "jsonl-number":
        return write_jsonl(tmp_path / "d.jsonl", [{**r, "answer": a} for r, a in zip(rows, (42, 42.0, None))]), "null"
    if kind == "json-bool":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{**r, "answer": a} for r, a in zip(rows, (True, True, float("nan")))]))
        return path, "NaN"
    path = tmp_path / "d.csv"  # csv: the text as written
    path.write_text("prompt,completion,answer\n" + "".join(f"What is 40 plus 2?,42,{a}\n" for a in ("42.0", "42", "")))
    return path, "empty"


ANSWER_KINDS = ["parquet-float-nan", "parquet-int", "parquet-string", "jsonl-number", "json-bool", "csv"]


@cases(
    *(
        Case(
            f"answers-{kind}",
            "limits",
            f"held-out answers as {kind.replace('-', ' ')}, one unusable (null, NaN or empty) where the type has one",
            "compared by value (42 == 42.0 == '42'; True == 'true'): the right replies score 100%; the unusable "
            "answer counted and named (dropped_rows, the log), never scored 0",
            (kind,),
        )
        for kind in ANSWER_KINDS
    )
)
def test_answers_are_compared_by_value_whatever_their_column_type(case, tmp_path, caplog):
    from finetune.core.data import DataReport, load_rows, to_prompt
    from finetune.core.evaluation import Reply, correctness
    from finetune.recipe import load_recipe
    from finetune.rl.rewards import exact_answer

    (kind,) = case.args
    path, unusable = _answers_file(tmp_path, kind)
    recipe = load_recipe(TINY_RECIPE)
    source = recipe.sft.data.train[0].model_copy(update={"path": str(path)})
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="finetune.core.data"):
        rows, _ = load_rows([source], recipe, False, report, 0)
    scored = [r for r in rows if "answer" in r]
    right = "True" if kind == "json-bool" else "42"
    assert scored and correctness(scored, [Reply(right)] * len(scored)) == 1.0
    assert correctness(scored, [Reply("41")] * len(scored)) == 0.0
    if unusable:
        assert report.unscored == 1 and len(scored) == 2
        (drop,) = [d for d in report.drops if d["kind"] == "unusable_answer"]
        assert drop["row"] == 3 and unusable in drop["reason"]
        assert "not scored for correctness" in caplog.text and "row 3" in caplog.text
    else:
        assert report.unscored == 0 and len(scored) == 3
    prompts, _ = load_rows([source], recipe, False, DataReport(), 0, to_prompt)  # PPO's rule reward reads them
    rewards = [exact_answer("", right, p["example"]) for p in prompts]
    assert sorted(rewards) == [0.0] * (1 if unusable else 0) + [1.0] * (2 if unusable else 3)


@cases(
    Case(
        "answers-lm-eval-task",
        "limits",
        "the tiny lm-eval task's scoring with a float answer (42.0) and a NaN one",
        "by value: '42' matches 42.0; NaN matches nothing",
    )
)
def test_the_tiny_lm_eval_task_compares_by_value_too(case):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_heldout", ROOT / "data/tiny/eval/tiny_heldout.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    assert task.process_results({"answer": 42.0}, ["42"]) == {"exact_match": 1.0}
    assert task.process_results({"answer": math.nan}, ["nan"]) == {"exact_match": 0.0}
