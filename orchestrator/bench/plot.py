"""PNG plots from benchmark JSON, written next to it (``scaling.json`` -> ``scaling.png``).

``orchestrator bench scaling`` and ``orchestrator bench graphs`` plot their own
results after writing them; this re-plots saved ones:

    python -m orchestrator.bench.plot docs/results/scaling.json docs/results/graphs.json
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(doc: dict, out: Path) -> None:
    plt = _pyplot()
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
    plt.close(fig)


def plot_graphs(doc: dict, out: Path) -> None:
    """Per model: rows/s of eager and CUDA-graph compute per batch size (top), graphs over eager (bottom)."""
    plt = _pyplot()
    rows = doc["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for col, name in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["batch"])
        # Batch sizes sit at even steps (they are mostly powers of two), labelled with their value.
        x, labels = range(len(mine)), [str(r["batch"]) for r in mine]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(x, [r["eager_rows_per_s"] for r in mine], marker="o", label="eager")
        top.plot(x, [r["graphs_rows_per_s"] for r in mine], marker="o", label="CUDA graphs")
        top.set(title=name, ylabel="rows/s", yscale="log")
        top.set_xticks(x, labels)
        top.grid(alpha=0.3, which="both")
        top.legend(fontsize=8)
        bottom.bar(x, [r["ratio"] for r in mine], color="tab:green")
        bottom.axhline(1.0, color="k", linestyle="--", linewidth=1)
        bottom.set(xlabel="batch size (rows)", ylabel="graphs / eager")
        bottom.set_xticks(x, labels)
        bottom.grid(alpha=0.3, axis="y")
    fig.suptitle(f"CUDA graphs vs eager in the pipeline ({doc['environment'].get('gpu', 'CPU')})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[dict, Path], None]] = {"scaling": plot_scaling, "graphs": plot_graphs}


def plot_file(path: str | Path) -> Path:
    """Plot a benchmark's JSON into a PNG next to it; returns the PNG's path."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if doc["benchmark"] not in PLOTS:
        raise ValueError(f"{path}: no plot for benchmark {doc['benchmark']!r} (plots: {', '.join(PLOTS)})")
    out = path.with_suffix(".png")
    PLOTS[doc["benchmark"]](doc, out)
    return out


def plot_after_bench(path: str | Path) -> None:
    """A benchmark's last step: the PNG of the JSON it wrote, or, without matplotlib, how to make it elsewhere."""
    try:
        print(f"wrote {plot_file(path)}")
    except ImportError as err:
        print(f"no plot here ({err}): python -m orchestrator.bench.plot {path}")


def main(argv: list[str] | None = None) -> None:
    for path in argv if argv is not None else sys.argv[1:]:
        try:
            print(f"wrote {plot_file(path)}")
        except ValueError as err:
            raise SystemExit(str(err)) from err


if __name__ == "__main__":
    main()
