"""`lab ui`: the MLflow UI over this repo's store (classic view), or one line saying why not."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from lab.pipeline import mlflow_import, tracking

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # a first start builds the sqlite schema; 2 slow cores take a while


class UIError(SystemExit):
    """The UI cannot serve: exits 1 with one line saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"lab ui: error: {message}")


def check_port(port: int) -> None:
    """Raise UIError if something already listens on HOST:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As servers bind: a port left in TIME_WAIT by a previous UI is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as err:
            taken = err.errno == errno.EADDRINUSE
            why = " is in use (another `lab ui`?): pick --port" if taken else f": {err.strerror}"
            raise UIError(f"port {port} on {HOST}{why}") from None


def prepare(import_from: Path | None) -> str:
    """The experiment's id; imports results first if asked, or says how to get runs if none."""
    if import_from is not None:
        done = mlflow_import.import_experiments(import_from)
        what = "already imported" if done.already else "imported"
        print(f"lab ui: {import_from}: {done.items} items {what}", file=sys.stderr)
    experiment_id = tracking.repo_experiment_id()
    client = MlflowClient(tracking.tracking_uri())
    if not client.search_runs([experiment_id], max_results=1):
        print("lab ui: no runs yet: `lab ui --import` (or `lab mlflow import experiments/`) loads"
              " the committed results; `dvc repro` makes new ones", file=sys.stderr)  # fmt: skip
    return experiment_id


def serve(port: int, import_from: Path | None = None) -> None:
    """Run `mlflow ui` until it ends or Ctrl-C; raise UIError if it cannot serve."""
    check_port(port)
    experiment_id = prepare(import_from)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking.tracking_uri(),
           "--host", HOST, "--port", str(port), "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env)
    try:
        _wait_until_serving(server, port)
        print(f"lab ui: {tracking.ui_url(experiment_id, port)}", file=sys.stderr)
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait()
        return
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if code != 0:
        raise UIError(f"mlflow ui exited with status {code}")


def _wait_until_serving(server: subprocess.Popen[bytes], port: int) -> None:
    """Poll the server's /health until it answers; raise UIError if it exits or never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (code := server.poll()) is not None:
            # mlflow ui can exit 0 without serving (e.g. it lost a race for the port).
            raise UIError(f"mlflow ui exited (status {code}) before serving on port {port}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise UIError(f"mlflow ui did not answer on port {port} within {START_TIMEOUT_S:.0f} s")
