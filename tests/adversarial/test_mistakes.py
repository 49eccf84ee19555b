"""Everyday mistakes get one clear message, never a traceback: keys given twice, byte-order marks, numbers where
text is expected, LoRA targets the model lacks, numbers out of range, a changed launch on resume, a Ctrl-C while
talking to Azure ML, a benchmark whose own package is missing, a symlinked checkpoints folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE, write_jsonl

from .cases import GOOD, Case, cases, cli, copy_run, nothing_written, refused, snapshot, unchanged

pytestmark = pytest.mark.timeout(900)

BOM = "\ufeff"
EVAL_DATA = ROOT / "data/tiny/sft_eval.jsonl"


def _recipe(tmp_path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("../data/", f"{ROOT}/data/"))
    return path


# ============================================================================= a key given twice


TWICE = [  # (id, where, what it looks like)
    ("dup-recipe-section", "recipe", "a recipe with two `sft:` sections"),
    ("dup-recipe-nested", "recipe", "`sft:` with `max_steps` twice"),
    ("dup-recipe-deep", "recipe", "a data source `{path: a, path: b}` in sft.data.train"),
    ("dup-override", "override", "an override value `sft.data.train=[{path: a, path: b}]`"),
    ("dup-accelerate-config", "accelerate", "the accelerate config with `num_processes` twice"),
    ("dup-deepspeed-json", "deepspeed", "the DeepSpeed JSON with `zero_optimization.stage` twice"),
    ("dup-data-jsonl", "jsonl", "a jsonl row whose message has `content` twice"),
    ("dup-data-json", "json", "a .json row with `messages` twice"),
    ("dup-data-csv", "csv", "a csv header naming `prompt` twice"),
    ("dup-data-parquet", "parquet", "a parquet file with two `prompt` columns"),
    ("dup-prompts-jsonl", "prompts", "a `finetune generate` prompts row with `prompt` twice"),
]


@cases(
    *(
        Case(id_, "mistakes", trigger, "refused: names the file, the key (and line or row) and to keep one", (where,))
        for id_, where, trigger in TWICE
    )
)
def test_a_key_given_twice_is_refused_in_every_file(case, tmp_path, capsys):
    (where,) = case.args
    out = tmp_path / "out"
    command, args = "config", [f"output_dir={out}"]
    recipe = TINY_RECIPE
    if where == "recipe":
        text = TINY_RECIPE.read_text()
        if case.id == "dup-recipe-section":
            text += "\nsft:\n  data:\n    train: [{path: ../data/tiny/sft_train.jsonl}]\n"
            must = ["line ", "the key 'sft' is given twice in one mapping (first on line"]
        elif case.id == "dup-recipe-nested":
            text = text.replace(
                "  max_length: 128\n  eval_generate_rows", "  max_length: 128\n  max_length: 64\n  eval_generate_rows"
            )
            must = ["the key 'max_length' is given twice in one mapping"]
        else:
            text = text.replace(
                "- path: ../data/tiny/sft_train.jsonl", "- {path: ../data/tiny/sft_train.jsonl, path: x.jsonl}"
            )
            must = ["the key 'path' is given twice in one mapping"]
        recipe = _recipe(tmp_path, text)
        must = [f"{recipe}: line ", *must, "keep one"]
    elif where == "override":
        args.append("sft.data.train=[{path: a.jsonl, path: b.jsonl}]")
        must = ["override 'sft.data.train=", "the key 'path' is given twice", "keep one"]
    elif where == "accelerate":
        config = tmp_path / "accelerate.yaml"
        config.write_text("num_processes: 2\nuse_cpu: true\nnum_processes: 1\n")
        args.append(f"launch.accelerate_config={config}")
        must = ["launch.accelerate_config:", f"{config}: line 3: the key 'num_processes' is given twice", "keep one"]
    elif where == "deepspeed":
        config = tmp_path / "ds.json"
        config.write_text('{"train_batch_size": "auto", "zero_optimization": {"stage": 2, "stage": 3}}')
        args.append(f"deepspeed={config}")
        must = ["deepspeed:", f"{config}: the key 'stage' is given twice in one object", "keep one"]
    else:
        command = "sft"
        row = GOOD.replace('"content": "4"', '"content": "4", "content": "5"')
        if where == "jsonl":
            data, must = write_jsonl(tmp_path / "d.jsonl", [GOOD, row]), ["row 2: the key 'content' is given twice"]
        elif where == "json":
            data = tmp_path / "d.json"
            data.write_text("[" + GOOD + ", " + GOOD.replace("{", '{"messages": [], ', 1) + "]")
            must = ["row 2: the key 'messages' is given twice"]
        elif where == "csv":
            data = tmp_path / "d.csv"
            data.write_text("prompt,completion,prompt\nWhat is 2 plus 2?,4,What is 3 plus 3?\n")
            must = ["the header names the column 'prompt' twice"]
        elif where == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            data = tmp_path / "d.parquet"
            columns = [pa.array(["What is 2 plus 2?"]), pa.array(["4"]), pa.array(["What is 3 plus 3?"])]
            pq.write_table(pa.Table.from_arrays(columns, names=["prompt", "completion", "prompt"]), data)
            must = ["the column 'prompt' is there twice"]
        else:
            prompts = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "What is 2 plus 2?", "prompt": "hi"}'])
            answers = tmp_path / "a.jsonl"
            code, err = cli(
                capsys, "generate", TINY_RECIPE, f"output_dir={out}", "--prompts", prompts, "--out", answers
            )
            refused(code, err, f"{prompts}: row 1: the key 'prompt' is given twice", "keep one")
            assert not answers.exists()
            return
        must = [str(data), *must]
        args += [f"sft.data.train=[{{path: {data}}}]", f"sft.data.eval=[{{path: {EVAL_DATA}}}]"]
    code, err = cli(capsys, command, recipe, *args)
    refused(code, err, *must)
    nothing_written(out)


# ============================================================================= byte-order marks


BOM_MEMBERS = ["recipe", "accelerate-config", "deepspeed-json", "jsonl", "json", "csv", "txt-prompts", "template"]


@cases(
    *(
        Case(
            f"bom-{member}",
            "mistakes",
            f"a {member.replace('-', ' ')} file saved with a UTF-8 byte-order mark (Windows editors, Excel)",
            "read as without it: the mark is not part of the first key, row, prompt or template",
            (member,),
        )
        for member in BOM_MEMBERS
    )
)
def test_a_byte_order_mark_is_accepted_in_every_text_format(case, tmp_path):
    from finetune.core.data import DataReport, load_rows, read_prompts
    from finetune.recipe import load_recipe

    (member,) = case.args
    if member == "recipe":
        recipe = _recipe(tmp_path, BOM + TINY_RECIPE.read_text())
        assert load_recipe(recipe).output_dir == "runs/tiny_chat"
    elif member == "accelerate-config":
        from finetune.core.memory import planned_processes

        config = tmp_path / "accelerate.yaml"
        config.write_text(BOM + "num_processes: 2\nuse_cpu: true\n")
        assert planned_processes(load_recipe(TINY_RECIPE, [f"launch.accelerate_config={config}"]), "sft") == 2
    elif member == "deepspeed-json":
        from finetune.readers import read_json

        config = tmp_path / "ds.json"
        config.write_text(BOM + (ROOT / "recipes/deepspeed/zero2.json").read_text())
        assert load_recipe(TINY_RECIPE, [f"deepspeed={config}"]).deepspeed == str(config)
        # what the trainer gets (core.training.trl_config): the parsed file, not the path transformers would
        # json.load (which refuses a byte-order mark)
        assert read_json(config) == json.loads((ROOT / "recipes/deepspeed/zero2.json").read_text())
    elif member in ("jsonl", "json", "csv"):
        path = tmp_path / f"d.{member}"
        if member == "jsonl":
            path.write_text(BOM + GOOD + "\n" + GOOD + "\n")
        elif member == "json":
            path.write_text(BOM + "[" + GOOD + ", " + GOOD + "]")
        else:
            path.write_text(BOM + "prompt,completion\nWhat is 2 plus 2?,4\nWhat is 3 plus 3?,6\n")
        recipe = load_recipe(TINY_RECIPE)
        source = recipe.sft.data.train[0].model_copy(update={"path": str(path)})
        rows, _ = load_rows([source], recipe, False, DataReport(), 0)
        assert len(rows) == 2 and all(BOM not in json.dumps(r, ensure_ascii=False) for r in rows)
    elif member == "txt-prompts":
        path = tmp_path / "p.txt"
        path.write_text(BOM + "What is 2 plus 2?\n")
        assert read_prompts(path)[0]["prompt"] == [{"role": "user", "content": "What is 2 plus 2?"}]
    else:
        from finetune.chat_template import load_template

        path = tmp_path / "t.jinja"
        path.write_text(BOM + (ROOT / "finetune/templates/phi_instruct.jinja").read_text())
        assert not load_template(str(path)).source.startswith(BOM)


# ============================================================================= numbers where text is expected


SCALAR_MEMBERS = [  # (id, file type, what the row holds, the converter)
    ("scalar-csv-prompt-completion", "csv", "a csv of numbers: prompt 7, completion 007, answer 42.0", "sft"),
    ("scalar-parquet-completion", "parquet", "a parquet int column of completions", "sft"),
    ("scalar-jsonl-content", "jsonl", "a message whose content is the number 4", "sft"),
    ("scalar-jsonl-chosen-rejected", "jsonl", "preference rows with chosen 4 and rejected 5.5", "preference"),
    ("scalar-parquet-chosen-rejected", "parquet", "parquet int columns chosen / rejected", "preference"),
    ("scalar-sharegpt-value", "jsonl", "a ShareGPT turn whose value is a number", "sft"),
    ("scalar-alpaca-output", "jsonl", "an Alpaca row whose output is a number", "sft"),
    ("scalar-prompt-only", "jsonl", "PPO / generate prompt rows whose prompt is a number", "prompt"),
]


@cases(
    *(
        Case(
            id_,
            "mistakes",
            trigger,
            "read as the text it is (4, 42 for 42.0, csv cells exactly as written)",
            (kind, use),
        )
        for id_, kind, trigger, use in SCALAR_MEMBERS
    )
)
def test_numbers_are_text_in_every_text_column(case, tmp_path):
    import pandas as pd

    from finetune.core.data import DataReport, load_rows, to_preference, to_prompt
    from finetune.recipe import load_recipe

    kind, use = case.args
    path = tmp_path / f"d.{kind}"
    if case.id == "scalar-csv-prompt-completion":
        path.write_text("prompt,completion,answer\n7,007,42.0\n7,NA,42\n")
        expect = [("7", "007", "42.0"), ("7", "NA", "42")]
    elif case.id == "scalar-parquet-completion":
        pd.DataFrame({"prompt": ["What is 2 plus 2?"] * 2, "completion": [4, 5]}).to_parquet(path)
        expect = [("What is 2 plus 2?", "4", None), ("What is 2 plus 2?", "5", None)]
    elif case.id == "scalar-jsonl-content":
        write_jsonl(path, [{"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": 4}]}])
        expect = [("12", "4", None)]
    elif case.id == "scalar-sharegpt-value":
        write_jsonl(path, [{"conversations": [{"from": "human", "value": 12}, {"from": "gpt", "value": 4.0}]}])
        expect = [("12", "4", None)]
    elif case.id == "scalar-alpaca-output":
        write_jsonl(path, [{"instruction": "What is 2 plus 2?", "input": None, "output": 4}])
        expect = [("What is 2 plus 2?", "4", None)]
    elif case.id == "scalar-prompt-only":
        write_jsonl(path, [{"prompt": 12, "answer": 12.0}])
        expect = [("12", None, "12")]
    elif kind == "jsonl":
        write_jsonl(path, [{"prompt": "What is 2 plus 2?", "chosen": 4, "rejected": 5.5}])
        expect = [("What is 2 plus 2?", "4", "5.5")]
    else:
        pd.DataFrame({"prompt": ["What is 2 plus 2?"], "chosen": [4], "rejected": [5]}).to_parquet(path)
        expect = [("What is 2 plus 2?", "4", "5")]
    recipe = load_recipe(TINY_RECIPE)
    source = recipe.sft.data.train[0].model_copy(update={"path": str(path)})
    convert = {"sft": None, "preference": to_preference, "prompt": to_prompt}[use]
    rows, _ = load_rows([source], recipe, False, DataReport(), 0, convert)
    if use == "sft":
        got = [(r["messages"][0]["content"], r["messages"][1]["content"], r.get("answer")) for r in rows]
    elif use == "preference":
        got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    else:
        got = [(r["prompt"][0]["content"], None, r.get("answer")) for r in rows]
    assert sorted(got, key=str) == sorted(expect, key=str)


# ============================================================================= LoRA targets and numbers out of range


@cases(
    *(
        Case(
            f"lora-targets-{command}",
            "mistakes",
            f"`lora.target_modules=[q_lin, final_layernorm]` (not the model's names), `finetune {command}`",
            "refused before loading: the names that match nothing / are not layers, and the layers the model has",
            (command,),
        )
        for command in ("sft", "reward", "dpo", "kto", "orpo", "ppo", "pipeline")
    )
)
def test_lora_targets_the_model_lacks_are_named_with_the_ones_it_has(case, tmp_path, capsys):
    (command,) = case.args
    out = tmp_path / "out"
    code, err = cli(capsys, command, TINY_RECIPE, f"output_dir={out}", "lora.target_modules=[q_lin, final_layernorm]")
    refused(code, err, "lora.target_modules: in builtin:tiny-phi (phi), 'q_lin' matches no module")
    refused(code, err, "'final_layernorm' is not a layer LoRA can adapt", "are named dense, embed_tokens, fc1, fc2")
    nothing_written(out)


@cases(
    Case(
        "lora-targets-at-build",
        "mistakes",
        "the same targets where the model is built (a model whose config could not be read before loading)",
        "a RecipeError naming the modules, not peft's ValueError",
    )
)
def test_add_lora_names_the_modules_too(case, tiny_recipe):
    from finetune.core.modeling import add_lora, load_model
    from finetune.recipe import RecipeError

    recipe = tiny_recipe.model_copy(update={"lora": tiny_recipe.lora.model_copy(update={"target_modules": ["qkv"]})})
    with pytest.raises(RecipeError, match="'qkv' matches no module;.* named dense, embed_tokens, fc1"):
        add_lora(load_model(recipe), recipe)


OUT_OF_RANGE = [
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
    ("training.learning_rate=.inf", "training.learning_rate: must be a finite number"),
    ("sft.num_train_epochs=.inf", "sft.num_train_epochs: must be a finite number"),
    ("ppo.kl_coef=.inf", "ppo.kl_coef: Input should be a finite number"),
    ("ppo.reward_function_weight=.nan", "ppo.reward_function_weight: Input should be a finite number"),
    ("lora.dropout=.nan", "lora.dropout: Input should be a finite number"),
]


@cases(
    *(
        Case(
            f"range-{key.split('=')[0]}",
            "mistakes",
            f"`{key}`",
            "refused at load, the key and its range named (numpy takes seeds 0 to 2**32 - 1; no number may be inf/NaN)",
            (key, must),
        )
        for key, must in OUT_OF_RANGE
    )
)
def test_numbers_out_of_range_are_refused_at_load(case, tmp_path, capsys):
    key, must = case.args
    out = tmp_path / "out"
    for command in ("config", "sft"):
        code, err = cli(capsys, command, TINY_RECIPE, f"output_dir={out}", key)
        refused(code, err, f"{TINY_RECIPE}: {must}")
    nothing_written(out)


# ============================================================================= a changed launch on resume


@cases(
    Case(
        "resume-other-process-count",
        "mistakes",
        "rerun sft on 1 process where the checkpoints were made by 2",
        "refused before loading: names processes 2 -> 1 and `sft.resume=false`",
    ),
    Case(
        "resume-other-deepspeed-config",
        "mistakes",
        "the DeepSpeed config file edited (same path) between a run and its resumption",
        "refused: names the config file's content, and `sft.resume=false`",
    ),
)
def test_a_changed_launch_is_named_on_resume(case, small_run, tmp_path, capsys):
    from finetune.core.resume import differences, run_identity
    from finetune.recipe import load_recipe

    run = copy_run(small_run[0], tmp_path)
    marker = run / "sft-checkpoints" / "run_identity.json"
    if case.id == "resume-other-process-count":
        identity = json.loads(marker.read_text())
        marker.write_text(json.dumps({**identity, "processes": 2}))  # as a 2-process launch records it
        before = snapshot(run)
        code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={run}", *small_run[1])
        refused(code, err, "processes (launch.num_processes", ": 2 -> 1", "sft.resume=false")
        unchanged(before, run)
        return
    config = tmp_path / "ds.json"
    config.write_text((ROOT / "recipes/deepspeed/zero2.json").read_text())
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={run}", f"deepspeed={config}"])
    made = run_identity(recipe, "sft", [])
    config.write_text(config.read_text().replace('"stage": 2', '"stage": 3'))
    diff = differences("sft", made, run_identity(recipe, "sft", []))
    sha = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
    assert diff == [f"deepspeed (the config file's content): sha256 {made['deepspeed_sha256'][:12]} -> sha256 {sha}"]


# ============================================================================= Ctrl-C while talking to Azure ML


@cases(
    *(
        Case(
            f"ctrl-c-azureml-{moment}",
            "mistakes",
            f"Ctrl-C during `finetune azureml {'register' if moment == 'register' else 'submit'}` ({what})",
            f"exit 130, one line: {says}",
            (moment,),
        )
        for moment, what, says in (
            ("signing-in", "while the credential is asked for a token", "nothing was sent"),
            ("uploading", "while the job and its code snapshot are sent", "it may exist: how to look before resending"),
            (
                "streaming",
                "while `--stream` follows the job's logs",
                "the job keeps running: how to follow or cancel it",
            ),
            ("register", "while the export is uploaded as a model", "it may exist: how to look"),
        )
    )
)
def test_ctrl_c_while_talking_to_azure_ml_is_one_line(case, tmp_path, monkeypatch, capsys):
    from finetune.cli import azureml

    (moment,) = case.args

    class Job:
        name, studio_url = "sharp_job_1", "https://ml.azure.com/runs/sharp_job_1"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    class Credential:
        def __init__(self, *args, **kwargs):
            pass

        def get_token(self, *scopes, **kwargs):
            if moment == "signing-in":
                raise KeyboardInterrupt

    class Client:
        def __init__(self, *args, **kwargs):
            ok = type("Ok", (), {"get": lambda self, name: None})()
            self.workspaces = self.compute = ok
            self.jobs = type(
                "Jobs",
                (),
                {
                    "create_or_update": lambda self, job: interrupt() if moment == "uploading" else Job(),
                    "stream": lambda self, name: interrupt(),
                },
            )()
            self.models = type("Models", (), {"create_or_update": lambda self, model: interrupt()})()

    monkeypatch.setattr("azure.identity.DefaultAzureCredential", Credential)
    monkeypatch.setattr("azure.ai.ml.MLClient", Client)
    ids = ["--subscription", "00000000-0000-0000-0000-000000000000", "--resource-group", "rg", "--workspace", "ws"]
    if moment == "register":
        export = tmp_path / "export"
        export.mkdir()
        (export / "config.json").write_text("{}")
        (export / "metrics.json").write_text(json.dumps({"stage": "sft"}))
        monkeypatch.setattr(azureml, "export_folder", lambda target, overrides: (export, _tiny()))
        monkeypatch.setattr(azureml, "model_yaml", lambda folder, recipe, out: tmp_path / "model.yaml")
        monkeypatch.setattr(azureml, "load_model", lambda path: object())
        argv = ["register", str(export), "--out", str(tmp_path), *ids]
    else:
        argv = ["submit", str(TINY_RECIPE), "--stage", "sft", "--compute", "gpu", "--out", str(tmp_path), *ids]
        argv += ["--stream"] if moment == "streaming" else []
    capsys.readouterr()
    code = azureml.main(argv)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("finetune azureml: interrupted (Ctrl-C)"), err
    says = {
        "signing-in": "before anything was sent; no job was created",
        "uploading": "it may or may not have been created. Look with `az ml job list --resource-group rg",
        "streaming": "the job keeps running on Azure ML (https://ml.azure.com/runs/sharp_job_1). Follow it again with "
        "`az ml job stream --name sharp_job_1 --resource-group rg --workspace-name ws`",
        "register": "while the model was being sent: it may or may not have been created. Look with `az ml model list",
    }[moment]
    assert says in err, err


def _tiny():
    from finetune.recipe import load_recipe

    ids = ["subscription_id=00000000-0000-0000-0000-000000000000", "resource_group=rg", "workspace_name=ws"]
    return load_recipe(TINY_RECIPE, [f"azureml.{x}" for x in ids])


# ============================================================================= a benchmark's own package missing


@cases(
    *(
        Case(
            f"eval-task-package-missing-{form}",
            "mistakes",
            f"an lm-eval task whose code imports a package that is not installed, `finetune eval {form.upper()}`",
            "refused before any model loads: the task, the package, how to install it",
            (form,),
        )
        for form in ("recipe", "model_dir")
    )
)
def test_a_benchmark_missing_its_package_is_one_message(case, tmp_path, capsys):
    (form,) = case.args
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = (ROOT / "data/tiny/eval/tiny_heldout.yaml").read_text()
    (tasks / "needs.yaml").write_text(
        task.replace("task: finetune_tiny_heldout", "task: needs_a_package").replace("tiny_heldout.", "needs_pkg.")
    )
    (tasks / "needs_pkg.py").write_text("import finetune_no_such_package  # noqa: F401\n")
    out = tmp_path / "out"
    if form == "recipe":
        args = [TINY_RECIPE, f"output_dir={out}", "eval.tasks=[needs_a_package]", f"eval.include_path={tasks}"]
    else:
        model = tmp_path / "model"  # refused before the folder is read
        model.mkdir()
        args = [model, "--tasks", "needs_a_package", "--include-path", tasks, "--out", out, "--no-base"]
    code, err = cli(capsys, "eval", *args)
    refused(code, err, "eval.tasks: needs_a_package: the task's code needs the Python package")
    refused(code, err, "'finetune_no_such_package', which is not installed: pip install finetune_no_such_package")
    nothing_written(out)


# ============================================================================= a symlinked checkpoints folder


@cases(
    Case(
        "symlinked-checkpoints-resume-false",
        "mistakes",
        "`sft-checkpoints` is a symbolic link to another disk, and `sft.resume=false`",
        "starts over, no traceback: the link and its folder stay, emptied of the old checkpoints",
    )
)
def test_a_symlinked_checkpoints_folder_starts_over_in_place(case, small_run, tmp_path, caplog):
    import logging
    import shutil

    from finetune.core.resume import choose_checkpoint, run_identity
    from finetune.recipe import load_recipe

    run = copy_run(small_run[0], tmp_path)
    disk = tmp_path / "big-disk" / "checkpoints"
    shutil.move(run / "sft-checkpoints", disk)
    (run / "sft-checkpoints").symlink_to(disk)
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={run}", *small_run[1], "sft.resume=false"])
    with caplog.at_level(logging.INFO, logger="finetune.core.resume"):
        assert choose_checkpoint(recipe, "sft", False, run_identity(recipe, "sft", [])) is None
    assert (run / "sft-checkpoints").is_symlink() and disk.is_dir()
    assert not list(disk.glob("checkpoint-*")) and (disk / "run_identity.json").is_file()  # this run's, new
    assert "removed the earlier checkpoints" in caplog.text
