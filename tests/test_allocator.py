"""The heap is trimmed between tensors only past its high-water mark; interpolating methods map their chunks.
(What they save is measured by benchmarks, not here: these pin the policy and that no byte changes.)"""

from __future__ import annotations

import pytest

from mergekit_lite.engine import allocator


class Trims(list):
    """The resident sizes at which the heap was trimmed; `resident[0]` is what the process holds now."""

    resident = [300 * 2**20]


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> Trims:
    calls = Trims()
    calls.resident = [300 * 2**20]
    monkeypatch.setattr(allocator, "_done", True)
    monkeypatch.setattr(allocator, "_high_water", 0)
    monkeypatch.setattr(allocator, "_resident_bytes", lambda: calls.resident[0])
    monkeypatch.setattr(allocator, "_trim", lambda: calls.append(calls.resident[0]))
    return calls


def test_the_first_call_trims_then_only_growth_past_the_slack_does(trims: Trims) -> None:
    resident = trims.resident
    allocator.release_free_memory()
    assert len(trims) == 1  # the first tensor's leftovers
    resident[0] += allocator.TRIM_SLACK  # the next tensor faulted the same pages back in: kept
    allocator.release_free_memory()
    assert len(trims) == 1
    resident[0] += 1  # past the high-water mark plus the slack: trimmed, and the mark moves up
    allocator.release_free_memory()
    assert len(trims) == 2
    assert allocator._high_water == resident[0]


def test_without_a_resident_size_every_call_trims(trims: Trims, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_resident_bytes", lambda: 0)
    for _ in range(3):
        allocator.release_free_memory()
    assert len(trims) == 3


def test_nothing_happens_where_the_allocator_was_not_tuned(trims: Trims, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_done", False)
    allocator.release_free_memory()
    with allocator.mapped_chunks(1 << 20):
        pass
    assert trims == []


def test_the_resident_size_is_read() -> None:
    assert allocator._resident_bytes() > 10 * 2**20  # this interpreter with torch imported
