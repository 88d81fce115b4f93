"""Keeping part of the one-row step's weights in L2 from one step to the next.

A step streams every weight once (GPT-2 small: 247 MB in bf16, 494 MB in
fp32), five times the H100's 50 MB L2, so nothing is left in L2 when the next
step wants it. The output head is the step's one bandwidth-bound kernel.
Variants: the first bytes of a product's weight (``l2 keep``: bytes a layer)
loaded as L2 evict-last, with the context's persisting-L2 set-aside
(``cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE)``) at 0 or some size.
Per dtype: each variant's device bound (median of 3), then the base and the
fastest variant side by side.

    python docs/results/decode_l2_probe/l2.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json``.
"""
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import Variant, device_bound_us, model_and_prompts, side_by_side, write  # noqa: E402

from actors.streams import StreamManager  # noqa: E402

CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 6
CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
_cuda = ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed: CUresult {result}")


def max_set_aside() -> int:
    value = ctypes.c_int()
    _check(_cuda.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, 0),
           "cuDeviceGetAttribute")
    return value.value


def set_aside(nbytes: int) -> None:
    """The persisting-L2 set-aside of this context, with every line now persisting made normal."""
    torch.cuda.synchronize()
    _check(_cuda.cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache")
    _check(_cuda.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(nbytes)), "cuCtxSetLimit")
    got = ctypes.c_size_t()
    _check(_cuda.cuCtxGetLimit(ctypes.byref(got), CU_LIMIT_PERSISTING_L2_CACHE_SIZE), "cuCtxGetLimit")
    print(f"set-aside {nbytes} -> {got.value}", flush=True)


def variants(most: int) -> list[Variant]:
    mb = 1 << 20
    out = [Variant("base", {}, lambda: set_aside(0)),
           Variant("head 24 MB, no set-aside", {"l2 keep": {"head": 24 * mb}}, lambda: set_aside(0))]
    for frac in (0.5, 0.75, 1.0, 1.25):
        out.append(Variant(f"head {frac} x set-aside", {"l2 keep": {"head": int(frac * most)}},
                           lambda: set_aside(most)))
    out.append(Variant("set-aside only", {}, lambda: set_aside(most)))
    for size in (8 * mb, 16 * mb):
        out.append(Variant(f"head {size // mb} MB, set-aside {size // mb} MB", {"l2 keep": {"head": size}},
                           lambda size=size: set_aside(size)))
    out.append(Variant("fc 2 MB a layer", {"l2 keep": {"fc": 2 * mb}}, lambda: set_aside(most)))
    out.append(Variant("qkv 1 MB, fc 1 MB a layer", {"l2 keep": {"qkv": mb, "fc": mb}}, lambda: set_aside(most)))
    return out


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"]
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    most = max_set_aside()
    print("L2", torch.cuda.get_device_properties(0).L2_cache_size, "max set-aside", most, flush=True)
    results = []
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        for name in dtypes:
            model, x = model_and_prompts(getattr(torch, name))
            vs = variants(most)
            bounds = {}
            for v in vs:
                bounds[v.name] = device_bound_us(model, streams, v, x)
                print(name, v.name, "device us", round(bounds[v.name], 1), flush=True)
            fastest = min(vs[1:], key=lambda v: bounds[v.name])
            results.append({"dtype": name, "device_bound_us": bounds,
                            "side_by_side": side_by_side(model, streams, [vs[0], fastest], x, rounds)})
        set_aside(0)
    write(label, {"rows": 1, "rounds": rounds, "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
                  "max_set_aside_bytes": most, "results": results,
                  "command": "python docs/results/decode_l2_probe/l2.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
