"""The pure helpers of tools/bench_hardening.py (the bench itself runs in `make bench`)."""

import base64

import pytest

from tools.bench_hardening import corrected, dribble_chunks, percentile, plain_response, summary


def test_percentile_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 51  # round(0.5 * 99) = 50 -> the 51st
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_corrected_adds_the_requests_a_stall_held_up():
    assert corrected([0.005, 0.010], 0.020) == [0.005, 0.010]  # no stall, nothing added
    out = corrected([0.1], 0.02)
    assert out[0] == 0.1
    assert len(out) == 5  # 0.1, then 0.08, 0.06, 0.04, 0.02 (give or take float rounding)
    assert out[1:] == pytest.approx([0.08, 0.06, 0.04, 0.02], abs=1e-9)
    assert corrected([0.5], 0) == [0.5]


def test_one_stall_among_many_fast_replies_decides_p99():
    samples = [0.001] * 400 + [11.0]  # one 11 s stall, as the issue saw
    s = summary(samples, 0.020)
    assert s["n"] == 401 and s["max"] == 11.0 and s["p50"] == 0.001
    assert percentile(samples, 99) == 0.001  # uncorrected, the stall would not show
    assert s["p99"] > 10.0


def test_summary_of_nothing():
    s = summary([], 0.02)
    assert s["n"] == 0 and s["p99"] != s["p99"]  # NaN


def test_plain_response_and_chunks():
    assert base64.b64decode(plain_response("u", "p")) == b"\0u\0p"
    data = bytes(range(256)) * 5
    chunks = list(dribble_chunks(data, 400))
    assert b"".join(chunks) == data and [len(c) for c in chunks] == [400, 400, 400, 80]
