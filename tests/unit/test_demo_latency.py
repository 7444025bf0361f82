"""The latency demo's SLO: breached by the slow champion, met by the fastest candidate with room."""

from __future__ import annotations

import pytest

from opsctl.demo_latency import choose_slo


def test_the_slo_leaves_the_fastest_candidate_room_over_the_estimated_overhead():
    # served 103 ms, the FP32 model's own median 24 ms: 79 ms overhead; the fastest model's p95 is 8 ms.
    assert choose_slo(103.0, 24.0, 8.0) == pytest.approx(97.85, abs=0.1)  # capped at 95% of the served p95
    assert choose_slo(100.0, 60.0, 4.0) == 50.0  # 40 ms overhead + 2.5 x 4 ms
    assert choose_slo(50.0, 80.0, 4.0) == 10.0  # no overhead measured: 2.5 x the fastest p95
