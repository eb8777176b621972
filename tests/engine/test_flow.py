"""Pure flow-control decisions."""

from __future__ import annotations

from engine.flow import Admission, admit_frame, round_robin


def test_admit_below_the_limit():
    assert admit_frame(in_flight=1, waiting=1, max_in_flight=2) == Admission(accept=True)


def test_at_the_limit_a_new_frame_replaces_the_oldest_waiting():
    assert admit_frame(in_flight=2, waiting=1, max_in_flight=2) == Admission(accept=True, replace_index=0)


def test_at_the_limit_with_nothing_waiting_the_new_frame_is_dropped():
    assert admit_frame(in_flight=2, waiting=0, max_in_flight=2) == Admission(accept=False)


def test_round_robin_serves_the_next_ready_and_wraps():
    items = ["a", "b", "c", "d"]
    ready = {"a", "c"}.__contains__
    assert round_robin(items, after=0, is_ready=ready) == 2
    assert round_robin(items, after=2, is_ready=ready) == 0
    assert round_robin(items, after=-1, is_ready=ready) == 0
    assert round_robin(items, after=1, is_ready=lambda item: False) is None
    assert round_robin([], after=0, is_ready=ready) is None


def test_round_robin_is_fair_when_all_are_ready():
    items, served, last = list(range(3)), [], -1
    for _ in range(6):
        last = round_robin(items, after=last, is_ready=lambda item: True)
        served.append(last)
    assert served == [0, 1, 2, 0, 1, 2]
