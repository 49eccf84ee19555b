"""Held-out checks shared by the stages: greedy answers and their correctness rate."""

from __future__ import annotations

import torch

from .chat_template import ChatTemplate, end_of_turn_ids, tokenize_prompt


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def generate_answers(model, tokenizer, template: ChatTemplate, conversations: list[list[dict]],
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy replies to each conversation's last turn, stopped at the end-of-turn token.

    Prompts are left-padded (batched generation needs it) and carry their attention mask.
    """
    stop = end_of_turn_ids(tokenizer, template)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(conversations), batch_size):
        prompts = [tokenize_prompt(tokenizer, c) for c in conversations[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
                           + ("" if cut < len(row) else " [no end-of-turn]"))
    model.train(was_training)
    return replies


def correctness(rows: list[dict], replies: list[str]) -> float | None:
    """Share of replies equal to the row's reference `answer` (None when rows have none).

    A reply counts only if it is the answer and then stops: a model that does not end its turn
    is wrong, as it would be for a user.
    """
    scored = [(r["answer"], reply) for r, reply in zip(rows, replies) if "answer" in r]
    if not scored:
        return None
    return sum(normalise(a) == normalise(b) for a, b in scored) / len(scored)


@torch.no_grad()
def eval_loss(model, dataset, pad_token_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy over every label token of `dataset` (input_ids / labels columns).

    Computed here rather than by Trainer.evaluate, which cannot run before training under
    DeepSpeed ZeRO-2 ("ZeRO inference only makes sense with ZeRO Stage 3"). Token-weighted, so
    the figure does not depend on the batch size; with several processes each takes a shard and
    the sums are all-reduced.
    """
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    rows = list(range(rank, len(dataset), world))
    for start in range(0, len(rows), batch_size):
        batch = dataset.select(rows[start : start + batch_size])
        width = max(len(x) for x in batch["input_ids"])
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_labels = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += torch.stack([loss.double(), (shift_labels != -100).sum().double()])
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()
