#!/usr/bin/env bash
# Build what a GPU machine runs (x86-64 release binaries: gpu-bench, ep-bench, ffn-bench, ep-vs-tp, moe-run, the GPU test
# executables and the PyTorch baselines) into .devbin/, stripped, for the device tool's `carry`. See BENCHMARKS.md for
# the command that runs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p moe-ep-tools --bins
out=$(cargo test --release --locked -p moe-ep-wgpu --no-run 2>&1)
rm -rf .devbin && mkdir -p .devbin
cp target/release/gpu-bench target/release/ep-bench target/release/ffn-bench target/release/ep-vs-tp target/release/moe-run .devbin/
cp tools/scripts/*.py .devbin/
for t in kernels ep ffn ffn_packed policy resident; do
    exe=$(grep -o "tests/$t.rs ([^)]*)" <<<"$out" | sed 's/.*(\(.*\))/\1/')
    cp "$exe" ".devbin/test-$t"
done
strip .devbin/*-bench .devbin/ep-vs-tp .devbin/moe-run .devbin/test-*
gzip -f .devbin/*-bench .devbin/ep-vs-tp .devbin/moe-run .devbin/test-*
grep -qx '/.devbin/' .git/info/exclude 2>/dev/null || echo /.devbin/ >>.git/info/exclude
ls -la .devbin
