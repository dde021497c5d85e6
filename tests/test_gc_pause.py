"""gc_paused(): the collector is off inside, back on after (also after an error), and nesting keeps it off."""

from __future__ import annotations

import gc

import pytest

from orderbook_pipelines.gc_pause import gc_paused


def test_paused_inside_restored_after_nesting_and_errors() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner exit found it off: it stays off for the outer block
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_found_off_is_left_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
