"""`python -m finetune.cli ...`: the `finetune` command (the tests and the pipeline fixtures run it so)."""

import sys

from . import main

sys.exit(main())
