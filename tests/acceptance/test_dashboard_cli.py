"""`saga dashboard` as an operator starts it: loopback by default, a clear refusal to listen
elsewhere without a token, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

from saga.settings import Settings
from tests.processes import ROOT


def test_saga_dashboard_serves_on_loopback_and_stops_on_sigterm(settings: Settings) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "saga", "dashboard", "--port", "0", "--read-only"],
        env=settings.child_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("dashboard on http://127.0.0.1:"), line
            url = line.split()[2]
            with urllib.request.urlopen(f"{url}/api/runs", timeout=30) as response:
                assert json.load(response) == {"runs": [], "next_cursor": None}
                assert response.headers["X-Frame-Options"] == "DENY"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_saga_dashboard_refuses_another_address_without_a_token(settings: Settings) -> None:
    env = settings.child_env()
    env.pop("SAGA_DASHBOARD_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "saga", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "SAGA_DASHBOARD_TOKEN" in proc.stderr and "0.0.0.0" in proc.stderr
