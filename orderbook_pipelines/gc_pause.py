"""The cyclic garbage collector paused around bulk work that allocates millions of acyclic objects.

Parsed JSON-RPC answers, decoded logs, rows and book orders hold no reference cycles: refcounting frees them.
While they pile up, every generational collection re-scans all of them (a third of a backfill range's CPU,
about half of a snapshot bulk load); with the collector paused, one collection afterwards sees the same garbage.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Nestable, and safe across threads: only the entry that found the collector on turns it back on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
