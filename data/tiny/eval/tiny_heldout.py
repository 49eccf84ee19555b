"""Documents and scoring of the finetune_tiny_heldout lm-evaluation-harness task (tiny_heldout.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.core.evaluation import same_answer

DATA = Path(__file__).resolve().parent.parent / "sft_eval.jsonl"


def load(data_files: str | None = None, **_) -> dict:
    """The held-out SFT rows that carry an `answer`, one document per distinct question, in file order
    (as finetune.core.evaluation.held_out_correctness reads them)."""
    import datasets

    docs, seen = [], set()
    for line in Path(data_files or DATA).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        turns = [m for m in row["messages"] if m["role"] != "assistant"]
        if "answer" not in row or len(turns) != 1 or turns[0]["role"] != "user":
            continue
        question = turns[0]["content"]
        if question not in seen:
            seen.add(question)
            docs.append({"question": question, "answer": row["answer"]})
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(same_answer(results[0], doc["answer"]))}
