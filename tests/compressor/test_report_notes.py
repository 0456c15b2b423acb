"""report.md's artifact latency row says how the artifact was tuned and where."""
from __future__ import annotations

from compressor.report import tuning_note


def test_tuning_note_untuned_local_and_ray():
    assert tuning_note({"artifact": {"tuning": {"mode": "untuned"}}}) == ", untuned"
    local = {"mode": "tune", "trials_run": 8, "records_applied": 2, "tasks": 3, "tasks_reused": 1, "executor": "local"}
    assert tuning_note({"artifact": {"tuning": local}}) == ", tuned 8 new trials, 2/3 functions with records, 1 reused"
    ray = {**local, "executor": "ray", "workers": 2}
    assert tuning_note({"artifact": {"tuning": ray}}) == (
        ", tuned 8 new trials on ray (2 workers), 2/3 functions with records, 1 reused")
    assert tuning_note({"artifact": None}) == "" and tuning_note({}) == ""
