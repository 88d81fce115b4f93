"""GEMVs or tiles for the two-byte kernel step at 2-4 rows.

The GEMVs run up to ``GEMV_MAX_ROWS`` (4) rows; each program does the work of
every row, so their step grows with the rows (bf16: 178 us at 1 row, 455 at 4),
while the tiles (``tl.dot``, at least 16 rows a tile) took 426 us at 16 rows.
Per row count: the device bound (median of 3, two alternating passes) of the
GEMVs with the default configs, with the configs chosen before the one-row
sweep (proj (16, 4), proj2 (4, 8)), and of the tiles (``"gemv rows": 1``);
then the defaults and the fastest other side by side.

    python docs/results/decode_rows_probe/rows.py LABEL [rounds] [rows,...]

writes ``$OUT/LABEL.json``.
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import Variant, device_bound_us, model_and_prompts, side_by_side, write  # noqa: E402

from actors.streams import StreamManager  # noqa: E402

VARIANTS = [Variant("gemv"), Variant("gemv, proj (16, 4), proj2 (4, 8)", {"proj": (16, 4), "proj2": (4, 8)}),
            Variant("tiles", {"gemv rows": 1})]


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    row_counts = [int(r) for r in sys.argv[3].split(",")] if len(sys.argv) > 3 else [2, 3, 4]
    results = []
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        for rows in row_counts:
            model, x = model_and_prompts(torch.bfloat16, rows)
            passes = {v.name: [] for v in VARIANTS}
            for _ in range(2):
                for v in VARIANTS:
                    passes[v.name].append(device_bound_us(model, streams, v, x))
            bounds = {name: statistics.median(us) for name, us in passes.items()}
            print(rows, {name: [round(u, 1) for u in us] for name, us in passes.items()}, flush=True)
            fastest = min(VARIANTS[1:], key=lambda v: bounds[v.name])
            results.append({"rows": rows, "device_bound_us": bounds, "passes_us": passes,
                            "side_by_side": side_by_side(model, streams, [VARIANTS[0], fastest], x, rounds)})
    write(label, {"dtype": "bfloat16", "rounds": rounds, "results": results,
                  "command": "python docs/results/decode_rows_probe/rows.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
