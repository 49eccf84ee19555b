"""Progress of long phases: a bar at a terminal, timed log lines everywhere else.

Output that is not a terminal (CI logs, `nohup`, Azure ML job logs, a stage run by `finetune pipeline`
with its output redirected) gets no bar: tqdm's carriage-return redraws become a wall of text in a
file, and with `disable=None` tqdm prints nothing at all. There, a phase writes a line instead,
"what, how far, how long, about how long left", whenever `interval` seconds (default 20,
$FINETUNE_PROGRESS_INTERVAL) have passed without a progress line from any phase of the process, so a
run never goes quiet for longer than that while a phase is running. A background thread writes the
lines, so a phase stuck in one long call (loading a model, one slow batch) still reports.

    from finetune.core.progress import progress, track

    for batch in track(batches, "held-out answers", unit="batches"):      # an iterable
        ...

    with progress("pre-training tiny-phi", total=4000, unit="steps") as p:  # counted by hand
        for step in range(4000):
            ...
            p.update(1, loss=f"{loss:.3f}")                               # optional key=value figures

    with progress("loading microsoft/phi-2", announce=True):              # no total: start, heartbeats, end
        model = AutoModelForCausalLM.from_pretrained(...)

`p.write(message)` prints a line without breaking the bar (the compact per-step training lines use
it). `announce=True` always writes a start line and a "done in ..." line; otherwise the end line is
written only when the phase wrote progress lines (short phases stay quiet). Only the main process
reports (`finetune.core.distributed.is_main`). Lines go through the `finetune.progress` logger, so they
carry the stage log's timestamp and format; where logging is not configured they go to stderr.

$FINETUNE_PROGRESS chooses the mode: `auto` (default: bar when stderr is a terminal, else lines),
`bar`, `lines` or `off`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from . import distributed

log = logging.getLogger("finetune.progress")

DEFAULT_INTERVAL = 20.0  # seconds between lines when output is not a terminal
FIRST_LINE_AFTER = 2.0  # a phase reports no earlier than this: instant phases stay quiet

_lock = threading.RLock()
_active: list[Progress] = []  # running phases, innermost last: the heartbeat reports that one
_last_line = time.monotonic()  # when any phase last wrote a line
_heartbeat: threading.Thread | None = None


def interval() -> float:
    """Seconds between progress lines when output is not a terminal ($FINETUNE_PROGRESS_INTERVAL)."""
    try:
        return max(0.05, float(os.environ.get("FINETUNE_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def mode() -> str:
    """'bar', 'lines' or 'off' for this process ($FINETUNE_PROGRESS, else a bar only at a terminal)."""
    if not distributed.is_main():
        return "off"
    wanted = os.environ.get("FINETUNE_PROGRESS", "auto").lower()
    if wanted in ("bar", "lines", "off"):
        return wanted
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "lines"


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def emit(message: str) -> None:
    """Write one progress line (the `finetune.progress` logger, or stderr where logging is not set up)."""
    global _last_line
    with _lock:
        _last_line = time.monotonic()
    if logging.getLogger().handlers or log.handlers:
        log.info(message)
    else:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _beat() -> None:
    """The heartbeat thread: while a phase runs, write its state when the process has been quiet for
    `interval()` seconds. Exits when no phase is running."""
    global _heartbeat
    while True:
        every = interval()
        time.sleep(min(1.0, every / 4))
        with _lock:
            if not _active:
                _heartbeat = None
                return
            phase = _active[-1]
            now = time.monotonic()
            due = now - _last_line >= every and now - phase.started >= min(FIRST_LINE_AFTER, every)
        if due:
            phase._report()


class Progress:
    """One phase: see the module docstring. Use as a context manager, or call close()."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "items",
        initial: int = 0,
        announce: bool = False,
        enabled: bool = True,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self.initial = initial
        self.announce = announce
        self.postfix: dict[str, str] = {}
        self.started = time.monotonic()
        self.lines = 0
        self.closed = False
        self.mode = mode() if enabled else "off"
        if self.mode == "bar" and total is None:
            self.mode = "lines"  # nothing to draw a bar of: timed lines (at a terminal too)
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=False, file=sys.stderr
            )
        if self.mode == "off":
            return
        if announce:
            emit(f"{desc}: started" + (f" ({total - initial} {unit} to go)" if total is not None else ""))
            self.lines += 1
        if self.mode == "lines":
            global _heartbeat
            with _lock:
                _active.append(self)
                if _heartbeat is None:
                    _heartbeat = threading.Thread(target=_beat, name="finetune-progress", daemon=True)
                    _heartbeat.start()

    # ---- counting
    def update(self, n: int = 1, **postfix) -> None:
        """Count `n` more units done; keyword arguments replace the figures shown after the count."""
        self.set(self.n + n, **postfix)

    def set(self, n: int, **postfix) -> None:
        """Set the count to `n` (e.g. the Trainer's global step)."""
        delta, self.n = n - self.n, n
        if postfix:
            self.postfix = {k: str(v) for k, v in postfix.items()}
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(delta)

    def write(self, message: str) -> None:
        """A line of its own (e.g. a training log line) that does not break the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            emit(message)

    # ---- lines
    def status(self) -> str:
        """'desc: 12/40 batches (30%), 25s elapsed, ~58s left, loss 0.41' (what a line says)."""
        elapsed = time.monotonic() - self.started
        parts = []
        if self.total is not None:
            pct = f" ({self.n / self.total:.0%})" if self.total else ""
            parts.append(f"{self.n}/{self.total} {self.unit}{pct}")
        elif self.n:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"{duration(elapsed)} elapsed")
        done = self.n - self.initial
        if self.total is not None and done > 0 and self.n < self.total:
            parts.append(f"~{duration(elapsed / done * (self.total - self.n))} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def _report(self) -> None:
        with _lock:
            if self.closed:
                return
            self.lines += 1
        emit(self.status())

    def close(self) -> None:
        if self.closed:
            return
        with _lock:
            self.closed = True
            if self in _active:
                _active.remove(self)
        elapsed = duration(time.monotonic() - self.started)
        if self.bar is not None:
            self.bar.close()
            if self.announce:
                emit(f"{self.desc}: done in {elapsed}")
        elif self.mode == "lines" and self.lines:
            emit(f"{self.desc}: done" + (f", {self.n} {self.unit}" if self.n else "") + f" in {elapsed}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def number(value) -> str:
    """A figure for a log line: 4 significant digits, scientific notation for small ones (learning rates)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def step_line(stage: str, step: int, total: int | None, figures: dict) -> str:
    """One training log line, the same shape for every stage:
    `sft     step 10/40  loss 1.234  lr 4.90e-06  token acc 0.77` (figures in the order given; None skipped)."""
    head = f"{stage:<7} step {step}/{total}" if total else f"{stage:<7} step {step}"
    return "  ".join([head, *(f"{k} {number(v)}" for k, v in figures.items() if v is not None)])


@contextlib.contextmanager
def library_bars_off(always: bool = True):
    """Within: the libraries' tqdm bars off, because a phase of ours reports instead. TQDM_DISABLE covers bars
    made with tqdm's defaults; when output is not a terminal (where ours are lines, not tqdm bars) also those
    a library makes with an explicit `disable=False` (lm-eval's), whose redraws are a wall of text in a log
    file. With `always=False`, only when output is not a terminal."""
    if not always and mode() == "bar":
        yield
        return
    import tqdm.std

    previous, init = os.environ.get("TQDM_DISABLE"), tqdm.std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    os.environ["TQDM_DISABLE"] = "1"
    if mode() != "bar":
        tqdm.std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = init
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def progress(desc: str, total: int | None = None, unit: str = "items", **kwargs) -> Progress:
    """A phase to report on: `with progress(...) as p: ... p.update()` (see the module docstring)."""
    return Progress(desc, total=total, unit=unit, **kwargs)


def track(iterable: Iterable, desc: str, total: int | None = None, unit: str = "items", **kwargs) -> Iterator:
    """Iterate `iterable`, reporting progress (total from len() when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(desc, total=total, unit=unit, **kwargs) as p:
        for item in iterable:
            yield item
            p.update(1)
