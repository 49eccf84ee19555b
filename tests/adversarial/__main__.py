"""`python -m tests.adversarial` prints the case table of docs/reliability.md."""

from .cases import all_cases_table

print(all_cases_table(), end="")
