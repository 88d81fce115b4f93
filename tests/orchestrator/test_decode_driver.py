"""Generation through the driver: prompts sharded over real Ray workers (CPU backend), tokens per batch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch
from _util import RAY_GPUS, run_config
from test_cli import REPO, orchestrator

from actors.decode import GenerateConfig, Generator
from actors.models import load_model
from actors.streams import StreamManager
from orchestrator import InputError, Orchestrator, RunConfig, WorkerStartError
from orchestrator.sources import Synthetic

pytestmark = pytest.mark.usefixtures("ray_local")

BATCH, PROMPT, NEW = 8, 12, 16
DECODE = {"max_new_tokens": NEW, "eos_token_id": 7, "temperature": 0.9, "seed": 4}


def decode_config(**decode) -> RunConfig:
    return run_config(BATCH, model={"source": "zoo:tiny_decoder", "kwargs": {"prompt_len": PROMPT}},
                      decode={**DECODE, **decode})


def local_tokens(x: np.ndarray, batch_rows: int, prompt_len: int = PROMPT,
                 decode: dict = DECODE) -> dict[int, np.ndarray]:
    """Each batch's tokens from a Generator in this process, on one thread like a Ray worker with one CPU."""
    torch.manual_seed(0)
    model = load_model("zoo:tiny_decoder", kwargs={"prompt_len": prompt_len}).model
    decode = dict(decode)
    n = decode.pop("max_new_tokens")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with StreamManager(device="cpu") as streams, Generator(
                model, streams, GenerateConfig(max_batch=batch_rows, max_seq_len=prompt_len + n, **decode)) as gen:
            return {i: gen.generate(x[a:a + batch_rows], n, batch_id=i).tokens
                    for i, a in enumerate(range(0, len(x), batch_rows))}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def orch():
    if not ray.is_initialized():
        ray.init(num_cpus=16, num_gpus=RAY_GPUS, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with Orchestrator(decode_config()) as o:
        yield o


def prompts(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, PROMPT))


def test_each_batch_of_prompts_yields_its_tokens_as_it_completes(orch):
    x = prompts(BATCH * 6 + 3, seed=1)
    want = local_tokens(x, BATCH)
    results = list(orch.generate(x))
    assert sorted(r.batch_id for r in results) == list(range(7))
    assert {r.worker for r in results} == {"worker-0", "worker-1"}
    for r in results:
        np.testing.assert_array_equal(r.outputs, want[r.batch_id], err_msg=f"batch {r.batch_id}")
    assert (np.concatenate(list(want.values())) == 7).any()  # some rows ended early: EOS and pads were checked


def test_run_returns_every_prompts_tokens_in_input_order(orch):
    x = prompts(30, seed=2)
    np.testing.assert_array_equal(orch.run(x), np.concatenate(list(local_tokens(x, BATCH).values())))
    stats = orch.report()["workers"]
    assert all(w["decode"]["line"].startswith("decode (interleaved loop, eager)") for w in stats)


def test_a_bad_prompt_fails_its_batch_by_name(orch):
    x = prompts(32, seed=3)
    x[2 * BATCH + 5, 4] = 999
    with pytest.raises(InputError, match=r"batch 2 on worker worker-\d: token id 999 \(prompt 5, position 4\)"):
        list(orch.generate(x))
    with pytest.raises(InputError, match="too long for the KV cache"):
        orch.run(np.zeros((4, PROMPT + 1), np.int64))


def test_generate_needs_a_decode_section():
    with pytest.raises(RuntimeError, match="generate needs a decode section"):
        Orchestrator(run_config(BATCH)).generate(prompts(4))


def test_a_model_that_is_not_a_decoder_fails_the_start_naming_it():
    config = RunConfig.model_validate({**decode_config().model_dump(), "model": {"source": "zoo:tiny_mlp"}})
    with pytest.raises(WorkerStartError, match=r"'zoo:tiny_mlp' built .*; decode needs an actors.decode.Decoder"):
        Orchestrator(config).start()


def test_the_cli_runs_the_tiny_decode_config(tmp_path):
    r = orchestrator("run", "--config", "configs/decode_tiny.yaml", "--set", f"output.path={tmp_path / 'tokens.npy'}",
                     "--set", f"output.report={tmp_path / 'report.json'}", "--set", "input.rows=40",
                     "--set", "input.seed=5")
    assert r.returncode == 0, r.stderr[-3000:]
    config = RunConfig.from_yaml(REPO / "configs" / "decode_tiny.yaml")
    rows, batch = 40, config.dispatch.batch_rows
    syn = Synthetic(rows, (config.model.kwargs["prompt_len"],), "int64", seed=5)
    x = np.concatenate([syn.batch(i, a, min(a + batch, rows)) for i, a in enumerate(range(0, rows, batch))])
    want = local_tokens(x, batch, config.model.kwargs["prompt_len"], config.decode.model_dump(
        exclude={"loop", "max_seq_len"}))
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), np.concatenate(list(want.values())))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "ok" and report["rows"] == rows
    assert "decode (interleaved loop, eager)" in r.stdout
