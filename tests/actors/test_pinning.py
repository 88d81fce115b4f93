"""Pinning host memory in place (actors.pinning) through the real pipeline on CUDA.

Every test checks the outputs against the same model run on device tensors,
so a copy that read the wrong bytes (a stale registration, a piece misplaced at
a chunk boundary) fails here, and checks from the registry's counters that the
in-place path, not staging, carried the batches.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actors.models import BuiltModel, InputSpec
from actors.pinning import CHUNK_BYTES, MIN_ARRAY_BYTES, _shared_memory_mappings
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager

pytestmark = pytest.mark.gpu

WIDTH = 4096  # fp32 rows of 16 KiB
ROW_BYTES = WIDTH * 4
BATCH = 4096  # 64 MiB per batch


def _built() -> BuiltModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    return BuiltModel(model=model, input_spec=InputSpec("float32", (WIDTH,)), preprocess=None,
                      postprocess=None, name="wide-mlp")


def _expected(built: BuiltModel, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return built.model.cuda()(torch.from_numpy(np.ascontiguousarray(x)).cuda()).cpu().numpy()


def _run(built: BuiltModel, batches: list[np.ndarray], after=None, **cfg):
    """Outputs, and the registry's counters before the pipeline closes and after."""
    config = PipelineConfig(depth=3, max_batch_rows=BATCH, **cfg)
    with StreamManager(device="cuda") as sm, Pipeline(built, sm, config) as p:
        outs = [r.outputs for r in p.map(enumerate(batches))]
        if after is not None:
            after()
        pinner = p.pinner
        during = pinner.as_dict() if pinner else None
    return outs, during, (pinner.as_dict() if pinner else None)


def _check(built: BuiltModel, batches: list[np.ndarray], outs: list[np.ndarray]) -> None:
    for x, out in zip(batches, outs):
        np.testing.assert_allclose(out, _expected(built, x), rtol=1e-5, atol=1e-5)  # same kernels; tf32 off


def test_a_large_array_is_registered_whole_on_its_second_pass_and_stays_usable_by_plain_copies():
    built = _built()
    data = np.random.default_rng(0).standard_normal((12_000, WIDTH), dtype=np.float32)  # 188 MiB
    one_pass = [data[s:s + n] for s, n in ((0, BATCH), (1, BATCH - 1), (8000, 3000), (12_000 - 777, 777))]
    _, first, _ = _run(built, one_pass)
    assert first["registrations"] == 0  # read once: staged, registering would not pay back
    batches = one_pass + one_pass
    copied = {}
    # While registered, a copy of the whole array, as user code might make, must still work.
    outs, during, after = _run(built, batches, after=lambda: copied.setdefault("x", torch.from_numpy(data).cuda()))
    _check(built, batches, outs)
    assert torch.equal(copied["x"].cpu(), torch.from_numpy(data))
    assert during["registrations"] == 1 and during["registered_bytes"] == data.nbytes
    assert after["registered_bytes"] == 0 and after["regions"] == 0


def test_budget_evicts_idle_arrays_and_results_stay_right():
    built = _built()
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((BATCH, WIDTH), dtype=np.float32) for _ in range(5)]  # 64 MiB each
    assert arrays[0].nbytes >= MIN_ARRAY_BYTES
    batches = arrays * 3  # registered from the second pass on, two at a time
    outs, during, after = _run(built, batches, pin_in_place_gb=2 * arrays[0].nbytes / (1 << 30))
    _check(built, batches, outs)
    assert during["registrations"] >= 5 and during["evictions"] >= 3
    assert during["registered_bytes"] <= 2 * arrays[0].nbytes
    assert after["registered_bytes"] == 0


def test_two_pipelines_share_one_registration_per_chunk():
    """Registration is per process: a second pipeline reading the same memory must not register it again."""
    built = _built()
    data = np.random.default_rng(6).standard_normal((2 * BATCH, WIDTH), dtype=np.float32)  # 128 MiB
    batches = [data[:BATCH], data[BATCH:]]
    config = PipelineConfig(depth=2, max_batch_rows=BATCH)
    with StreamManager(device="cuda") as sm, Pipeline(built, sm, config) as a, Pipeline(built, sm, config) as b:
        outs = [r.outputs for r in a.map(enumerate(batches))] + [r.outputs for r in b.map(enumerate(batches))]
        counters = a.pinner.as_dict()
    _check(built, batches + batches, outs)
    assert counters["registrations"] == 1


def test_small_or_strided_sources_are_staged():
    built = _built()
    rng = np.random.default_rng(2)
    small = rng.standard_normal((64, WIDTH), dtype=np.float32)
    strided = rng.standard_normal((2 * BATCH, WIDTH), dtype=np.float32)[::2]
    outs, during, _ = _run(built, [small, strided])
    _check(built, [small, strided], outs)
    assert during["registrations"] == 0


def test_ray_object_store_arrays_are_pinned_in_place():
    """ray.get of a numpy array is a read-only view into the store's /dev/shm mapping."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, object_store_memory=1 << 30)
    try:
        built = _built()
        rng = np.random.default_rng(3)
        # 375 MiB in objects of odd sizes: some object straddles a chunk boundary of the mapping.
        batches = [ray.get(ray.put(rng.standard_normal((4000, WIDTH), dtype=np.float32))) for _ in range(6)]
        assert not batches[0].flags.writeable
        (start, _), = [m for m in _shared_memory_mappings() if m[0] <= batches[0].ctypes.data < m[1]]
        assert any((b.ctypes.data - start) // CHUNK_BYTES != (b.ctypes.data + b.nbytes - 1 - start) // CHUNK_BYTES
                   for b in batches)
        outs, during, _ = _run(built, batches)
        _check(built, batches, outs)
        assert during["registrations"] >= 2 and during["regions"] == 1
    finally:
        if started:
            ray.shutdown()


def test_memory_mapped_npy_is_read_in_place(tmp_path):
    built = _built()
    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(4).standard_normal((2 * BATCH, WIDTH), dtype=np.float32))
    data = np.load(path, mmap_mode="r")
    batches = [data[:BATCH], data[BATCH - 5:2 * BATCH - 5], data[:BATCH]]  # a second pass starts
    outs, during, _ = _run(built, batches)
    _check(built, batches, outs)
    assert during["registrations"] == 1


def test_pinning_off_stages_everything():
    built = _built()
    data = np.random.default_rng(5).standard_normal((2 * BATCH, WIDTH), dtype=np.float32)
    batches = [data[:BATCH], data[BATCH:]]
    outs, during, _ = _run(built, batches, pin_in_place_gb=0)
    _check(built, batches, outs)
    assert during is None


def test_a_region_is_not_evicted_between_handing_out_pieces_and_their_fence():
    """User A has copied from array ``a`` (its fence complete) and takes pieces of ``a`` again; before
    it enqueues that copy, user B needs budget. ``a`` must stay registered: every fence on it is
    complete, but A is about to copy from it (the old code, fencing with the slot's event before
    it was re-recorded, saw a completed event here and evicted ``a``)."""
    from actors.pinning import HostPinner

    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((BATCH, WIDTH), dtype=np.float32) for _ in range(2))  # 64 MiB each
    budget = a.nbytes + a.nbytes // 2  # room for one of them
    pinner = HostPinner(budget)
    user_a, user_b = 1, 2
    for _ in (user_a, user_b):
        pinner.acquire(budget)
    stream, done = torch.cuda.Stream(), torch.cuda.Event()
    device_a = torch.empty(a.nbytes, dtype=torch.uint8, device="cuda")
    try:
        assert pinner.pieces(a[:1], user_a) is None  # first pass: staged
        views = pinner.pieces(a, user_a)  # second pass: registered
        assert views is not None and pinner.as_dict()["registrations"] == 1
        with torch.cuda.stream(stream):
            device_a.copy_(views[0], non_blocking=True)
            done.record(stream)
        pinner.fenced(user_a, done)
        done.synchronize()  # A's fence on a is complete
        views = pinner.pieces(a, user_a)  # A's next batch: copies not enqueued yet
        assert views is not None
        assert pinner.pieces(b[:1], user_b) is None and pinner.pieces(b, user_b) is None  # no room: staged
        assert pinner.as_dict()["evictions"] == 0 and pinner.as_dict()["registered_bytes"] == a.nbytes
        device_a.zero_()
        stream.wait_stream(torch.cuda.current_stream())  # the copy lands after the zeroing
        with torch.cuda.stream(stream):
            device_a.copy_(views[0], non_blocking=True)  # still registered memory: an async copy
            done.record(stream)
        pinner.fenced(user_a, done)
        done.synchronize()
        assert torch.equal(device_a.cpu(), torch.from_numpy(a.view(np.uint8).reshape(-1)))
    finally:
        stream.synchronize()
        pinner.release(user_a)
        pinner.release(user_b)
