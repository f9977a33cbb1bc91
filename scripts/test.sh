#!/usr/bin/env bash
# Runs every test of the workspace. Checks (and where it can, installs) what the tests need
# from the system first, and says clearly what is missing when it cannot.
#
# Usage: scripts/test.sh            (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }
die() { printf '\nscripts/test.sh: %s\n' "$*" >&2; exit 1; }

say "system needs"
command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs (1.85 or newer)"
cargo --version
# The core crate and the tools need nothing but Rust. The crates that need a system MPI
# (backends/mpi) or a Vulkan/Metal driver (backends/wgpu) check for them here once they are
# part of the workspace.
for crate in backends/mpi backends/wgpu; do
  [ -f "$crate/Cargo.toml" ] || echo "note: $crate is not in this tree yet; its system checks are skipped"
done

say "format and lints"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"
else
  echo "note: rustfmt not installed, format check skipped (rustup component add rustfmt)"
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "note: clippy not installed, lints skipped (rustup component add clippy)"
fi

say "benches compile"
cargo bench --workspace --locked --no-run

say "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line over every test binary: "tests: N passed, M failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f; if (p == 0) { print "scripts/test.sh: no test ran" > "/dev/stderr"; exit 1 } }' "$log"
