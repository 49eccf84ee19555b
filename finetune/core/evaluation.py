"""Held-out checks shared by the stages: greedy answers and their correctness rate, reward and DPO figures,
and the sample replies every chat-model stage saves (samples.jsonl)."""

from __future__ import annotations

import json
import logging
import math

import torch

from finetune.chat_template import ChatTemplate, end_of_turn_ids, least_tokens, tokenize_prompt
from finetune.errors import UserError
from finetune.recipe import STAGES, Recipe

from . import distributed
from .batching import left_pad, pad
from .data import DataReport, as_text, load_rows, to_prompt, train_eval_rows
from .modeling import context_length
from .progress import Progress, progress, track

log = logging.getLogger(__name__)


class Reply(str):
    """A generated reply, verbatim, that also says why generation stopped: `stop` is "end_of_turn" (the
    model ended its turn) or "max_new_tokens" (cut at the budget). A str, so it prints and compares as the
    text; its repr (used in summaries) adds "(no end-of-turn)" when cut."""

    stop: str

    def __new__(cls, text: str, stop: str = "end_of_turn"):
        reply = super().__new__(cls, text)
        reply.stop = stop
        return reply

    @property
    def ended(self) -> bool:
        return self.stop == "end_of_turn"

    def __repr__(self) -> str:
        return super().__repr__() + ("" if self.ended else " (no end-of-turn)")


def autocast_like_training(model):
    """The autocast the Trainer trains a 4-bit (QLoRA) model under, for the held-out checks too. Its parts are
    kept in mixed dtypes on purpose (peft's prepare_model_for_kbit_training keeps norms in fp32; TRL casts heads
    such as the reward model's score to bf16 on a 4-bit model), which only autocast reconciles; other models
    evaluate exactly as loaded."""
    import contextlib

    if not getattr(model, "is_loaded_in_4bit", False):
        return contextlib.nullcontext()
    dtypes = {p.dtype for p in model.parameters()}
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(reply: str, answer) -> bool:
    """Whether a reply gives the reference answer: equal text once case, spacing and a final period are
    ignored, or the same number however it is written (42 == 42.0 == "42"). Every place answers are compared
    uses this: held-out correctness, the exact_answer reward, the tiny lm-eval task. An answer that is not text
    or a number (null, NaN) matches nothing; the loaders count such rows (core.data.answer_of)."""
    answer = as_text(answer)
    if answer is None:
        return False
    a, b = normalise(str(reply)), normalise(answer)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and x == y


def prompt_tokens(
    conversations: list[list[dict]],
    tokenizer,
    max_new_tokens: int,
    context: int | None,
    names: list[str] | None = None,
    key: str = "max_new_tokens",
) -> list[list[int]]:
    """Tokens of each conversation's inference prompt, once it is known to leave room for `max_new_tokens` in
    the model's `context` (None: unknown, not checked). Past its context a rotary model runs on positions it
    never saw and writes garbage with no error, so a prompt without room is refused, every such prompt named
    (`names`, default its position) with `key`, the setting to lower. A prompt far too long is known to be
    without tokenizing it (chat_template.least_tokens), so a huge one cannot abort the tokenizer."""
    names = names or [f"prompt {i + 1}" for i in range(len(conversations))]
    room = None if context is None else context - max_new_tokens
    ids, over = [], []
    for conversation, name in zip(conversations, names):
        if room is not None:
            chars = sum(len(m["content"]) for m in conversation)
            least = least_tokens(chars, tokenizer)
            if least > room:
                over.append((name, f"{chars:,} characters, at least {least:,} tokens", least))
                continue
        p = tokenize_prompt(tokenizer, conversation)
        if room is not None and len(p) > room:
            over.append((name, f"{len(p)} tokens", len(p)))
        ids.append(p)
    if over:
        shown = "; ".join(f"{name} ({size})" for name, size, _ in over[:5])
        more = f"; and {len(over) - 5} more" if len(over) > 5 else ""
        fits = context - max(n for _, _, n in over)  # room for every prompt named, the longest included
        fix = f"lower {key} to at most {fits} for them, or shorten" if fits > 0 else "shorten"
        raise UserError(
            f"{len(over)} prompt(s) leave no room for {max_new_tokens} new token(s) ({key}) in the model's context of "
            f"{context} positions (max_position_embeddings), past which it writes garbage: {shown}{more}. {fix} "
            "those prompts"
        )
    return ids


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    template: ChatTemplate,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "generating answers",
    names: list[str] | None = None,
    key: str = "max_new_tokens",
) -> list[Reply]:
    """Greedy replies to each conversation's last turn, stopped at the end-of-turn token; each says whether
    it ended its turn or ran out of tokens (Reply.stop). Every prompt must leave room for `max_new_tokens` in
    the model's context (prompt_tokens: refused before anything is generated, naming `names` and `key`).

    Prompts are left-padded (batched generation needs it) and carry their attention mask.
    """
    stop = end_of_turn_ids(tokenizer, template)
    all_prompts = prompt_tokens(conversations, tokenizer, max_new_tokens, context_length(model.config), names, key)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    replies = []
    for start in track(range(0, len(all_prompts), batch_size), desc, unit="batches"):
        prompts = all_prompts[start : start + batch_size]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        width = ids.shape[1]
        with autocast_like_training(model):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            replies.append(
                Reply(
                    tokenizer.decode(row[:cut], skip_special_tokens=True).strip(),
                    "end_of_turn" if cut < len(row) else "max_new_tokens",
                )
            )
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
    return sum(same_answer(b, a) and getattr(b, "ended", True) for a, b in scored) / len(scored)


@torch.no_grad()
def eval_loss(model, dataset, pad_token_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy over every label token of `dataset` (input_ids / labels columns).

    Computed here rather than by Trainer.evaluate, which cannot run before training under
    DeepSpeed ZeRO-2 ("ZeRO inference only makes sense with ZeRO Stage 3"). Token-weighted, so
    the figure does not depend on the batch size; with several processes each takes a shard and
    the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    rows = distributed.shard(len(dataset))
    for start in track(range(0, len(rows), batch_size), "held-out loss", unit="batches"):
        batch = dataset.select(rows[start : start + batch_size])
        ids, mask = pad(batch["input_ids"], pad_token_id)
        labels, _ = pad(batch["labels"], -100)
        with autocast_like_training(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_labels = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += torch.stack([loss.double(), (shift_labels != -100).sum().double()])
    distributed.all_sum_(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def held_out_correctness(
    model,
    tokenizer,
    template: ChatTemplate,
    rows: list[dict],
    limit: int,
    max_new_tokens: int,
    budget_key: str = "the stage's max_new_tokens",
) -> tuple[float | None, list[str]]:
    """Greedy replies to up to `limit` held-out rows that carry an `answer`, and their correctness
    (the rows and prompts of `held_out_prompts`)."""
    rows, prompts = held_out_prompts(rows, limit)
    if not rows:
        return None, []
    replies = generate_answers(
        model,
        tokenizer,
        template,
        prompts,
        max_new_tokens,
        desc=f"held-out answers ({len(prompts)} prompts)",
        names=[r.get("where", f"held-out row {i + 1}") for i, r in enumerate(rows)],
        key=budget_key,
    )
    return correctness(rows, replies), replies


def held_out_prompts(rows: list[dict], limit: int) -> tuple[list[dict], list[list[dict]]]:
    """Up to `limit` held-out rows that carry an `answer`, and the prompt each is answered from.

    Rows are SFT conversations (the final assistant turn is dropped) or preference rows (prompt).
    A prompt that several rows share (preference data pairs one prompt with several rejected
    replies) is answered and counted once."""
    seen, kept, prompts = set(), [], []
    for r in rows:
        if "answer" not in r:
            continue
        prompt = (
            r["prompt"]
            if "prompt" in r
            else r["messages"][:-1]
            if r["messages"][-1]["role"] == "assistant"
            else r["messages"]
        )
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen and len(kept) < limit:
            seen.add(key)
            kept.append(r)
            prompts.append(prompt)
    return kept, prompts


def batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


@torch.no_grad()
def reward_scores(
    model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32, bar: Progress | None = None
) -> torch.Tensor:
    """Scalar reward of each full sequence (sequence-classification head); `bar` counts batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad(sequences[start : start + batch_size], pad_token_id)
        with autocast_like_training(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out.append(logits[:, 0].float().cpu())
        if bar is not None:
            bar.update(1)
    model.train(was_training)
    return torch.cat(out)


def pairwise_accuracy(model, dataset, pad_token_id: int, batch_size: int = 32) -> dict:
    """Share of pairs whose chosen reply scores above the rejected one, and the mean margin."""
    p = dataset["prompt_ids"]
    with progress("held-out pair scores", total=2 * batches(len(p), batch_size), unit="batches") as bar:
        chosen = reward_scores(model, [a + c for a, c in zip(p, dataset["chosen_ids"])], pad_token_id, batch_size, bar)
        rejected = reward_scores(
            model, [a + r for a, r in zip(p, dataset["rejected_ids"])], pad_token_id, batch_size, bar
        )
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item()}


@torch.no_grad()
def sequence_logps(
    model,
    prompts: list[list[int]],
    replies: list[list[int]],
    pad_token_id: int,
    batch_size: int = 32,
    bar: Progress | None = None,
    mean: bool = False,
) -> torch.Tensor:
    """Sum of log-probabilities of each reply given its prompt (with `mean`, per reply token); `bar` counts
    batches."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], replies[start : start + batch_size]
        ids, mask = pad([p + r for p, r in zip(ps, rs)], pad_token_id)
        with autocast_like_training(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        reply_mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(zip(ps, rs)):
            reply_mask[i, len(p) : len(p) + len(r)] = 1
        total = (logps * reply_mask[:, 1:].to(device)).sum(-1).cpu()
        out.append(total / torch.tensor([len(r) for r in rs]) if mean else total)
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def dpo_eval(model, dataset, beta: float, pad_token_id: int, batch_size: int = 32) -> dict:
    """Held-out DPO figures: implicit rewards beta * (log pi - log pi_ref) of chosen and rejected, their
    accuracy and margin, and the sigmoid DPO loss. The reference is the model with adapters disabled."""
    was_training = model.training
    model.eval()
    p, c, r = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    with progress("held-out DPO log-probs", total=4 * batches(len(p), batch_size), unit="batches") as bar:
        pol_c = sequence_logps(model, p, c, pad_token_id, batch_size, bar)
        pol_r = sequence_logps(model, p, r, pad_token_id, batch_size, bar)
        with model.disable_adapter():
            ref_c = sequence_logps(model, p, c, pad_token_id, batch_size, bar)
            ref_r = sequence_logps(model, p, r, pad_token_id, batch_size, bar)
    model.train(was_training)
    chosen, rejected = beta * (pol_c - ref_c), beta * (pol_r - ref_r)
    margin = chosen - rejected
    return {
        "rewards_accuracy": (margin > 0).float().mean().item(),
        "rewards_margin": margin.mean().item(),
        "loss": torch.nn.functional.softplus(-margin).mean().item(),
    }


def kto_eval(model, dataset, beta: float, pad_token_id: int, batch_size: int = 32) -> dict:
    """Held-out KTO figures on unpaired rows: the implicit reward beta * (log pi - log pi_ref) of each reply (the
    reference: the model with adapters disabled), the share of rows whose reward has the sign of their label
    (above 0 for a desirable reply, below for an undesirable one) and the margin between the mean rewards of
    desirable and undesirable replies."""
    was_training = model.training
    model.eval()
    p, c = dataset["prompt_ids"], dataset["completion_ids"]
    label = torch.tensor(dataset["label"], dtype=torch.bool)
    with progress("held-out KTO log-probs", total=2 * batches(len(p), batch_size), unit="batches") as bar:
        policy = sequence_logps(model, p, c, pad_token_id, batch_size, bar)
        with model.disable_adapter():
            reference = sequence_logps(model, p, c, pad_token_id, batch_size, bar)
    model.train(was_training)
    reward = beta * (policy - reference)
    right = torch.where(label, reward > 0, reward < 0)
    desirable = reward[label].mean().item() if label.any() else 0.0
    undesirable = reward[~label].mean().item() if (~label).any() else 0.0
    return {"rewards_accuracy": right.float().mean().item(), "rewards_margin": desirable - undesirable}


def orpo_eval(model, dataset, beta: float, pad_token_id: int, batch_size: int = 32) -> dict:
    """Held-out ORPO figures (no reference model): the reward beta * mean log-prob per reply token, as TRL's
    ORPOTrainer logs it (Hong et al. 2024, arXiv 2403.07691), the share of pairs whose chosen reply scores
    above the rejected one, and the mean margin."""
    was_training = model.training
    model.eval()
    p = dataset["prompt_ids"]
    with progress("held-out ORPO log-probs", total=2 * batches(len(p), batch_size), unit="batches") as bar:
        chosen = beta * sequence_logps(model, p, dataset["chosen_ids"], pad_token_id, batch_size, bar, mean=True)
        rejected = beta * sequence_logps(model, p, dataset["rejected_ids"], pad_token_id, batch_size, bar, mean=True)
    model.train(was_training)
    margin = chosen - rejected
    return {"rewards_accuracy": (margin > 0).float().mean().item(), "rewards_margin": margin.mean().item()}


# ---------------------------------------------------------------- samples a person reads


def first_turn(prompt: list[dict]) -> list[dict]:
    """A prompt cut after its first user turn (any system turn before it kept): one question per sample."""
    end = next(i for i, m in enumerate(prompt) if m["role"] == "user")
    return prompt[: end + 1]


def sample_prompts(recipe: Recipe) -> list[list[dict]]:
    """The fixed held-out prompts of `samples`: the first `samples.count` distinct first turns of
    `samples.data`, or of the held-out rows of the first stage with data. The loader's order is seeded by
    the recipe, so every stage of a recipe gets the same prompts."""
    s = recipe.samples
    if s.count == 0:
        return []
    if s.data:
        rows, _ = load_rows(s.data, recipe, True, DataReport(), recipe.seed, to_prompt)
    else:
        stage = next((st.name for st in STAGES if st.has_data and recipe.section(st.name) is not None), None)
        if stage is None:
            return []
        data = recipe.section(stage).data
        if data.eval:  # the held-out sources alone, in the order the stage reads them (same seed)
            rows, _ = load_rows(data.eval, recipe, True, DataReport(), recipe.seed, to_prompt)
        else:
            _, rows, _, _ = train_eval_rows(data, recipe, recipe.seed, to_prompt)
    seen, prompts = set(), []
    for row in rows:
        prompt = first_turn(row["prompt"])
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
        if len(prompts) == s.count:
            break
    return prompts


class Samples:
    """Greedy replies of one stage's models (e.g. before / after training) to the recipe's sample prompts,
    saved as `samples.jsonl` beside the stage's metrics: one row per prompt, one key per model."""

    def __init__(self, recipe: Recipe, prompts: list[list[dict]] | None = None):
        if prompts is None:
            try:
                prompts = sample_prompts(recipe)
            except UserError as e:  # samples are for reading: never the reason a long stage fails
                log.warning("samples.jsonl skipped: cannot read the sample prompts: %s", e)
                prompts = []
        self.prompts = prompts
        self.max_new_tokens = recipe.samples.max_new_tokens
        self.replies: dict[str, list[str]] = {}

    def answer(self, label: str, model, tokenizer, template: ChatTemplate) -> None:
        if self.prompts:
            self.replies[label] = generate_answers(
                model,
                tokenizer,
                template,
                self.prompts,
                self.max_new_tokens,
                desc=f"samples ({label})",
                names=[f"sample prompt {i + 1}" for i in range(len(self.prompts))],
                key="samples.max_new_tokens",
            )

    def rows(self) -> list[dict]:
        return [
            {"prompt": prompt[-1]["content"], "messages": prompt, **{k: v[i] for k, v in self.replies.items()}}
            for i, prompt in enumerate(self.prompts)
        ]
