"""`python -m finetune.tiny write-data FOLDER | build OUT [--threads N] [--force]`."""

import sys

from .build import main

sys.exit(main())
