"""Progress lines for work that takes a while (decoding a data set, evaluating, a compress
phase), with the true time since it began: a log line every ``every_s`` seconds saying how far
it is, then how long it took. A job that may be short (an evaluation) stays silent unless it
passes ``every_s``."""

import logging
import time


def duration(seconds: float) -> str:
    """``48 s``, ``3 min 05 s``, ``2 h 04 min``: the time in a log line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """``what`` (e.g. "decoding 60,000 images into the cache ...") done in ``total`` units:
    ``update(done)`` logs ``what: done/total unit (pct), elapsed`` at most every ``every_s``
    seconds; ``finish()`` logs ``what: done in <elapsed>`` and returns the elapsed seconds.
    ``announce``: say ``what ...`` at the start (work known to be long); else only a job that
    has logged progress says when it is done. ``started``: when the work began, if before this
    (``time.monotonic()``)."""

    def __init__(self, log: logging.Logger, what: str, total: int, *, unit: str = "",
                 every_s: float = 10.0, announce: bool = True, started: float | None = None):
        self.log, self.what, self.total, self.every_s = log, what, total, every_s
        self.unit = f" {unit}" if unit else ""
        self.last = time.monotonic()
        self.started = self.last if started is None else started
        self.spoke = announce
        if announce:
            log.info(f"{what} ...")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last, self.spoke = now, True
        self.log.info(f"{self.what}: {done:,}/{self.total:,}{self.unit} "
                      f"({100 * done / max(self.total, 1):.0f}%), {duration(now - self.started)}")

    def finish(self, note: str = "") -> float:
        elapsed = self.elapsed
        if self.spoke:
            self.log.info(f"{self.what}: done in {duration(elapsed)}{note}")
        return elapsed
