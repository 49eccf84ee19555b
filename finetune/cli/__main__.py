"""`python -m finetune.cli ...`: the `finetune` command (tests and the pipeline fixture run it this way)."""

import sys

from finetune.cli import main

sys.exit(main())
