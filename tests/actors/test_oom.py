"""Split-and-retry on device out-of-memory: injected on the CPU backend (and CUDA), real on CUDA (gpu)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from actors.engines import Engine, EngineSpec
from actors.errors import DeviceMemoryError
from actors.models import BuiltModel, InputSpec
from actors.oom import OomAbove, OomSplitter
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class TwoHeads(nn.Module):
    """A small MLP with a tuple-and-dict output, so the halves' output trees must be joined."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor):
        y = self.body(x)
        return y, {"top": y.argmax(dim=1)}


def built(model: nn.Module) -> BuiltModel:
    return BuiltModel(model=model.eval(), input_spec=InputSpec("float32", (16,)), preprocess=None, postprocess=None,
                      name="two-heads")


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def reference_in_chunks(model: nn.Module, x: np.ndarray, chunk: int):
    """The model on ``chunk``-row pieces, as the split runs it (CPU kernels may round differently per row count)."""
    with torch.inference_mode():
        parts = [model(torch.from_numpy(x[i:i + chunk])) for i in range(0, len(x), chunk)]
    return (torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1]["top"] for p in parts]).numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_out_of_memory_is_halved_until_it_fits_with_outputs_in_order(device):
    model = TwoHeads()
    cfg = PipelineConfig(depth=2, max_batch_rows=64)
    with StreamManager(device=device) as sm, Pipeline(built(OomAbove(model, limit=8)), sm, cfg) as p:
        splitter = OomSplitter(p, min_rows=1)
        x = rows(64, seed=1)
        result = splitter.run(7, x)
        assert splitter.splits == 7  # 64 -> 2x32 -> 4x16 -> 8x8: 1 + 2 + 4 halvings
        ragged = rows(37, seed=2)
        ragged_result = splitter.run(8, ragged)
        small = splitter.run(9, rows(8, seed=3))  # fits: no split
        assert splitter.splits == 7 + 7  # 37 -> 19 + 18 -> 10 + 9 + 9 + 9 -> 5 + 5 + (5 + 4) x 3
        assert splitter.stats() == {"splits": 14, "min_rows": 1}
    assert (result.batch_id, result.rows, ragged_result.rows, small.rows) == (7, 64, 37, 8)
    model = model.to("cpu")
    if device == "cpu":  # the same row counts as the split (8-row parts): bit-exact
        np.testing.assert_array_equal(result.outputs[0], reference_in_chunks(model, x, 8)[0])
    for got, inputs in ((result, x), (ragged_result, ragged)):
        logits, top = got.outputs[0], got.outputs[1]["top"]
        np.testing.assert_allclose(logits, reference_in_chunks(model, inputs, 64)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(top, np.argmax(logits, axis=1))  # both leaves joined in the same row order


def test_split_depth_is_bounded_and_the_last_failure_names_the_batch():
    model = OomAbove(TwoHeads(), limit=64)
    with StreamManager(device="cpu") as sm, Pipeline(built(model), sm, PipelineConfig(max_batch_rows=64)) as p:
        model.limit = 0  # after the start-up probe: now every call runs out of memory
        splitter = OomSplitter(p, min_rows=1)
        with pytest.raises(DeviceMemoryError, match=r"batch 5: out of device memory at 1 rows and cannot be split "
                                                    r"further \(pipeline.oom_min_rows=1\)"):
            splitter.run(5, rows(64, seed=4))
        assert splitter.splits == 6  # log2(64): one halving per level, then the 1-row part fails; no loop
        model.limit = 8
        min16 = OomSplitter(p, min_rows=16)
        with pytest.raises(DeviceMemoryError, match="batch 6: out of device memory at 16 rows"):
            min16.run(6, rows(64, seed=5))
        assert min16.splits == 2  # 64 -> 32 -> 16, and 16 cannot halve into parts of 16
        # The pipeline stays usable after the failures.
        ok = splitter.run(10, rows(8, seed=6))
        np.testing.assert_array_equal(ok.outputs[0], reference_in_chunks(model.model, rows(8, seed=6), 8)[0])


def test_device_memory_error_pickles_and_is_a_model_error():
    from actors.errors import ModelError

    err = DeviceMemoryError(3, "out of device memory at 4 rows", "worker-1")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is DeviceMemoryError and isinstance(clone, ModelError) and str(clone) == str(err)
    assert str(err) == "batch 3 on worker worker-1: out of device memory at 4 rows"


def test_min_rows_is_validated():
    with pytest.raises(ValueError, match="oom_min_rows must be an int >= 1"):
        PipelineConfig(oom_min_rows=0)


@pytest.mark.gpu
def test_real_cuda_out_of_memory_is_split_and_recovers_with_correct_outputs():
    """A per-process memory cap that a 4096-row batch exceeds and a 2048-row half fits: a real allocator OOM."""
    torch.manual_seed(0)
    hidden = 16384
    model = nn.Sequential(nn.Linear(1024, hidden), nn.ReLU(), nn.Linear(hidden, 8)).eval()
    b = BuiltModel(model=model, input_spec=InputSpec("float32", (1024,)), preprocess=None, postprocess=None,
                   name="wide")
    x = np.random.default_rng(7).standard_normal((4096, 1024)).astype(np.float32)
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).total_memory
    with StreamManager(device="cuda") as sm, Pipeline(b, sm, PipelineConfig(depth=2, max_batch_rows=4096)) as p:
        splitter = OomSplitter(p, min_rows=1)
        splitter.run(0, x[:64])  # cuBLAS workspaces and the like are allocated before the cap
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        # The full batch's first Linear and ReLU outputs (256 MiB each) are alive together: 512 MiB;
        # a half needs 256 MiB. Cap the allocator at what it holds now plus 384 MiB.
        activation = 4096 * hidden * 4
        cap = torch.cuda.memory_reserved(device) + activation * 3 // 2
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        try:
            result = splitter.run(1, x)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        assert splitter.splits >= 1
        assert result.rows == 4096
    with torch.inference_mode():
        want = model.to(torch.float64).cpu()(torch.from_numpy(x).to(torch.float64)).numpy()
    np.testing.assert_allclose(result.outputs, want, rtol=1e-3, atol=1e-3)  # fp32 (TF32 off by default) vs fp64


@pytest.mark.parametrize("device", DEVICES)
def test_injected_out_of_memory_spares_the_start_up_memory_probe(device):
    # faults.<worker>.oom_above_rows wraps the model after the memory probe, which runs a full
    # batch on CUDA: wrapped before it, the worker failed to start instead of splitting batches.
    spec = EngineSpec(name="mlp", model={"source": "zoo:tiny_mlp"})
    with StreamManager(device=device) as sm:
        engine = Engine(spec, sm, PipelineConfig(max_batch_rows=32), wrap_model=lambda m: OomAbove(m, limit=8))
        try:
            assert engine.submit(0, rows(8, seed=1)).result().rows == 8
            with pytest.raises(DeviceMemoryError, match="batch 1: .* at 32 rows"):
                engine.submit(1, rows(32, seed=2))
        finally:
            engine.close()
