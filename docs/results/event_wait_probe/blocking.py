"""Experiment: spin-wait (default) vs blocking-sync CUDA events in the per-GPU pipeline, multistream throughput."""
import json, os, time
import torch
from torch.backends import cudnn
from orchestrator.bench import multistream_bench as mb

SPIN = torch.cuda.Event


class BlockingEvent(SPIN):
    def __new__(cls, enable_timing=False, blocking=False, interprocess=False):
        return SPIN.__new__(cls, enable_timing=enable_timing, blocking=True, interprocess=interprocess)


cudnn.benchmark = True
device = torch.device("cuda", 0)
work = mb._workload(False, "zoo:resnet18", 8)
out = []
for rnd in range(2):
    for mode in ("spin", "blocking"):
        torch.cuda.Event = BlockingEvent if mode == "blocking" else SPIN
        cpu0, t0 = time.process_time(), time.perf_counter()
        rows = mb.throughput(work, device, 4, 3)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        for r in rows:
            r.update(mode=mode, round=rnd, cpu_s=cpu, wall_s=wall)
            out.append(r)
            print(mode, rnd, r["streams"], round(r["rows_per_s"]), round(r["speedup"], 3), f"cpu {cpu:.1f}s / wall {wall:.1f}s", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "blocking.json"), "w"), indent=1)
