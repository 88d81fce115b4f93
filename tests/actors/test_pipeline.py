"""The per-device pipeline on the CPU backend (always) and on CUDA (marked gpu)."""
from __future__ import annotations

import pickle
import threading
import time
import typing

import numpy as np
import pytest
import torch
from torch import nn

from actors.bounds import analyse, copy_ceilings
from actors.errors import BatchError, InputError, ModelError, PipelineBrokenError
from actors.models import BuiltModel, InputSpec
from actors.pipeline import Pipeline, PipelineConfig, concat_outputs
from actors.streams import StreamManager

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Pair(typing.NamedTuple):
    logits: torch.Tensor
    top: torch.Tensor


class Net(nn.Module):
    """A small MLP whose output kind (tensor, tuple, namedtuple, dict) is chosen by the test."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.kind = kind

    def forward(self, x: torch.Tensor):
        y = self.body(x)
        if self.kind == "tuple":
            return y, y.argmax(dim=1)
        if self.kind == "namedtuple":
            return Pair(y, y.argmax(dim=1))
        if self.kind == "dict":
            return {"logits": y, "top": (y.max(dim=1).values,)}
        return y


class RaisesOnMarker(Net):
    """Raises (a host-side check, CPU only) when a batch's first value is the marker 1e6."""

    def forward(self, x: torch.Tensor):
        if x[0, 0].item() == 1e6:
            raise RuntimeError("poison row")
        return super().forward(x)


def built(kind: str = "tensor", model: nn.Module | None = None) -> BuiltModel:
    return BuiltModel(model=(model or Net(kind)).eval(), input_spec=InputSpec("float32", (16,)),
                      preprocess=None, postprocess=None, name=f"net-{kind}")


def batches(sizes, seed=1):
    rng = np.random.default_rng(seed)
    return [(i, rng.standard_normal((n, 16)).astype(np.float32)) for i, n in enumerate(sizes)]


def reference(model: nn.Module, x: np.ndarray):
    with torch.inference_mode():
        return model(torch.from_numpy(x))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def assert_same(got, want, exact):
    if isinstance(want, torch.Tensor):
        want = want.cpu().numpy()
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # TF32 off: fp32 kernels differ by rounding only
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_same(got[k], want[k], exact)
    else:
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, exact)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "namedtuple", "dict"])
def test_outputs_equal_serial_reference_with_ragged_batches(device, kind):
    b = built(kind)
    data = batches([64, 64, 17, 1, 64, 40, 3])
    with StreamManager(device=device) as sm, Pipeline(b, sm, PipelineConfig(depth=3, max_batch_rows=64)) as p:
        results = list(p.map(data))
    assert [r.batch_id for r in results] == [i for i, _ in data]
    assert [r.rows for r in results] == [len(x) for _, x in data]
    cpu_model = b.model.to("cpu")
    for r, (_, x) in zip(results, data):
        assert_same(r.outputs, reference(cpu_model, x), exact=(device == "cpu"))


def test_concat_outputs_keeps_each_tree_kind():
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, 2)) for n in (3, 1, 4)]
    tops = [rng.integers(0, 9, n) for n in (3, 1, 4)]
    joined = concat_outputs([Pair(a, b) for a, b in zip(parts, tops)])
    assert type(joined) is Pair
    np.testing.assert_array_equal(joined.logits, np.concatenate(parts))
    np.testing.assert_array_equal(joined.top, np.concatenate(tops))
    nested = concat_outputs([{"x": [a], "y": (b,)} for a, b in zip(parts, tops)])
    np.testing.assert_array_equal(nested["x"][0], np.concatenate(parts))
    assert type(nested["x"]) is list and type(nested["y"]) is tuple


def test_read_only_and_torch_inputs_are_accepted():
    data = batches([8, 8])
    ro = data[0][1].copy()
    ro.setflags(write=False)
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm) as p:
        a = p.submit(0, ro).result()
        b = p.submit(1, torch.from_numpy(data[1][1])).result()
    np.testing.assert_array_equal(a.outputs, reference(Net(), ro).numpy())
    np.testing.assert_array_equal(b.outputs, reference(Net(), data[1][1]).numpy())


def test_large_batches_stage_across_threads_exactly():
    """Above the parallel-staging threshold rows are split across threads; the result must not change."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 16)).astype(np.float32)  # 1.3 MB... x4 below
    x = np.concatenate([x] * 4)  # 5.1 MB > 4 MiB threshold
    cfg = PipelineConfig(max_batch_rows=len(x), staging_threads=3)
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, cfg) as p:
        out = p.submit(7, x).result().outputs
    np.testing.assert_array_equal(out, reference(Net(), x).numpy())


@pytest.mark.parametrize("bad, match", [
    (np.ones((4, 16), np.float64), r"expected float32 \(N, 16\), got float64 \(4, 16\)"),
    (np.ones((4, 15), np.float32), r"got float32 \(4, 15\)"),
    (np.ones((4, 16, 1), np.float32), r"got float32 \(4, 16, 1\)"),
    (np.ones(16, np.float32), r"got float32 \(16,\)"),
    (np.ones((0, 16), np.float32), "empty batch"),
    (np.ones((65, 16), np.float32), "65 rows exceed max_batch_rows=64"),
    ([[1.0] * 16], "expected a numpy array or torch tensor, got list"),
])
def test_bad_input_names_batch_and_pipeline_stays_usable(bad, match):
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, PipelineConfig(max_batch_rows=64)) as p:
        with pytest.raises(InputError, match=match) as info:
            p.submit(1234, bad)
        assert info.value.batch_id == 1234 and str(info.value).startswith("batch 1234:")
        (_, good), = batches([5])
        np.testing.assert_array_equal(p.submit(1235, good).result().outputs, reference(Net(), good).numpy())


def test_non_finite_rejected_only_when_configured():
    (_, x), = batches([6])
    x[4, 3] = np.nan
    with StreamManager(device="cpu") as sm:
        with Pipeline(built(), sm, PipelineConfig(check_finite=True)) as p:
            with pytest.raises(InputError, match=r"batch 9: non-finite values \(first in row 4\)"):
                p.submit(9, x)
        with Pipeline(built(), sm, PipelineConfig(check_finite=False)) as p:
            assert np.isnan(p.submit(9, x).result().outputs[4]).all()


def test_model_raising_fails_that_batch_only():
    data = batches([4, 4, 4])
    data[1][1][0, 0] = 1e6
    model = RaisesOnMarker().eval()
    with StreamManager(device="cpu") as sm, Pipeline(built(model=model), sm, PipelineConfig(depth=2)) as p:
        ok0 = p.submit(*data[0])
        with pytest.raises(ModelError, match="batch 1: model 'net-tensor' raised RuntimeError: poison row") as info:
            p.submit(*data[1])
        assert isinstance(info.value.__cause__, RuntimeError)
        ok2 = p.submit(*data[2])
        more = [p.submit(10 + i, x) for i, x in batches([3] * 5, seed=5)]
        assert [f.result().batch_id for f in [ok0, ok2, *more]] == [0, 2, 10, 11, 12, 13, 14]


def test_output_rows_not_matching_the_batch_fail_that_batch_only():
    class Pooled(Net):
        """One row for the whole batch past start-up: a mean that would be broadcast over the output rows."""

        def forward(self, x):
            y = super().forward(x)
            return y.mean(0, keepdim=True) if x.shape[0] == 3 else y

    data = batches([4, 3, 5])
    with StreamManager(device="cpu") as sm, Pipeline(built(model=Pooled().eval()), sm, PipelineConfig(depth=2)) as p:
        first = p.submit(*data[0])
        with pytest.raises(ModelError, match=r"batch 1: model 'net-tensor' output 0 has shape \(1, 8\) for 3 rows; "
                                             r"expected \(3, 8\)"):
            p.submit(*data[1])
        assert [f.result().rows for f in (first, p.submit(*data[2]))] == [4, 5]


def test_a_host_memory_failure_copying_outputs_fails_that_batch_only():
    """Host memory running out while a batch's outputs leave the slot is that batch's error, not a device failure."""
    data = batches([4, 3, 5])
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, PipelineConfig(depth=2)) as p:
        copy_rows = p._copy_rows

        def out_of_memory_on_three_output_rows(dst, src):  # outputs are 8 wide, inputs 16
            if src.shape == (3, 8):
                raise MemoryError("no host memory for 96 bytes")
            copy_rows(dst, src)

        p._copy_rows = out_of_memory_on_three_output_rows
        first = p.submit(*data[0])
        with pytest.raises(BatchError, match="batch 1: copying its outputs to host memory failed: "
                                             "MemoryError: no host memory for 96 bytes") as info:
            p.submit(*data[1]).result()
        assert not isinstance(info.value, (ModelError, PipelineBrokenError))
        p._copy_rows = copy_rows
        later = [p.submit(*data[2]), *(p.submit(10 + i, x) for i, x in batches([3] * 3, seed=5))]
        assert [f.result().rows for f in (first, *later)] == [4, 5, 3, 3, 3]
        np.testing.assert_allclose(later[1].result().outputs, reference(Net(), batches([3], seed=5)[0][1]).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_an_output_tree_that_changes_after_start_up_fails_that_batch_only():
    class Shifty(Net):
        def forward(self, x):
            y = super().forward(x)
            return (y, y) if x.shape[0] == 3 else y

    data = batches([4, 3, 5])
    with StreamManager(device="cpu") as sm, Pipeline(built(model=Shifty().eval()), sm, PipelineConfig(depth=2)) as p:
        first = p.submit(*data[0])
        with pytest.raises(ModelError, match="batch 1: model 'net-tensor' returned a different output structure"):
            p.submit(*data[1])
        assert [f.result().rows for f in (first, p.submit(*data[2]))] == [4, 5]


def test_a_model_that_raises_at_start_up_is_named():
    class Broken(nn.Module):
        def forward(self, x):
            return x @ torch.ones(3, 3)  # rows are 16 wide

    with StreamManager(device="cpu") as sm, pytest.raises(ModelError, match=r"model 'net-tensor' failed its "
                                                                              r"start-up run on 2 random rows: "
                                                                              r"RuntimeError: mat1 and mat2"):
        Pipeline(built(model=Broken()), sm)


def test_output_without_batch_dimension_is_rejected_at_start_up():
    class Scalar(nn.Module):
        def forward(self, x):
            return x.sum()

    with StreamManager(device="cpu") as sm, pytest.raises(ModelError, match="first dimension"):
        Pipeline(built(model=Scalar()), sm)


def test_concurrent_submitters_all_get_their_own_results():
    data = batches([7] * 60, seed=11)
    results = {}
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, PipelineConfig(depth=3)) as p:
        def worker(part):
            for bid, x in part:
                results[bid] = p.submit(bid, x).result()

        threads = [threading.Thread(target=worker, args=(data[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == list(range(60))
    for bid, x in data:
        np.testing.assert_array_equal(results[bid].outputs, reference(Net(), x).numpy())


def test_close_is_idempotent_releases_buffers_and_rejects_new_work():
    sm = StreamManager(device="cpu")
    p = Pipeline(built(), sm)
    futures = [p.submit(i, x) for i, x in batches([5] * 6)]
    p.close()
    assert all(f.done() for f in futures)  # close finished the in-flight batches first
    assert not p._completion.is_alive() and p._slots == []
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(99, batches([2])[0][1])
    sm.close()


def test_close_runs_on_error_inside_context():
    sm = StreamManager(device="cpu")
    with pytest.raises(KeyError), Pipeline(built(), sm) as p:
        p.submit(0, batches([3])[0][1])
        raise KeyError("user code failed")
    assert not p._completion.is_alive()
    sm.close()


def test_timing_stats_bound_report_and_timeline():
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, PipelineConfig(timing_every=2, timeline=True)) as p:
        results = list(p.map(batches([32] * 10)))
        stats = p.stats.as_dict()
        report = analyse(p.stats, copy_ceilings(sm.device))
        trace = p.timeline.chrome_trace("worker-0")
    assert [r.stage_ms is not None for r in results] == [True, False] * 5
    assert stats["batches"] == 10 and stats["rows"] == 320 and stats["timed_batches"] == 5
    assert stats["bytes_in"] == 320 * 16 * 4 and stats["bytes_out"] == 320 * 8 * 4
    assert report.binding_stage in ("stage", "h2d", "compute", "d2h")
    # Microsecond CPU batches make the sampled stage rates noisy, so only the shape is checked here.
    assert report.line.startswith(f"{report.binding_stage}-bound:") and report.fraction_of_bound > 0
    assert report.line.endswith(f"{100 * report.fraction_of_bound:.0f}%")
    assert report.bound_rows_per_second == min(report.stage_capacity_rows_per_second.values())
    assert {e["tid"] for e in trace} == {"stage", "h2d", "compute", "d2h"}
    assert len(trace) == 5 * 4 and all(e["dur"] >= 0 and e["ph"] == "X" for e in trace)


def test_idle_time_between_maps_is_left_out_of_the_rate_and_the_bound():
    """Two maps 1.5 s apart (above IDLE_GAP_S): the busy time is the two maps', not the span from first to last."""
    with StreamManager(device="cpu") as sm, Pipeline(built(), sm, PipelineConfig(timing_every=1)) as p:
        elapsed = []
        for pause in (0.0, 1.5):
            time.sleep(pause)
            t0 = time.perf_counter()
            list(p.map(batches([32] * 20)))
            elapsed.append(time.perf_counter() - t0)
        stats = p.stats.as_dict()
        report = analyse(p.stats, None)
    assert len(p.stats.busy) == 2
    assert stats["busy_seconds"] <= sum(elapsed)  # the span from first to last batch holds the 1.5 s pause
    assert stats["rows_per_second"] >= 640 / sum(elapsed)
    assert report.achieved_rows_per_second == pytest.approx(stats["rows_per_second"])


@pytest.mark.parametrize("bad", [dict(depth=0), dict(max_batch_rows=0), dict(staging_threads=0),
                                 dict(timing_every=-1), dict(depth="3"), dict(pin_in_place_gb=-1)])
def test_config_validation_names_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=f"PipelineConfig.{field}"):
        PipelineConfig(**bad)


@pytest.mark.parametrize("error", [InputError(3, "empty batch (0 rows)"), ModelError(4, "x", "w1"),
                                   PipelineBrokenError("device-side assert")])
def test_pipeline_errors_pickle(error):
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)


@pytest.mark.gpu
def test_cuda_timeline_shows_h2d_overlapping_compute():
    """Batch n+1's H2D runs while batch n computes: the point of the pipeline."""
    torch.manual_seed(0)
    # Narrow outputs: copying 32 MiB of outputs out per batch would make the host, not the GPU, the pace-setter.
    # Compute (32 layers, ~20 ms a batch) well above host staging (~7 ms for 32 MiB), so the GPU sets the pace.
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(32)], nn.Linear(2048, 16)).eval()
    b = BuiltModel(model=model, input_spec=InputSpec("float32", (2048,)), preprocess=None, postprocess=None, name="wide")
    data = batches([4096] * 12, seed=2)
    data = [(i, np.random.default_rng(i).standard_normal((4096, 2048)).astype(np.float32)) for i, _ in data]
    # Depth 2: batch n+1 takes the slot batch n-1 frees, so its H2D falls inside compute of batch n
    # (with depth 3 and the GPU setting the pace, it runs a batch earlier still, inside compute of n-1).
    cfg = PipelineConfig(depth=2, max_batch_rows=4096, timing_every=1, timeline=True)
    with StreamManager(device="cuda") as sm, Pipeline(b, sm, cfg) as p:
        list(p.map(data))
        spans = {(bid, s): (a, z) for bid, s, a, z in p.timeline.spans}
    overlaps = 0
    for n in range(2, 11):
        c0, c1 = spans[(n, "compute")]
        h0, h1 = spans[(n + 1, "h2d")]
        overlaps += h0 < c1 and h1 > c0
    assert overlaps >= 4, spans  # of 9 chances; timing-dependent, so not all


@pytest.mark.gpu
def test_cuda_ceilings_are_plausible():
    c = copy_ceilings(torch.device("cuda", 0))
    assert 5 < c.h2d_gbps < 200 and 5 < c.d2h_gbps < 200
