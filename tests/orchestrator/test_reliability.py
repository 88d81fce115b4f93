"""Faults with the real Ray: every batch ends exactly once, as a result or as an error naming it."""
from __future__ import annotations

import random
import re
import threading
import time

import numpy as np
import pytest
import ray
from _util import check_exactly_once, reference, rows, run_config

from orchestrator import BatchError, ModelError, NoWorkersError, Orchestrator, RunConfig

pytestmark = pytest.mark.usefixtures("ray_local")


def config(**sections) -> RunConfig:
    return run_config(32, **sections)


def run_and_report(cfg: RunConfig, x: np.ndarray) -> tuple[list, dict]:
    """Every batch's Result (completion order) and the report, from a fresh Orchestrator."""
    with Orchestrator(cfg) as o:
        return list(o.map(x)), o.report()


def test_worker_process_exits_mid_run_batches_are_redispatched_and_it_rejoins():
    x = rows(32 * 400, seed=1)
    slow = {"delay_s": 0.05}  # long enough a run for the restarted worker to come back
    cfg = config(faults={"worker-0": {**slow, "exit_after_batches": 10}, "worker-1": slow},
                 cluster={"max_worker_restarts": 5})
    results, report = run_and_report(cfg, x)
    check_exactly_once(results, 400, x, batch_rows=32)
    d = report["dispatch"]
    assert d["worker_deaths"] >= 1 and d["retried"] >= 1 and d["failed"] == 0
    # Each life of worker-0 runs at most 10 batches: more than 10 means it rejoined after a restart.
    assert sum(r.worker == "worker-0" for r in results) > 10


def test_actor_killed_by_ray_mid_run():
    x = rows(32 * 80, seed=2)
    cfg = config(faults={"worker-0": {"delay_s": 0.05}, "worker-1": {"delay_s": 0.05}})
    with Orchestrator(cfg) as o:
        results = []
        for r in o.map(x):
            results.append(r)
            if len(results) == 10:
                ray.kill(o.workers[1].actor, no_restart=False)
        report = o.report()
    check_exactly_once(results, 80, x, batch_rows=32)
    assert report["dispatch"]["worker_deaths"] == 1


def test_concurrent_maps_of_two_models_both_see_a_death_and_the_worker_rejoins():
    # Both dispatchers have batches on worker-0 when it exits, so both see the death and wait on
    # its probe: one settling the probe must not make the other give the worker up.
    sections = run_config(16, faults={"worker-0": {"exit_after_batches": 40, "delay_s": 0.02}},
                          cluster={"max_worker_restarts": 30}).model_dump(exclude={"model"})
    cfg = RunConfig.model_validate({**sections, "models": [{"name": "a", "source": "zoo:tiny_mlp"},
                                                          {"name": "b", "source": "zoo:tiny_mlp"}]})
    x = rows(16 * 1000, seed=11)
    results: dict[str, list] = {}
    with Orchestrator(cfg) as o:
        threads = [threading.Thread(target=lambda m=m: results.setdefault(m, list(o.map(x, model=m))))
                   for m in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report = o.report()
        gone = [w.gone for w in o.workers]
    assert gone == [None, None], gone
    for name in ("a", "b"):
        check_exactly_once(results[name], 1000, x, batch_rows=16)
    # Each death is counted once, however many dispatchers saw it (worker-0 lives up to 40 batches).
    assert 1 <= report["dispatch"]["worker_deaths"] <= 2000 // 40


def test_report_leaves_out_a_worker_that_died_after_the_run():
    with Orchestrator(config()) as o:
        o.run(rows(32 * 4, seed=9))
        ray.kill(o.workers[1].actor, no_restart=True)  # the driver learns of it only at the next batch
        deadline = time.monotonic() + 30
        while True:  # ray.kill is asynchronous: a ping sent right after it may still be answered
            try:
                ray.get(o.workers[1].actor.ping.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "worker-1 still answers 30 s after ray.kill"
            time.sleep(0.05)
        report = o.report()
    assert [w["name"] for w in report["workers"]] == ["worker-0"]


def test_no_worker_left_fails_clearly_and_keeps_completed_results():
    x = rows(32 * 60, seed=3)
    cfg = config(faults={"worker-0": {"exit_after_batches": 5}, "worker-1": {"exit_after_batches": 5}},
                 cluster={"max_worker_restarts": 0})
    got = []
    with Orchestrator(cfg) as o:
        with pytest.raises(NoWorkersError, match="no worker can run: all 2 workers died") as caught:
            for r in o.map(x):
                got.append(r)
    assert "worker-0 is dead (" in str(caught.value) and "worker-1 is dead (" in str(caught.value)
    # The batches that never ran are named: those re-queued by the deaths, then the rest of the input.
    assert re.search(r"batches not run: (\d+, )*every batch from \d+ on\)$", str(caught.value)), str(caught.value)
    assert 1 <= len(got) <= 10 and len({r.batch_id for r in got}) == len(got)
    for r in got:
        np.testing.assert_array_equal(r.outputs, reference(x[32 * r.batch_id:32 * (r.batch_id + 1)], batch_rows=32))


def test_retry_policy_moves_a_failing_batch_to_another_worker():
    x = rows(32 * 20, seed=4)
    cfg = config(faults={"worker-0": {"raise_on_batches": [3, 4, 5, 6]}},
                 errors={"on_error": "retry", "max_retries": 2})
    results, report = run_and_report(cfg, x)
    check_exactly_once(results, 20, x, batch_rows=32)
    assert all(r.worker == "worker-1" for r in results if r.batch_id in (3, 4, 5, 6))
    assert report["dispatch"]["failed"] == 0


def test_retry_gives_up_after_max_retries_naming_the_batch():
    cfg = config(faults={"worker-0": {"raise_on_batches": [2]}, "worker-1": {"raise_on_batches": [2]}},
                 errors={"on_error": "retry", "max_retries": 2})
    with Orchestrator(cfg) as o, pytest.raises(ModelError, match=r"batch 2 on worker worker-\d"):
        list(o.map(rows(32 * 6)))


def test_poison_batch_that_kills_every_worker_is_failed_not_looped():
    # Batch 3 kills whichever worker runs it. After max_retries+1 deaths it is failed
    # (named), the workers come back, and every other batch still completes.
    poison = {"exit_on_batches": [3]}
    # One batch in flight per worker, so a death is blamed on the batch that caused it.
    cfg = config(faults={"worker-0": poison, "worker-1": poison}, errors={"on_error": "skip", "max_retries": 1},
                 dispatch={"inflight_per_worker": 1},
                 cluster={"max_worker_restarts": 10})
    x = rows(32 * 8, seed=5)
    with Orchestrator(cfg) as o:
        started = time.monotonic()
        results = list(o.map(x))
    assert time.monotonic() - started < 120
    assert sorted(r.batch_id for r in results) == list(range(8))  # every batch ended once
    failed = [r for r in results if r.error is not None]
    assert [r.batch_id for r in failed] == [3]
    assert isinstance(failed[0].error, BatchError) and "2 workers died running this batch" in str(failed[0].error)
    good = np.concatenate([r.outputs for r in sorted(results, key=lambda r: r.batch_id) if r.error is None])
    np.testing.assert_array_equal(good, np.delete(reference(x, batch_rows=32), np.s_[96:128], axis=0))


def test_out_of_memory_batches_are_split_reported_and_still_right():
    # worker-0's model "runs out of memory" above 8 rows: each of its 32-row batches is run as four 8-row parts.
    x = rows(32 * 24, seed=8)
    cfg = config(faults={"worker-0": {"oom_above_rows": 8}})
    results, report = run_and_report(cfg, x)
    assert sorted(r.batch_id for r in results) == list(range(24))
    got = np.concatenate([r.outputs for r in sorted(results, key=lambda r: r.batch_id)])
    np.testing.assert_allclose(got, reference(x, batch_rows=32), rtol=1e-5, atol=1e-6)  # fp32 rounding only
    split = [r for r in results if r.worker == "worker-0"]
    assert split, "worker-0 ran no batch"
    for r in split:  # the same row counts as the 8-row parts: bit-exact
        np.testing.assert_array_equal(r.outputs, reference(x[32 * r.batch_id:32 * (r.batch_id + 1)], batch_rows=8))
    oom = {w["name"]: w["oom"]["splits"] for w in report["workers"]}
    assert oom == {"worker-0": 3 * len(split), "worker-1": 0}  # 32 -> 2x16 -> 4x8
    assert report["dispatch"]["failed"] == 0 and report["dispatch"]["retried"] == 0


def test_leaving_the_context_mid_run_returns_fast_and_leaves_no_actors():
    # worker-0's batches take a minute each: returning well inside that shows close() did not wait for them.
    cfg = config(faults={"worker-0": {"delay_s": 60.0}})
    o = Orchestrator(cfg)
    o.start()
    handles = [w.actor for w in o.workers]
    stream = o.map(rows(32 * 200))
    next(stream)
    started = time.monotonic()
    stream.close()
    o.close()
    assert time.monotonic() - started < 45
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.ping.remote(), timeout=30)


def answers(actor, timeout_s: float = 60.0) -> None:
    """Return once ``actor`` answers a ping: Ray refuses calls while it restarts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
            return
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline, f"not back {timeout_s:.0f} s after a kill"
            time.sleep(0.1)


def test_workers_killed_again_and_again_mid_run_still_finish_with_right_results():
    # Kills follow progress, not the clock: on a slow machine a kill per second lands during
    # restarts and spends Ray's whole restart budget (a correct NoWorkersError, not what this tests).
    # Each kill waits until the last killed worker answers again, so it hits a running worker.
    x = rows(32 * 400, seed=6)
    cfg = config(faults={"worker-0": {"delay_s": 0.02}, "worker-1": {"delay_s": 0.02}},
                 cluster={"max_worker_restarts": 10})
    kill_after = {40, 100, 160, 220, 280}
    rng = random.Random(0)
    results, killed = [], []
    with Orchestrator(cfg) as o:
        for r in o.map(x):
            results.append(r)
            if len(results) in kill_after:
                if killed:
                    answers(killed[-1])  # back from the last kill
                killed.append(rng.choice(o.workers).actor)
                ray.kill(killed[-1], no_restart=False)
        report = o.report()
    check_exactly_once(results, 400, x, batch_rows=32)
    # A kill that lands before the driver saw the last one's restart reads as the same death.
    assert len(killed) == len(kill_after) and 1 <= report["dispatch"]["worker_deaths"] <= len(kill_after)
    assert report["dispatch"]["failed"] == 0


@pytest.mark.slow
def test_hundred_thousand_tiny_batches_constant_driver_memory():
    import tracemalloc

    x = rows(100_000, seed=7)
    cfg = config(pipeline={"max_batch_rows": 1}, dispatch={"batch_rows": 1})
    with Orchestrator(cfg) as o:
        tracemalloc.start()
        count = 0
        peaks = []
        for r in o.map(x):
            count += 1
            if count % 20_000 == 0:
                peaks.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        report = o.report()
    assert count == 100_000 and report["dispatch"]["duplicates_dropped"] == 0
    # Python heap held by the driver does not grow with the number of batches done.
    assert max(peaks) - min(peaks) < 2 << 20, peaks


def test_a_batch_past_its_deadline_marks_the_worker_hung_and_runs_elsewhere():
    # worker-0 sleeps a minute a batch: past batch_timeout_s it is killed (Ray restarts it) and its
    # batches run on worker-1; each batch ends once.
    x = rows(32 * 12, seed=12)
    cfg = config(faults={"worker-0": {"delay_s": 60.0}}, dispatch={"batch_timeout_s": 3, "inflight_per_worker": 2})
    results, report = run_and_report(cfg, x)
    check_exactly_once(results, 12, x, batch_rows=32)
    d = report["dispatch"]
    assert d["hung_batches"] >= 1 and d["worker_deaths"] >= 1 and d["failed"] == 0
    assert {r.worker for r in results} == {"worker-1"}


def test_ordered_maps_run_at_most_the_reorder_window_ahead():
    # worker-0 holds its first batch for 2 s; the rest flow through worker-1, but in input order
    # nothing can be handed out before batch 0, so the driver may draw only reorder_window ahead.
    window = 4
    cfg = config(faults={"worker-0": {"delay_s": 2.0}}, dispatch={"reorder_window": window, "inflight_per_worker": 1})
    x = rows(32 * 40, seed=13)
    drawn = 0

    def source():
        nonlocal drawn
        for i in range(40):
            drawn += 1
            yield x[32 * i:32 * (i + 1)]

    with Orchestrator(cfg) as o:
        ahead = []
        results = []
        for r in o.map(source(), ordered=True):
            ahead.append(drawn - len(results))
            results.append(r)
    assert [r.batch_id for r in results] == list(range(40))
    assert max(ahead) <= window, ahead
    np.testing.assert_array_equal(np.concatenate([r.outputs for r in results]), reference(x, batch_rows=32))
