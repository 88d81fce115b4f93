"""A Ray cluster of several logical nodes on this machine, each with fake GPUs: for node-loss tests and drills.

Ray's ``cluster_utils.Cluster`` records its address in ``<temp dir>/ray/ray_current_cluster``,
where any later ``ray.init()`` on the machine would find and join it; the cluster
here therefore runs under its own temporary directory, removed on exit.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import ray
from ray.cluster_utils import Cluster


class FakeGpuCluster:
    """The head (no CPUs, no GPUs: it runs only the driver) plus worker nodes added and removed at will."""

    def __init__(self, cluster: Cluster, gpus_per_node: int, cpus_per_node: float) -> None:
        self.cluster = cluster
        self.gpus_per_node = gpus_per_node
        self.cpus_per_node = cpus_per_node

    def add_node(self) -> Any:
        """Start one more worker node; returns it once it has joined."""
        return self.cluster.add_node(num_cpus=self.cpus_per_node, num_gpus=self.gpus_per_node)

    def remove_node(self, node_id: str) -> None:
        """Kill every process of the worker node with this Ray node id (its actors die with it)."""
        node = next((n for n in self.cluster.worker_nodes if n.node_id == node_id), None)
        if node is None:
            raise ValueError(f"no worker node {node_id} in this cluster")
        self.cluster.remove_node(node)

    @property
    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}


@contextlib.contextmanager
def fake_gpu_cluster(nodes: int = 2, gpus_per_node: int = 1, cpus_per_node: float = 1) -> Iterator[FakeGpuCluster]:
    """Start the cluster and connect this process's driver to it; on exit disconnect and stop every node.

    Ray must not be initialised in this process already: a process has one driver.
    """
    if ray.is_initialized():
        raise RuntimeError("fake_gpu_cluster needs a process not connected to Ray; call ray.shutdown() first")
    # Unix socket paths live under the temp dir and must stay short (108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        fake = FakeGpuCluster(cluster, gpus_per_node, cpus_per_node)
        for _ in range(nodes):
            fake.add_node()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield fake
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp_dir, ignore_errors=True)
