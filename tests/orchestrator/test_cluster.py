"""The driver on a Ray cluster of two logical nodes with fake GPUs: placement, exactly-once, node loss."""
from __future__ import annotations

import time

import pytest
import ray
from _util import check_exactly_once, rows, run_config

from orchestrator import Orchestrator
from orchestrator.bench.cluster import fake_gpu_cluster

BATCH_ROWS = 32


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()  # a process has one driver; the ray_local fixture starts its Ray again after this module
    with fake_gpu_cluster(nodes=2, gpus_per_node=1, cpus_per_node=1) as c:
        yield c


@pytest.fixture
def two_nodes(cluster):
    """Two worker nodes with one GPU each, whatever an earlier test removed."""
    while len(cluster.node_ids) < 2:
        cluster.add_node()
    return cluster


def node_of(orch: Orchestrator, index: int) -> str:
    return ray.get(orch.workers[index].actor.ping.remote(), timeout=60)["node_id"]


def slow(**sections):
    """Two workers that take 50 ms per batch, so a run lasts long enough to lose a node in it."""
    return run_config(BATCH_ROWS, faults={"worker-0": {"delay_s": 0.05}, "worker-1": {"delay_s": 0.05}},
                      **sections)


def test_workers_on_both_nodes_give_the_reference_exactly_once(two_nodes):
    x = rows(BATCH_ROWS * 60, seed=11)
    with Orchestrator(run_config(BATCH_ROWS)) as o:
        placed = {info["node_id"] for info in o.worker_info}
        results = list(o.map(x))
    assert placed == two_nodes.node_ids  # one worker per node: each node has one GPU
    assert {r.worker for r in results} == {"worker-0", "worker-1"}
    check_exactly_once(results, 60, x, batch_rows=BATCH_ROWS)


def test_node_removed_mid_run_its_batches_finish_on_the_other_node(two_nodes):
    # No node comes back: worker-0's restart waits for a GPU. The run must not wait for it.
    x = rows(BATCH_ROWS * 150, seed=12)
    cfg = slow(cluster={"max_worker_restarts": 3, "worker_start_timeout_s": 120})
    with Orchestrator(cfg) as o:
        lost_node = node_of(o, 0)
        results = []
        started = time.monotonic()
        for r in o.map(x):
            results.append(r)
            if len(results) == 20:
                two_nodes.remove_node(lost_node)
        elapsed = time.monotonic() - started
        report = o.report()
    check_exactly_once(results, 150, x, batch_rows=BATCH_ROWS)
    # Batches from 40 on were dispatched after worker-0's full window stopped answering.
    assert all(r.worker == "worker-1" for r in results if r.batch_id >= 40)
    assert [w["name"] for w in report["workers"]] == ["worker-1"]  # worker-0 is still waiting for a GPU
    d = report["dispatch"]
    assert d["worker_deaths"] == 1 and d["retried"] >= 1 and d["failed"] == 0
    assert elapsed < 60, f"the run waited {elapsed:.0f} s for a worker that could not come back"


def test_node_removed_then_added_back_the_worker_rejoins_there(two_nodes):
    x = rows(BATCH_ROWS * 3000, seed=13)
    cfg = slow(cluster={"max_worker_restarts": 3, "worker_start_timeout_s": 120})
    removed = False
    rejoined = yielded = 0

    def inputs():
        # Streams batches until the restarted worker-0 has run a few (or a cap), so the test
        # lasts as long as the restart takes and no longer.
        nonlocal yielded
        for i in range(3000):
            if rejoined >= 5:
                return
            yielded += 1
            yield x[i * BATCH_ROWS:(i + 1) * BATCH_ROWS]

    with Orchestrator(cfg) as o:
        lost_node = node_of(o, 0)
        results = []
        for r in o.map(inputs()):
            results.append(r)
            if len(results) == 20:
                two_nodes.remove_node(lost_node)
                removed = True
                new_node = two_nodes.add_node().node_id
            elif removed and r.worker == "worker-0":
                rejoined += 1
        restarted_on = node_of(o, 0)
        d = o.report()["dispatch"]
    assert yielded < 3000, "worker-0 never rejoined"
    assert restarted_on == new_node != lost_node
    assert d["worker_deaths"] == 1 and d["failed"] == 0
    check_exactly_once(results, yielded, x[:yielded * BATCH_ROWS], batch_rows=BATCH_ROWS)
