"""Token lists to tensors: the one place padding and packing are done.

Padding makes [B, L] batches (right-padded for scoring and loss, left-padded for generation). Packing
is padding-free: sequences laid end to end in rows, each with position ids restarting at 0 and no
attention mask. From those position ids transformers builds a block-diagonal causal mask on SDPA and
eager (`masking_utils.find_packed_sequence_indices`, which needs use_cache=False and no 2D mask), and
FlashAttention-2 reads the sequence boundaries (`cu_seq_lens`, varlen) when everything is one row. No
FLOP goes to padding and no sequence attends to another; tests/core/test_batching.py checks the logits.
"""

from __future__ import annotations

import torch

# The keys a PackingCollator adds to a padded batch (popped again before the batch reaches a model).
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_index")


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention mask [B, L]) with `pad_id` on the `side` ("left" for generation, whose
    prompts must end together; "right" for scoring and loss)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation needs the prompts' ends aligned)."""
    return pad(seqs, pad_id, side="left")


# ----------------------------------------------------------------------------- packing a dataset (SFT)


def pack_rows(dataset, max_length: int):
    """Tokenized rows packed best-fit-decreasing (TRL's `bfd`) into rows of at most max_length tokens,
    with a `seq_lengths` column; whole conversations only (rows over max_length were dropped before)."""
    from trl import pack_dataset

    return pack_dataset(
        dataset.select_columns(["input_ids", "labels"]), max_length, "bfd", {"desc": "Packing train dataset"}
    )


class PackedRowsCollator:
    """Batches of packed rows for SDPA / eager attention: [B, L] right-padded, `position_ids` restarting
    at 0 for every packed sequence and no attention mask, so transformers builds a block-diagonal
    causal mask per row from the position ids (masking_utils.find_packed_sequence_indices; needs
    use_cache=False, which SFTTrainer passes). Attention costs sum over rows of L^2, not (B*L)^2 as
    TRL's padding-free collator (one flattened row, meant for flash-attn varlen) would on SDPA.
    Pad tokens get position 0 each: every one is its own sequence, and no real token attends to it."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        batch.pop("attention_mask")  # a 2D mask would switch off the per-row packed-sequence mask
        return batch


# ----------------------------------------------------------------------------- packing one batch (DPO, reward)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the fullest
    bin it fits. TRL's `bfd` does this to a whole dataset's table (trl.pack_dataset); a preference batch
    packs its own sequences, a few dozen at most, so a plain loop does."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=room.__getitem__)
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def row_tokens(config) -> int:
    """How long a packed row may grow beyond the longest sequence of its batch on SDPA / eager, for a model
    of this config: while attention over the row stays under a tenth of each token's other work. Masked
    attention scores every pair of the row, about 4*W*d FLOPs per token and layer for a row of W tokens,
    against 2*(4*d^2 + 2*d*ffn) in the layer's linear maps, so W <= (2*d + ffn) / 10. Phi-2's width: 1,536
    tokens (rows then hold a whole preference batch, no row padding); the tiny base: 76 (rows hold the
    longest sequence, as when attention is a large share of the work)."""
    d = config.hidden_size
    return (2 * d + (getattr(config, "intermediate_size", None) or 4 * d)) // 10


def pack(
    seqs: list[list[int]], pad_id: int, width: int | None = None, one_row: bool = False, capacity: int = 0
) -> dict:
    """`seqs` packed padding-free, with the map back to their right-padded [N, width] layout:

    - `packed_input_ids` [R, W]: the sequences end to end, rows right-padded with `pad_id`;
    - `packed_position_ids` [R, W]: 0, 1, ... within each sequence; 0 at every pad (each its own sequence);
    - `packed_index` [N, width]: where token t of sequence n sits in the flattened packed tensor, -1 where
      the padded layout has padding.

    Rows hold at most `capacity` tokens or the longest sequence, whichever is more (best-fit-decreasing):
    with the default, a packed batch is never wider than the padded one and SDPA's masked attention over R
    rows of W^2 stays under the padded N rows of L^2; `row_tokens` says how much longer rows may be
    before attention outweighs what fewer, fuller rows save. `one_row` lays everything in one row in
    order: FlashAttention-2's varlen kernel wants that (it reads the boundaries from the position ids and
    computes no masked scores)."""
    lengths = [len(s) for s in seqs]
    width = width or max(lengths)
    rows = [list(range(len(seqs)))] if one_row else best_fit_decreasing(lengths, max(max(lengths), capacity))
    W = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), W), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), W), dtype=torch.long)
    index = torch.full((len(seqs), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(seqs[i], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            index[i, :n] = torch.arange(r * W + at, r * W + at + n)
            at += n
    return {"packed_input_ids": ids, "packed_position_ids": positions, "packed_index": index}


class PackingCollator:
    """A right-padding collator's batch, plus the same sequences packed (`pack`, keys PACKED_KEYS).

    The padded batch stays what the trainer's loss code reads (its masks, labels and shapes); the model
    runs on the packed tensors instead (see core.training.PaddingFree), and its per-sequence outputs are
    laid back out in the padded shape with `unpack`. The sequences are read from the padded batch itself
    (`input_ids` where `attention_mask` is 1), so this wraps TRL's DPO and reward collators alike."""

    def __init__(self, inner, pad_token_id: int, one_row: bool = False, capacity: int = 0):
        self.inner, self.pad_token_id, self.one_row, self.capacity = inner, pad_token_id, one_row, capacity

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1)
        if not bool((mask.bool() == (torch.arange(ids.shape[1]) < lengths[:, None])).all()):
            raise ValueError("PackingCollator needs a right-padded batch (every sequence from column 0)")
        seqs = [row[: int(n)].tolist() for row, n in zip(ids, lengths)]
        packed = pack(seqs, self.pad_token_id, width=ids.shape[1], one_row=self.one_row, capacity=self.capacity)
        return {**batch, **packed}


def to_packed(padded: torch.Tensor, index: torch.Tensor, shape, fill) -> torch.Tensor:
    """A padded [N, L] tensor's real entries at their packed places (`pack`'s `packed_index`); `fill`
    elsewhere."""
    out = padded.new_full(tuple(shape), fill)
    real = index >= 0
    out.view(-1)[index[real]] = padded[real]
    return out


def unpack(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A packed [R, W, ...] tensor laid out as the padded [N, L, ...] one, zeros at the padding (the
    gather is differentiable: gradients flow back to the packed places)."""
    flat = packed.reshape(-1, *packed.shape[2:])
    flat = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])  # the last slot is the padding's zero
    return flat[index.where(index >= 0, len(flat) - 1)]


def unpack_next_token(packed: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Next-token figures of a packed batch (`packed` [R, W-1]: position w scores token w+1 of its row)
    laid out as the padded batch's [N, L-1] (position t scores token t+1 of its sequence), zeros where
    token t+1 is padding, as a causal LM's shifted outputs on the padded batch are. Token t of sequence n
    sits at flat r*W + w; its shifted place is r*(W-1) + w, i.e. the flat index less its row."""
    here, after = index[:, :-1], index[:, 1:]
    shifted = (here - here.div(width, rounding_mode="floor")).where(after >= 0, -1)
    return unpack(packed, shifted)
