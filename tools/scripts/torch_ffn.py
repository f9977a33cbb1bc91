"""PyTorch baseline for ffn-bench: the same grouped SwiGLU experts (per expert: gate and up
matmuls, silu * up, down matmul), timed with CUDA events (median of --iters runs), in bf16 (tensor
cores) and in fp32 with TF32 off; and torch.matmul on a square product for the card's rate.

    python3 tools/scripts/torch_ffn.py --hidden 4096 --intermediate 14336 --experts 8 --top-k 2 \
        --tokens 1,4,16,512,2048 --json out.json
"""
import argparse
import json

import torch

from torch_baseline import timed  # same directory: CUDA-event timing, median of runs


def counts(tokens, k, experts, seed):
    g = torch.Generator().manual_seed(seed)
    c = [0] * experts
    for _ in range(tokens):
        for e in torch.randperm(experts, generator=g)[:k].tolist():
            c[e] += 1
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="1,4,16,512,2048")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    d, f, E, k = a.hidden, a.intermediate, a.experts, a.top_k
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "points": []}
    for dt, name in [(torch.bfloat16, "bf16"), (torch.float32, "fp32")]:
        m = 8192
        x = torch.randn(m, m, device=dev, dtype=dt)
        y = torch.randn(m, m, device=dev, dtype=dt)
        t = timed(lambda: x @ y, a.iters)
        res[f"square_{name}_tflops"] = 2 * m**3 / t / 1e12
        print(f"torch square {m} matmul {name}: {res[f'square_{name}_tflops']:.1f} TFLOP/s")
        del x, y
        wg = [torch.randn(f, d, device=dev, dtype=dt) * d**-0.5 for _ in range(E)]
        wu = [torch.randn(f, d, device=dev, dtype=dt) * d**-0.5 for _ in range(E)]
        wd = [torch.randn(d, f, device=dev, dtype=dt) * f**-0.5 for _ in range(E)]
        for n in [int(s) for s in a.tokens.split(",")]:
            c = counts(n, min(k, E), E, n)
            xs = [torch.randn(r, d, device=dev, dtype=dt) for r in c]

            def ffn():
                for e, r in enumerate(c):
                    if r:
                        h = xs[e]
                        a_ = torch.nn.functional.silu(h @ wg[e].T) * (h @ wu[e].T)
                        _ = a_ @ wd[e].T

            t = timed(ffn, a.iters)
            rows = sum(c)
            active = sum(1 for r in c if r)
            wbytes = active * 3 * d * f * x_size(dt)
            pt = {"dtype": name, "tokens": n, "rows": rows, "active": active, "median_s": t,
                  "weight_gbps": wbytes / t / 1e9, "tflops": 2 * 3 * rows * d * f / t / 1e12}
            res["points"].append(pt)
            print(f"torch ffn {name} N={n} rows={rows} active={active}: {t*1e6:.1f} us, "
                  f"weights {pt['weight_gbps']:.0f} GB/s, {pt['tflops']:.2f} TFLOP/s")
        del wg, wu, wd
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


def x_size(dt):
    return torch.tensor([], dtype=dt).element_size()


if __name__ == "__main__":
    main()
