"""The README's Ray job submission against a real Ray head started here, and stopped here.

The head runs in its own session (``start_new_session``) and its own ``--temp-dir``,
on free ports: it never touches another Ray on this machine (the test session's own
cluster, or a colleague's), nobody's ``ray.init()`` finds it through
``/tmp/ray/ray_current_cluster``, and teardown kills exactly the processes of that
session instead of ``ray stop``, which stops every Ray on the machine.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HEAD_START_DEADLINE_S = 90
JOB_DEADLINE_S = 240

pytestmark = pytest.mark.slow

# The dashboard (and its job server) needs ray[default], which CI installs with the project;
# the GPU machines' Ray bundle leaves it out.
pytest.importorskip("aiohttp", reason="the Ray dashboard's dependencies (ray[default]) are not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies left out: they are gone, only unreaped)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int, grace_s: float = 3.0, deadline_s: float = 20.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after ``grace_s``; return survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, deadline_s)):
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            members = _session_members(sid)
            if not members:
                return []
            for pid in members:  # again on each pass: a raylet may have started a worker meanwhile
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
    return _session_members(sid)


class Head:
    def __init__(self, temp_dir: str, dashboard_port: int, process: subprocess.Popen) -> None:
        self.temp_dir, self.address, self.process = temp_dir, f"http://127.0.0.1:{dashboard_port}", process

    def log(self) -> str:
        return Path(self.temp_dir, "head.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    from ray.job_submission import JobSubmissionClient

    # Short: Ray's unix sockets live under it and a socket path has at most 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="orchjob", dir="/tmp")
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A head started where ~/.ray/auth_token exists turns token auth on; this test is about
    # job submission, and its dashboard listens on 127.0.0.1 only.
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", "--num-cpus=4", "--num-gpus=0",
           "--object-store-memory=200000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(Path(temp_dir, "head.log"), "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(temp_dir, dashboard, process)
    try:
        end = time.monotonic() + HEAD_START_DEADLINE_S
        while True:
            try:
                JobSubmissionClient(head.address)
                break
            except OSError:  # not listening yet (ConnectionError), or up but not ready (an HTTP 5xx)
                if process.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"the Ray head did not come up (exit {process.poll()}):\n{head.log()}")
                time.sleep(1)
        yield head
    finally:
        survivors = _kill_session(process.pid)
        process.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test's Ray head survived: {survivors}"


def test_ray_job_submit_runs_the_cpu_default_and_writes_its_output(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.address)
    out = tmp_path / "out.npy"
    # As the README has it; the job finds the cluster through RAY_ADDRESS, which Ray sets for it.
    entrypoint = (f"{shlex.quote(sys.executable)} -m orchestrator run --config configs/cpu_default.yaml "
                  f"--set output.path={shlex.quote(str(out))} --set output.report={shlex.quote(str(tmp_path))}"
                  f"/report.json --set input.rows=20000")
    job = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO), "excludes": [".git", ".device", "out", "docs", ".pytest_cache"]})
    try:
        end = time.monotonic() + JOB_DEADLINE_S
        status = client.get_job_status(job)
        while not status.is_terminal() and time.monotonic() < end:
            time.sleep(1)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, f"job {job} is {status}; its log:\n{logs[-4000:]}"
    finally:
        if not client.get_job_status(job).is_terminal():
            client.stop_job(job)

    assert "progress: 20,000/20,000 rows (100%)" in logs, logs[-4000:]
    assert "OK: zoo:tiny_mlp, 20,000 rows" in logs, logs[-4000:]
    outputs = np.load(out)
    assert outputs.shape == (20000, 8) and outputs.dtype == np.float32
    ids = np.load(tmp_path / "out.batch_ids.npy")
    np.testing.assert_array_equal(ids, np.repeat(np.arange(20), 1024)[:20000])
