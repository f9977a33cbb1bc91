"""PyTorch baseline for gpu-bench: the same shape's permute (index_select), weighted unpermute
(index_add_), and a device copy, timed with CUDA events (median of --iters runs).

    python3 tools/scripts/torch_baseline.py --tokens 4096 --hidden 7168 --top-k 8 --json out.json
"""
import argparse
import json
import statistics
import time

import torch


def timed(fn, iters, warm_s=0.3):
    """Median seconds of `iters` runs of `fn` (CUDA events), after untimed runs for at least
    `warm_s` of wall time (the card's clocks leave their idle state; the first run compiles)."""
    start = time.perf_counter()
    while True:
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - start >= warm_s:
            break
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json")
    a = p.parse_args()
    n, d, k = a.tokens, a.hidden, a.top_k
    dev = torch.device("cuda")
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(n, d, device=dev, dtype=dt, generator=g) * 2 - 1
    slots = n * k
    tok = torch.arange(slots, device=dev) // k
    tok = tok[torch.randperm(slots, device=dev, generator=g)]
    rows = torch.rand(slots, d, device=dev, dtype=dt, generator=g)
    w = torch.rand(slots, device=dev, dtype=dt, generator=g)
    y = torch.zeros(n, d, device=dev, dtype=dt)
    dst = torch.empty_like(rows)
    row_bytes = d * 2

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n, "hidden": d, "top_k": k}
    res["copy_us"] = timed(lambda: dst.copy_(rows), a.iters) * 1e6
    res["copy_gbps"] = 2 * slots * row_bytes / (res["copy_us"] * 1e-6) / 1e9
    res["index_select_us"] = timed(lambda: torch.index_select(x, 0, tok), a.iters) * 1e6
    res["index_add_us"] = timed(lambda: y.index_add_(0, tok, rows), a.iters) * 1e6
    res["weighted_index_add_us"] = timed(lambda: y.index_add_(0, tok, rows * w[:, None]), a.iters) * 1e6
    for key, v in res.items():
        print(f"torch {key}: {v:.1f}" if isinstance(v, float) else f"torch {key}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
