"""The fidelity table: one prediction against one run, and many against many (medians and
ranges), as `benchmarks/fidelity.py` writes them."""

from __future__ import annotations

import pytest

from measure.fidelity import compare, compare_runs


def test_one_prediction_against_one_run() -> None:
    rows = {r["metric"]: r for r in compare("p", [{"rollout_duration_s": 30.0, "failed": 0}],
                                            {"rollout_duration_s": 24.0, "failed": 0})}  # fmt: skip
    assert rows["rollout_duration_s"]["error_pct"] == pytest.approx(25.0)
    assert rows["failed"]["error_pct"] == 0.0  # equal zeros: no error
    assert rows["peak_gpus"]["error_pct"] is None  # in neither summary
    seeds = [{"rollout_duration_s": v} for v in (30.0, 18.0, 24.0)]  # the median of several
    assert compare("p", seeds, {"rollout_duration_s": 24.0})[0]["error_pct"] == 0.0


def test_many_runs_compare_medians_and_show_both_ranges() -> None:
    """Three runs whose first step took 9.7, 18.8 and 12 s (which replica Serve removed, and
    what it held) against five seeds: medians 12 and 13.2, the error between them, and the
    ranges; a step only some runs took still gets its row."""
    measured = [
        {"step_duration_s_1": 9.7, "failed": 0},
        {"step_duration_s_1": 18.8, "failed": 0},
        {"step_duration_s_1": 12.0, "failed": 1, "step_duration_s_2": 5.0},
    ]
    predicted = [{"step_duration_s_1": v, "failed": 0} for v in (7.7, 15.8, 16.7, 13.2, 10.8)]
    rows = {r["metric"]: r for r in compare_runs("unavailable=50", predicted, measured)}
    first = rows["step_duration_s_1"]
    assert (first["predicted"], first["measured"]) == (13.2, 12.0)
    assert first["error_pct"] == pytest.approx(10.0)
    assert (first["predicted_min"], first["predicted_max"]) == (7.7, 16.7)
    assert (first["measured_min"], first["measured_max"]) == (9.7, 18.8)
    assert first["runs"] == 3
    assert rows["failed"]["measured"] == 0.0 and rows["failed"]["error_pct"] == 0.0
    second = rows["step_duration_s_2"]
    assert (second["predicted"], second["measured"], second["runs"]) == (None, 5.0, 1)
    assert second["error_pct"] is None
