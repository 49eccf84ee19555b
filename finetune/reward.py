"""Reward-model stage: a LoRA sequence-classification head on the SFT model, trained on preference pairs.

    accelerate launch finetune/reward.py RECIPE [key=value ...]
    finetune reward RECIPE [key=value ...]

load recipe -> pairs -> SFT-merged base + score head + LoRA -> accuracy before -> train (TRL
RewardTrainer; padding-free batches unless reward.padding_free is false) -> accuracy after -> save
(adapter + score head) -> summary.
"""

from __future__ import annotations

import logging
import sys

import torch

from finetune.core.evaluation import pairwise_accuracy
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.progress import progress
from finetune.core.summary import print_summary
from finetune.core.training import PaddingFree, place_for_eval, prepare_preference_stage, save_stage, train
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe

log = logging.getLogger("finetune.reward")


def packed_score_forward(model, original, packed: dict):
    """The forward of a transformers sequence-classification model (a causal backbone, a `score` head read
    at one token) that runs the packed form of the batch it is called on and returns the padded call's
    pooled logits.

    The score is read where the padded forward reads it (transformers' GenericForSequenceClassification):
    the rightmost token that is not the pad token, found by the same rule on the same padded ids; with pad
    == eos (Phi) that is the token before a closing end-of-turn, which is where PPO reads the reward too
    (rl.functional.reward_readout_index). The backbone sees each sequence alone (block-diagonal attention
    from the position ids), so its hidden state there is the padded one's."""
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    def forward(input_ids=None, attention_mask=None, **kwargs):
        index = packed["packed_index"]
        # PEFT passes return_dict=True and the other output switches as None: anything more (labels, hidden
        # states, attentions, embeddings) is not the call this answers, nor a call on another batch
        asked = {k for k, v in kwargs.items() if v not in (None, False) and k not in ("use_cache", "return_dict")}
        if input_ids is None or input_ids.shape != index.shape or asked:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=packed["packed_input_ids"], position_ids=packed["packed_position_ids"], use_cache=False
        ).last_hidden_state
        pad = model.config.get_text_config().pad_token_id
        if pad is None:  # transformers reads the last column (it allows one row only then)
            last = attention_mask.sum(1) - 1
        else:
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (columns * (input_ids != pad)).argmax(-1)
        at = index[torch.arange(len(index), device=index.device), last]
        return SequenceClassifierOutputWithPast(logits=model.score(hidden.flatten(0, 1)[at]))

    return forward


def make_trainer(args, model, tokenizer, train_pairs, eval_pairs=None, padding_free: bool = True, **extra):
    """TRL's RewardTrainer on our full sequences (chosen_ids / rejected_ids), with padding-free batches
    unless `padding_free` is false (core.training.PaddingFree, packed_score_forward)."""
    from trl import RewardTrainer

    class PackedRewardTrainer(PaddingFree, RewardTrainer):
        _pack_batches = padding_free

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._use_packing()

        def packed_forward(self, model, original, packed):
            return packed_score_forward(model, original, packed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with self.packed(inputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with progress("reward: setting up the trainer"):
        return PackedRewardTrainer(
            model=model,
            args=args,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=tokenizer,
            **extra,
        )


def as_reward_rows(pairs):
    """Full sequences (prompt + reply through its end-of-turn token) as RewardTrainer's chosen_ids /
    rejected_ids; seeing them already tokenized, it does not tokenize again."""
    return pairs.map(
        lambda r: {
            "chosen_ids": r["prompt_ids"] + r["chosen_ids"],
            "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
        },
        remove_columns=["prompt_ids"],
    )


def run(recipe: Recipe) -> dict:
    from trl import RewardConfig

    setup = prepare_preference_stage(recipe, "reward", RewardConfig)
    start, tokenizer, args, pairs = setup.start, setup.tokenizer, setup.args, setup.pairs
    as_reward = {name: as_reward_rows(ds) for name, ds in pairs.items()}

    model = load_model(recipe, task="seq_cls", merge=start, num_labels=1)
    model = add_lora(model, recipe, task="seq_cls")  # PEFT saves the score head with the adapter
    trainable, total = count_parameters(model)
    log.info("LoRA + score head: %d trainable of %d parameters", trainable, total)

    trainer = make_trainer(
        args, model, tokenizer, as_reward["train"], as_reward["eval"], padding_free=recipe.reward.padding_free
    )
    pad = tokenizer.pad_token_id
    place_for_eval(model, args, recipe)
    before = pairwise_accuracy(model, pairs["eval"], pad, args.per_device_eval_batch_size)
    trained = train(trainer, model, recipe, "reward", setup.checkpoint)
    after = pairwise_accuracy(model, pairs["eval"], pad, args.per_device_eval_batch_size)

    metrics = {
        "eval_accuracy_before": before["accuracy"],
        "eval_accuracy": after["accuracy"],
        "eval_margin_before": before["margin"],
        "eval_margin": after["margin"],
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "reward", tokenizer, metrics, reports=setup.reports)
    if setup.main_process:
        print_summary(
            STAGES["reward"].summary_title,
            [
                ("held-out pair accuracy", f"{before['accuracy']:.0%} -> {after['accuracy']:.0%}"),
                ("mean margin", f"{before['margin']:.3f} -> {after['margin']:.3f}"),
                (
                    "trained",
                    f"{metrics['global_steps']} steps on {len(pairs['train'])} pairs, "
                    f"{metrics['train_runtime_s']:.1f}s",
                ),
                ("data", setup.data_summary()),
                ("started from", ", ".join(start) or "the base"),
                ("output", str(out)),
            ],
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("reward", run, argv)


if __name__ == "__main__":
    sys.exit(main())
