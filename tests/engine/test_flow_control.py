"""Pure flow-control decisions."""

from __future__ import annotations

import pytest

from engine.flow_control import (
    Admission,
    BatchLimit,
    BatchPick,
    admit_frame,
    is_out_of_memory,
    round_robin,
    round_robin_batch,
)


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


def test_round_robin_batch_takes_one_item_each_of_the_leaders_key():
    keys = ["a", "b", "a", "a"]
    pick = round_robin_batch(keys, -1, lambda k: True, lambda k: k, max_batch=4)
    # "b" was passed over, so the next pick starts at it.
    assert pick == BatchPick([0, 2, 3], after=0)
    assert round_robin_batch(keys, pick.after, lambda k: True, lambda k: k, max_batch=4) == BatchPick([1], after=1)


def test_round_robin_batch_never_batches_an_item_without_key():
    assert round_robin_batch([None, "a"], -1, lambda k: True, lambda k: k, max_batch=2).indices == [0]
    assert round_robin_batch(["a", None, "a"], -1, lambda k: True, lambda k: k, max_batch=3).indices == [0, 2]
    assert round_robin_batch(["a", "a"], -1, lambda k: False, lambda k: k, max_batch=2) is None


@pytest.mark.parametrize("count", [1, 3, 5])
@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_round_robin_batch_keeps_flooding_items_within_one_frame(count, max_batch):
    served = [0] * count
    after = -1
    for _ in range(30):
        pick = round_robin_batch(["a"] * count, after, lambda k: True, lambda k: k, max_batch)
        assert len(set(pick.indices)) == len(pick.indices) == min(max_batch, count)
        for index in pick.indices:
            served[index] += 1
        after = pick.after
        assert max(served) - min(served) <= 1, served


@pytest.mark.parametrize("keys", [["a", "b", "a"], ["a", None, "a", "b"], ["b", "a", "a", "a", "c"]])
@pytest.mark.parametrize("max_batch", [2, 3])
def test_round_robin_batch_with_mixed_keys_serves_everyone_every_round(keys, max_batch):
    picks = []
    after = -1
    for _ in range(30):
        pick = round_robin_batch(keys, after, lambda k: True, lambda k: k, max_batch)
        assert len({keys[index] for index in pick.indices}) == 1
        picks.append(pick.indices)
        after = pick.after
    for start in range(len(picks) - len(keys) + 1):
        window = {index for indices in picks[start:start + len(keys)] for index in indices}
        assert window == set(range(len(keys))), (start, picks)


def test_a_batch_with_usage_is_led_by_the_least_used_ready_item():
    keys, used = ["a", "a", "b", "a"], [3.0, 0.5, 0.1, 2.0]
    pick = round_robin_batch(keys, -1, lambda k: True, lambda k: k, max_batch=4, usage=lambda k: used[keys.index(k)])
    assert pick.indices[0] == 2  # "b" used the least
    by_index = round_robin_batch(list(range(4)), -1, lambda i: True, lambda i: "a", max_batch=2,
                                 usage=lambda i: used[i])
    assert by_index.indices == [2, 3] and by_index.after == 3  # led by the least used, filled in turn after it
    tied = round_robin_batch(list(range(3)), 0, lambda i: True, lambda i: None, max_batch=1, usage=lambda i: 0.0)
    assert tied.indices == [1]  # equal usage: round-robin as without usage
    assert round_robin_batch(list(range(3)), 0, lambda i: False, lambda i: "a", 2, usage=lambda i: 0.0) is None


def test_the_batch_limit_halves_on_out_of_memory_and_recovers_slowly():
    limit = BatchLimit(max_batch=8, recover_after=3)
    assert limit.limit == 8
    limit.out_of_memory(batch=6)
    assert limit.limit == 3  # half the call that failed
    limit.out_of_memory(batch=3)
    assert limit.limit == 1
    limit.out_of_memory(batch=1)
    assert limit.limit == 1  # never below one stream per call
    for _ in range(2):
        limit.succeeded(1)
    assert limit.limit == 1
    limit.succeeded(1)
    assert limit.limit == 2  # three calls in a row at the limit went through: one more
    limit.out_of_memory(batch=2)
    assert limit.limit == 1


def test_out_of_memory_is_recognised_from_each_backend():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : ... Failed to allocate memory"
                                         " for requested buffer: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
