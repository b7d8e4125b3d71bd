"""Helpers shared by the tests that run servers in child processes: polling and stopping."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def wait_until(predicate, timeout_s: float, step_s: float = 0.25) -> bool:
    """Poll ``predicate`` every ``step_s`` until it is true or ``timeout_s`` has passed."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def stop(proc: subprocess.Popen, timeout_s: float = 30, group: bool = False) -> None:
    """SIGTERM ``proc`` (its whole process group with ``group``), SIGKILL if it outlives ``timeout_s``."""
    def send(sig):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def intake_state(status_path: Path) -> str | None:
    """The ``state`` of a service intake's status.json, None while unreadable."""
    try:
        return json.loads(Path(status_path).read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


def intake_finished(status_path: Path) -> bool:
    """Whether the service has finished the study (done or failed)."""
    return intake_state(status_path) in ("done", "failed")
