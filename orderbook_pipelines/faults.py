"""Named crash points for the crash-and-resume tests: a real SIGKILL of this process at an awkward moment.

Inert unless OBP_CRASH_AT is set (tests set it for a subprocess): "name" kills the process the first time the
point `name` is reached, "name@N" the N-th time, so a test can kill a run in the middle of its ranges rather
than in the first one. Occurrences are counted per process (each worker process of a backfill counts its own)
from the moment the variable is set. The kill is real, so what the tests see after it (what Postgres kept, what
a resume does) is what a crashed production process leaves.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}  # how often the targeted point was reached in this process


def crash_point(name: str) -> None:
    spec = os.environ.get("OBP_CRASH_AT")
    if not spec:  # the production path: one dictionary lookup
        return
    target, nth = _parse(spec)
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


def _parse(spec: str) -> tuple[str, int]:
    """(point, occurrence); a malformed occurrence raises, so a typo cannot make a crash test pass vacuously."""
    target, sep, count = spec.partition("@")
    if not sep:
        return target, 1
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"OBP_CRASH_AT={spec!r}: expected NAME or NAME@N with N >= 1")
    return target, int(count)
