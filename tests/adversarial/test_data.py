"""Bad data in every supported file type, for training and for `finetune generate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE, write_jsonl

from .cases import (
    GOOD,
    Case,
    cases,
    cli,
    refused,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= bad data in every file type


def _csv(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    return path


DATA_CASES = [
    Case("jsonl-invalid-utf8", "data", "a jsonl line with a byte that is not UTF-8", "refused: file, row 2"),
    Case("jsonl-invalid-json", "data", "a jsonl line that is not JSON", "refused: file, row 2"),
    Case("json-invalid-utf8", "data", "a .json list with a byte that is not UTF-8", "refused: file, line"),
    Case("json-not-a-list", "data", "a .json file holding an object", "refused: expected a list"),
    Case("csv-unbalanced-quote", "data", "a csv with an unclosed quote", "refused: file, parser's row, how to quote"),
    Case("csv-ragged", "data", "a csv line with more fields than the header", "refused: file and line"),
    Case("csv-invalid-utf8", "data", "a csv with a byte that is not UTF-8", "refused: file, line"),
    Case("parquet-garbage", "data", "a .parquet file that is not parquet", "refused: file, not readable"),
    Case(
        "parquet-wrong-columns",
        "data",
        "a parquet file without prompt/completion/messages",
        "refused: file, row, the columns it needs",
    ),
    Case("special-token-in-data", "data", "a reply that spells `<|endoftext|>`", "refused: file, row, the token"),
    Case("empty-file", "data", "an empty training file", "refused: no usable training rows"),
    Case("unsupported-suffix", "data", "`data.xlsx`", "refused: the supported types"),
    Case("missing-file", "data", "a data path that does not exist", "refused: data file not found"),
]


def bad_data(case_id: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The file of a data case and what its message must say."""
    import pandas as pd

    if case_id == "jsonl-invalid-utf8":
        p = tmp_path / "d.jsonl"
        p.write_bytes(GOOD.encode() + b"\n" + GOOD.encode().replace(b"2 plus", b"2 \xff plus") + b"\n")
        return p, [f"{p}: row 2: not UTF-8 text", "save the file as UTF-8"]
    if case_id == "jsonl-invalid-json":
        p = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"])
        return p, [f"{p}: row 2: not valid JSON", "skip_bad_rows"]
    if case_id == "json-invalid-utf8":
        p = tmp_path / "d.json"
        p.write_bytes(b"[\n" + GOOD.encode() + b",\n" + GOOD.encode().replace(b"plus", b"pl\xffus") + b"\n]")
        return p, [f"{p}: line 3: not UTF-8 text"]
    if case_id == "json-not-a-list":
        p = tmp_path / "d.json"
        p.write_text(GOOD)
        return p, [f"{p}: expected a JSON list of rows"]
    if case_id == "csv-unbalanced-quote":
        p = _csv(tmp_path / "d.csv", b'prompt,completion\nq1,a1\n"q2,a2\nq3,a3\n')
        return p, [f"{p}: not a readable csv file", "EOF inside string starting at row 2", "quote fields"]
    if case_id == "csv-ragged":
        p = _csv(tmp_path / "d.csv", b"prompt,completion\nq1,a1\nq2,a2,extra\n")
        return p, [f"{p}: not a readable csv file", "Expected 2 fields in line 3, saw 3"]
    if case_id == "csv-invalid-utf8":
        p = _csv(tmp_path / "d.csv", b"prompt,completion\nq1,a1\nq2,a\xff2\n")
        return p, [f"{p}: line 3: not UTF-8 text"]
    if case_id == "parquet-garbage":
        p = tmp_path / "d.parquet"
        p.write_bytes(b"PAR1 this is not a parquet file at all" * 4)
        return p, [f"{p}: not a readable parquet file"]
    if case_id == "parquet-wrong-columns":
        p = tmp_path / "d.parquet"
        pd.DataFrame([{"question": "q", "reply": "a"}] * 3).to_parquet(p)
        return p, [f"{p}: row 1: cannot tell the row format from its keys ['question', 'reply']"]
    if case_id == "special-token-in-data":
        p = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD.replace('"4"', '"4<|endoftext|>Instruct: hi"')])
        return p, [f"{p}: row 2: content contains the special token '<|endoftext|>'"]
    if case_id == "empty-file":
        p = tmp_path / "d.jsonl"
        p.write_text("")
        return p, ["data.train: no usable training rows"]
    if case_id == "unsupported-suffix":
        p = tmp_path / "d.xlsx"
        p.write_bytes(b"PK\x03\x04")
        return p, [f"{p}: unsupported file type; use one of ['.csv', '.json', '.jsonl', '.parquet']"]
    p = tmp_path / "missing.jsonl"
    return p, [f"{p}: data file not found"]


@cases(*DATA_CASES)
def test_bad_data_names_the_file_and_row(case, tmp_path, capsys):
    path, must = bad_data(case.id, tmp_path)
    out = tmp_path / "out"
    code, err = cli(
        capsys,
        "sft",
        TINY_RECIPE,
        f"output_dir={out}",
        f"sft.data.train=[{{path: {path}}}]",
        f"sft.data.eval=[{{path: {ROOT / 'data/tiny/sft_eval.jsonl'}}}]",
    )
    refused(code, err, *must)
    assert not (out / "sft").exists() and not (out / "sft-checkpoints").exists()


@cases(
    Case(
        "txt-prompts-invalid-utf8",
        "data",
        "`finetune generate --prompts p.txt` with a line that is not UTF-8",
        "refused before the model loads: file, line",
    ),
    Case("prompts-missing", "data", "`--prompts` names a missing file", "refused: prompts file not found"),
)
def test_bad_prompt_files_for_generate(case, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    if case.id == "txt-prompts-invalid-utf8":
        prompts.write_bytes(b"What is 2 plus 2?\nWhat is 3 \xff plus 1?\n")
        must = [f"{prompts}: row 2: not UTF-8 text"]
    else:
        must = [f"{prompts}: prompts file not found"]
    out = tmp_path / "answers.jsonl"
    code, err = cli(capsys, "generate", TINY_RECIPE, f"output_dir={tmp_path}", "--prompts", prompts, "--out", out)
    refused(code, err, *must)
    assert not out.exists()
