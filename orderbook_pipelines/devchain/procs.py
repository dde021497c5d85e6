"""Processes of the local stack as the kernel sees them: resident memory read from /proc (Linux).

`make run` prints it in its status lines and `bench/soak_run.py` records it every minute; psutil is not a
dependency for one field of one file.
"""

from __future__ import annotations

from pathlib import Path


def rss_mib(pid: int) -> float | None:
    """Resident set size of `pid` in MiB, or None if the process is gone (or not readable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
