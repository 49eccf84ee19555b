"""Padding-free DPO and reward training equal the padded path: the same trainer, the same model, one batch
collated twice (TRL's padded batch, and with its sequences packed), the loss, every gradient and the
figures TRL logs compared, on the tiny base and on a 2-layer model of Phi-2's width (hidden 2560, 32
heads, partial rotary 0.4, vocabulary 51200; fp32), for each DPO loss the recipes use, the reward loss
and the precomputed reference log-probs."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from tests.conftest import TINY_RECIPE

PAIRS = 4  # one batch: 8 sequences of 3 to 16 tokens, long-tailed like real preference data


def _recipe(tmp_path, *overrides):
    from finetune.recipe import load_recipe

    return load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "precision=fp32", *overrides])


def _phi2_width_config(task: str):
    """Phi-2's width and shape rules with 2 layers and a small FFN (the width is what the numerics and the
    51,200-token head see; the FFN only adds seconds)."""
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=51200,
        hidden_size=2560,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=256,
        num_hidden_layers=2,
        partial_rotary_factor=0.4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        num_labels=1,
        pad_token_id=0,
    )


_WEIGHTS: dict = {}


def _model(recipe, which: str, task: str):
    """The base with a new LoRA adapter. A trainer adds its own pieces to a model (TRL's fused LM head, a
    "ref" adapter), so each case gets a fresh one; at Phi-2's width the random weights are drawn once and
    shared (the base is frozen, LoRA adds its own tensors)."""
    from transformers import PhiForCausalLM, PhiForSequenceClassification
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    from finetune.core.modeling import add_lora, load_model

    torch.manual_seed(0)
    if which == "tiny":
        base = load_model(recipe, task=task, **({"num_labels": 1} if task == "seq_cls" else {}))
    else:
        cls = PhiForCausalLM if task == "causal_lm" else PhiForSequenceClassification
        with torch.device("meta"):
            base = cls._from_config(_phi2_width_config(task), attn_implementation="sdpa", dtype=torch.float32)
        if task not in _WEIGHTS:
            _WEIGHTS[task] = {k: torch.randn(v.shape) * 0.02 for k, v in base.state_dict().items()}
            _WEIGHTS[task].update({k: torch.ones(v.shape) for k, v in base.state_dict().items() if "layernorm" in k})
        base.load_state_dict(_WEIGHTS[task], assign=True)
        base.model.rotary_emb = PhiRotaryEmbedding(base.config)  # its buffers are not in the state dict
    return add_lora(base, recipe, task=task)


def _randomize_lora(model):
    """A new adapter has lora_B = 0, where lora_A gets no gradient: start from a trained-looking one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _pairs(pad_id: int):
    """Token lists; some replies end in the pad id (Phi: pad == eos), as the end-of-turn token does."""
    from datasets import Dataset

    rng = random.Random(0)
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, c, r in [(3, 2, 9), (8, 6, 3), (2, 1, 1), (4, 12, 7)][:PAIRS]:
        rows["prompt_ids"].append([rng.randrange(5, 400) for _ in range(p)])
        rows["chosen_ids"].append([rng.randrange(5, 400) for _ in range(c - 1)] + [pad_id])
        rows["rejected_ids"].append([rng.randrange(5, 400) for _ in range(r)])
    return Dataset.from_dict(rows)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _shapes_run(trainer):
    """The shapes of the token tensors the transformer under the LM or score head runs on, in this block."""
    seen = []
    hook = trainer._inner(trainer.model).base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple((args[0] if args else kwargs["input_ids"]).shape)),
        with_kwargs=True,
    )
    try:
        yield seen
    finally:
        hook.remove()


def _loss_and_grads(trainer, batch):
    """The loss, gradients and logged figures of one batch, and the shapes of what the layers ran on."""
    model = trainer.model
    model.zero_grad()
    trainer._total_train_tokens = 0  # TRL's num_tokens figure counts real tokens over the run
    with _shapes_run(trainer) as seen:
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), _grads(model), metrics, seen


def _assert_same(padded, packed, rtol):
    """Equal to fp32 rounding: the loss and figures to `rtol`; each gradient tensor to `rtol` elementwise
    or 10 * rtol of its largest entry (sums of a few hundred products, added in another order)."""
    (loss_a, grads_a, metrics_a, _), (loss_b, grads_b, metrics_b, _) = padded, packed
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0.0)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for name, a in grads_a.items():
        atol = 10 * rtol * float(a.abs().max())
        torch.testing.assert_close(grads_b[name], a, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=rtol, abs=1e-6), key


def _check_both(trainer, padded, packed, rtol):
    """The padded batch runs padded and the packed one packed (every forward of the step: the policy's and,
    with the reference in the step, the reference's), with the same loss, gradients and figures."""
    a, b = _loss_and_grads(trainer, padded), _loss_and_grads(trainer, packed)
    assert a[3] and set(a[3]) == {tuple(padded["input_ids"].shape)}
    assert b[3] and set(b[3]) == {tuple(packed["packed_input_ids"].shape)}
    _assert_same(a, b, rtol)


def _collate_both(trainer, dataset):
    examples = [dataset[i] for i in range(len(dataset))]
    packed = trainer.data_collator(examples)
    padded = trainer.data_collator.inner(examples)
    assert "packed_input_ids" in packed and "packed_input_ids" not in padded
    ids = packed["packed_input_ids"]
    assert ids.shape[0] < padded["input_ids"].shape[0]  # several sequences share rows
    assert ids.numel() < padded["input_ids"].numel()  # and fewer positions go through the model
    return padded, packed


RTOL = {"tiny": 1e-5, "phi2-width": 1e-4}


@pytest.mark.parametrize("which", ["tiny", "phi2-width"])
def test_dpo_packed_equals_padded(tmp_path, tiny_base, which):
    """sigmoid + sft (the tiny recipe's losses) with the reference in the step, and ipo (length-normalised:
    it reads the completion mask) with precomputed reference log-probs, whose pass runs packed too."""
    from trl import DPOConfig

    from finetune import dpo
    from finetune.core.batching import PackingCollator
    from finetune.core.modeling import load_tokenizer
    from finetune.core.training import trl_config

    rtol = RTOL[which]
    for losses, precompute in ((["sigmoid", "sft"], False), (["ipo"], True)):
        recipe = _recipe(
            tmp_path,
            f"dpo.loss_type={losses}",
            f"dpo.loss_weights={[1.0] * len(losses)}",
            f"dpo.precompute_ref_log_probs={str(precompute).lower()}",
            f"training.per_device_train_batch_size={PAIRS}",
        )
        tokenizer = load_tokenizer(recipe)
        args = trl_config(recipe, "dpo", DPOConfig, eval_strategy="no")
        assert args.padding_free  # finetune's default, which TRL's own DPOTrainer would switch off
        model = _model(recipe, which, "causal_lm")
        trainer = dpo.make_trainer(args, model, tokenizer, _pairs(tokenizer.pad_token_id))
        assert args.padding_free and isinstance(trainer.data_collator, PackingCollator)
        if precompute:  # the reference pass itself ran packed; the same pass over a padded batch agrees
            examples = [trainer.train_dataset[i] for i in range(PAIRS)]
            padded, packed = _collate_both(trainer, trainer.train_dataset)
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                assert key in padded and packed[key].tolist() == [e[key] for e in examples]
            with _shapes_run(trainer) as seen_padded:
                ref_padded = trainer.compute_ref_log_probs(trainer.model, dict(padded))
            with _shapes_run(trainer) as seen_packed:
                ref_packed = trainer.compute_ref_log_probs(trainer.model, dict(packed))
            assert seen_padded == [tuple(padded["input_ids"].shape)]
            assert seen_packed == [tuple(packed["packed_input_ids"].shape)]
            for a, b in zip(ref_padded, ref_packed):
                torch.testing.assert_close(b, a, rtol=rtol, atol=1e-6)
            torch.testing.assert_close(ref_packed[0], packed["ref_chosen_logps"], rtol=rtol, atol=1e-6)
        _randomize_lora(model)
        model.train()
        padded, packed = _collate_both(trainer, trainer.train_dataset)
        _check_both(trainer, padded, packed, rtol)


@pytest.mark.parametrize("which", ["tiny", "phi2-width"])
def test_reward_packed_equals_padded(tmp_path, tiny_base, which):
    """The reward loss (-log sigmoid(r_chosen - r_rejected)), its gradients and logged figures; the score is
    read where transformers reads it on the padded batch (the last token that is not pad), which the
    chosen replies ending in the pad id exercise."""
    from trl import RewardConfig

    from finetune import reward
    from finetune.core.modeling import load_tokenizer
    from finetune.core.training import trl_config

    rtol = RTOL[which]
    recipe = _recipe(tmp_path, f"training.per_device_train_batch_size={PAIRS}")
    assert recipe.reward.padding_free
    tokenizer = load_tokenizer(recipe)
    args = trl_config(recipe, "reward", RewardConfig, eval_strategy="no")
    model = _model(recipe, which, "seq_cls")
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = reward.as_reward_rows(_pairs(tokenizer.pad_token_id))
    trainer = reward.make_trainer(args, model, tokenizer, rows, padding_free=recipe.reward.padding_free)
    _randomize_lora(model)
    model.train()
    padded, packed = _collate_both(trainer, trainer.train_dataset)
    assert (padded["input_ids"] == tokenizer.pad_token_id).logical_and(padded["attention_mask"].bool()).any()
    _check_both(trainer, padded, packed, rtol)
