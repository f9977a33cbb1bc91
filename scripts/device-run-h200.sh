#!/usr/bin/env bash
# One command on the GPU machine (the device tool's `run`, with `.gl` and `.devbin` carried;
# binaries from scripts/device-bundle.sh): the GPU tests on the card, then the whole-layer
# sweeps of BENCHMARKS.md's "Whole layer on the H200, device-resident" section. JSON and the
# log go to $OUT.
#
#   run: bash scripts/device-run-h200.sh
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cd .devbin && gunzip -f ./*.gz && chmod +x ./*
log="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$log"

echo "== GPU tests on the card" | tee -a "$log"
for t in resident ep ffn; do
    timeout 150 "./test-$t" 2>&1 | grep -E "^test |test result|SKIPPED|panicked|adapter" | tee -a "$log"
done

echo "== world 1 on the GPU" | tee -a "$log"
for c in mixtral-8x7b qwen3-30b-a3b deepseek-v3-scaled; do
    timeout 120 ./ep-bench --config "$c" --world 1 --tokens 1,8,64,512,4096 --backend wgpu --iters 10 \
        --warmup 3 --json "$OUT/ep-$c-w1-gpu.json" 2>&1 | tail -22 | tee -a "$log"
done

echo "== world 1 on the CPU engine (this machine's cores)" | tee -a "$log"
for c in mixtral-8x7b qwen3-30b-a3b deepseek-v3-scaled; do
    timeout 90 ./ep-bench --config "$c" --world 1 --tokens 1,8,64 --backend cpu --iters 5 --warmup 1 \
        --json "/tmp/ep-$c-w1-cpu.json" 2>&1 | tail -8 | tee -a "$log"
done
(cd /tmp && tar czf "$OUT/ep-w1-cpu.tar.gz" ep-*-w1-cpu.json)

echo "== world 2: two thread ranks, one context each, one GPU" | tee -a "$log"
timeout 120 ./ep-bench --config deepseek-v3-scaled --world 2 --tokens 1,8,64,512 --backend wgpu --iters 10 \
    --warmup 3 --json "$OUT/ep-deepseek-v3-scaled-w2-gpu.json" 2>&1 | tail -20 | tee -a "$log"

echo "== host-side profile: Mixtral-8x7B world 1, N=1 (span busy times of the last forward)" | tee -a "$log"
MOE_EP_SPANS=1 RUST_LOG=moe_ep=debug,moe_ep_wgpu=debug timeout 60 ./ep-bench --config mixtral-8x7b --world 1 \
    --tokens 1 --backend wgpu --iters 5 --warmup 2 2>/tmp/spans.txt >/dev/null
grep " close " /tmp/spans.txt | tail -14 | tee -a "$log"

if [ -x ./ep-bench-mpich ] && [ -d ../.mpich ]; then
    echo "== world 2 as two MPI processes (MPICH hydra, no PMIx daemon) sharing the GPU" | tee -a "$log"
    mkdir -p /tmp/mpich && for f in ../.mpich/*.deb; do dpkg -x "$f" /tmp/mpich; done
    export PATH=/tmp/mpich/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/mpich/usr/lib/x86_64-linux-gnu FI_PROVIDER=tcp
    timeout 150 mpiexec.hydra -n 2 ./ep-bench-mpich --group mpi --config deepseek-v3-scaled --tokens 1,8,64,512 \
        --backend wgpu --iters 10 --warmup 3 --json "$OUT/ep-deepseek-v3-scaled-mpi2-gpu.json" 2>&1 | tail -20 | tee -a "$log"
fi
