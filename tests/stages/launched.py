"""Several stages in one launched run, for the tests of sharded and multi-node training:

    accelerate launch [--config_file CFG] tests/stages/launched.py sft,reward,dpo,sft+sft.max_steps=3 RECIPE [k=v ...]

Every launched run pays for starting its processes, importing the libraries and the launcher's rendezvous
(tens of seconds on CI's 2 cores, more under DeepSpeed); one launch for the stages a test needs keeps CI's time
down. Each stage runs through its module's main(), exactly what `finetune <stage>` runs in a launched process.
`stage+key=value+...` adds overrides to that one stage (a second run of a stage with a longer max_steps resumes
from the first run's checkpoint).
"""

from __future__ import annotations

import importlib
import sys

from finetune.recipe import STAGES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan, recipe, overrides = argv[0], argv[1], argv[2:]
    for step in plan.split(","):
        stage, *extra = step.split("+")
        code = importlib.import_module(STAGES[stage].module).main([recipe, *overrides, *extra])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
