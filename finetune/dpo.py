"""DPO stage: LoRA direct preference optimisation on top of the SFT model.

    accelerate launch finetune/dpo.py RECIPE [key=value ...]
    finetune dpo RECIPE [key=value ...]

load recipe -> pairs -> SFT-merged base + new LoRA (reference = adapters disabled = the SFT model)
-> held-out DPO figures and correctness before -> train (TRL DPOTrainer) -> after -> save -> summary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from finetune.core import distributed
from finetune.core.batching import to_packed, unpack_next_token
from finetune.core.evaluation import Samples, dpo_eval, held_out_correctness
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.progress import progress
from finetune.core.summary import print_summary, rate
from finetune.core.training import (
    PaddingFree,
    ReferenceIsTheStart,
    place_for_eval,
    prepare_preference_stage,
    save_stage,
    train,
)
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError

log = logging.getLogger("finetune.dpo")


# The per-token fields of TRL's fused LM head output (trl.trainer.utils.FusedCausalLMOutput)
NEXT_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
# Config fields that scale or cap a model's logits, which TRL's fused head applies and target_log_probs does not
LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
VOCAB_TILE = 32768  # the vocabulary columns per tile TRL's fused head uses (trl.trainer.utils)


def head_outputs(use_weighting: bool) -> tuple[str, ...]:
    """The per-token fields TRL 1.16's DPOTrainer asks its fused head for (DPOTrainer.__init__)."""
    return ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if use_weighting else ())


def target_log_probs(model, ids, positions, targets, outputs: tuple[str, ...], kwargs: dict):
    """TRL's fused LM head (trl.kernels.ChunkedLogProbFunction) on the positions that have a target only.

    TRL scores only those on a Triton device (CUDA); elsewhere, the CPU included, its fused forward scores
    every position, prompts and padding too (`add_fused_lm_head`: compact only where Triton runs, so that
    tile shapes stay fixed for compilers), and with a 51,200-token head that is most of a small model's
    work. Same kernel, same result at the scored positions, zeros elsewhere as TRL's. None where TRL's head
    does more than this (scaled or soft-capped logits, a sharded FSDP head, MoE router logits): the caller
    then runs TRL's."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    if (
        any(getattr(text, key, None) is not None for key in LOGIT_SCALING)
        or kwargs.get("output_router_logits")
        or type(head.weight.data) is not torch.Tensor  # a DTensor (FSDP2)
        or not hasattr(model, "base_model")
    ):
        return None
    hidden = model.base_model(input_ids=ids, position_ids=positions, **{**kwargs, "use_cache": False})
    hidden = hidden.last_hidden_state[:, :-1].to(head.weight.device)
    labels = targets[:, 1:].to(head.weight.device)
    mask = labels != -100
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        per_token = ChunkedLogProbFunction.apply(
            hidden[mask], head.weight, head.bias, labels[mask], 1.0, VOCAB_TILE, None, 1.0, outputs
        )
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    return FusedCausalLMOutput(
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


def packed_causal_lm_forward(model, original, packed: dict, outputs: tuple[str, ...]):
    """The forward of a causal LM with TRL's fused LM head (`model(..., labels=, fused_lm_head=True)`) that
    runs the packed form of the batch it is called on and returns the padded call's output.

    Why this is exact, although TRL 1.16 switched padding-free DPO off (trl#6972: since its DPO rewrite the
    loss sums each row of the batch and splits the rows into chosen and rejected, which a flattened batch
    breaks; its earlier padding-free relied on flash-attention alone): TRL's loss code never sees the packed
    batch. The packed rows give every sequence its own position ids and no attention mask, so attention is
    block-diagonal (SDPA / eager: transformers' mask from the position ids; FlashAttention: one row, varlen);
    each sequence's first token is no target (its label is -100 in the packed row, so the previous sequence's
    last token scores nothing); and the per-token log-probs (and the entropy, mean logit and top-1 figures
    TRL logs) are laid back out in the padded [2B, L-1] shape, zero at the padding as TRL's head leaves them.
    Per-sequence sums, the chosen / rejected split and every loss type are then TRL's own code. The LM head
    scores only the positions that have a target (target_log_probs)."""

    def forward(*args, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        index = packed["packed_index"]
        if args or not fused_lm_head or input_ids is None or input_ids.shape != index.shape:
            # anything but TRL's log-prob call on this batch (e.g. the logits its deprecated
            # `return_outputs` recomputes) runs as it was asked
            return original(
                *args,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=fused_lm_head,
                **kwargs,
            )
        ids, positions = packed["packed_input_ids"], packed["packed_position_ids"]
        targets = to_packed(labels, index, ids.shape, -100).masked_fill(positions == 0, -100)
        out = target_log_probs(model, ids, positions, targets, outputs, kwargs)
        if out is None:
            out = original(input_ids=ids, position_ids=positions, labels=targets, fused_lm_head=True, **kwargs)
        fields = {
            name: None if getattr(out, name) is None else unpack_next_token(getattr(out, name), index, ids.shape[1])
            for name in NEXT_TOKEN_FIELDS
        }
        loss = -fields["log_probs"].sum() / fields["label_mask"].sum().clamp(min=1)  # the head's own loss rule
        return type(out)(loss=loss, aux_loss=out.aux_loss, **fields)

    return forward


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(PaddingFree, ReferenceIsTheStart, DPOTrainer):
        """DPOTrainer fed prompt_ids / chosen_ids / rejected_ids built by finetune.chat_template, with
        padding-free batches when `args.padding_free` (core.training.PaddingFree, packed_causal_lm_forward).

        TRL would re-render and re-tokenize the conversations itself (and, for conversational rows,
        train the tokens after the end-of-turn token too); our rows already hold exactly the
        inference prompt and each reply through its end-of-turn token, and over-long rows were
        counted and dropped, so preparation is skipped.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def __init__(self, *args, **kwargs):
            config = kwargs["args"]
            self._pack_batches = bool(config.padding_free)
            # TRL 1.16 would warn and fall back to padding (trl#6972); the packing is ours, so TRL sees it off
            config.padding_free = False
            try:
                super().__init__(*args, **kwargs)
            finally:
                config.padding_free = self._pack_batches
            self._use_packing()

        def packed_forward(self, model, original, packed):
            return packed_causal_lm_forward(model, original, packed, head_outputs(self.use_weighting))

        def _compute_loss(self, model, inputs, return_outputs):
            with self.packed(inputs):
                return super()._compute_loss(model, inputs, return_outputs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._use_packing()  # runs inside DPOTrainer.__init__: the reference pass packs as training does
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model, batch):
            with self.packed(batch):
                return super().compute_ref_log_probs(model, batch)

    return PreTokenizedDPOTrainer


def make_trainer(args, model, tokenizer, train_pairs, eval_pairs=None, **extra):
    """TRL's DPOTrainer on our tokenized pairs. TRL already runs chosen and rejected as one
    concatenated forward (batch = [chosen; rejected]) and reads log-probs from the fused LM head;
    with `precompute_ref_log_probs` the reference runs once over the data before training."""
    with progress("dpo: setting up the trainer"):
        return _trainer_class()(
            model=model,
            args=args,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=tokenizer,
            **extra,
        )


def summarise(metrics: dict, train_pairs: int, replies: list[str], start: list[str], out: Path) -> None:
    """DPO's closing summary, from its metrics."""
    m = metrics
    print_summary(
        STAGES["dpo"].summary_title,
        [
            ("held-out DPO loss", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}"),
            ("reward accuracy", f"{m['eval_rewards_accuracy_before']:.0%} -> {m['eval_rewards_accuracy']:.0%}"),
            ("reward margin", f"{m['eval_rewards_margin_before']:.3f} -> {m['eval_rewards_margin']:.3f}"),
            (
                "held-out correct",
                f"{rate(m['correct_rate_start'])} (start model) -> {rate(m['correct_rate_after'])} (DPO)",
            ),
            ("trained", f"{m['global_steps']} steps on {train_pairs} pairs, {m['train_runtime_s']:.1f}s"),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("started from", ", ".join(start) or "the base"),
            ("output", str(out)),
        ],
    )


def run(recipe: Recipe) -> dict:
    from trl import DPOConfig

    section = recipe.dpo
    setup = prepare_preference_stage(recipe, "dpo", DPOConfig)
    start, template, tokenizer, args, pairs = setup.start, setup.template, setup.tokenizer, setup.args, setup.pairs
    eval_rows = setup.eval_rows
    if args.precompute_ref_log_probs and distributed.world_size() > 1:
        # Seen with TRL 1.16 + datasets 5.2 on 2 processes: the precompute map reads a cache file that
        # only the other process's temporary folder holds (FileNotFoundError on *.arrow).
        raise RecipeError(
            f"{recipe.source}: dpo.precompute_ref_log_probs: not supported with several processes "
            "yet; set dpo.precompute_ref_log_probs=false (the reference then runs each step) or run "
            "one process"
        )

    model = add_lora(load_model(recipe, merge=start), recipe)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable of %d parameters; reference = the start model (adapters disabled)", trainable, total)

    # no eval set for TRL: the held-out figures are ours (dpo_eval), and with precomputed reference log-probs TRL
    # would run a reference pass over the held-out pairs too, for nothing
    trainer = make_trainer(args, model, tokenizer, pairs["train"])
    pad, beta = tokenizer.pad_token_id, args.beta
    place_for_eval(model, args, recipe)
    before = dpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_before, _ = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples = Samples(recipe)
    samples.answer("start", model, tokenizer, template)  # the SFT model: the start, adapters of this stage new
    trained = train(trainer, model, recipe, "dpo", setup.checkpoint)
    after = dpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_after, replies = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples.answer("dpo", model, tokenizer, template)

    metrics = {
        "eval_loss_before": before["loss"],
        "eval_loss": after["loss"],
        "eval_rewards_accuracy_before": before["rewards_accuracy"],
        "eval_rewards_accuracy": after["rewards_accuracy"],
        "eval_rewards_margin_before": before["rewards_margin"],
        "eval_rewards_margin": after["rewards_margin"],
        # correctness of greedy answers on held-out prompts: the start (SFT) model vs the DPO model
        "correct_rate_start": correct_before,
        "correct_rate_after": correct_after,
        "beta": beta,
        "loss_type": list(args.loss_type),
        "sample_prompts": len(samples.prompts),
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "dpo", tokenizer, metrics, samples=samples.rows(), reports=setup.reports)
    if setup.main_process:
        summarise(metrics, len(pairs["train"]), replies, start, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("dpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
