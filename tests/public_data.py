"""Small data sets in exactly the public schemas the Phi recipes and users bring, written in code.

- `openai/gsm8k` (config main): question, answer (a worked solution ending in `#### N`); splits train / test
- `HuggingFaceH4/ultrachat_200k`: prompt, prompt_id, messages (list of {content, role}); splits
  train_sft / test_sft (and train_gen / test_gen).
- `HuggingFaceH4/ultrafeedback_binarized`: prompt, prompt_id, chosen and rejected (whole conversations:
  [user, assistant]), messages (= chosen), score_chosen, score_rejected; splits train_prefs / test_prefs
  (and train_sft, train_gen, ...).
- Anthropic HH-RLHF: chosen / rejected transcripts as strings ("\\n\\nHuman: ...\\n\\nAssistant: ...").
- ShareGPT: id, conversations (list of {from: human|gpt|system, value}).
- Alpaca: instruction, input, output (and `text`, the formatted prompt, in tatsu-lab/alpaca).

`hub_folder` lays a data set out as its hub repository is (README with `configs:` naming the splits,
parquet shards under data/), so `datasets.load_dataset(folder, split="train_sft")` reads it exactly as
it reads the hub id.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

TOPICS = ["the sea", "mountains", "bread", "rivers", "bees", "clocks", "maps", "lamps", "trees", "rain"]


def _pid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _qa(i: int) -> tuple[str, str, str]:
    a, b = i % 10, (i * 7) % 10
    topic = TOPICS[i % len(TOPICS)]
    return f"What is {a} plus {b}? Then say one thing about {topic}.", f"{a + b}. I like {topic}.", f"{a + b + 1}."


def ultrachat_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        q, good, _ = _qa(i)
        messages = [{"content": q, "role": "user"}, {"content": good, "role": "assistant"}]
        if i % 3 == 0:  # multi-turn, as most ultrachat rows are
            messages += [
                {"content": "Say it again, shorter.", "role": "user"},
                {"content": good[:3], "role": "assistant"},
            ]
        rows.append({"prompt": q, "prompt_id": _pid(q), "messages": messages})
    return rows


def ultrafeedback_rows(n: int, offset: int = 0) -> list[dict]:
    rng = random.Random(offset)
    rows = []
    for i in range(offset, offset + n):
        q, good, bad = _qa(i)
        chosen = [{"content": q, "role": "user"}, {"content": good, "role": "assistant"}]
        rejected = [{"content": q, "role": "user"}, {"content": bad, "role": "assistant"}]
        rows.append(
            {
                "prompt": q,
                "prompt_id": _pid(q),
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": float(rng.choice([7.0, 8.0, 8.5, 9.0])),
                "score_rejected": float(rng.choice([2.0, 3.0, 4.5, 5.0])),
            }
        )
    return rows


def hh_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        q, good, bad = _qa(i)
        history = "\n\nHuman: Hello.\n\nAssistant: Hi, how can I help?" if i % 2 else ""
        rows.append(
            {
                "chosen": f"{history}\n\nHuman: {q}\n\nAssistant: {good}",
                "rejected": f"{history}\n\nHuman: {q}\n\nAssistant: {bad}",
            }
        )
    return rows


def sharegpt_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        q, good, _ = _qa(i)
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": good}]
        if i % 2:
            turns.insert(0, {"from": "system", "value": "Answer briefly."})
        rows.append({"id": f"conv_{i}", "conversations": turns})
    return rows


def alpaca_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        q, good, _ = _qa(i)
        extra = "Use digits." if i % 2 else ""
        text = f"Below is an instruction... ### Instruction:\n{q}\n\n### Response:\n{good}"
        rows.append({"instruction": q, "input": extra, "output": good, "text": text})
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    """openai/gsm8k's `main` config: question, and an answer that works the problem and ends in `#### N`."""
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 + i % 7, 2 + (i * 5) % 9
        rows.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
    return rows


def hub_folder(folder: Path, splits: dict[str, list[dict]], config: str = "default") -> Path:
    """`folder` laid out as a hub dataset repository: README.md whose `configs:` map each split to
    data/<split>-00000-of-00001.parquet (how ultrachat_200k and ultrafeedback_binarized name theirs; gsm8k puts
    its `main` config's files under main/)."""
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    where = "data" if config == "default" else config
    for split, rows in splits.items():
        write_parquet(folder / where / f"{split}-00000-of-00001.parquet", rows)
        lines += [f"  - split: {split}", f"    path: {where}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*lines, "---", "", "A small copy in the public schema.", ""]))
    return folder


def ultrachat_folder(folder: Path, train: int = 24, test: int = 8) -> Path:
    return hub_folder(
        folder,
        {
            "train_sft": ultrachat_rows(train),
            "test_sft": ultrachat_rows(test, offset=1000),
            "train_gen": ultrachat_rows(train // 2, offset=2000),
        },
    )


def gsm8k_folder(folder: Path, train: int = 24, test: int = 8) -> Path:
    return hub_folder(folder, {"train": gsm8k_rows(train), "test": gsm8k_rows(test, offset=1000)}, config="main")


def ultrafeedback_folder(folder: Path, train: int = 24, test: int = 8) -> Path:
    return hub_folder(
        folder,
        {
            "train_prefs": ultrafeedback_rows(train),
            "test_prefs": ultrafeedback_rows(test, offset=1000),
            "train_gen": ultrafeedback_rows(train // 2, offset=2000),
            "test_gen": ultrafeedback_rows(test, offset=3000),
        },
    )
