"""Where the interleaved loop's time above the device bound goes: loop variants at batch 1, compiled fp32 step.

Each variant replaces ``Generator._interleaved`` on one instance; all share the
graphs, buffers and events. Timed in rounds, variants in turn, medians.
    python docs/results/decode_interleave_probe/variants.py
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager


def lanes_nosync(self, bucket, rows, prompt_len, n, batch_id):
    """The two-lane ping-pong with no flag read: its device-side cost alone."""
    streams, lanes = self._streams, self._lanes
    for t in range(n):
        p = t % 2
        lane = lanes[p]
        if t > 0:
            streams.wait_event(lane, self._step_done[1 - p])
        with streams.use(lane):
            if t == 0:
                self._reset(bucket, rows, prompt_len, n, batch_id)
                self._prefill(bucket, prompt_len, p)
            else:
                self._run_step(bucket, p)
            self._step_done[p].record(lane)
            self._host_flags[p].copy_(self._flags[p], non_blocking=True)
            self._flag_copied[p].record(lane)
    return n, n, lanes[(n - 1) % 2]


def one_lane_side_copy(self, bucket, rows, prompt_len, n, batch_id):
    """Steps back to back on one stream; each step's flag copied on a second stream that waits for it."""
    streams = self._streams
    compute, side = self._lanes
    for t in range(n):
        p = t % 2
        with streams.use(compute):
            if t == 0:
                self._reset(bucket, rows, prompt_len, n, batch_id)
                self._prefill(bucket, prompt_len, p)
            else:
                self._run_step(bucket, p)
            self._step_done[p].record(compute)
        streams.wait_event(side, self._step_done[p])
        with streams.use(side):
            self._host_flags[p].copy_(self._flags[p], non_blocking=True)
            self._flag_copied[p].record(side)
        if t > 0:
            self._flag_copied[1 - p].synchronize()
            if self._host_flags_np[1 - p]:
                return t, t + 1, compute
    return n, n, compute


def one_stream(self, bucket, rows, prompt_len, n, batch_id):
    """Steps and flag copies on one stream; the host reads step t-1's flag while step t runs."""
    streams = self._streams
    compute = self._lanes[0]
    for t in range(n):
        p = t % 2
        with streams.use(compute):
            if t == 0:
                self._reset(bucket, rows, prompt_len, n, batch_id)
                self._prefill(bucket, prompt_len, p)
            else:
                self._run_step(bucket, p)
            self._host_flags[p].copy_(self._flags[p], non_blocking=True)
            self._flag_copied[p].record(compute)
        if t > 0:
            self._flag_copied[1 - p].synchronize()
            if self._host_flags_np[1 - p]:
                return t, t + 1, compute
    return n, n, compute


VARIANTS = {"lanes_nosync": lanes_nosync, "one_lane_side_copy": one_lane_side_copy, "one_stream": one_stream}


def main():
    rows, prompt_len, new_tokens, rounds = 1, 16, 256, int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda")
    x = np.random.default_rng(rows).integers(0, model.shape.vocab_size, (rows, prompt_len))
    config = GenerateConfig(max_batch=rows, max_seq_len=prompt_len + new_tokens, compile=True)
    names = ["synced", "interleaved", *VARIANTS]
    seconds = {name: [] for name in names}
    device = []
    with StreamManager(device=torch.device("cuda", 0)) as streams, Generator(model, streams, config) as gen:
        original = gen._interleaved

        def run(name):
            gen._interleaved = VARIANTS[name].__get__(gen) if name in VARIANTS else original
            loop = "synced" if name == "synced" else "interleaved"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = gen.generate(x, new_tokens, loop)
            elapsed = time.perf_counter() - t0
            return result, elapsed

        tokens = {name: run(name)[0].tokens for name in names}  # warm-up
        for _ in range(rounds):
            for name in names:
                seconds[name].append(run(name)[1])
            device.append(gen.device_step_seconds(x, new_tokens))
    step_us = {name: 1e6 * statistics.median(s) / new_tokens for name, s in seconds.items()}
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
           "device_step_us": 1e6 * statistics.median(device), "step_us": step_us,
           "vs_synced": {name: step_us["synced"] / us for name, us in step_us.items()},
           "tokens_match_synced": {name: bool((t == tokens["synced"]).all()) for name, t in tokens.items()},
           "command": "python docs/results/decode_interleave_probe/variants.py " + " ".join(sys.argv[1:])}
    print(json.dumps(out, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "variants.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
