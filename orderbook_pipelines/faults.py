"""Named crash points for the crash-and-resume tests: a real SIGKILL of this process at an awkward moment.

Inert unless OBP_CRASH_AT names the point (tests set it for a subprocess). The kill is real, so what the
tests see after it (what Postgres kept, what a resume does) is what a crashed production process leaves.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("OBP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
