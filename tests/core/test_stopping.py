"""core.stopping: a real SIGTERM to a child process running a small loop under `checkpointable()`. The first one
lets the current step finish and the loop checkpoint and stop; a second one, or one outside a loop, stops at
once, as Ctrl-C does; with several processes every rank stops after the same step."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from finetune.core import stopping
from tests.conftest import ROOT, subprocess_env

LOOP = """
import sys
from finetune.core import stopping

stopping.install()
step = 0
try:
    with stopping.checkpointable():
        while True:
            step += 1
            print(f"step {step}", flush=True)
            sys.stdin.readline()  # the step's work, done when the test says: the signal lands in here
            print(f"end {step}", flush=True)
            if stopping.stop_now():
                print(f"checkpoint {step}", flush=True)
                raise stopping.Terminated("after a checkpoint")
except KeyboardInterrupt as e:  # what cleans up after Ctrl-C cleans up after SIGTERM too
    print(f"stopped {type(e).__name__}", flush=True)
    sys.exit(stopping.TERMINATED)
"""

OUTSIDE = """
import sys
from finetune.core import stopping

stopping.install()
try:
    print("ready", flush=True)
    sys.stdin.readline()
    print("read a line", flush=True)
except stopping.Terminated:
    print("stopped at once", flush=True)
    raise SystemExit(stopping.TERMINATED)
"""


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(stream, line: str) -> None:
    seen = []
    while (got := stream.readline()) != "":
        seen.append(got.rstrip())
        if line in got:
            return
    raise AssertionError(f"never printed {line!r}: {seen}")


def finish(proc: subprocess.Popen, stdin: str = "") -> tuple[int, str]:
    out, err = proc.communicate(stdin, timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, " ".join(out.split())


ASKED = "SIGTERM: stopping after this step"  # the warning the first SIGTERM logs


def test_the_first_sigterm_finishes_the_step_then_checkpoints_and_stops():
    proc = start(LOOP)
    wait_for(proc.stdout, "step 1")
    proc.send_signal(signal.SIGTERM)
    wait_for(proc.stderr, ASKED)
    code, out = finish(proc, "work done\n")  # the step goes on to its end
    assert code == stopping.TERMINATED == 143
    assert out == "end 1 checkpoint 1 stopped Terminated"  # the step completed, a checkpoint, no step 2


def test_a_second_sigterm_stops_at_once():
    proc = start(LOOP)
    wait_for(proc.stdout, "step 1")
    proc.send_signal(signal.SIGTERM)
    wait_for(proc.stderr, ASKED)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143 and out == "stopped Terminated"  # step 1 never ended, no checkpoint


def test_outside_a_training_loop_sigterm_stops_at_once():
    proc = start(OUTSIDE)
    wait_for(proc.stdout, "ready")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143 and out == "stopped at once"


def test_terminated_is_cleaned_up_after_as_ctrl_c_is():
    assert issubclass(stopping.Terminated, KeyboardInterrupt)


def test_install_outside_the_main_thread_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def run():
        try:
            stopping.install()
        except Exception as e:  # noqa: BLE001 - any exception is the failure this test looks for
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors and signal.getsignal(signal.SIGTERM) == before


RANKS = """
import os, sys, signal
import torch.distributed as dist
from finetune.core import stopping

rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
stopping.install()
with stopping.checkpointable():
    for step in range(1, 6):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is asked, in the middle of step 2
        if stopping.stop_now():
            print(f"rank {rank} stops after step {step}", flush=True)
            break
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_when_one_rank_is_asked_every_rank_stops_after_the_same_step():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [start(RANKS, str(rank), port) for rank in (0, 1)]
    results = [finish(p) for p in procs]
    assert results == [(0, f"rank {r} stops after step 2") for r in (0, 1)]
