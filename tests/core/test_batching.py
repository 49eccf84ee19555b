"""core.batching: padding, and packing a batch padding-free with the map back to its padded layout."""

from __future__ import annotations

import pytest
import torch

from finetune.core.batching import (
    PackingCollator,
    best_fit_decreasing,
    pack,
    pad,
    to_packed,
    unpack,
    unpack_next_token,
)

SEQS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
    bins = best_fit_decreasing([5, 4, 3, 2, 1], capacity=5)
    assert bins == [[0], [1, 4], [2, 3]]
    assert best_fit_decreasing([2, 2, 2], capacity=2) == [[0], [1], [2]]


def test_pack_lays_sequences_in_rows_no_wider_than_the_longest():
    packed = pack(SEQS, pad_id=0)
    ids, positions, index = packed["packed_input_ids"], packed["packed_position_ids"], packed["packed_index"]
    assert ids.shape == (3, 5)  # 15 tokens in 3 rows of at most 5; the padded batch is 5 x 5
    flat = ids.view(-1)
    for n, s in enumerate(SEQS):
        at = index[n, : len(s)]
        assert flat[at].tolist() == s and positions.view(-1)[at].tolist() == list(range(len(s)))
        assert (index[n, len(s) :] == -1).all()
    assert sorted(index[index >= 0].tolist()) == sorted(set(index[index >= 0].tolist()))  # one place per token
    assert (positions.view(-1)[flat == 0] == 0).all()  # row padding: position 0, a sequence of its own
    one = pack(SEQS, pad_id=0, one_row=True)
    assert one["packed_input_ids"].tolist() == [sum(SEQS, [])]
    longer = pack(SEQS, pad_id=0, capacity=8)  # rows may outgrow the longest sequence: fuller, fewer rows
    assert longer["packed_input_ids"].shape == (2, 8)


def test_rows_grow_with_the_model_width():
    """A row may hold a whole preference batch at Phi-2's width, only the longest sequence on the tiny base."""
    from transformers import PhiConfig

    from finetune.core.batching import row_tokens

    assert row_tokens(PhiConfig(hidden_size=2560, intermediate_size=10240)) == 1536
    assert row_tokens(PhiConfig(hidden_size=128, intermediate_size=512)) == 76


def test_to_packed_and_unpack_are_inverse_on_the_real_tokens():
    padded, mask = pad(SEQS, pad_id=0)
    packed = pack(SEQS, pad_id=0)
    index = packed["packed_index"]
    assert torch.equal(to_packed(padded, index, packed["packed_input_ids"].shape, 0), packed["packed_input_ids"])
    values = torch.randn(*packed["packed_input_ids"].shape, 3, requires_grad=True)
    back = unpack(values, index)
    assert back.shape == (5, 5, 3) and (back[mask == 0] == 0).all()
    back.sum().backward()  # every real token's place gets gradient 1, row padding none
    assert torch.equal(values.grad[..., 0].view(-1) != 0, torch.zeros(15).index_fill(0, index[index >= 0], 1).bool())


def test_packing_collator_keeps_the_padded_batch_and_refuses_left_padding():
    def inner(examples):
        ids, mask = pad([e["ids"] for e in examples], pad_id=0)
        return {"input_ids": ids, "attention_mask": mask}

    batch = PackingCollator(inner, pad_token_id=0)([{"ids": s} for s in SEQS])
    assert torch.equal(batch["input_ids"], pad(SEQS, 0)[0]) and batch["packed_input_ids"].shape == (3, 5)

    def left(examples):
        ids, mask = pad([e["ids"] for e in examples], pad_id=0, side="left")
        return {"input_ids": ids, "attention_mask": mask}

    with pytest.raises(ValueError, match="right-padded"):
        PackingCollator(left, pad_token_id=0)([{"ids": s} for s in SEQS])


@pytest.mark.parametrize("attn,one_row,capacity", [("sdpa", False, 0), ("eager", False, 20), ("sdpa", True, 0)])
def test_packed_next_token_log_probs_equal_the_padded_ones(tiny_base, attn, one_row, capacity):
    """The tiny base's next-token log-probs on the packed batch, laid out by unpack_next_token, equal the
    padded batch's (SDPA / eager rows; one row is FlashAttention's layout, checked here on SDPA). The
    control, the same packed rows without per-sequence position ids, lets sequences see each other and
    fails the same comparison."""
    from finetune.core.modeling import load_model
    from finetune.recipe import load_recipe
    from tests.conftest import TINY_RECIPE

    model = load_model(load_recipe(TINY_RECIPE, [f"model.attn_implementation={attn}"])).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 400, (n,), generator=g).tolist() for n in (7, 3, 12, 1, 9, 5)]
    ids, mask = pad(seqs, pad_id=0)
    packed = pack(seqs, pad_id=0, width=ids.shape[1], one_row=one_row, capacity=capacity)
    p_ids, p_pos, index = packed["packed_input_ids"], packed["packed_position_ids"], packed["packed_index"]

    def next_token_logps(logits, targets):
        return logits[:, :-1].log_softmax(-1).gather(-1, targets[:, 1:, None])[..., 0]

    with torch.no_grad():
        padded = next_token_logps(model(input_ids=ids, attention_mask=mask).logits, ids)
        padded = padded * mask[:, 1:]  # zero where the next token is padding
        run = model(input_ids=p_ids, position_ids=p_pos, use_cache=False).logits
        got = unpack_next_token(next_token_logps(run, p_ids), index, p_ids.shape[1])
        control = model(input_ids=p_ids, use_cache=False).logits
        leaked = unpack_next_token(next_token_logps(control, p_ids), index, p_ids.shape[1])
    torch.testing.assert_close(got, padded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaked, padded, rtol=1e-5, atol=1e-5)
