"""The latency measurement's pauses: edits fall at any point of the sensors' cycle.

Each edit used to follow the last one's run by the same time, so all met the sensors' cycle
at one point: 25 of 40 edits took 9.9 to 10.2 s and the rest 4 to 5.3 s, a median of 9.91 s
that said more about that point than about the sync (the same demo, edits at random points:
median 6.36 s)."""

from __future__ import annotations

from crm_assets.latency import edit_pauses, parse_args


def test_edits_wait_a_random_time_up_to_the_sensors_interval(monkeypatch):
    pauses = edit_pauses(400, 5.0, "run-1")
    assert all(0 <= p < 5.0 for p in pauses)
    # spread over the whole cycle, not bunched at one point
    assert min(pauses) < 0.5 and max(pauses) > 4.5
    assert len({round(p, 6) for p in pauses}) == 400
    assert edit_pauses(400, 5.0, "run-1") == pauses  # a run's pauses can be drawn again
    assert edit_pauses(3, 0.0, "run-1") == [0.0, 0.0, 0.0]  # --spread 0: the old behaviour

    monkeypatch.setenv("CRM_SYNC_SENSOR_INTERVAL", "2")
    assert parse_args([]).spread == 2.0  # the demo's sensors' interval, when set
    monkeypatch.delenv("CRM_SYNC_SENSOR_INTERVAL")
    assert parse_args([]).spread == 5.0
    assert parse_args(["--spread", "0"]).spread == 0.0
