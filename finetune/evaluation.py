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
