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
import os
import sys

from finetune.recipe import STAGES


def fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for GPU-like devices (AcceleratorState: MULTI_GPU, MULTI_XPU, ...), while
    torch's FSDP2 (fully_shard) also runs on CPU processes over gloo. A CPU launch with an FSDP config
    (ACCELERATE_USE_FSDP, set by `accelerate launch`) here gets the FSDP plugin a GPU launch gets, so CI runs
    the same Trainer -> accelerate -> FSDP2 code as a GPU machine does. Test-only: finetune itself never patches."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and getattr(self, "fsdp_plugin", None) is None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = init


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        import torch

        if not torch.cuda.is_available():
            fsdp_on_cpu()
    plan, recipe, overrides = argv[0], argv[1], argv[2:]
    for step in plan.split(","):
        stage, *extra = step.split("+")
        code = importlib.import_module(STAGES[stage].module).main([recipe, *overrides, *extra])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
