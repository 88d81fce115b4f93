"""What the persistent step's grid barrier costs alone, and the step kernel's registers and spills.

A kernel of one program per SM that only passes ``barriers`` of decode_persistent's
grid barriers (cooperative launch), timed over 50 launches from the host for 1
and 61 barriers: the difference / 60 is one barrier. Then the step kernel
compiled for GPT-2 small per dtype and num_warps: registers per thread, spills.
    python docs/results/decode_persistent_probe/barrier.py
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from actors.decode import GPT2_SMALL, Decoder, KVCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_persistent import PersistentStep, _arrive, _wait, step_kernel  # noqa: E402


@triton.jit
def barrier_kernel(counter_ptr, n, PROGRAMS: tl.constexpr, STRIDE: tl.constexpr):
    base = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") // STRIDE * STRIDE
    for phase in range(0, n):
        _wait(counter_ptr, base + phase * PROGRAMS, True)
        _arrive(counter_ptr, True)
    if tl.program_id(0) == 0:
        tl.atomic_add(counter_ptr, STRIDE - n * PROGRAMS, sem="release", scope="gpu")


def launch_us(programs, counter, barriers, warps, launches=50):
    def launch():
        barrier_kernel[(programs,)](counter, barriers, PROGRAMS=programs, STRIDE=64 * programs, num_warps=warps,
                                    launch_cooperative_grid=True)
    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        launch()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / launches


def main():
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    barriers = []
    for warps in (4, 8, 16):
        one, many = launch_us(programs, counter, 1, warps), launch_us(programs, counter, 61, warps)
        barriers.append({"num_warps": warps, "launch_1_barrier_us": one, "launch_61_barriers_us": many,
                         "barrier_us": (many - one) / 60})
        print(barriers[-1], flush=True)
    kernels = []
    for dtype in (torch.float32, torch.bfloat16):
        model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
        for warps in (8, 16):
            step = PersistentStep(model, 272, num_warps=warps)
            cache = KVCache(model.shape, 1, 272, dtype, torch.device("cuda"))
            step.logits(torch.tensor([5], device="cuda"), torch.tensor([16], device="cuda"), cache.view(1))
            torch.cuda.synchronize()
            for cached in step_kernel.device_caches.values():
                for compiled in cached[0].values():
                    compiled._init_handles()
                    kernels.append({"dtype": str(dtype), "num_warps": warps, "registers": compiled.n_regs,
                                    "spills": compiled.n_spills})
                    print(kernels[-1], flush=True)
                cached[0].clear()
    result = {"device": torch.cuda.get_device_name(), "programs": programs, "barriers": barriers,
              "step_kernel": kernels, "command": "python docs/results/decode_persistent_probe/barrier.py"}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "barrier.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
