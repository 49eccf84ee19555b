"""`python -m finetune.cli ...`: the `finetune` command without its console script (tests use it)."""

import sys

from finetune.cli import main

sys.exit(main())
