"""PNG plots from benchmark JSON (run where matplotlib is installed; the GPU machines lack it).

    python -m orchestrator.bench.plot docs/results/scaling.json    # -> docs/results/scaling.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_scaling(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, name in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == name]
        gpus = sorted({r["gpus"] for r in mine})
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["gpus"], r["rows_per_s"]) for r in mine if r["method"] == method)
            ax.plot([g for g, _ in pts], [v for _, v in pts], marker="o", label=method)
        one = next(r["rows_per_s"] for r in mine if r["method"] == "orchestrator" and r["gpus"] == gpus[0])
        ax.plot(gpus, [one * g / gpus[0] for g in gpus], "k--", linewidth=1, label="ideal linear (orchestrator)")
        ax.set_title(name)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("rows/s")
        ax.set_xticks(gpus)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Throughput vs GPUs ({doc['environment'].get('gpu', 'CPU')})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    for path in map(Path, argv if argv is not None else sys.argv[1:]):
        doc = json.loads(path.read_text())
        if doc["benchmark"] != "scaling":
            raise SystemExit(f"{path}: no plot for benchmark {doc['benchmark']!r}")
        plot_scaling(doc, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
