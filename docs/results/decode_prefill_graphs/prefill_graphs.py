"""Generate calls with step 0 eager (GenerateConfig(prefill_graphs=0)) against step 0 replayed as its graph (default).

GPT-2 small fp32 on one GPU, GenerateConfig(kernels=True) (one row: the Triton
step; more: the model's step), the interleaved loop. Per (rows, prompt length,
new tokens): both generators' tokens compared, then calls timed in alternating
rounds, medians, and eager / graphed.
    python docs/results/decode_prefill_graphs/prefill_graphs.py [rounds]
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

ROWS, PROMPTS, NEW = (1, 16), (16, 128), (1, 16, 256)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda")
    rng = np.random.default_rng(0)
    prompts = {(rows, length): rng.integers(0, GPT2_SMALL.vocab_size, (rows, length))
               for rows in ROWS for length in PROMPTS}
    config = dict(max_batch=max(ROWS), max_seq_len=max(PROMPTS) + max(NEW), kernels=True)
    results = []
    with StreamManager(device=torch.device("cuda", 0)) as streams, \
            Generator(model, streams, GenerateConfig(**config, prefill_graphs=0)) as eager, \
            Generator(model, streams, GenerateConfig(**config)) as graphed:
        gens = {"eager": eager, "graphed": graphed}
        for (rows, length), x in prompts.items():
            for new in NEW:
                tokens = {name: gen.generate(x, new).tokens for name, gen in gens.items()}  # captures, warms up
                seconds = {name: [] for name in gens}
                for _ in range(rounds):
                    for name, gen in gens.items():
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        gen.generate(x, new)
                        seconds[name].append(time.perf_counter() - t0)
                ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
                r = {"rows": rows, "prompt_len": length, "new_tokens": new, "eager_ms": ms["eager"],
                     "graphed_ms": ms["graphed"], "eager_vs_graphed": ms["eager"] / ms["graphed"],
                     "tokens_identical": bool((tokens["eager"] == tokens["graphed"]).all()),
                     "runs_ms": {name: [round(1e3 * t, 3) for t in s] for name, s in seconds.items()}}
                print(json.dumps({k: v for k, v in r.items() if k != "runs_ms"}), flush=True)
                results.append(r)
        stats = {name: gen.stats.as_dict() for name, gen in gens.items()}
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float32", "loop": "interleaved",
           "rounds": rounds, "results": results, "stats": stats,
           "command": "python docs/results/decode_prefill_graphs/prefill_graphs.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "prefill_graphs.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
