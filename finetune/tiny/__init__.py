"""The offline default: a tiny Phi-architecture model, its tokenizer and its task, all made in code.

`builtin:tiny-phi` is the pre-trained base shipped in `finetune/tiny/base/` (a 3.7 MB safetensors file,
the tokenizer and `build_record.json`): it loads at once, needs no network and no cache, and is the
same file on every machine, so the seeded stages print the same figures everywhere. It is the one
exception to "no weights in the repository". `finetune tiny build OUT` (finetune/cli/tiny.py) reproduces it:
  1. a byte-level BPE tokenizer shaped like Phi-2's (bos = eos = unk = <|endoftext|>, no pad token),
     trained on the corpus below;
  2. a 4-layer PhiForCausalLM (partial rotary 0.4 like Phi-2) pre-trained, all parameters, for
     PRETRAIN_STEPS steps on that corpus, so LoRA has knowledge to build on, as with a real base model.
The build is deterministic for a given torch thread count (the order of floating-point reductions
depends on it), so the command pins the thread count the shipped base was built with
(`build_record.json`: build key, steps, seed, threads, library versions). The build key hashes the
build version, steps, seed, corpus and model config; a test fails when the code's key no longer
matches the shipped record, i.e. when the corpus or config changed without a rebuild.

The task has checkable answers (small sums, the next letter, opposites). The corpus states every
fact, held-out ones included, as plain text and as "Q: ... A: ..." lines, but never in a chat
template: SFT has to teach the chat format and to stop at the end of the turn, and the held-out
prompts measure whether that generalises to facts never seen in chat form.

The corpus also grades answers, right and wrong, as web text does ("Quiz: What is 3 plus 4?
Answer: 8 wrong."), for every fact, again never in chat form. A real base model can tell a right
answer from a wrong one before any reward training; without these lines the tiny one could not
(linear probes on every layer at the reward model's read-out position found no correctness signal,
and the reward model fell below chance on held-out facts: it memorised which answers were right
in training). The reward stage has to carry that judgement into the chat format, as SFT carries the
answers; held-out pairs measure whether it does. The verdict comes right after the answer because
a transformers reward model reads the last answer token (pad == eos, see finetune/rl/functional.py).

`finetune tiny write-data data/tiny` rewrites the shipped jsonl files (tests check the
shipped files equal this generator's output).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from finetune.errors import UserError

EOS = "<|endoftext|>"
HELD_OUT_WRONG = 4  # wrong answers paired with each held-out fact
GRADED_RIGHT, GRADED_WRONG = 3, 3  # graded answers per fact in each copy of the corpus
PRETRAIN_STEPS = 4000  # the verdicts need ~7x the steps the answers alone did (600)
BUILD_VERSION = 2  # bump when the build below changes (part of the build key)
BUILD_THREADS = 2  # torch threads the shipped base was built with; the build is bit-exact for a thread count
BASE_DIR = Path(__file__).resolve().parent / "base"  # the shipped base: what builtin:tiny-phi loads
RECORD = "build_record.json"
SYSTEM_PROMPTS = ["You are a helpful assistant. Answer briefly.", "Reply with the answer only."]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("old", "new"),
    ("day", "night"),
    ("light", "dark"),
    ("happy", "sad"),
    ("open", "closed"),
    ("wet", "dry"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("left", "right"),
]


def facts() -> list[dict]:
    """Every fact of the task: question, answer, family and plain-text statements of it."""
    out = []
    for a in range(10):
        for b in range(10):
            c = a + b
            out.append(
                dict(
                    family="add",
                    question=f"What is {a} plus {b}?",
                    answer=str(c),
                    statements=[f"{a} plus {b} is {c}.", f"{a} + {b} = {c}", f"The sum of {a} and {b} is {c}."],
                )
            )
    for i in range(25):
        x, y = chr(97 + i), chr(98 + i)
        out.append(
            dict(
                family="letter",
                question=f"What letter comes after {x}?",
                answer=y,
                statements=[f"After {x} comes {y}.", f"The letter after {x} is {y}."],
            )
        )
    for w, v in OPPOSITES + [(v, w) for w, v in OPPOSITES]:
        out.append(
            dict(
                family="opposite",
                question=f"What is the opposite of {w}?",
                answer=v,
                statements=[f"The opposite of {w} is {v}.", f"{w.capitalize()} is the opposite of {v}."],
            )
        )
    return out


def split_facts(seed: int = 0, held_out: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Deterministic split per family: (train facts, held-out facts)."""
    rng = random.Random(seed)
    train, held = [], []
    for family in ("add", "letter", "opposite"):
        fam = [f for f in facts() if f["family"] == family]
        rng.shuffle(fam)
        k = round(len(fam) * held_out)
        held += fam[:k]
        train += fam[k:]
    return train, held


def corpus_documents(seed: int = 0) -> list[str]:
    """Plain-text pre-training documents: each mixes 3-6 facts, as statements or Q/A lines, so the
    base knows every fact but has no reason to stop right after an answer."""
    rng = random.Random(seed)
    lines = []
    for f in facts():
        lines += f["statements"]
        lines.append(f"Q: {f['question']}\nA: {f['answer']}")
    docs = []
    for _ in range(3):
        graded = [quiz_line(f, f["answer"]) for f in facts()] * GRADED_RIGHT
        graded += [quiz_line(f, w) for f in facts() for w in sample_wrong_answers(f, rng, GRADED_WRONG)]
        copy = lines + graded
        rng.shuffle(copy)
        i = 0
        while i < len(copy):
            k = rng.randint(3, 6)
            docs.append("\n".join(copy[i : i + k]))
            i += k
    return docs


def quiz_line(f: dict, answer: str) -> str:
    """A graded answer in plain text; the verdict is the token right after the answer."""
    return f"Quiz: {f['question']} Answer: {answer} {'right' if answer == f['answer'] else 'wrong'}."


def sft_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Chat rows: (train conversations, held-out conversations with their reference `answer`)."""
    rng = random.Random(seed + 1)
    train_facts, held = split_facts(seed)

    def turn(f):
        return [{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["answer"]}]

    train = []
    for f in train_facts:
        messages = turn(f)
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
        train.append({"messages": messages})
    for _ in range(40):  # multi-turn conversations
        a, b = rng.sample(train_facts, 2)
        train.append({"messages": turn(a) + turn(b)})
    rng.shuffle(train)
    evals = [{"messages": turn(f), "answer": f["answer"]} for f in held]
    return train, evals


def wrong_answers(f: dict) -> list[str]:
    """The plausible wrong answers of a fact, of the same kind (a near sum, another letter, another word)."""
    if f["family"] == "add":
        c = int(f["answer"])
        return [str(x) for x in (c - 2, c - 1, c + 1, c + 2) if x >= 0]
    if f["family"] == "letter":
        return [chr(97 + i) for i in range(26) if chr(97 + i) != f["answer"]]
    return sorted({w for pair in OPPOSITES for w in pair} - {f["answer"]})


def wrong_answer(f: dict, rng: random.Random) -> str:
    return rng.choice(wrong_answers(f))


def sample_wrong_answers(f: dict, rng: random.Random, k: int) -> list[str]:
    """Up to k distinct wrong answers (the smallest sums have fewer than 4)."""
    options = wrong_answers(f)
    return rng.sample(options, min(k, len(options)))


def preference_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Preference pairs: the correct answer is chosen, a wrong one rejected (train / held-out facts).

    Each fact gets 4 pairs: training facts with wrong answers drawn at random, held-out facts with 4
    distinct wrong answers (fewer for the smallest sums), so the held-out accuracy is measured on 123
    pairs rather than 31 (one pair is 3 points of 31: too coarse for a 0.9 bar)."""
    rng = random.Random(seed + 2)
    train_facts, held = split_facts(seed)

    def pair(f):
        return {
            "prompt": [{"role": "user", "content": f["question"]}],
            "chosen": [{"role": "assistant", "content": f["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong_answer(f, rng)}],
            "answer": f["answer"],
        }

    train = [pair(f) for f in train_facts for _ in range(4)]  # several wrong answers per fact
    rng.shuffle(train)
    held_pairs = []
    for f in held:
        base = pair(f)
        for w in sample_wrong_answers(f, rng, HELD_OUT_WRONG):
            held_pairs.append(dict(base, rejected=[{"role": "assistant", "content": w}]))
    return train, held_pairs


def write_data(folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, evals = sft_rows()
    pref_train, pref_evals = preference_rows()
    for name, rows in (
        ("sft_train.jsonl", train),
        ("sft_eval.jsonl", evals),
        ("pref_train.jsonl", pref_train),
        ("pref_eval.jsonl", pref_evals),
    ):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE like Phi-2's (GPT-2 pre-tokenisation), trained on the task corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = corpus_documents() + ["Instruct: Output: System: " + " ".join(SYSTEM_PROMPTS)]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=256
    )


# The model's shape: hashed into the build key (these values, not PhiConfig.to_dict(), which also holds
# the transformers version and every library default, so a library patch release does not change the key).
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    partial_rotary_factor=0.4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)


def tiny_config(vocab_size: int):
    from transformers import PhiConfig

    return PhiConfig(vocab_size=vocab_size, **TINY_CONFIG)


# ---------------------------------------------------------------- the shipped base


def rebuild_hint() -> str:
    return (
        f"rebuild it with `finetune tiny build finetune/tiny/base --force` ({BUILD_THREADS} threads, about "
        "10 minutes on 2 idle cores), commit the folder, and re-measure the README's pipeline table"
    )


def base_path() -> Path:
    """The shipped tiny base folder (what `builtin:tiny-phi` loads): no build, no cache, no network."""
    if not (BASE_DIR / "model.safetensors").is_file() or not (BASE_DIR / RECORD).is_file():
        raise UserError(
            f"builtin:tiny-phi: the shipped base is missing from {BASE_DIR} (an install without the package data?); "
            f"reinstall finetune (`pip install .` ships it), or {rebuild_hint()}"
        )
    return BASE_DIR


def build_record() -> dict:
    return json.loads((base_path() / RECORD).read_text())
