"""Where a kernel lets the next one launch: before its wait (the product), after it, or at its exit.

Every kernel of the one-row step calls ``gdc_launch_dependents`` right after
issuing its weight (or cache) loads, then ``gdc_wait``. So the next kernel
launches as soon as all of this one's programs have started, issues its own
loads and lets the one after it go in turn: as many kernels ahead as the
SMs' registers hold are loading at once. That keeps memory busy, but those
loads compete with the ones the kernel on the critical path is waiting for
(in fp32 the attention's increment is 4.2 us against 2.4 in bf16,
``../decode_chain_probe/chain_f909d32.json``). Triggering after the wait
keeps one kernel ahead at most; triggering at the exit, none. Variants, as
copies of ``actors/decode_kernels.py`` edited as text:

- ``attention after wait`` / ``attention at exit``: the attention kernel only;
- ``proj after wait``: the product that merges the attention only;
- ``gemvs after wait``: every GEMV, the attention as it is;
- ``all after wait``: every GEMV and the attention;
- ``copy, unchanged``: a control of the copying.

Per dtype: each variant's device bound (median of 3, two alternating
passes), then the product and the fastest variant side by side (tokens
compared).

    python docs/results/decode_trigger_probe/trigger.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json``.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import Variant, bounds_then_side_by_side, changed, write  # noqa: E402

from actors.streams import StreamManager  # noqa: E402

AFTER_WAIT = """    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
"""
ATTENTION = "    _await_previous_kernel(PDL)\n    q = tl.load(q_ptr"
GEMV = "    _await_previous_kernel(PDL)\n    for row in tl.static_range(ROWS):"
ATTENTION_AFTER = (ATTENTION, AFTER_WAIT + "    q = tl.load(q_ptr")
ATTENTION_EXIT = (ATTENTION, "    if PDL:\n        tl.extra.cuda.gdc_wait()\n    q = tl.load(q_ptr")
GEMV_AFTER = (GEMV, AFTER_WAIT + "    for row in tl.static_range(ROWS):")
PROJ_AFTER = (GEMV, """    if ATTENTION:
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
    else:
        _await_previous_kernel(PDL)
    for row in tl.static_range(ROWS):""")


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["float32", "bfloat16"]
    variants = [Variant("base"),
                Variant("attention after wait", step=changed("attention_after", ATTENTION_AFTER)),
                Variant("attention at exit", step=changed("attention_exit", ATTENTION_EXIT)),
                Variant("proj after wait", step=changed("proj_after", PROJ_AFTER)),
                Variant("gemvs after wait", step=changed("gemvs_after", GEMV_AFTER)),
                Variant("all after wait", step=changed("all_after", GEMV_AFTER, ATTENTION_AFTER)),
                Variant("copy, unchanged", step=changed("copy"))]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [bounds_then_side_by_side(streams, name, variants, variants[1:-1], rounds) for name in dtypes]
    write(label, {"rows": 1, "rounds": rounds, "results": results,
                  "command": "python docs/results/decode_trigger_probe/trigger.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
