"""The trained model as it is served: an exported folder, or a stage's adapter chain merged in memory.

`finetune chat`, `finetune generate` and `finetune eval` load their model here. A folder is loaded as
plain transformers would load it (its tokenizer's chat template, its generation config's end-of-turn);
a recipe means its export when complete, else the last finished chat stage's chain (the chain
`finetune export` would merge), with the template's end-of-turn set as the generation EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.chat_template import end_of_turn_ids
from finetune.recipe import STAGES, Recipe, RecipeError, load_recipe

from .lineage import chat_model_stage, fp32_recipe, model_chain
from .modeling import context_length, load_model, load_tokenizer, template_for
from .outputs import finished


@dataclass
class Loaded:
    model: object
    tokenizer: object
    stop_ids: list[int]
    description: str
    context: int | None = None  # the model's positions (max_position_embeddings), None when its config says none


def load_for_chat(target: str, overrides: list[str], before_model=None) -> Loaded:
    """The model and tokenizer `target` names (a model folder or a recipe), in eval mode. `before_model`, if
    given, is called as before_model(tokenizer, stop_ids, context) once the tokenizer is ready and before the
    model loads (context: the model's positions, from its config, or None): checks of the input (prompts that
    spell special tokens or do not fit the context) fail in a second, not after the load."""
    path = Path(target)
    if path.is_dir():
        if overrides:
            raise RecipeError(f"{target}: key=value overrides apply to a recipe, not to a model folder")
        return load_folder(path, before_model)
    if not path.is_file():
        raise RecipeError(
            f"{target}: neither a model folder nor a recipe file; give an exported folder "
            "(finetune export RECIPE) or a recipe such as recipes/tiny_chat.yaml"
        )
    return load_recipe_model(load_recipe(path, overrides), before_model=before_model)


def load_recipe_model(recipe: Recipe, stage: str = "auto", before_model=None, key: str = "the model") -> Loaded:
    """A recipe's model: a finished merged folder when `stage` is auto or a stage that takes models (the export),
    else the chain of `stage` (auto: the last finished chat stage) merged into the base in memory. `key` names
    the recipe key `stage` came from, for the messages."""
    folder = STAGES.model_folder_stage()  # the export: a plain model folder, served as it is
    if folder is not None and stage in ("auto", folder):
        if finished(recipe, folder):
            return load_folder(recipe.stage_dir(folder), before_model)
        if stage == folder:
            raise RecipeError(
                f"{recipe.source}: {key}: no finished {folder} in {recipe.stage_dir(folder)}; run "
                f"`finetune {folder} {recipe.source}` first, or name a trained stage"
            )
    stage = chat_model_stage(recipe, stage, key)
    chain = model_chain(recipe, stage, key)
    loaded = _load_merged(recipe, chain, before_model)
    loaded.description = f"{stage} of {recipe.source} ({' + '.join(chain)} merged in memory; not exported yet)"
    return loaded


def load_base(recipe: Recipe) -> Loaded:
    """The recipe's base model with its chat template, as the stages measure their 'before' figures."""
    loaded = _load_merged(recipe, [])
    loaded.description = f"the base {recipe.model.name_or_path}"
    return loaded


def _load_merged(recipe: Recipe, chain: list[str], before_model=None) -> Loaded:
    from .memory import model_config

    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(recipe)
    stop = end_of_turn_ids(tokenizer, template_for(recipe))
    if before_model is not None:
        config, _ = model_config(recipe)
        before_model(tokenizer, stop, context_length(config) if config is not None else None)
    run_recipe = recipe if cuda else fp32_recipe(recipe)  # fp16 generation on a CPU is slow
    model = load_model(run_recipe, merge=chain, device_map="auto" if cuda else None)
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop  # as the export writes it
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model.eval(), tokenizer, stop, "", context_length(model.config))


def load_folder(path: Path, before_model=None) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not (path / "config.json").is_file():
        hint = (
            " (it holds a LoRA adapter: give the recipe instead, or export it with finetune export)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise RecipeError(f"{path}: no config.json, not a model folder{hint}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise RecipeError(
            f"{path}: the tokenizer has no chat template; export the model with finetune export, which embeds it"
        )
    eos = GenerationConfig.from_pretrained(path).eos_token_id if (path / "generation_config.json").is_file() else None
    stop = [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None] or [tokenizer.eos_token_id]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if before_model is not None:
        before_model(tokenizer, stop, context_length(AutoConfig.from_pretrained(path)))
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype="auto" if cuda else torch.float32, device_map="auto" if cuda else None
    )
    return Loaded(model.eval(), tokenizer, stop, str(path), context_length(model.config))
