"""What a checkpoint must match to be resumed (finetune.core.resume.run_identity): the settings that change
the math, not those that only trade memory for compute, and for PPO only what PPO reads."""

from finetune.core.resume import differences, run_identity
from finetune.recipe import load_recipe
from tests.conftest import TINY_RECIPE

ROWS = [{"prompt": "What is 2 plus 3?"}]


def changes(stage: str, *overrides: str, base: tuple[str, ...] = ()) -> list[str]:
    before = run_identity(load_recipe(TINY_RECIPE, list(base)), stage, ROWS)
    after = run_identity(load_recipe(TINY_RECIPE, [*base, *overrides]), stage, ROWS)
    return differences(stage, before, after)


def test_what_the_memory_check_suggests_does_not_block_a_resume():
    assert changes("sft", "training.gradient_checkpointing=true") == []
    assert changes("dpo", "training.activation_checkpointing=true") == []
    assert changes("ppo", "ppo.micro_batch_size=2", "ppo.eval_prompts=2") == []


def test_ppo_ignores_the_trl_stages_shared_training_block():
    assert changes("ppo", "training.per_device_train_batch_size=4", "training.learning_rate=1e-3") == []
    assert changes("sft", "training.learning_rate=1e-3") == ["sft.learning_rate: 0.002 -> 0.001"]


def test_a_quantised_base_is_another_run():
    assert changes("sft", "model.load_in_4bit=true", base=("precision=fp16",)) == ["model.load_in_4bit: false -> true"]
