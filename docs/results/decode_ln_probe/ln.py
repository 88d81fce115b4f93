"""The GEMVs' layer norm off the critical path: folded into the product, statistics alongside the dot.

``gemv_kernel`` builds a layer-normed input after its wait in three rounds of
reductions, one after the other: the mean, the variance about it, then the
product. Folded, with g and beta the norm's weight and bias and w a weight row:

    w . LN(x) = rstd * (sum_k w_k g_k x_k - mean * sum_k w_k g_k) + sum_k w_k beta_k

The two sums over the weight alone are taken before the wait; after it, the
three sums over x (x, x^2, and w g x) are independent, one round. The
variance is E[x^2] - mean^2. Variants, as copies of the working tree's
``actors/decode_kernels.py`` changed by text:
- ``folded``: the above, in ``gemv_kernel`` (tiles unchanged);
- ``folded, trigger first``: folded, with the next kernel let go
  (``gdc_launch_dependents``) before the fold's sums over the weight, not
  after them;
- ``no statistics``: the norm without its mean and variance (x g + beta): the
  wrong answer, but how fast the input could be with no statistics at all;
- ``copy, unchanged``: the copy with no edits, a control of the copying.

Per dtype: each variant's device bound (median of 3, two alternating
passes), then base and the faster folded side by side (tokens compared).

    python docs/results/decode_ln_probe/ln.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json``.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import Variant, bounds_then_side_by_side, changed, write  # noqa: E402

from actors.streams import StreamManager  # noqa: E402

FOLD_BEFORE_WAIT = ("""    if QKV:
        pos = tl.load(pos_ptr)  # written by the previous step, which has finished (see KernelStep._layers)
    _await_previous_kernel(PDL)
    for row in tl.static_range(ROWS):""", """    if QKV:
        pos = tl.load(pos_ptr)  # written by the previous step, which has finished (see KernelStep._layers)
    if LN:
        g = tl.load(ln_w_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
        wf = w.to(tl.float32)
        c = tl.sum(wf * g[None, :], axis=1)
        b += tl.sum(wf * tl.load(ln_b_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :], axis=1)
    _await_previous_kernel(PDL)
    for row in tl.static_range(ROWS):""")
FOLD_AFTER_WAIT = ("""        x = _row_input(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, eps, row, rk, k_mask, K, K_POW2, LN,
                       ATTENTION, D, HD, CHUNKS)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) + b""", """        if LN:
            x = tl.load(x_ptr + row * K + rk, mask=k_mask, other=0.0).to(tl.float32)
            mean = tl.sum(x) / K
            rstd = 1.0 / tl.sqrt(tl.sum(x * x) / K - mean * mean + eps)
            y = rstd * (tl.sum(w.to(tl.float32) * (x * g)[None, :], axis=1) - mean * c) + b
        else:
            x = _row_input(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, eps, row, rk, k_mask, K, K_POW2, LN,
                           ATTENTION, D, HD, CHUNKS)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) + b""")
# The same, with the next kernel let go before the fold's sums, not after them.
FOLD_TRIGGER_FIRST = (FOLD_BEFORE_WAIT[0], FOLD_BEFORE_WAIT[1].replace("""    if LN:
        g = tl.load(""", """    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if LN:
        g = tl.load(""").replace("""    _await_previous_kernel(PDL)
    for row""", """    if PDL:
        tl.extra.cuda.gdc_wait()
    for row"""))
NO_STATISTICS = ("""        mean = tl.sum(x) / K
        centred = tl.where(k_mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred) / K + eps)
        x = centred * rstd * tl.load(""", """        x = x * tl.load(""")


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"]
    variants = [Variant("base"), Variant("folded", step=changed("folded", FOLD_BEFORE_WAIT, FOLD_AFTER_WAIT)),
                Variant("folded, trigger first",
                        step=changed("folded_trigger_first", FOLD_TRIGGER_FIRST, FOLD_AFTER_WAIT)),
                Variant("no statistics", step=changed("no_statistics", NO_STATISTICS)),
                Variant("copy, unchanged", step=changed("copy"))]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [bounds_then_side_by_side(streams, name, variants, variants[1:3], rounds) for name in dtypes]
    write(label, {"rows": 1, "rounds": rounds, "results": results,
                  "command": "python docs/results/decode_ln_probe/ln.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
