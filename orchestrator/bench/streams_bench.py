"""RFC 0004's table: throughput of copy+compute requests on 1, 2 and 4 streams of one GPU.

Workload (balanced on purpose, so that both overlap and concurrency matter):
each request copies ``rows x width`` fp32 from pinned host memory to the
device (H2D), runs ``layers`` bf16 matmuls of ``rows x width @ width x width``
(narrow: ``rows`` is small, so one request's kernels leave most SMs idle), and
copies the fp32 result back (D2H). ``layers`` is calibrated at start so that
one request's compute takes about as long as its H2D copy. With k streams, the
requests are issued round-robin from one host thread, each stream owning its
buffers; with one stream everything is serial.

    python -m orchestrator.bench.streams_bench --out docs/results/streams.json
"""
from __future__ import annotations

import argparse

import torch

from actors.streams import StreamManager, StreamPriority
from orchestrator.bench.common import command_line, median_seconds, print_table, write_result


class _Lane:
    """The buffers and stream one request in flight owns."""

    def __init__(self, sm: StreamManager, stream, rows: int, width: int) -> None:
        self.stream = stream
        self.host_in = torch.randn(rows, width, pin_memory=True)
        self.host_out = torch.empty(rows, width, pin_memory=True)
        self.dev_in = torch.empty(rows, width, device=sm.device)


def _request(sm: StreamManager, lane: _Lane, weights: list[torch.Tensor]) -> None:
    with sm.use(lane.stream):
        lane.dev_in.copy_(lane.host_in, non_blocking=True)
        x = lane.dev_in.to(torch.bfloat16)
        for w in weights:
            x = x @ w
        lane.host_out.copy_(x.float(), non_blocking=True)


def _run(sm: StreamManager, lanes: list[_Lane], weights: list[torch.Tensor], requests: int) -> None:
    for i in range(requests):
        _request(sm, lanes[i % len(lanes)], weights)


def _calibrate_layers(sm: StreamManager, rows: int, width: int) -> tuple[int, float, float]:
    """Layers whose compute time matches one request's H2D time; returns (layers, h2d_ms, layer_ms)."""
    stream = sm.get_compute_stream()
    lane = _Lane(sm, stream, rows, width)
    w = torch.randn(width, width, device=sm.device, dtype=torch.bfloat16) / width ** 0.5

    def copy() -> None:
        with sm.use(stream):
            for _ in range(50):
                lane.dev_in.copy_(lane.host_in, non_blocking=True)

    def matmul() -> None:
        with sm.use(stream):
            x = lane.dev_in.to(torch.bfloat16)
            for _ in range(50):
                x = x @ w

    h2d_ms = median_seconds(copy, 5) * 1e3 / 50
    layer_ms = median_seconds(matmul, 5) * 1e3 / 50
    return max(1, round(h2d_ms / layer_ms)), h2d_ms, layer_ms


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="docs/results/streams.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("streams_bench needs a CUDA device")
    torch.manual_seed(0)
    rows = []
    with StreamManager(max_streams=4) as sm:
        layers, h2d_ms, layer_ms = _calibrate_layers(sm, args.rows, args.width)
        weights = [torch.randn(args.width, args.width, device=sm.device, dtype=torch.bfloat16) / args.width ** 0.5
                   for _ in range(layers)]
        base = None
        for k in (1, 2, 4):
            streams = [sm.get_compute_stream()] if k == 1 else [sm.create_stream(StreamPriority.NORMAL) for _ in range(k)]
            lanes = [_Lane(sm, s, args.rows, args.width) for s in streams]
            # Correctness first: every lane's output equals the reference for its input.
            _run(sm, lanes, weights, len(lanes))
            sm.sync_all_streams()
            for lane in lanes:
                ref = lane.host_in.cuda().to(torch.bfloat16)
                for w in weights:
                    ref = ref @ w
                torch.testing.assert_close(lane.host_out, ref.float().cpu(), rtol=2e-2, atol=2e-2)
            seconds = median_seconds(lambda: _run(sm, lanes, weights, args.requests), args.repeats, warmup=2)
            rate = args.requests / seconds
            base = base or rate
            rows.append({"streams": k, "requests_per_s": rate, "speedup": rate / base,
                         "median_seconds": seconds})
            for s in streams:
                if s is not sm.get_compute_stream():
                    sm.destroy_stream(s)
    workload = {"rows": args.rows, "width": args.width, "layers": layers, "requests": args.requests,
                "h2d_ms_per_request": h2d_ms, "matmul_ms_per_layer": layer_ms,
                "bytes_h2d_per_request": args.rows * args.width * 4}
    print_table(rows, ["streams", "requests_per_s", "speedup", "median_seconds"])
    print("workload:", workload)
    write_result(args.out, "streams", command_line("orchestrator.bench.streams_bench", argv),
                 rows, workload=workload, floors={"2": 1.3, "4": 1.8})
    return rows


if __name__ == "__main__":
    main()
