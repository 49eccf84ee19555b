"""docs/reliability.md carries the table of every case of the adversarial suite."""

from tests.conftest import ROOT

from .cases import all_cases_table


def test_reliability_doc_carries_the_case_table():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert all_cases_table() in doc, "docs/reliability.md is out of date; run: python -m tests.adversarial"
