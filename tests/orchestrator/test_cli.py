"""The command line: exit codes, error messages, the run summary, and atomic outputs.

Runs that need workers go through ``python -m orchestrator`` in a subprocess, each
starting its own local Ray (``RAY_ADDRESS=local``: never a cluster someone else
started on this machine); there are few of them because each costs seconds.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _util import reference

from orchestrator import cli
from orchestrator.sources import Synthetic

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RUN_TIMEOUT_S = 180


def orchestrator(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def run_default(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The CPU default, small, writing under tmp_path."""
    sets = [f"output.path={tmp_path / 'out.npy'}", f"output.report={tmp_path / 'report.json'}", "input.rows=2048",
            "dispatch.batch_rows=256", *overrides]
    return orchestrator("run", "--config", "configs/cpu_default.yaml", *[a for s in sets for a in ("--set", s)])


def write_config(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- help and validate (no Ray) ---------------------------------------------------------------------

def test_help_names_the_commands_and_the_exit_codes():
    r = orchestrator("--help")
    assert r.returncode == 0
    for text in ("run", "validate", "bench", "exit codes: 0 success, 2 a bad config or input, 1 a failed run",
                 "orchestrator run --config configs/cpu_default.yaml", "ray job submit"):
        assert text in r.stdout


def test_validate_accepts_every_config_in_configs():
    r = orchestrator("validate", *map(str, CONFIGS))
    assert r.returncode == 0, r.stderr
    for path in CONFIGS:
        assert f"{path}: ok" in r.stdout


def test_validate_names_every_bad_field_with_its_path_and_exits_2(tmp_path, capsys):
    good = write_config(tmp_path, "pipeline:\n  depth: 4\n", "good.yaml")
    bad = write_config(tmp_path, """
model:
  source: zoo:tiny_mlp
  colour: red              # unknown field
pipeline:
  depth: four              # wrong type
  staging_threads: 0       # out of range
errors:
  on_error: ignore         # not one of the choices
faults:
  worker-0:
    delay_s: -1            # out of range
""", "bad.yaml")
    assert cli.main(["validate", good, bad]) == cli.EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert f"{good}: ok" in out and bad not in out
    assert f"{bad}: invalid config (5 problems)" in err
    for path in ("model.colour", "pipeline.depth", "pipeline.staging_threads", "errors.on_error",
                 "faults.worker-0.delay_s"):
        assert f"  {path}: " in err, err


def test_validate_reports_yaml_syntax_errors_with_the_line(tmp_path, capsys):
    bad = write_config(tmp_path, "pipeline:\n  depth: [3\n")
    assert cli.main(["validate", bad]) == cli.EXIT_BAD_INPUT
    assert "line" in capsys.readouterr().err


# -- run: exit 2 before any Ray start ---------------------------------------------------------------

def test_run_with_a_bad_override_exits_2_naming_it(capsys):
    code = cli.main(["run", "--config", str(REPO / "configs" / "cpu_default.yaml"), "--set", "pipeline.depth=99"])
    assert code == cli.EXIT_BAD_INPUT
    assert "pipeline.depth: Input should be less than or equal to 16 (got 99)" in capsys.readouterr().err


def test_run_with_a_missing_config_exits_2(capsys):
    assert cli.main(["run", "--config", "no/such/config.yaml"]) == cli.EXIT_BAD_INPUT
    assert "no/such/config.yaml" in capsys.readouterr().err


def test_run_with_a_missing_input_file_exits_2(tmp_path):
    r = run_default(tmp_path, "input.kind=npy", f"input.path={tmp_path / 'missing.npy'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"bad input: input.path {tmp_path / 'missing.npy'}: no such file" in r.stderr
    assert "started 2 workers" not in r.stderr and not (tmp_path / "out.npy").exists()  # failed before Ray


# -- run: real runs --------------------------------------------------------------------------------

def test_run_succeeds_with_outputs_in_input_order_and_a_one_screen_summary(tmp_path):
    r = run_default(tmp_path, "input.seed=7")
    assert r.returncode == 0, r.stderr[-3000:]

    syn = Synthetic(2048, (16,), "float32", seed=7)
    x = np.concatenate([syn.batch(i, a, a + 256) for i, a in enumerate(range(0, 2048, 256))])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference(x, batch_rows=256), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "out.batch_ids.npy"), np.repeat(np.arange(8), 256))

    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["status"], report["exit_code"], report["rows"]) == ("ok", 0, 2048)
    assert report["config"]["input"]["seed"] == 7 and report["dispatch"]["completed"] == 8

    summary = r.stdout.strip().splitlines()
    assert summary[0].startswith("OK: zoo:tiny_mlp, 2,048 rows in ") and summary[-1] == "  exit code 0"
    assert len(summary) <= 20
    assert f"  outputs: {tmp_path / 'out.npy'} (2,048 rows)" in summary
    # stderr is a pipe here, as in a Ray job's log: progress comes as lines, not a redrawn bar
    assert "progress: 2,048/2,048 rows (100%)" in r.stderr and "\r" not in r.stderr


def test_a_failed_run_exits_1_and_writes_no_outputs(tmp_path):
    every_batch = "[0, 1, 2, 3, 4, 5, 6, 7]"
    r = run_default(tmp_path, "errors.on_error=raise", f"faults.worker-0.raise_on_batches={every_batch}",
                    f"faults.worker-1.raise_on_batches={every_batch}")
    assert r.returncode == 1, r.stderr[-3000:]
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.batch_ids.npy").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and "fault injection" in report["error"]
    assert r.stdout.strip().splitlines()[0].startswith("FAILED: ")


def test_skipped_batches_exit_1_with_the_rest_written(tmp_path):
    r = run_default(tmp_path, "errors.on_error=skip", "faults.worker-0.raise_on_batches=[3]",
                    "faults.worker-1.raise_on_batches=[3]")
    assert r.returncode == 1, r.stderr[-3000:]
    ids = np.load(tmp_path / "out.batch_ids.npy")
    np.testing.assert_array_equal(ids, np.repeat([0, 1, 2, 4, 5, 6, 7], 256))
    assert np.load(tmp_path / "out.npy").shape == (7 * 256, 8)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "incomplete" and len(report["failed_batches"]) == 1
    assert "  failed: batch 3 on worker worker-" in r.stdout


def test_an_input_of_the_wrong_dtype_exits_2(tmp_path):
    np.save(tmp_path / "f64.npy", np.zeros((100, 16), np.float64))
    r = run_default(tmp_path, f"input.path={tmp_path / 'f64.npy'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "bad input: input.path" in r.stderr
    assert "rows are float64 (16,), the model 'tiny_mlp' takes float32 (16,)" in r.stderr
    assert not (tmp_path / "out.npy").exists()


# -- outputs ------------------------------------------------------------------------------------------

def test_npy_outputs_come_with_their_batch_ids(tmp_path):
    ids = np.array([0, 0, 1, 2], np.int64)
    rng = np.random.default_rng(0)
    outputs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 1, 1)]
    assert cli.write_outputs(str(tmp_path / "o.npy"), ids, outputs) == 4
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), np.concatenate(outputs))
    np.testing.assert_array_equal(np.load(tmp_path / "o.batch_ids.npy"), ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.batch_ids.npy", "o.npy"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o.npy").stat().st_mode & 0o777 == 0o666 & ~umask


def test_parquet_outputs_have_batch_ids_and_a_column_per_output(tmp_path):
    ids = np.array([0, 0, 1], np.int64)
    rng = np.random.default_rng(1)
    grids = [rng.standard_normal((n, 2, 2)).astype(np.float32) for n in (2, 1)]
    outputs = [(grids[0], np.array([5, 6])), (grids[1], np.array([7]))]
    cli.write_outputs(str(tmp_path / "o.parquet"), ids, outputs)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names == ["batch_id", "output_0", "output_1"]
    assert table.column("batch_id").to_pylist() == [0, 0, 1]
    assert table.column("output_1").to_pylist() == [5, 6, 7]
    # Each row's 2x2 grid flattened in C order: a transposed or shuffled row would differ.
    np.testing.assert_array_equal(np.array(table.column("output_0").to_pylist(), np.float32).reshape(-1, 2, 2),
                                  np.concatenate(grids))
    assert json.loads(table.schema.metadata[b"row_shapes"]) == {"output_0": [2, 2], "output_1": []}


def test_npy_refuses_several_outputs(tmp_path):
    with pytest.raises(ValueError, match="write .parquet"):
        cli.write_outputs(str(tmp_path / "o.npy"), np.zeros(1, np.int64), [(np.zeros(1), np.zeros(1))])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "o.npy"
    path.write_bytes(b"the previous run")

    def write(f):
        f.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cli._atomic_write(path, write)
    assert path.read_bytes() == b"the previous run" and list(tmp_path.iterdir()) == [path]


# Writes the batch ids, then stalls half-way through the outputs, like a slow disk, until killed.
_KILLED_MID_WRITE = """
import sys, time
import numpy as np
from orchestrator import cli

real_save = np.save

def stalling_save(f, arr, *args, **kwargs):
    if arr.dtype == np.float32:
        f.write(b"\\x93NUMPY" + bytes(4096))
        f.flush()
        print("mid-write", flush=True)
        time.sleep(600)
    real_save(f, arr, *args, **kwargs)

np.save = stalling_save
cli.write_outputs(sys.argv[1], np.arange(4, dtype=np.int64), [np.ones((4, 3), np.float32)])
"""


def test_a_writer_killed_mid_write_leaves_no_final_file(tmp_path):
    path = tmp_path / "o.npy"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == "mid-write", proc.stderr.read() if not ready else ""
        temporaries = list(tmp_path.glob(".o.npy.*.tmp"))
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    # What is left: the complete batch ids (written first) and the hidden temporary of the outputs.
    np.testing.assert_array_equal(np.load(tmp_path / "o.batch_ids.npy"), np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "o.batch_ids.npy") == [temporaries[0].name]
