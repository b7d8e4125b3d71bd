"""The CLI's flow runs without Prefect's flow-run heartbeats only when there is no Prefect
server to hear them (no PREFECT_API_URL: the temporary in-process server dies with the
process); with a server configured they stay on."""
from __future__ import annotations

from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings,
                              temporary_settings)

from flows.cli import no_heartbeats_without_server


def test_no_heartbeats_without_a_server():
    with temporary_settings(updates={PREFECT_API_URL: None}):
        before = get_current_settings().flows.heartbeat_frequency
        with no_heartbeats_without_server():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == before
    assert before is not None  # Prefect's default sends them


def test_heartbeats_stay_with_a_configured_server():
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        before = get_current_settings().flows.heartbeat_frequency
        with no_heartbeats_without_server():
            assert get_current_settings().flows.heartbeat_frequency == before is not None
