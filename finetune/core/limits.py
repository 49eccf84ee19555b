"""What the model can take, checked before anything loads (from its config alone: no weights, no data):

- every token budget of the stage (`max_length`, PPO's prompt + response, held-out generation, lm-eval's
  `max_length`) against the model's context (config.max_position_embeddings). Past it a rotary model such as
  Phi runs on positions it never saw and writes garbage without an error; a budget above it is a mistake
  that would otherwise show only as bad figures after training.
- LoRA's `target_modules` against the model's own layers, and `lora.r` against the rank those layers can
  have (finetune.core.modeling.lora_problem).

The same checks run again where the model is used (finetune.core.modeling.add_lora, generation in
finetune.core.evaluation), for a model whose config could not be read here.
"""

from __future__ import annotations

import logging

from finetune.recipe import STAGES, Recipe, RecipeError
from finetune.recipe.sections import TrainedStage

from .memory import model_config
from .modeling import context_length, lora_problem, lora_targets, meta_model

log = logging.getLogger(__name__)


def check_limits(recipe: Recipe, stage: str) -> None:
    """Refuse (RecipeError naming the key and the fix) a stage whose settings cannot fit the model."""
    if STAGES[stage].trl_config is not None and recipe.trl_setting(stage, "max_length", default=0) is None:
        raise RecipeError(
            f"{recipe.source}: {stage}.max_length: must be a number; finetune counts and reports "
            "rows longer than it instead of truncating them"
        )
    config, source = model_config(recipe)
    if config is None:
        log.info("limits of %s not checked before loading: %s", stage, source)
        return
    section = recipe.section(stage)
    context = context_length(config)
    if context and hasattr(section, "token_budgets"):
        for keys, tokens in section.token_budgets(stage, lambda name: recipe.trl_setting(stage, name)):
            if tokens is not None and tokens > context:
                raise RecipeError(
                    f"{recipe.source}: {keys}: {tokens} tokens, more than the {context} positions of "
                    f"{recipe.model.name_or_path} (max_position_embeddings, {source}); past them the model writes "
                    f"garbage without an error. Set {keys} to at most {context}{' in all' if '+' in keys else ''}"
                )
    if isinstance(section, TrainedStage):  # the stages that add a LoRA adapter
        targets = lora_targets(recipe, config.model_type)
        problem = lora_problem(meta_model(config), targets, recipe.lora.r, recipe.model.name_or_path)
        if problem:
            raise RecipeError(f"{recipe.source}: {problem}")
