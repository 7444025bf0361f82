"""Monitoring state keyed by window end: a retried window (an Airflow retry) replaces its own verdict,
sees the counters from before it, and decides as its first attempt did; two windows count as two."""

import json

import pytest

from monitoring import monitor
from monitoring.monitor import HISTORY_KEPT, MonitorConfig, MonitorSettings, MonitorState, WindowRecord, run_window
from monitoring.policy import PolicyConfig, WindowVerdict

CONFIG = MonitorConfig(policy=PolicyConfig(persist_windows=2, cooldown_minutes=60))
GATEWAY, TRITON = "http://10.0.0.5:8090/metrics", "http://triton:8002/metrics"


@pytest.fixture()
def settings(tmp_path) -> MonitorSettings:
    # An empty prediction log and no models: the windows are judged on the servers' counters alone.
    return MonitorSettings(f"sqlite:///{tmp_path / 'predictions.db'}", tmp_path / "models", "model", "unused",
                           tmp_path / "state")


def _counters(monkeypatch, gateway: dict[str, float] | None, triton: tuple[float, float] | None) -> None:
    """What the next window's scrapes read: the gateway's counters by status, Triton's (success, failure),
    each of one replica."""
    monkeypatch.setattr(monitor, "gateway_counts", lambda url, model=None: None if gateway is None else {GATEWAY: gateway})
    monkeypatch.setattr(monitor, "triton_counts", lambda url, model: None if triton is None else
                        {TRITON: {"success": triton[0], "failure": triton[1]}})


def _window(settings: MonitorSettings, end: float) -> dict:
    return run_window(settings, CONFIG, end, False, settings.state_dir / "windows" / str(int(end)),
                      log_to_mlflow=False)


def _state(settings: MonitorSettings) -> MonitorState:
    return MonitorState.load(settings.state_dir / "state.json")


def test_a_retried_window_replaces_its_verdict_and_is_not_two_windows(settings, monkeypatch):
    _counters(monkeypatch, None, (100.0, 10.0))
    first = _window(settings, 900)
    _counters(monkeypatch, None, (200.0, 20.0))  # the retry reads later counters: still a breach
    retry = _window(settings, 900)
    assert first["verdict"]["status"] == retry["verdict"]["status"] == "slo_breach"
    assert not retry["decision"]["trigger"] and "1/2" in retry["decision"]["reason"]
    assert [record.window_end for record in _state(settings).windows] == [900]


def test_a_retry_takes_its_deltas_against_the_counters_from_before_its_window(settings, monkeypatch):
    _counters(monkeypatch, {"200": 100.0}, (1000.0, 0.0))
    _window(settings, 900)
    _counters(monkeypatch, {"200": 150.0, "503": 50.0}, (1100.0, 50.0))
    first = _window(settings, 1800)
    retry = _window(settings, 1800)  # same counters: a retry must not see a zero delta
    for result in (first, retry):
        evidence = result["verdict"]["evidence"]
        assert evidence["requests"] == 100 and evidence["triton_error_rate"] == pytest.approx(50 / 150)
        assert result["verdict"]["status"] == "slo_breach"
    assert _state(settings).windows[-1].counters == {"gateway": {GATEWAY: {"200": 150.0, "503": 50.0}},
                                                     "triton": {TRITON: {"success": 1100.0, "failure": 50.0}}}


def test_a_window_without_counters_keeps_the_earlier_baseline(settings, monkeypatch):
    _counters(monkeypatch, {"200": 100.0}, None)
    _window(settings, 900)
    _counters(monkeypatch, None, None)  # the gateway was unreachable
    _window(settings, 1800)
    _counters(monkeypatch, {"200": 130.0}, None)
    assert _window(settings, 2700)["verdict"]["evidence"]["requests"] == 30


def test_two_windows_count_as_two_and_a_retry_decides_as_its_first_attempt(settings, monkeypatch):
    _counters(monkeypatch, None, (100.0, 10.0))
    assert not _window(settings, 900)["decision"]["trigger"]
    _counters(monkeypatch, None, (200.0, 20.0))
    first = _window(settings, 1800)
    assert first["decision"]["trigger"]
    retry = _window(settings, 1800)  # its own trigger is no cooldown against it
    assert retry["decision"] == first["decision"]
    _counters(monkeypatch, None, (300.0, 30.0))
    cooling = _window(settings, 2700)  # the next window is within the 60-minute cooldown
    assert not cooling["decision"]["trigger"] and "cooldown" in cooling["decision"]["reason"]
    assert [(r.window_end, r.triggered) for r in _state(settings).windows] == [(900, False), (1800, True),
                                                                              (2700, False)]


def _record(minute: int, triggered: bool = False) -> WindowRecord:
    return WindowRecord(WindowVerdict(minute * 60.0, "ok"), {"gateway": {GATEWAY: {"200": float(minute)}}},
                        triggered)


def test_old_windows_are_pruned_but_the_last_trigger_is_kept(tmp_path):
    state = MonitorState()
    for minute in range(HISTORY_KEPT + 50):
        state.record(_record(minute, triggered=minute in (3, 10)))
    assert len(state.windows) == HISTORY_KEPT + 1
    assert state.windows[0].window_end == 600 and state.windows[1].window_end == 50 * 60
    path = tmp_path / "state.json"
    state.save(path)
    loaded = MonitorState.load(path)
    assert loaded == state and loaded.last_trigger_before(1e9) == 600
    assert loaded.replica_baseline(60 * 60, "gateway") == {GATEWAY: {"200": 59.0}}
    assert loaded.replica_baseline(0, "gateway") == {}


def test_a_state_file_of_the_earlier_layout_is_read(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"history": [WindowVerdict(900.0, "drift").to_dict(),
                                            WindowVerdict(1800.0, "drift").to_dict(),
                                            WindowVerdict(1800.0, "drift").to_dict()],  # a retry's duplicate
                                "last_trigger_at": 1800.0, "gateway_counts": {"200": 5.0}, "triton_counts": {}}))
    state = MonitorState.load(path)
    assert [(r.window_end, r.triggered) for r in state.windows] == [(900.0, False), (1800.0, True)]
    # The one flat reading stands for the replica read now when only one is, else for none.
    assert state.replica_baseline(2700, "gateway", {GATEWAY: {}}) == {GATEWAY: {"200": 5.0}}
    assert state.replica_baseline(2700, "gateway", {GATEWAY: {}, "http://10.0.0.6:8090/metrics": {}}) == {}
    assert state.replica_baseline(2700, "triton", {TRITON: {}}) == {}


def test_verdicts_saved_before_they_had_kinds_load_with_kinds_from_their_reasons(tmp_path):
    path = tmp_path / "state.json"
    verdicts = [{"window_end": 900.0, "status": "slo_breach", "reasons": ["p95 latency 150.0 ms > 100 ms"],
                 "evidence": {}},
                {"window_end": 1800.0, "status": "drift", "reasons": ["output drift in confidence"], "evidence": {}},
                {"window_end": 2700.0, "status": "ok", "reasons": [], "evidence": {}}]
    path.write_text(json.dumps({"windows": [{"verdict": verdict, "counters": {}, "triggered": False}
                                            for verdict in verdicts]}))
    assert [r.verdict.kinds for r in MonitorState.load(path).windows] == [("latency",), ("drift",), ()]
