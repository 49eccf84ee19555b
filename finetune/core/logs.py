"""The stage log, set up once per process: `HH:MM:SS LEVEL logger: message` lines, and library messages a
user cannot act on silenced unless `--verbose` (logging.verbose)."""

from __future__ import annotations

import logging
import os
import sys

from . import progress

# Library messages a user cannot act on, silenced unless logging.verbose (`--verbose`). Each is either a
# deprecation inside the libraries' own code or a statement about the environment that finetune already
# makes in its own log (the attention kernel line says where the model runs).
QUIET_WARNINGS = [
    # peft and trl read `model.is_gradient_checkpointing`, deprecated in transformers 5 (their code, not ours)
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
]
QUIET_LOG_LINES = {
    # DeepSpeed at import, on every machine without a GPU (deepspeed/accelerator/real_accelerator.py)
    "DeepSpeed": ("Setting accelerator to CPU", "Setting ds_accelerator to"),
    # lm-eval, when handed a model object (finetune eval does so on purpose: the model is loaded once, by us)
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}
# Libraries whose INFO lines restate what the stage's own log says (set to WARNING unless verbose)
QUIET_LOGGERS = ["lm_eval"]
_quieted = False


class DropMessages(logging.Filter):
    """A logging filter dropping the records whose message contains one of `texts`."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(t in message for t in self.texts)


def setup_logging(main_process: bool = True, verbose: bool = False):
    """The stage log: `HH:MM:SS LEVEL logger: message` on stderr, INFO on the main process and WARNING on
    the others. Unless `verbose`, library warnings a user cannot act on (QUIET_WARNINGS, QUIET_LOG_LINES)
    are silenced and, when output is not a terminal, the libraries' own progress bars are off
    (finetune.core.progress reports instead)."""
    global _quieted
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose or _quieted:
        return
    _quieted = True
    import warnings

    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, texts in QUIET_LOG_LINES.items():
        logging.getLogger(name).addFilter(DropMessages(*texts))  # kept when the library configures its logger
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if progress.mode() != "bar":
        # Their carriage-return redraws are a wall of text in a log file; load_model, the data loader and
        # the Trainer report through finetune.core.progress instead. At a terminal they stay (downloads).
        # The environment switches them off in libraries not imported yet (without importing them here).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it at import
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
