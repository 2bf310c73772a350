"""Stopping at a step boundary with nothing lost: a time limit, a preemption, Ctrl-C.

SIGINT, SIGTERM or SIGUSR2 reaching any rank records a stop request here. The training loop
folds it into the flags every rank already agrees on after each step (``engine.step_flags``), so
all ranks see it at the same step; they finish that step, write a step checkpoint (complete, as
any other), and the job exits with ``EXIT_STOPPED`` and one line saying how to resume.

A second signal of the same kind ends the process at once (the default action of that signal),
unless it comes within ``REPEAT_AFTER_S`` of the first: that is a launcher passing on the
signal it got itself (torchrun's agent sends its workers the SIGINT of a Ctrl-C that the
terminal already delivered to them; SLURM signals every process of a step). Another kind of
signal while stopping is ignored: the stop is already under way.
"""

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
EXIT_STOPPED = 75          # stopped, resumable (sysexits' EX_TEMPFAIL: "try again later")
REPEAT_AFTER_S = 2.0

_received: dict = {"signal": 0, "at": 0.0}
_previous: dict = {}        # the handlers ours replaced (submitit's requeue, where it runs the job)


def _handle(signum, frame) -> None:
    now = time.monotonic()
    if not _received["signal"]:
        _received.update(signal=signum, at=now)
        print(f"{signal.Signals(signum).name} received: stopping after the next step with a "
              f"checkpoint; the same signal again ends at once", file=sys.stderr, flush=True)
    elif signum == _received["signal"] and now - _received["at"] >= REPEAT_AFTER_S:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install() -> None:
    """Handle the stop signals in this process (the main thread of each rank)."""
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, _handle)
        # Python's Ctrl-C handler (raising KeyboardInterrupt) is no one's to hand over to: it
        # would turn the stop, its checkpoint written, into exit 130 and a traceback.
        if callable(previous) and previous not in (_handle, signal.default_int_handler):
            _previous[signum] = previous


def interrupt_before_training() -> None:
    """Until ``install``: SIGTERM ends this process as Ctrl-C does (``KeyboardInterrupt``:
    nothing trained, nothing to save, exit 130, which no launcher restarts) instead of killing
    it, which torchrun would answer by starting the rank again, the stop lost. Only where
    SIGTERM has its default action: a handler already there (submitit's) is kept."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def requested() -> int:
    """The number of the signal that asked this process to stop, or 0."""
    return _received["signal"]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def hand_over(signum: int) -> bool:
    """After the stop's checkpoint: give ``signum`` to the handler ours replaced, if it was a
    Python one (submitit's, which requeues the job on rank 0 and exits there); whether there
    was one."""
    previous = _previous.get(signum)
    if previous is None:
        return False
    previous(signum, None)
    return True
