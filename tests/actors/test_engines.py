"""Several models and replicas in one process: routing, results, streams, stats and memory (CPU; GPU marked)."""
from __future__ import annotations

import pickle
import statistics
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from actors.engines import Engine, Engines, EngineSpec, build_model, merge_stats, streams_needed
from actors.errors import ModelMemoryError, UnknownModelError
from actors.memory import MemoryNeed, check_fits, fit_model, slot_bytes
from actors.models import BuiltModel, InputSpec
from actors.pipeline import PipelineConfig, PipelineStats
from actors.streams import StreamManager, StreamPriority

TOL = {"rtol": 1e-5, "atol": 1e-6}  # same kernels, same thread count: only summation order may differ


class _SlowNet(nn.Module):
    """tiny_mlp's shape with a host sleep per call: keeps a replica busy long enough to see routing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return self.body(x)


def slow_model() -> BuiltModel:
    return BuiltModel(_SlowNet().eval(), InputSpec("float32", (16,)), None, None, "slow")


SLOW = f"{__name__}:slow_model"


def spec(name: str, source: str = "zoo:tiny_mlp", seed: int = 0, **kw) -> EngineSpec:
    return EngineSpec(name=name, model={"source": source, "seed": seed, **kw.pop("model", {})}, **kw)


def serial_reference(model: dict, arrays: list[np.ndarray]) -> list[np.ndarray]:
    built = build_model(model)
    with torch.inference_mode():
        return [built.run(torch.from_numpy(a)).numpy() for a in arrays]


def feed(seed: int, n: int, width: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 33)), width)).astype(np.float32) for _ in range(n)]


def test_each_model_equals_its_own_serial_reference_when_fed_from_two_threads():
    specs = [spec("a", seed=1), spec("b", "zoo:mlp", seed=2, model={"kwargs": {"in_features": 16, "hidden": 24,
                                                                                "out_features": 5}}, replicas=2)]
    inputs = {"a": feed(10, 40), "b": feed(11, 40)}
    got: dict[str, list[np.ndarray]] = {}
    with StreamManager(max_streams=streams_needed([1, 2]), device="cpu") as sm:
        engines = Engines(specs, sm, PipelineConfig(max_batch_rows=32))
        try:
            def run(name: str) -> None:
                futures = [engines.get(name).submit(i, x) for i, x in enumerate(inputs[name])]
                got[name] = [f.result().outputs for f in futures]

            threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report = engines.report()
        finally:
            engines.close()
    for s in specs:
        want = serial_reference(s.model, inputs[s.name])
        assert len(got[s.name]) == len(want)
        for g, w in zip(got[s.name], want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, **TOL)
    assert report["models"]["a"]["rows"] == sum(len(x) for x in inputs["a"])
    assert report["models"]["b"]["rows"] == sum(len(x) for x in inputs["b"])
    assert report["rows"] == report["models"]["a"]["rows"] + report["models"]["b"]["rows"]
    assert report["models"]["b"]["replicas"] == 2 and report["models"]["a"]["priority"] == "normal"


def test_default_model_and_unknown_name_lists_the_known_ones():
    with StreamManager(max_streams=6, device="cpu") as sm:
        engines = Engines([spec("first"), spec("second", seed=3)], sm, PipelineConfig(max_batch_rows=8))
        try:
            assert engines.get() is engines.get("first") and engines.names == ["first", "second"]
            with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; known: 'first', 'second'"):
                engines.get("nope")
        finally:
            engines.close()


def test_batches_go_to_the_least_busy_replica():
    """Three threads submit at once to a model whose batches take 50 ms: each lands on its own replica."""
    with StreamManager(max_streams=7, device="cpu") as sm:
        engine = Engine(spec("slow", SLOW, replicas=3), sm, PipelineConfig(max_batch_rows=4))
        try:
            start = threading.Barrier(3)
            x = np.ones((2, 16), np.float32)

            def one(i: int) -> None:
                start.wait()
                time.sleep(0.01 * i)  # staggered, so each choice sees the earlier ones' busy counts
                engine.submit(i, x).result()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [p.stats.batches for p in engine.replicas] == [1, 1, 1]
            assert engine._busy == [0, 0, 0]  # every completion released its count
        finally:
            engine.close()


def test_an_engine_owns_2n_plus_1_streams_at_its_priority_and_destroys_them():
    with StreamManager(max_streams=7, device="cpu") as sm:
        engine = Engine(spec("hi", replicas=3, priority="high"), sm, PipelineConfig(max_batch_rows=4))
        assert sm.active_streams() == streams_needed([3]) == 7
        high = sm.priority_value(StreamPriority.HIGH)
        assert {s.priority for s in engine._owned} == {high}
        lanes = [(p._compute, p._h2d, p._d2h) for p in engine.replicas]
        assert len({c for c, _, _ in lanes}) == 3 and len({d for _, _, d in lanes}) == 3
        assert len({h for _, h, _ in lanes}) == 1  # H2D is shared: it waits on nothing
        engine.close()
        engine.close()  # idempotent
        assert sm.active_streams() == 0


def test_a_failed_build_releases_the_streams_and_engines_already_built():
    with StreamManager(max_streams=4, device="cpu") as sm:
        with pytest.raises(Exception, match="stream limit"):
            Engines([spec("a"), spec("b", replicas=2)], sm, PipelineConfig(max_batch_rows=4))  # needs 3 + 5
        assert sm.active_streams() == 0


def test_spec_and_engines_reject_bad_values():
    with pytest.raises(ValueError, match="replicas"):
        EngineSpec("m", {"source": "zoo:tiny_mlp"}, replicas=0)
    with pytest.raises(ValueError, match="priority"):
        EngineSpec("m", {"source": "zoo:tiny_mlp"}, priority="urgent")
    with StreamManager(device="cpu") as sm, pytest.raises(ValueError, match="unique"):
        Engines([spec("m"), spec("m")], sm, PipelineConfig())


# -- stats -----------------------------------------------------------------------------------------

def _stats(rows: int, timed_rows: int, compute_ms: float, *busy: tuple[float, float]) -> PipelineStats:
    s = PipelineStats()
    s.batches, s.rows, s.bytes_in, s.bytes_out = 2, rows, rows * 64, rows * 4
    s.timed_batches, s.timed_rows = 1, timed_rows
    s.stage_ms_total.update(stage=1.0, h2d=0.5, compute=compute_ms, d2h=0.25)
    s.busy = [list(spell) for spell in busy]
    return s


def test_merged_stats_sum_counts_and_capacities_over_side_by_side_pipelines():
    a, b = _stats(100, 10, 2.0, (1.0, 3.0), (20.0, 21.0)), _stats(50, 20, 8.0, (0.5, 2.0), (9.0, 10.0))
    m = merge_stats([a, b])
    assert (m.rows, m.batches, m.bytes_in, m.timed_rows) == (150, 4, 150 * 64, 30)
    # Overlapping spells join; the idle gaps (3 -> 9, 10 -> 20 s) are left out of the busy time.
    assert m.busy == [[0.5, 3.0], [9.0, 10.0], [20.0, 21.0]] and m.busy_seconds == pytest.approx(4.5)
    capacity = m.timed_rows / m.stage_ms_total["compute"]  # rows per ms
    assert capacity == pytest.approx(10 / 2.0 + 20 / 8.0)
    one = merge_stats([a])
    assert one.stage_ms_total == pytest.approx(a.stage_ms_total) and one.rows == a.rows


# -- memory ----------------------------------------------------------------------------------------

def test_memory_need_arithmetic_and_the_error_names_the_model():
    need = MemoryNeed("big", weight_bytes=1000, slot_bytes=100, activation_bytes=50, replicas=3, graphs=True)
    assert need.per_replica_bytes == 100 + 2 * 50
    assert need.total_bytes == 1000 + 3 * 200
    check_fits(need, 1600, "cuda:0")  # exactly fits
    with pytest.raises(ModelMemoryError, match=r"model 'big' does not fit on cuda:0") as info:
        check_fits(need, 1599, "cuda:0")
    assert info.value.need_bytes == 1600 and info.value.free_bytes == 1599
    assert "3 replica(s)" in str(info.value) and "x2 for graphs" in str(info.value)


def test_memory_need_of_a_real_small_model_on_the_cpu():
    built = build_model({"source": "zoo:mlp", "kwargs": {"in_features": 16, "hidden": 24, "out_features": 5}})
    weights = (16 * 24 + 24) * 4 + (24 * 5 + 5) * 4  # two fp32 Linear layers, weights and biases
    assert built.weight_bytes() == weights
    config = PipelineConfig(depth=3, max_batch_rows=32)
    assert slot_bytes(built.input_spec, config) == 3 * 32 * 16 * 4
    graphs = PipelineConfig(depth=2, max_batch_rows=8, graphs={"enabled": True})
    assert slot_bytes(built.input_spec, graphs, out_row_bytes=20) == 2 * 8 * (16 * 4 + 20)
    need = fit_model("m", built, config, 2, torch.device("cpu"))  # the CPU backend checks nothing
    assert need == MemoryNeed("m", weights, 3 * 32 * 64, 0, 2, False)
    with pytest.raises(ModelMemoryError, match="'m'"):
        check_fits(need, need.total_bytes - 1, "cpu")


@pytest.mark.parametrize("error", [UnknownModelError("x", ["a", "b"]),
                                   ModelMemoryError("m", "cuda:0", 3 << 30, 1 << 30, "weights 1 MiB")])
def test_new_errors_pickle(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)


# -- GPU -------------------------------------------------------------------------------------------

def _cuda_engines(specs: list[EngineSpec], config: PipelineConfig) -> tuple[StreamManager, Engines]:
    sm = StreamManager(max_streams=streams_needed([s.replicas for s in specs]), device="cuda")
    try:
        return sm, Engines(specs, sm, config)
    except BaseException:
        sm.close()
        raise


def _images(n: int, rows: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (rows, 224, 224, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.gpu
def test_cuda_two_models_on_their_own_streams_overlap_in_the_timeline():
    """Two ResNet-18s at batch 8 fed from two threads: their compute spans overlap on the device.

    With CUDA graphs a compute span is one replay, timed on the device: on one stream two replays could
    never overlap, so any overlap is kernels of the two models running at once.
    """
    model = {"source": "zoo:resnet18", "dtype": "bfloat16", "channels_last": True}
    specs = [EngineSpec("a", model), EngineSpec("b", {**model, "seed": 1})]
    config = PipelineConfig(depth=3, max_batch_rows=8, timing_every=1, timeline=True,
                            graphs={"enabled": True, "buckets": (8,)})
    sm, engines = _cuda_engines(specs, config)
    try:
        feeds = {"a": _images(200, 8, 0), "b": _images(200, 8, 1)}
        outs: dict[str, list] = {}

        def run(name: str) -> None:
            futures = [engines.get(name).submit(i, x) for i, x in enumerate(feeds[name])]
            outs[name] = [f.result().outputs for f in futures]

        threads = [threading.Thread(target=run, args=(n,)) for n in feeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a, b = (engines.get(n).replicas[0].timeline for n in ("a", "b"))
        shift = a.origin.elapsed_time(b.origin)  # b's spans onto a's clock
        spans_a = [(s, e) for _, stage, s, e in a.spans if stage == "compute"]
        spans_b = [(s + shift, e + shift) for _, stage, s, e in b.spans if stage == "compute"]
        overlap = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in spans_a for s2, e2 in spans_b)
        busy = min(sum(e - s for s, e in spans_a), sum(e - s for s, e in spans_b))
        # Serialised kernels would give no overlap at all; side by side, most of the shorter's time overlaps.
        assert overlap > 0.3 * busy, f"compute overlap {overlap:.2f} ms of {busy:.2f} ms"
        for s in specs:  # and results stay each model's own: class ids, at most 1 of 32 off (bf16 near-ties)
            got = np.concatenate(outs[s.name][:4])
            want = np.concatenate(serial_cuda_reference(s.model, feeds[s.name][:4]))
            assert got.shape == want.shape and (got != want).sum() <= 1
    finally:
        engines.close()
        sm.close()


def serial_cuda_reference(model: dict, arrays: list[np.ndarray]) -> list[np.ndarray]:
    built = build_model(model).to("cuda")
    with torch.inference_mode():
        return [built.run(torch.from_numpy(a).cuda()).cpu().numpy() for a in arrays]


def _high_latency_under_flood(high_priority: str) -> tuple[list[float], list[float]]:
    """Latency (ms) of single ResNet-18 batches of 8 alone, then while a LOW ResNet-50 (batches of 64, two
    replicas) floods from two threads; CUDA graphs for both."""
    low = EngineSpec("flood", {"source": "zoo:resnet50", "dtype": "bfloat16", "channels_last": True},
                     replicas=2, priority="low")
    high = EngineSpec("probe", {"source": "zoo:resnet18", "dtype": "bfloat16", "channels_last": True},
                      priority=high_priority)
    # Graphs, so that each batch's kernels reach the device at once and only device scheduling differs.
    config = PipelineConfig(depth=3, max_batch_rows=64, timing_every=0, graphs={"enabled": True, "buckets": (8, 64)})
    sm, engines = _cuda_engines([low, high], config)
    try:
        probe_x, flood_x = _images(1, 8, 0)[0], _images(1, 64, 1)[0]

        def probe(n: int) -> list[float]:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                engines.get("probe").submit(i, probe_x).result()
                times.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.002)
            return times

        probe(20)  # warm: cuDNN autotuning
        for i in range(8):
            engines.get("flood").submit(i, flood_x).result()
        alone = probe(40)
        stop = threading.Event()

        def flood() -> None:
            i, pending = 0, []
            while not stop.is_set():
                pending.append(engines.get("flood").submit(i, flood_x))
                i += 1
                if len(pending) > 4:
                    pending.pop(0).result()
            for f in pending:
                f.result()

        floods = [threading.Thread(target=flood) for _ in range(2)]
        for t in floods:
            t.start()
        time.sleep(0.5)
        try:
            loaded = probe(40)
        finally:
            stop.set()
            for t in floods:
                t.join()
        return alone, loaded
    finally:
        engines.close()
        sm.close()


@pytest.mark.gpu
def test_cuda_high_priority_model_keeps_its_latency_under_a_low_priority_flood():
    """Control: the same probe at LOW priority (equal to the flood) waits behind the flood's kernels."""
    _, high = _high_latency_under_flood("high")
    _, equal = _high_latency_under_flood("low")
    p50_high, p50_equal = statistics.median(high), statistics.median(equal)
    assert p50_high < 0.7 * p50_equal, f"p50 {p50_high:.2f} ms at HIGH vs {p50_equal:.2f} ms at the flood's LOW"


@pytest.mark.gpu
def test_cuda_a_model_that_does_not_fit_fails_at_start_up_naming_it():
    """Leave ~200 MiB free, then build ResNet-18 fp32 with 256-row slots: ModelMemoryError, not an OOM later."""
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.empty_cache()
    blocker = torch.empty(max(0, free - (200 << 20)), dtype=torch.uint8, device="cuda")
    try:
        with StreamManager(max_streams=3, device="cuda") as sm:
            with pytest.raises(ModelMemoryError, match="model 'too-big' does not fit"):
                Engines([EngineSpec("too-big", {"source": "zoo:resnet18"})], sm, PipelineConfig(max_batch_rows=256))
            assert sm.active_streams() == 0
    finally:
        del blocker
        torch.cuda.empty_cache()
