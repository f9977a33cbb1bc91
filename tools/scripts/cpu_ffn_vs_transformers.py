#!/usr/bin/env python3
"""One Qwen3-30B-A3B MoE block on the CPU: transformers against moe-ep, same shapes, one command.

transformers side: `Qwen3MoeSparseMoeBlock` (router: linear + softmax + top-8, renormalised;
experts; weighted sum into the output), timed with each experts implementation that
transformers 5 offers on the CPU (`config._experts_implementation`: "eager", the per-expert
loop, and "grouped_mm"); the best of them is the peer.

moe-ep side: `ep-bench --config qwen3-30b-a3b --world 1 --backend cpu` (one rank holding every
expert: router, dispatch, experts, combine), the command of issue 19's table; its forward time
is the figure, its experts stage is printed beside it.

Both sides: E=128, D=2048, F=768, k=8, random weights and inputs (so near-uniform routing on
both), the same thread count, medians of `--iters` calls after `--warmup`; per N the two
sides run back to back, so that they see the same machine load. Floors measured in
the same run: PyTorch's square GEMM rate per dtype (the peer's own best) and ep-bench's memcpy
and f32 GEMM figures.

    nice -n -5 python3 tools/scripts/cpu_ffn_vs_transformers.py --json benchmarks/cpu-ffn-dev2c.json

Needs torch and transformers (a venv; never needed by CI) and a release build of ep-bench
(`cargo build --release -p moe-ep-tools --bin ep-bench`).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

E, D, F, K = 128, 2048, 768, 8


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def median_time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_rate(torch, dtype, n=2048, reps=5):
    """PyTorch's square matmul rate, GFLOP/s (median of reps)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = median_time(lambda: torch.matmul(a, b), 1, reps)
    return 2 * n**3 / t / 1e9


def transformers_block(torch, dtype, seed):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(-0.05, 0.05)
    return cfg, block.to(dtype).eval()


def time_transformers(torch, cfg, block, dtype, n, impls, warmup, iters):
    """{impl: seconds or None} at N tokens, and the errors of implementations that failed."""
    out, errors = {}, {}
    x = (torch.rand(1, n, D) * 2 - 1).to(dtype)
    for impl in impls:
        cfg._experts_implementation = impl
        try:
            with torch.inference_mode():
                out[impl] = median_time(lambda: block(x), warmup, iters)
        except Exception as e:  # an implementation this torch build lacks on the CPU
            out[impl] = None
            errors[impl] = f"{type(e).__name__}: {e}"
        print(f"  transformers {impl:<10} {dtype} N={n:<5} {fmt(out[impl])}", flush=True)
    return out, errors


def time_moe_ep(ep_bench, dtype, tokens, warmup, iters, threads, extra=()):
    extra = list(extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ep.json")
        cmd = [ep_bench, "--config", "qwen3-30b-a3b", "--world", "1", "--backend", "cpu", "--dtype", dtype,
               "--tokens", ",".join(map(str, tokens)), "--warmup", str(warmup), "--iters", str(iters),
               "--json", path] + extra
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        print("  $ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(path) as f:
            report = json.load(f)
    points = {p["tokens_per_rank"]: p for p in report["points"]}
    return report, points


def fmt(s):
    if s is None:
        return "n/a"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,64,256,1024")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="eager,grouped_mm", help="transformers experts implementations")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ep-bench", default=os.path.join("target", "release", "ep-bench"))
    ap.add_argument("--cpu-gemm-panels", action="store_true",
                    help="run ep-bench with --cpu-gemm-panels (experts also held in the GEMM's panels)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = args.dtypes.split(",")
    impls = args.impls.split(",")
    if not os.path.exists(args.ep_bench):
        sys.exit(f"{args.ep_bench} not found: cargo build --release -p moe-ep-tools --bin ep-bench")
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"needs torch and transformers ({e})")
    torch.set_num_threads(args.threads)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "cpu_gemm_panels": args.cpu_gemm_panels,
        "shape": {"experts": E, "hidden": D, "intermediate": F, "top_k": K},
        "load_before": load_average(),
        "dtypes": {},
    }
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"load {result['load_before']}")
    for dt in dtypes:
        peer_gemm = gemm_rate(torch, tdt[dt])
        print(f"{dt}: PyTorch square GEMM 2048^3: {peer_gemm:.0f} GFLOP/s")
        cfg, block = transformers_block(torch, tdt[dt], args.seed)
        rows, errors = [], {}
        # Per N, transformers then moe-ep, so that both see the same load.
        for n in tokens:
            tr, err = time_transformers(torch, cfg, block, tdt[dt], n, impls, args.warmup, args.iters)
            errors.update(err)
            report, points = time_moe_ep(args.ep_bench, dt, [n], args.warmup, args.iters, args.threads,
                                         ["--cpu-gemm-panels"] if args.cpu_gemm_panels else [])
            p = points[n]
            print(f"  moe-ep {dt} N={n:<5} {fmt(p['forward_s'])} (experts {fmt(p['experts_s'])})", flush=True)
            times = {i: t for i, t in tr.items() if t is not None}
            best = min(times, key=times.get) if times else None
            ratio = times[best] / p["forward_s"] if best else None
            rows.append({"tokens": n, "transformers_s": tr, "best_impl": best, "best_s": times.get(best),
                         "moe_ep_forward_s": p["forward_s"], "moe_ep_experts_s": p["experts_s"],
                         "moe_ep_expert_gflops": p["expert_gflops"], "moe_ep_stages": p["stages"],
                         "load": load_average(), "ratio": ratio})
        del block
        result["dtypes"][dt] = {"peer_gemm_gflops": peer_gemm, "impl_errors": errors, "rows": rows,
                                "moe_ep_memcpy_gbps": report["memcpy_all_gbps"],
                                "moe_ep_cpu_gemm_gflops": report["cpu_gemm_gflops"]}
        print_table(dt, impls, rows, peer_gemm, report)
    result["load_after"] = load_average()
    print(f"load after: {result['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


def print_table(dt, impls, rows, peer_gemm, report):
    print(f"\n{dt}: transformers Qwen3MoeSparseMoeBlock vs moe-ep ep-bench --world 1 --backend cpu "
          f"(floors: PyTorch GEMM {peer_gemm:.0f} GFLOP/s, memcpy {report['memcpy_all_gbps']:.1f} GB/s, "
          f"gemmkit f32 GEMM {report['cpu_gemm_gflops']:.0f} GFLOP/s)")
    head = " | ".join(f"transformers {i}" for i in impls)
    print(f"| N | {head} | moe-ep forward (experts) | experts GFLOP/s | best transformers / moe-ep |")
    print("|---|" + "---|" * len(impls) + "---|---|---|")
    for r in rows:
        cells = " | ".join(fmt(r["transformers_s"][i]) for i in impls)
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "n/a"
        gflops = r["moe_ep_expert_gflops"]
        gflops = f"{gflops:.0f}" if gflops else "n/a"
        print(f"| {r['tokens']} | {cells} | {fmt(r['moe_ep_forward_s'])} ({fmt(r['moe_ep_experts_s'])}) | "
              f"{gflops} | {ratio} |")


if __name__ == "__main__":
    main()
