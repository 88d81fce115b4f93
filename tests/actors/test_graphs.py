"""CUDA graphs for the compute stage: pure bucketing and config logic on the CPU, capture and replay on CUDA (gpu)."""
from __future__ import annotations

import copy
import gc
import logging
import time

import numpy as np
import pytest
import torch
from torch import nn

from actors.graphs import CPU_REASON, GraphConfig, bucket_for, buckets_for
from actors.models import BuiltModel, InputSpec
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager
from actors.zoo import ImagePreprocess, TopK


def mlp_built(model: nn.Module | None = None, name: str = "mlp") -> BuiltModel:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    return BuiltModel(model=model.eval(), input_spec=InputSpec("float32", (16,)),
                      preprocess=None, postprocess=None, name=name)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model on the host, from a copy: moving the original would free weights a graph reads."""
    with torch.inference_mode():
        return copy.deepcopy(model).to("cpu")(torch.from_numpy(x)).numpy()


def warnings_from_graphs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "actors.graphs"]


# -- buckets (pure) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("max_rows, want", [
    (1, [1]),
    (2, [1, 2]),
    (8, [1, 2, 4, 8]),
    (100, [1, 2, 4, 8, 16, 32, 64, 100]),
    (256, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
])
def test_default_buckets_are_powers_of_two_up_to_and_including_max(max_rows, want):
    assert buckets_for(max_rows) == want


def test_given_buckets_are_sorted_and_deduplicated():
    assert buckets_for(64, [32, 8, 8, 64, 3]) == [3, 8, 32, 64]
    assert buckets_for(64, (48,)) == [48]


@pytest.mark.parametrize("max_rows, sizes, match", [
    (64, [128], "bucket size 128 exceeds max_batch_rows=64"),
    (64, [0, 8], "ints >= 1, got 0"),
    (64, [-4], "ints >= 1, got -4"),
    (64, [True], "ints >= 1, got True"),
    (64, [8.0], "ints >= 1, got 8.0"),
    (64, [], "must not be empty"),
    (64, "8", "list or tuple"),
    (0, None, "max_rows must be an int >= 1"),
])
def test_bad_buckets_are_rejected(max_rows, sizes, match):
    with pytest.raises(ValueError, match=match):
        buckets_for(max_rows, sizes)


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (37, 64), (100, 100),
                                       (65, 100), (101, None), (1000, None)])
def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(n, bucket):
    assert bucket_for(n, buckets_for(100)) == bucket


# -- config validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(enabled="yes"), "enabled"),
    (dict(enabled=1), "enabled"),
    (dict(buckets=(0,)), "buckets"),
    (dict(buckets=()), "buckets"),
    (dict(buckets="8"), "buckets"),
    (dict(capture="lazy"), "capture"),
    (dict(warmup_iters=0), "warmup_iters"),
    (dict(warmup_iters=True), "warmup_iters"),
])
def test_graph_config_validation_names_field(bad, field):
    with pytest.raises(ValueError, match=f"GraphConfig.{field}"):
        GraphConfig(**bad)


def test_graph_config_defaults_off_and_normalises_buckets():
    assert GraphConfig() == GraphConfig(enabled=False, buckets=None, capture="startup", warmup_iters=3)
    assert GraphConfig(buckets=[8, 2, 8]).buckets == (2, 8)


def test_pipeline_config_takes_graphs_as_a_mapping_and_checks_buckets_against_max_rows():
    cfg = PipelineConfig(max_batch_rows=64, graphs={"enabled": True, "buckets": [16, 64], "capture": "first_use"})
    assert cfg.graphs == GraphConfig(enabled=True, buckets=(16, 64), capture="first_use")
    assert PipelineConfig().graphs == GraphConfig()
    with pytest.raises(ValueError, match=r"PipelineConfig.graphs.buckets: bucket size 128 exceeds max_batch_rows=64"):
        PipelineConfig(max_batch_rows=64, graphs=GraphConfig(buckets=(8, 128)))
    with pytest.raises(ValueError, match="PipelineConfig.graphs: .*unexpected keyword argument 'bucket'"):
        PipelineConfig(graphs={"bucket": [8]})
    with pytest.raises(ValueError, match="PipelineConfig.graphs must be a GraphConfig or a mapping, got True"):
        PipelineConfig(graphs=True)


# -- the CPU backend ------------------------------------------------------------------------------------

def test_cpu_backend_runs_eager_and_says_so_once(caplog):
    b = mlp_built()
    cfg = PipelineConfig(depth=2, max_batch_rows=16, graphs=GraphConfig(enabled=True))
    data = [(i, rows(n, i)) for i, n in enumerate([3, 16, 1, 7])]
    with caplog.at_level(logging.WARNING, logger="actors.graphs"):
        with StreamManager(device="cpu") as sm, Pipeline(b, sm, cfg) as p:
            results = list(p.map(data))
            assert not p.graphs.active and p.graphs.bucket(3) is None
    for r, (_, x) in zip(results, data):
        np.testing.assert_array_equal(r.outputs, reference(b.model, x))
    assert p.graphs.stats.as_dict() == {
        "enabled": True, "buckets": [1, 2, 4, 8, 16], "captured": 0, "capture_seconds": 0.0,
        "graph_memory_bytes": 0, "replays": 0, "eager_batches": 4, "fallback_reasons": [CPU_REASON]}
    assert warnings_from_graphs(caplog) == [f"pipeline mlp: {CPU_REASON}"]


def test_graphs_off_by_default_leave_the_eager_path_untouched():
    with StreamManager(device="cpu") as sm, Pipeline(mlp_built(), sm) as p:
        assert p._compute_fn == p._eager_compute
        p.submit(0, rows(4, 0)).result()
        stats = p.graphs.stats.as_dict()
    assert stats["enabled"] is False and stats["eager_batches"] == 0 and stats["fallback_reasons"] == []
    p.close()  # idempotent, graphs included


# -- CUDA -----------------------------------------------------------------------------------------------

class SmallCnn(nn.Module):
    """Conv + eval-mode batchnorm + linear: row-independent, as graph padding requires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
        bn = self.body[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def cnn_built() -> BuiltModel:
    return BuiltModel(model=SmallCnn().eval(), input_spec=InputSpec("uint8", (16, 16, 3)),
                      preprocess=ImagePreprocess(torch.float32), postprocess=TopK(3), name="cnn")


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


@pytest.fixture
def no_tf32():
    """fp32 kernels of different shapes then differ by rounding only, so the unpadded comparison is tight."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
def test_graph_output_equals_eager_for_every_bucket_including_padded_batches(no_tf32):
    """Bit-exact against eager at the bucket's shape (same kernels); to fp32 rounding against eager at the batch's."""
    max_rows = 16
    buckets = buckets_for(max_rows)
    sizes = [n for b in buckets for n in sorted({b, b // 2 + 1})]  # each bucket full and padded
    # Fill every slot with full batches first, so the padding rows hold stale, non-zero data.
    data = [(i, images(max_rows, 100 + i)) for i in range(3)] + [(10 + i, images(n, i)) for i, n in enumerate(sizes)]
    b = cnn_built()
    with StreamManager(device="cuda") as sm_g, StreamManager(device="cuda") as sm_e:
        gp = Pipeline(b, sm_g, PipelineConfig(depth=3, max_batch_rows=max_rows, graphs={"enabled": True}))
        ep = Pipeline(b, sm_e, PipelineConfig(depth=3, max_batch_rows=max_rows))
        with gp, ep:
            got = list(gp.map(data))
            rng = np.random.default_rng(7)
            padded = [(i, np.concatenate([x, images(bucket_for(len(x), buckets) - len(x), int(rng.integers(1 << 30)))]))
                      for i, x in data]
            same_shape = list(ep.map(padded))
            unpadded = list(ep.map(data))
            stats = gp.graphs.stats.as_dict()
    for g, s, u, (_, x) in zip(got, same_shape, unpadded, data):
        n = len(x)
        assert g.rows == n and g.outputs[0].shape == (n, 3)
        np.testing.assert_array_equal(g.outputs[0], s.outputs[0][:n])
        np.testing.assert_array_equal(g.outputs[1], s.outputs[1][:n])
        np.testing.assert_allclose(g.outputs[0], u.outputs[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(g.outputs[1], u.outputs[1])
    assert stats["captured"] == len(buckets) * 3
    assert stats["replays"] == len(data) and stats["eager_batches"] == 0 and stats["fallback_reasons"] == []
    assert stats["graph_memory_bytes"] > 0 and stats["capture_seconds"] > 0


@pytest.mark.gpu
def test_first_use_capture_and_batches_above_the_largest_bucket(caplog):
    b = mlp_built()
    graphs = GraphConfig(enabled=True, buckets=(2, 4), capture="first_use")
    cfg = PipelineConfig(depth=2, max_batch_rows=16, graphs=graphs)
    data = [(i, rows(n, i)) for i, n in enumerate([3, 9, 4, 16, 1, 2])]
    with caplog.at_level(logging.WARNING, logger="actors.graphs"):
        with StreamManager(device="cuda") as sm, Pipeline(b, sm, cfg) as p:
            assert p.graphs.stats.captured == 0
            p.submit(*data[0]).result()
            assert p.graphs.stats.captured == 2  # bucket 4, both slots
            results = [p.submit(i, x).result() for i, x in data[1:]]
            stats = p.graphs.stats.as_dict()
    for r, (_, x) in zip(results, data[1:]):
        np.testing.assert_allclose(r.outputs, reference(b.model, x), rtol=1e-4, atol=1e-5)
    reason = "batches above the largest bucket (4 rows) run eager"
    assert stats["captured"] == 4 and stats["replays"] == 4 and stats["eager_batches"] == 2
    assert stats["fallback_reasons"] == [reason]
    assert warnings_from_graphs(caplog) == [f"pipeline mlp: {reason}"]


class SyncsOnHost(nn.Module):
    """Reads a device value on the host each call: legal eager, impossible inside a graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float(x.abs().max() > -1)


@pytest.mark.gpu
def test_a_model_that_cannot_be_captured_runs_eager_and_says_why_once(caplog):
    b = mlp_built(SyncsOnHost(), name="syncs")
    data = [(i, rows(n, i)) for i, n in enumerate([5, 16, 1, 8])]
    with caplog.at_level(logging.WARNING, logger="actors.graphs"):
        cfg = PipelineConfig(max_batch_rows=16, graphs={"enabled": True})
        with StreamManager(device="cuda") as sm, Pipeline(b, sm, cfg) as p:
            results = list(p.map(data))
            stats = p.graphs.stats.as_dict()
    for r, (_, x) in zip(results, data):
        np.testing.assert_allclose(r.outputs, reference(b.model, x), rtol=1e-4, atol=1e-5)
    assert stats["captured"] == 0 and stats["replays"] == 0 and stats["eager_batches"] == 4
    assert len(stats["fallback_reasons"]) == 1 and stats["fallback_reasons"][0].startswith("capture failed at 16 rows")
    assert len(warnings_from_graphs(caplog)) == 1
    # The failed capture must not leave the allocator capturing: empty_cache would then free nothing
    # and eager outputs (marked with record_stream) would never be reused.
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del scratch
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == reserved


class Sleeps(nn.Module):
    """Spins on the device for a fixed number of cycles (capturable), then doubles its input."""

    def __init__(self, cycles: int) -> None:
        super().__init__()
        self.cycles = cycles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return x * 2


@pytest.mark.gpu
def test_replay_path_never_waits_on_the_device():
    """Three batches of ~10 ms device time each enqueue in well under one batch's time: no host sync between them."""
    b = mlp_built(Sleeps(20_000_000), name="sleeps")
    cfg = PipelineConfig(depth=3, max_batch_rows=4, timing_every=0, graphs={"enabled": True})
    data = [(i, rows(4, i)) for i in range(4)]
    with StreamManager(device="cuda") as sm, Pipeline(b, sm, cfg) as p:
        t0 = time.perf_counter()
        p.submit(*data[0]).result()
        one_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        futures = [p.submit(i, x) for i, x in data[1:]]
        enqueue = time.perf_counter() - t0
        first_done_early = futures[0].done()
        results = [f.result() for f in futures]
        replays = p.graphs.stats.replays
    assert replays == 4
    assert one_batch > 0.005, one_batch  # the spin really costs device time
    assert not first_done_early and enqueue < 0.5 * one_batch, (enqueue, one_batch)
    for r, (_, x) in zip(results, data[1:]):
        np.testing.assert_array_equal(r.outputs, 2 * x)


@pytest.mark.gpu
def test_graph_memory_is_released_on_close():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(16, 8192), nn.ReLU(), nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8))
    b = mlp_built(wide, name="wide").to("cuda")
    cfg = PipelineConfig(depth=2, max_batch_rows=8192, graphs=GraphConfig(enabled=True, buckets=(8192,)))
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with StreamManager(device="cuda") as sm:
        p = Pipeline(b, sm, cfg)
        held = p.graphs.stats.graph_memory_bytes
        x = rows(8192, 0)
        np.testing.assert_allclose(p.submit(0, x).result().outputs, reference(wide, x), rtol=1e-3, atol=1e-3)
        p.close()
        del p
    gc.collect()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_reserved()
    assert held > 256 << 20, held  # at least two 8192 x 8192 fp32 activations live in the pool
    # What may stay: the capture stream's cuBLAS workspaces, which torch keeps per stream for the process.
    assert after - before < 96 << 20, (before, after, held)
