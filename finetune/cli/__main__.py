"""`python -m finetune.cli ...` is the `finetune` command (tests and scripts run it with this interpreter)."""

import sys

from finetune.cli import main

sys.exit(main())
