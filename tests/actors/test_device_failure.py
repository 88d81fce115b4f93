"""A sticky CUDA error (here a device-side assert) breaks the pipeline or the decode generator and ends the
worker's process.

Each test runs in a fresh process: the error poisons the whole process's CUDA
context, which no later test could use. The assert is fired outside the
pipeline (or generator), as another stream or model on the same GPU might: it
learns of it only when its next batch is enqueued.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

SETUP = """
import os
import numpy as np
import torch
x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)

def poison():
    try:
        torch.arange(4.0, device="cuda")[torch.tensor([1 << 40], device="cuda")]
        torch.cuda.synchronize()
    except RuntimeError as err:
        print("poisoned:", str(err).splitlines()[0], flush=True)
"""

PIPELINE = SETUP + """
from actors.models import load_model
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager
torch.manual_seed(0)
pipeline = Pipeline(load_model("zoo:tiny_mlp"), StreamManager(device="cuda"), PipelineConfig(max_batch_rows=8))
print("batch 0:", pipeline.submit(0, x).result(timeout=60).rows, "rows", flush=True)
poison()
for batch in (1, 2):
    try:
        pipeline.submit(batch, x).result(timeout=60)
        print(f"batch {batch}: ok", flush=True)
    except Exception as err:
        print(f"batch {batch}: {type(err).__name__}", flush=True)
print("broken:", pipeline.broken, flush=True)
os._exit(0)  # no teardown on a poisoned context
"""

AFTER_POISON = """
try:
    worker.infer(1, {rows})
    print("batch 1: ok", flush=True)
except Exception as err:
    print(f"batch 1: {{type(err).__name__}}", flush=True)
print("the worker survived a poisoned context", flush=True)
"""

WORKER = SETUP + """
from actors.worker import GpuWorker
worker = GpuWorker("worker-x", [{"name": "m", "model": {"source": "zoo:tiny_mlp"}}], {"max_batch_rows": 8})
print("batch 0:", worker.infer(0, x).rows, "rows", flush=True)
poison()
""" + AFTER_POISON.format(rows="x")

GENERATOR = SETUP + """
from actors.decode import TINY_DECODER, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager
torch.manual_seed(0)
prompts = np.random.default_rng(1).integers(0, TINY_DECODER.vocab_size, (8, 8))
generator = Generator(Decoder(TINY_DECODER).cuda(), StreamManager(device="cuda"),
                      GenerateConfig(max_batch=8, max_seq_len=24))
print("batch 0:", generator.generate(prompts, 16, "interleaved", 0).tokens.shape[0], "rows", flush=True)
poison()
for batch in (1, 2):
    try:
        generator.generate(prompts, 16, "interleaved", batch)
        print(f"batch {batch}: ok", flush=True)
    except Exception as err:
        print(f"batch {batch}: {type(err).__name__}", flush=True)
print("broken:", generator.broken, flush=True)
os._exit(0)
"""

DECODE_WORKER = SETUP + """
from actors.decode_worker import DecodeWorker
worker = DecodeWorker("worker-d", {"source": "zoo:tiny_decoder"},
                      {"max_new_tokens": 16, "loop": "interleaved", "max_seq_len": None}, 8)
prompts = np.random.default_rng(1).integers(0, 100, (8, worker.spec.row_shape[0]))
print("batch 0:", worker.infer(0, prompts).rows, "rows", flush=True)
poison()
""" + AFTER_POISON.format(rows="prompts")


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


# Before (H100): the pipeline's batches 1 and 2 raised the bare torch.AcceleratorError and `broken` stayed
# None; the generator's batch 1 raised it too and the process then aborted (exit -6).
@pytest.mark.gpu
@pytest.mark.parametrize("script", [PIPELINE, GENERATOR], ids=["pipeline", "generator"])
def test_a_batch_enqueued_after_a_device_failure_is_a_broken_pipeline_not_its_own_error(script):
    done = _run(script)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "batch 0: 8 rows" in lines and any(line.startswith("poisoned:") for line in lines), done.stdout
    assert "batch 1: PipelineBrokenError" in lines and "batch 2: PipelineBrokenError" in lines, done.stdout
    assert any(line.startswith("broken: ") and "device-side assert" in line for line in lines), done.stdout


# Before (H100): infer raised the bare torch.AcceleratorError and the worker lived on, every batch failing.
@pytest.mark.gpu
@pytest.mark.parametrize("script", [WORKER, DECODE_WORKER], ids=["inference_worker", "decode_worker"])
def test_the_worker_process_exits_after_a_device_failure_so_ray_restarts_it(script):
    done = _run(script)
    assert "batch 0: 8 rows" in done.stdout and "poisoned:" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "batch 1" not in done.stdout and "survived" not in done.stdout, done.stdout
    assert done.returncode == 1 and "device failure, exiting" in done.stderr, done.stderr[-3000:]
