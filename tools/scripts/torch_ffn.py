"""PyTorch peer for ffn-bench: the same grouped SwiGLU experts in bf16 over the same expert row
counts (tokens pre-sorted by expert), timed with CUDA events (median of --iters runs):
torch._grouped_mm where this PyTorch has it (gate, up and down each one grouped product over
all experts, silu(gate) * up between), else a per-expert loop of matmuls; the one used is named
in each point's `impl`.

    python3 tools/scripts/torch_ffn.py --hidden 7168 --intermediate 2048 --experts 256 \
        --counts-json counts.json --json out.json

--counts-json holds a list of {"tokens": N, "counts": [rows of expert 0, 1, ...]} (what
ffn-bench writes, so both time the same routing); without it, --tokens and --top-k draw counts
here.
"""
import argparse
import json

import torch

from torch_baseline import timed  # same directory: CUDA-event timing, median of runs


def draw_counts(tokens, k, experts, seed):
    g = torch.Generator().manual_seed(seed)
    c = [0] * experts
    for _ in range(tokens):
        for e in torch.randperm(experts, generator=g)[:k].tolist():
            c[e] += 1
    return c


def grouped(x, w_t, offs):
    return torch._grouped_mm(x, w_t, offs=offs)


def make_grouped(wg, wu, wd, counts, dev):
    # mat_b is [E, K, N]: the [E, N, K] weights transposed (column-major inner dims).
    offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    wg_t, wu_t, wd_t = wg.transpose(-2, -1), wu.transpose(-2, -1), wd.transpose(-2, -1)

    def ffn(x):
        h = torch.nn.functional.silu(grouped(x, wg_t, offs)) * grouped(x, wu_t, offs)
        return grouped(h, wd_t, offs)

    return ffn


def make_loop(wg, wu, wd, counts):
    bounds = []
    start = 0
    for e, r in enumerate(counts):
        if r:
            bounds.append((e, start, start + r))
        start += r

    def ffn(x):
        out = torch.empty(x.shape[0], wd.shape[1], device=x.device, dtype=x.dtype)
        for e, a, b in bounds:
            h = x[a:b]
            out[a:b] = (torch.nn.functional.silu(h @ wg[e].T) * (h @ wu[e].T)) @ wd[e].T
        return out

    return ffn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="1,16,64,512,2048")
    p.add_argument("--counts-json")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--loop", action="store_true", help="time the per-expert loop even where _grouped_mm exists")
    p.add_argument("--json")
    a = p.parse_args()
    dev = torch.device("cuda")
    d, f, E = a.hidden, a.intermediate, a.experts
    if a.counts_json:
        with open(a.counts_json) as fh:
            calls = json.load(fh)
    else:
        calls = [{"tokens": int(n), "counts": draw_counts(int(n), min(a.top_k, E), E, int(n))} for n in a.tokens.split(",")]
    dt = torch.bfloat16
    m = 8192
    sq_a = torch.randn(m, m, device=dev, dtype=dt)
    sq_b = torch.randn(m, m, device=dev, dtype=dt)
    square = 2 * m**3 / timed(lambda: sq_a @ sq_b, a.iters) / 1e12
    print(f"torch square {m} matmul bf16: {square:.1f} TFLOP/s")
    del sq_a, sq_b
    g = torch.Generator(device=dev).manual_seed(0)
    wg = (torch.rand(E, f, d, device=dev, dtype=dt, generator=g) * 2 - 1) * d**-0.5
    wu = (torch.rand(E, f, d, device=dev, dtype=dt, generator=g) * 2 - 1) * d**-0.5
    wd = (torch.rand(E, d, f, device=dev, dtype=dt, generator=g) * 2 - 1) * f**-0.5
    has_grouped = hasattr(torch, "_grouped_mm") and not a.loop
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "square_bf16_tflops": square,
           "points": []}
    for call in calls:
        counts = call["counts"]
        assert len(counts) == E, f"{len(counts)} counts for {E} experts"
        rows = sum(counts)
        x = torch.rand(rows, d, device=dev, dtype=dt, generator=g) * 2 - 1
        impl = "torch._grouped_mm" if has_grouped else "per-expert loop"
        ffn = make_grouped(wg, wu, wd, counts, dev) if has_grouped else make_loop(wg, wu, wd, counts)
        try:
            t = timed(lambda: ffn(x), a.iters)
        except RuntimeError as e:
            print(f"torch._grouped_mm failed ({e}); per-expert loop instead")
            impl = "per-expert loop"
            ffn = make_loop(wg, wu, wd, counts)
            t = timed(lambda: ffn(x), a.iters)
        active = sum(1 for r in counts if r)
        wbytes = active * 3 * d * f * 2
        pt = {"tokens": call["tokens"], "rows": rows, "active": active, "median_s": t, "impl": impl,
              "weight_gbps": wbytes / t / 1e9, "tflops": 2 * 3 * rows * d * f / t / 1e12}
        res["points"].append(pt)
        print(f"torch {impl} N={call['tokens']} rows={rows} active={active}: {t*1e6:.1f} us, "
              f"weights {pt['weight_gbps']:.0f} GB/s, {pt['tflops']:.2f} TFLOP/s")
        del x
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
