import json
import math

import numpy as np
import pytest

from client.stats import (
    StreamReport,
    delivered_fps,
    latency_summary_ms,
    meets_target,
    percentile,
    ramp_result,
    summarize,
)


@pytest.mark.parametrize("q", [0, 10, 50, 95, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.4, 0.1, 0.9, 0.3, 0.7, 0.2, 0.05]])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan_and_q_is_checked():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="`q`"):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds():
    summary = latency_summary_ms([0.010, 0.020, 0.030])
    assert summary == {"p50": pytest.approx(20.0), "p95": pytest.approx(29.0), "p99": pytest.approx(29.8)}


def test_delivered_fps():
    assert delivered_fps(30, 2.0) == 15.0
    assert delivered_fps(5, 0.0) == 0.0
    with pytest.raises(ValueError):
        delivered_fps(-1, 1.0)


def _reports():
    first = StreamReport(0, sent=12, received=10, in_window=9, dropped=1, errors=0, latencies_s=[0.1, 0.2])
    second = StreamReport(1, sent=8, received=8, in_window=6, dropped=0, errors=2, latencies_s=[0.3])
    return [first, second]


def test_summary_totals_and_fps_sum():
    summary = summarize(_reports(), duration_s=3.0)
    assert summary.per_stream_fps == [pytest.approx(3.0), pytest.approx(2.0)]
    assert summary.total_fps == pytest.approx(sum(summary.per_stream_fps))
    assert (summary.sent, summary.received, summary.dropped, summary.errors) == (20, 18, 1, 2)
    assert summary.latency_ms["p50"] == pytest.approx(200.0)


def test_summary_json_has_the_contract_keys_and_stays_valid_without_outputs():
    keys = {"streams", "duration_s", "total_fps", "per_stream_fps", "latency_ms", "errors", "dropped"}
    data = summarize(_reports(), 3.0).as_json()
    assert keys <= data.keys() and set(data["latency_ms"]) == {"p50", "p95", "p99"}
    empty = summarize([StreamReport(0, errors=1)], 3.0).as_json()
    assert empty["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    json.loads(json.dumps(empty, allow_nan=False))


def _run(streams, total_fps):
    reports = [StreamReport(index, in_window=round(total_fps / streams * 10)) for index in range(streams)]
    return summarize(reports, 10.0)


def test_ramp_reports_the_last_count_that_met_the_target():
    steps = [_run(1, 10.0), _run(2, 16.0), _run(3, 12.0)]
    assert meets_target(steps[1], 8.0) and not meets_target(steps[2], 8.0)
    result = ramp_result(steps, 8.0)
    assert (result.capacity, result.below_target_at) == (2, 3)


def test_ramp_that_never_falls_below_has_no_breaking_point():
    result = ramp_result([_run(1, 10.0), _run(2, 20.0)], 5.0)
    assert (result.capacity, result.below_target_at) == (2, None)
    assert ramp_result([_run(1, 2.0)], 5.0).capacity == 0
