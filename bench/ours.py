"""Everything bench/ takes from the finetune package, in one place.

The benchmark measures the stages' own code paths, so it needs some of finetune's internals; they are
imported here only, so that a move inside the package is one edit. Importing this module imports
torch, transformers and TRL 1.16 (run it in the project's environment, never in the PPO peer's).
"""

from __future__ import annotations

from finetune.chat_template import end_of_turn_ids, tokenize_prompt
from finetune.core.batching import left_pad
from finetune.core.data import DataReport, tokenize_conversations, tokenize_preferences
from finetune.core.memory import KNOWN_CONFIGS
from finetune.core.modeling import (
    DTYPES,
    add_lora,
    choose_attention,
    load_model,
    load_tokenizer,
    lora_targets,
    template_for,
)
from finetune.core.training import trl_config
from finetune.dpo import make_trainer as dpo_trainer
from finetune.recipe import GrpoAlgorithm, apply_overrides, validate_recipe
from finetune.reward import as_reward_rows
from finetune.reward import make_trainer as reward_trainer
from finetune.rl.engine import REFERENCE, SpeedSwitches
from finetune.rl.engine import build_model as build_multi_adapter
from finetune.rl.functional import reward_readout_index
from finetune.rl.grpo_engine import GRPOEngine
from finetune.rl.ppo_engine import PPOEngine
from finetune.rl.scoring import Scorer
from finetune.sft import make_trainer as sft_trainer
from finetune.sft import sft_args
from finetune.tiny import base_path

PHI2_PUBLISHED = KNOWN_CONFIGS["microsoft/phi-2"][1]  # the hub's config.json values, without the network

__all__ = [
    "PHI2_PUBLISHED",
    "DTYPES",
    "DataReport",
    "GRPOEngine",
    "GrpoAlgorithm",
    "PPOEngine",
    "REFERENCE",
    "Scorer",
    "SpeedSwitches",
    "add_lora",
    "apply_overrides",
    "as_reward_rows",
    "build_multi_adapter",
    "choose_attention",
    "dpo_trainer",
    "end_of_turn_ids",
    "left_pad",
    "load_model",
    "load_tokenizer",
    "lora_targets",
    "reward_readout_index",
    "reward_trainer",
    "sft_args",
    "sft_trainer",
    "template_for",
    "tiny_base",
    "tokenize_conversations",
    "tokenize_preferences",
    "tokenize_prompt",
    "trl_config",
    "validate_recipe",
]


def tiny_base() -> str:
    """The shipped builtin:tiny-phi folder (its tokenizer is every benchmark model's); it travels with the
    repository, so a GPU run needs no build and no cache."""
    return str(base_path())
