from pathlib import Path

import pytest
import yaml

from finetune.recipe import RecipeError, dump_recipe, load_recipe, validate_recipe
from tests.conftest import ROOT, TINY_RECIPE

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def is_accelerate_config(path: Path) -> bool:
    return "distributed_type" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_under_recipes_validates(path):
    if is_accelerate_config(path):
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))
        assert config.distributed_type.value in ("DEEPSPEED", "FSDP")
        if config.distributed_type.value == "FSDP":  # FSDP2, sharded checkpoints (resumed by the same count)
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    else:
        recipe = load_recipe(path)
        assert recipe.sft is not None and recipe.sft.data.train


def test_phi2_recipe_is_what_the_issue_promises():
    r = load_recipe(ROOT / "recipes" / "phi2_chat.yaml")
    args = r.training_args("sft")
    assert r.model.name_or_path == "microsoft/phi-2" and r.precision == "fp16"
    assert args["learning_rate"] == 5e-6 and args["lr_scheduler_type"] == "cosine"
    assert args["per_device_train_batch_size"] == 1 and args["save_total_limit"] == 1
    assert r.logging.logging_steps == 10 and r.model.attn_implementation == "flash_attention_2"
    import json

    ds = json.loads(Path(r.resolve_path(r.deepspeed)).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["fp16"]["enabled"] == "auto" and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["bf16"]["enabled"] == "auto"
    assert r.lora.target_modules == "auto"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """
output_dir: out
model: {name_or_path: builtin:tiny-phi}
sft:
  data: {train: [{path: data.jsonl}]}
"""


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "sft.max_stepz=3",
            "r.yaml: sft.max_stepz: unknown key (neither a finetune key nor a SFTConfig field); "
            "did you mean 'max_steps'?",
        ),
        ("lora.alpah=8", "r.yaml: lora.alpah: unknown key; did you mean 'alpha'?"),
        ("lora.rank=8", "r.yaml: lora.rank: unknown key; valid keys: r, alpha, dropout, target_modules"),
        ("modle.x=1", "r.yaml: modle: unknown key; did you mean 'model'?"),
        ("sft.learning_rate=fast", "r.yaml: sft.learning_rate: expected float, got str 'fast'"),
        ("lora.r=zero", "r.yaml: lora.r: Input should be a valid integer"),
        ("sft.fp16=true", "r.yaml: sft.fp16: set this with precision (top level) instead"),
        ("training.output_dir=x", "r.yaml: training.output_dir: set this with output_dir (top level) instead"),
        ("sft.assistant_only_loss=true", "assistant-only loss is always on"),
        ("precision=fp8", "r.yaml: precision: Input should be 'fp32', 'fp16' or 'bf16'"),
        ("model.load_in_4bit=true", "load_in_4bit needs precision fp16 or bf16"),
        ("deepspeed=nowhere.json", "r.yaml: deepspeed: file not found"),
        ("sft.data.train=[]", None),
        ("training.lr_scheduler_type=cosin", "training.lr_scheduler_type: expected one of ['linear', 'cosine'"),
        ("sft.eval_strategy=steps", "sft.eval_strategy: set this with nothing (finetune evaluates"),
        ("sft.max_steps='2.9'", "sft.max_steps: expected int, got str '2.9'"),
    ],
)
def test_bad_recipes_fail_before_loading_with_file_key_and_fix(tmp_path, override, message):
    path = write(tmp_path, BASE)
    if message is None:
        load_recipe(path, [override])  # an empty list is valid schema-wise; the loader reports it
        return
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_required_key_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="r.yaml: model: required key is missing"):
        load_recipe(write(tmp_path, "output_dir: x\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1,\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_and_stage_section_override_shared_training(tmp_path):
    path = write(tmp_path, BASE + "training: {learning_rate: 1.0e-4, num_train_epochs: 2}\n")
    r = load_recipe(path, ["sft.learning_rate=3e-4", "output_dir=/tmp/elsewhere", "lora.target_modules=[fc1,fc2]"])
    assert r.training_args("sft") == {"learning_rate": 3e-4, "num_train_epochs": 2}
    assert r.output_dir == "/tmp/elsewhere" and r.lora.target_modules == ["fc1", "fc2"]
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["sft.max_steps"])


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.resolve_path(r.sft.data.train[0].path) == str(tmp_path / "data.jsonl")
    assert r.resolve_path("builtin:tiny-phi") == "builtin:tiny-phi"


def test_an_input_key_names_a_stage_a_folder_or_none(tmp_path):
    """start_from / reward_from / a learned reward's `model`: unset is the registry's default stage, a stage's name
    is that stage's output wherever output_dir is, ./name is a folder of that name, none is no adapter."""
    out = tmp_path / "run"
    r = load_recipe(TINY_RECIPE, [f"output_dir={out}"])
    assert r.input_dir("ppo", "start_from") == out / "sft" and r.input_stage("ppo", "start_from") == "sft"
    r = load_recipe(TINY_RECIPE, [f"output_dir={out}", "ppo.start_from=null"])
    assert r.input_dir("ppo", "start_from") == out / "dpo"  # the registry's default: the stage before
    r = load_recipe(
        TINY_RECIPE,
        [f"output_dir={out}", "ppo.start_from=dpo", "grpo.reward_function=null", "grpo.rewards=[{model: reward}]"],
    )
    assert r.input_dir("ppo", "start_from") == out / "dpo" and r.input_dir("grpo", "reward_from") == out / "reward"
    r = load_recipe(TINY_RECIPE, [f"output_dir={out}", "ppo.start_from=./sft", "dpo.start_from=none"])
    assert r.input_dir("ppo", "start_from") == Path("sft") and r.input_stage("ppo", "start_from") is None
    assert r.input_dir("dpo", "start_from") is None
    with pytest.raises(RecipeError, match=r"ppo.start_from: ppo is this stage itself; name an earlier stage"):
        load_recipe(TINY_RECIPE, ["ppo.start_from=ppo"]).input_dir("ppo", "start_from")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(TINY_RECIPE)
    text = dump_recipe(r)
    again = validate_recipe(yaml.safe_load(text), source=str(TINY_RECIPE))
    assert dump_recipe(again) == text
    assert "num_train_epochs: 4" in text and "eval_fraction: 0.05" in text  # defaults filled in


def test_cli_config_prints_resolved_recipe_and_reports_errors(capsys, tmp_path):
    from finetune.cli import main

    assert main(["config", str(TINY_RECIPE), "sft.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    assert main(["config", str(write(tmp_path, BASE)), "sft.max_lenght=3"]) == 2
    assert "did you mean 'max_length'?" in capsys.readouterr().err


def test_recipe_reference_doc_is_in_step_with_the_schema():
    from finetune.recipe import reference_markdown

    assert (ROOT / "docs" / "recipe_reference.md").read_text() == reference_markdown(), (
        "run: python -m finetune.recipe > docs/recipe_reference.md"
    )


def test_stage_print_config_flag_prints_and_does_not_run(capsys):
    from finetune.launch import recipe_from_argv

    assert recipe_from_argv([str(TINY_RECIPE), "sft.max_steps=9", "--print-config"], "sft", "finetune sft") is None
    assert "max_steps: 9" in capsys.readouterr().out


def test_resume_refuses_checkpoints_of_another_run(tmp_path):
    from finetune.core.resume import choose_checkpoint, run_identity

    def complete(folder):  # every checkpoint folder counts as complete here (completeness: test_adversarial)
        return None

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    r = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"])
    ident = run_identity(r, "sft", rows)
    assert choose_checkpoint(r, "sft", True, ident, problem=complete) is None  # nothing yet: records the run
    (r.checkpoint_dir("sft") / "checkpoint-2").mkdir()
    assert choose_checkpoint(r, "sft", True, ident, problem=complete).name == "checkpoint-2"
    other = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "lora.r=8"])
    with pytest.raises(RecipeError, match=r"belong to a run with other inputs: lora.r: 16 -> 8.*sft.resume=false"):
        choose_checkpoint(other, "sft", True, run_identity(other, "sft", rows), problem=complete)
    # starting over is allowed: it clears the other run's checkpoints and records this run
    assert choose_checkpoint(other, "sft", False, run_identity(other, "sft", rows), problem=complete) is None
    assert not (r.checkpoint_dir("sft") / "checkpoint-2").exists()
