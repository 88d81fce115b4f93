"""The driver against a real local Ray cluster with logical GPUs (CPU backend in the workers)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from _util import RAY_GPUS, reference, rows, run_config


from orchestrator import ModelError, Npy, Orchestrator, Parquet, RunConfig, Synthetic, WorkerStartError
from orchestrator.sources import batches

pytestmark = pytest.mark.usefixtures("ray_local")


def config(**sections) -> RunConfig:
    return run_config(64, **sections)


@pytest.fixture(scope="module")
def orch():
    if not ray.is_initialized():
        ray.init(num_cpus=16, num_gpus=RAY_GPUS, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with Orchestrator(config()) as o:
        yield o


def test_one_worker_per_logical_gpu_with_distinct_gpu_ids(orch):
    assert len(orch.workers) == 2
    ids = [tuple(info["gpu_ids"]) for info in orch.worker_info]
    assert len(set(ids)) == 2 and all(len(i) == 1 for i in ids)
    assert all(info["device"] == "cpu" for info in orch.worker_info)  # no CUDA here: CPU backend


def _write_parquet(path, x: np.ndarray) -> None:
    pq.write_table(pa.table({"features": pa.array(list(x))}), path, row_group_size=100)


@pytest.mark.parametrize("kind", ["numpy", "torch", "generator", "objectref", "objectrefs", "tensors", "npy", "parquet",
                                  "dataset"])
def test_every_input_kind_matches_single_process_reference(orch, tmp_path, kind):
    x = rows(1000, seed=len(kind))
    want = reference(x, batch_rows={"generator": 37, "objectrefs": 50, "tensors": 50}.get(kind, 64))
    if kind == "numpy":
        inputs = x
    elif kind == "torch":
        inputs = torch.from_numpy(x)
    elif kind == "generator":
        inputs = (x[i:i + 37] for i in range(0, len(x), 37))
    elif kind == "objectref":  # one ref of all 1000 rows: split into 64-row batches where it lies
        inputs = ray.put(x)
    elif kind == "objectrefs":
        inputs = [ray.put(x[i:i + 50]) for i in range(0, len(x), 50)]
    elif kind == "tensors":
        inputs = (torch.from_numpy(x[i:i + 50]) for i in range(0, len(x), 50))
    elif kind == "npy":
        np.save(tmp_path / "x.npy", x)
        inputs = Npy(str(tmp_path / "x.npy"))
    elif kind == "parquet":
        _write_parquet(tmp_path / "x.parquet", x)
        inputs = Parquet(str(tmp_path / "x.parquet"), column="features")
    else:
        inputs = ray.data.from_numpy(x)
    np.testing.assert_array_equal(orch.run(inputs), want)


def test_a_parquet_column_with_null_rows_is_a_clear_error(tmp_path):
    x = [list(row) for row in rows(5, seed=3)]
    x[3] = None
    pq.write_table(pa.table({"features": pa.array(x, type=pa.list_(pa.float32()))}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n.parquet: column 'features' has 1 null rows .*the first at its row 3"):
        list(batches(Parquet(str(tmp_path / "n.parquet")), 64))


def test_parquet_rows_of_nested_lists_keep_their_shape_and_ragged_rows_are_named(tmp_path):
    x = np.random.default_rng(4).standard_normal((70, 4, 4)).astype(np.float32)
    pq.write_table(pa.table({"img": pa.array([[list(r) for r in m] for m in x])}), tmp_path / "m.parquet")
    got = np.concatenate([b.source for b in batches(Parquet(str(tmp_path / "m.parquet")), 32)])
    np.testing.assert_array_equal(got, x)
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "r.parquet")
    with pytest.raises(ValueError, match=r"r.parquet: column 'v': rows hold lists of different lengths \(1 to 2\)"):
        list(batches(Parquet(str(tmp_path / "r.parquet")), 32))


def test_synthetic_inputs_are_seeded_and_shaped(orch):
    syn = Synthetic(300, (16,), "float32", seed=4)
    x = np.concatenate([syn.batch(i, a, min(a + 64, 300)) for i, a in enumerate(range(0, 300, 64))])
    np.testing.assert_array_equal(orch.run(syn), reference(x))


@pytest.mark.parametrize("ordered", [False, True])
def test_each_batch_returned_exactly_once(orch, ordered):
    x = rows(64 * 40 + 5, seed=3)
    results = list(orch.map(x, ordered=ordered))
    ids = [r.batch_id for r in results]
    assert sorted(ids) == list(range(41))
    if ordered:
        assert ids == list(range(41))
    assert {r.worker for r in results} == {"worker-0", "worker-1"}  # both GPUs were used
    got = np.concatenate([r.outputs for r in sorted(results, key=lambda r: r.batch_id)])
    np.testing.assert_array_equal(got, reference(x))
    assert results[-1].rows == 5 or any(r.rows == 5 for r in results)


def test_generator_of_ten_thousand_batches_keeps_driver_memory_bounded(orch):
    produced = 0
    consumed = 0
    most_outstanding = 0
    window = orch.config.inflight_per_worker * len(orch.workers)

    def gen():
        nonlocal produced
        for i in range(10_000):
            produced += 1
            yield rows(2, seed=i)

    for result in orch.map(gen()):
        consumed += 1
        most_outstanding = max(most_outstanding, produced - consumed)
    assert consumed == 10_000
    # The driver pulls a batch only when a worker has room: never more than the windows hold.
    assert most_outstanding <= window + 1, (most_outstanding, window)


def test_report_has_throughput_workers_and_bound(orch):
    before = orch.report()  # the module's orchestrator: earlier tests' maps are in it too
    list(orch.map(rows(640, seed=9)))
    rep = orch.report()
    assert rep["rows"] - before["rows"] == 640 and rep["seconds"] > before["seconds"] and rep["rows_per_second"] > 0
    assert {w["name"] for w in rep["workers"]} == {"worker-0", "worker-1"}
    assert all(line.split(":")[0].endswith("-bound") or line == "no timed batches yet" for line in rep["bound"])
    assert rep["dispatch"]["completed"] - before["dispatch"].get("completed", 0) == 10
    assert all(w["graphs"]["enabled"] is False for w in rep["workers"])  # graph stats reach the report


def test_bad_inputs_are_clear_errors(orch):
    with pytest.raises(TypeError, match="unsupported inputs dict"):
        list(orch.map({"a": 1}))
    with pytest.raises(ValueError, match="batch_rows=65 exceeds pipeline.max_batch_rows=64"):
        orch.map(rows(10), batch_rows=65)  # at the call, not at the first next()
    with pytest.raises(TypeError, match="inputs: a torch.bfloat16 tensor has no numpy equivalent"):
        list(orch.map(torch.from_numpy(rows(10)).bfloat16()))
    with pytest.raises(TypeError, match="batch 1: a torch.bfloat16 tensor"):
        list(orch.map(iter([torch.from_numpy(rows(4)), torch.from_numpy(rows(4)).bfloat16()])))
    from orchestrator import InputError
    with pytest.raises(InputError, match=r"batch 0 on worker worker-\d: expected float32 \(N, 16\), got float64"):
        orch.run(rows(10).astype(np.float64))
    np.testing.assert_array_equal(orch.run(rows(10)), reference(rows(10)))  # still usable


def test_slow_worker_does_not_hold_back_the_fast_one():
    # worker-0 takes a minute a batch: results come as they complete, so the first ten are all worker-1's.
    cfg = config(faults={"worker-0": {"delay_s": 60.0}}, dispatch={"inflight_per_worker": 2})
    with Orchestrator(cfg) as o:
        first = []
        for r in o.map(rows(64 * 30, seed=5)):
            first.append(r.worker)
            if len(first) == 10:
                break
    assert first == ["worker-1"] * 10


def test_model_error_names_batch_and_worker_and_skip_policy():
    cfg = config(faults={"worker-0": {"raise_on_batches": [3]}, "worker-1": {"raise_on_batches": [3]}})
    x = rows(64 * 8, seed=6)
    with Orchestrator(cfg) as o:
        with pytest.raises(ModelError, match=r"batch 3 on worker worker-\d: fault injection"):
            o.run(x)
    with Orchestrator(cfg.model_copy(update={"errors": cfg.errors.model_copy(update={"on_error": "skip"})})) as o:
        results = list(o.map(x, ordered=True))
    assert [r.batch_id for r in results] == list(range(8))
    assert results[3].error is not None and results[3].outputs is None
    np.testing.assert_array_equal(results[4].outputs, reference(x[256:320]))


def test_run_with_skip_leaves_the_failed_batches_out_and_counts_only_good_rows(caplog):
    cfg = config(faults={"worker-0": {"raise_on_batches": [2, 5]}, "worker-1": {"raise_on_batches": [2, 5]}},
                 errors={"on_error": "skip"})
    x = rows(64 * 8, seed=8)
    with Orchestrator(cfg) as o:
        out = o.run(x)
        report = o.report()
    keep = np.r_[0:128, 192:320, 384:512]
    np.testing.assert_array_equal(out, reference(x)[keep])
    assert report["rows"] == 6 * 64 and report["dispatch"]["failed"] == 2
    assert "2 batches failed and were skipped (ids [2, 5])" in caplog.text


def test_a_map_left_early_lets_its_input_go(orch):
    from ray._private.internal_api import memory_summary  # the object store's own count of what is held

    def needed() -> float:  # percent of the object store that references still hold
        line = next(l for l in memory_summary(stats_only=True).splitlines() if "Plasma memory usage" in l)
        return float(line.split(",")[-1].split("%")[0])

    base = needed()
    x = np.random.default_rng(10).standard_normal((1 << 20, 16)).astype(np.float32)  # 64 MiB, put once by map
    stream = orch.map(x)
    next(stream)
    assert needed() > base
    stream.close()  # a break out of the loop does the same
    deadline = time.monotonic() + 30
    while needed() > base and time.monotonic() < deadline:  # the calls already running finish first
        time.sleep(0.2)
    assert needed() <= base
    np.testing.assert_array_equal(orch.run(rows(100)), reference(rows(100)))  # still usable


def test_shutdown_leaves_no_actors_behind():
    with Orchestrator(config()) as o:
        handles = [w.actor for w in o.workers]
        o.run(rows(100))
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.ping.remote(), timeout=30)
    assert ray.is_initialized()  # it did not start Ray, so it leaves Ray running


def test_more_workers_than_gpus_is_a_clear_error():
    with pytest.raises(WorkerStartError, match="you requested 5 workers x 1 GPU = 5 GPUs but the cluster has 4"):
        Orchestrator(config(cluster={"num_workers": 5})).start()


def test_fractional_gpus_pack_two_workers_per_gpu():
    with Orchestrator(config(cluster={"gpus_per_worker": 0.5, "num_workers": 4})) as o:
        assert len(o.workers) == 4
        ids = [i["gpu_ids"] for i in o.worker_info]
        assert len({tuple(i) for i in ids}) == 2 and all(len(i) == 1 for i in ids)  # two workers per GPU
        np.testing.assert_array_equal(o.run(rows(300)), reference(rows(300)))


def test_model_that_fails_to_build_is_reported():
    # A factory that raises when called: only the worker can find that out.
    with pytest.raises(WorkerStartError, match="failed to build its model 'json:dumps'.*ModelLoadError.*json:dumps"):
        Orchestrator(config(model={"source": "json:dumps"}, cluster={"worker_start_timeout_s": 60})).start()


@pytest.mark.gpu
def test_importing_the_driver_starts_no_cuda_context():
    # A fresh process: in this one other tests may have started CUDA. Without CUDA nothing could start it.
    check = "import orchestrator, torch; assert torch.cuda.is_available(); assert not torch.cuda.is_initialized()"
    done = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).parents[2], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
