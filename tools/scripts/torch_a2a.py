#!/usr/bin/env python3
"""NCCL's all_to_all_single on the GPUs of one host, with the bytes of moe-ep's EP dispatch.

The peer figure for ep-bench's exchange (issue 8): at N tokens per rank, top-k and hidden D in
bf16, each rank sends N*k rows of D (an even split over the ranks, the uniform-routing case).
Times are CUDA-event medians, the slowest rank per world size. Also prints pinned host<->device
copy rates on GPU 0, the floor of a path that goes through host memory (moe-ep's today).

    python3 torch_a2a.py --worlds 2,4 --tokens 128,4096 --hidden 7168 --top-k 8 [--json out.json]
"""
import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, args, q):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port + world)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    out = []
    for n in args.tokens:
        elems = n * args.top_k * args.hidden
        elems -= elems % world
        x = torch.randn(elems, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        for _ in range(5):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            dist.barrier()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dist.all_to_all_single(y, x)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        t = torch.tensor([statistics.median(times)], device="cuda", dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append({"world": world, "tokens_per_rank": n, "bytes_per_rank": elems * 2, "seconds": t.item()})
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def host_copy_gbps(nbytes=256 << 20, iters=20):
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    res = {}
    for name, fn in (("h2d", lambda: d.copy_(h, non_blocking=True)), ("d2h", lambda: h.copy_(d, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        res[name] = nbytes / statistics.median(times) / 1e9
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--port", type=int, default=29400)
    p.add_argument("--json")
    a = p.parse_args()
    a.tokens = [int(t) for t in a.tokens.split(",")]
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {gpus} x {torch.cuda.get_device_name(0)}")
    copy = host_copy_gbps()
    print(f"pinned host->device {copy['h2d']:.1f} GB/s, device->host {copy['d2h']:.1f} GB/s (GPU 0, 256 MiB)")
    rows = []
    for world in [int(w) for w in a.worlds.split(",")]:
        if world > gpus:
            print(f"world {world}: only {gpus} GPUs, skipped")
            continue
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.spawn(worker, args=(world, a, q), nprocs=world, join=True)
        rows += q.get()
    print(f"{'world':>5} {'N':>6} {'MB/rank':>9} {'time':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for r in rows:
        alg = r["bytes_per_rank"] / r["seconds"] / 1e9
        bus = alg * (r["world"] - 1) / r["world"]
        r["algbw_gbps"], r["busbw_gbps"] = alg, bus
        print(f"{r['world']:>5} {r['tokens_per_rank']:>6} {r['bytes_per_rank'] / 1e6:>9.1f} {r['seconds'] * 1e6:>8.0f} us {alg:>11.1f} {bus:>11.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host_copy_gbps": copy, "all_to_all": rows}, f, indent=1)


if __name__ == "__main__":
    main()
