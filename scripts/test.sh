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
command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs (1.89 or newer)"
cargo --version
# The core crate needs nothing but Rust. The GPU tests (backends/wgpu, the tools' wgpu run)
# need a wgpu adapter: Metal on macOS; on Linux a Vulkan driver, where Mesa's lavapipe (a
# software Vulkan driver) is enough and is installed here when we can.
# The MPI crate (backends/mpi) needs a system MPI found through pkg-config, libclang (its
# bindings are generated at build time) and mpirun for the multi-process tests.
have_mpi() {
  command -v mpirun >/dev/null && command -v pkg-config >/dev/null &&
    { pkg-config --exists ompi || pkg-config --exists mpich || pkg-config --exists mpi; } &&
    { compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' || compgen -G '/usr/lib/*/libclang*.so*' ||
      [ -n "${LIBCLANG_PATH:-}" ]; } >/dev/null
}
if ! have_mpi; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing MPI for the MPI tests: openmpi-bin libopenmpi-dev libclang-dev pkg-config"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev pkg-config >/dev/null \
      || die "apt-get could not install openmpi-bin libopenmpi-dev libclang-dev pkg-config, which the MPI tests need"
  fi
  have_mpi || die "MPI is missing: the MPI tests need mpirun, an MPI found by pkg-config (ompi or mpich) and libclang. \
Install them (Debian/Ubuntu, as root): apt-get install openmpi-bin libopenmpi-dev libclang-dev pkg-config"
fi
echo "MPI: $(mpirun --version 2>&1 | head -n 1)"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"   # silences a harmless lavapipe warning
if [ "$(uname -s)" = Linux ]; then
  # (No `cmd | grep -q` here: under pipefail, grep's early exit fails the pipeline.)
  have_vulkan() {
    local libs
    libs=$(ldconfig -p 2>/dev/null || true)
    [[ $libs == *libvulkan.so.1* ]] &&
      { compgen -G '/usr/share/vulkan/icd.d/*.json' || compgen -G '/etc/vulkan/icd.d/*.json'; } >/dev/null
  }
  if ! have_vulkan; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing a Vulkan driver for the GPU tests: mesa-vulkan-drivers libvulkan1 (lavapipe)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null || true
      apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null \
        || die "apt-get could not install mesa-vulkan-drivers libvulkan1, which the GPU tests need"
    fi
    have_vulkan || die "no Vulkan driver: the GPU tests need one. Install Mesa's lavapipe (software Vulkan): \
apt-get install mesa-vulkan-drivers libvulkan1 (Debian/Ubuntu, as root), or your GPU vendor's driver"
  fi
  echo "Vulkan drivers: $( (compgen -G '/usr/share/vulkan/icd.d/*.json'; compgen -G '/etc/vulkan/icd.d/*.json') | tr '\n' ' ')"
fi

# CI (CI=true) builds every crate once per mode, from clean: line tables are enough for a
# failing test's backtrace, and full debug info makes every test binary's compile and link
# (wgpu's above all) several times slower. Local runs keep the developers' profiles.
if [ -n "${CI:-}" ]; then
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only CARGO_PROFILE_TEST_DEBUG=line-tables-only
fi

say "format and lints"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"
else
  echo "note: rustfmt not installed, format check skipped (rustup component add rustfmt)"
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
else
  echo "note: clippy not installed, lints skipped (rustup component add clippy)"
fi

say "Metal build check"
# The Metal backend only builds for Apple targets: type-check the GPU crate for Apple Silicon.
if command -v rustup >/dev/null && rustup target add aarch64-apple-darwin >/dev/null 2>&1; then
  cargo check --locked --target aarch64-apple-darwin -p moe-ep-wgpu -p moe-ep-tools
else
  echo "note: the aarch64-apple-darwin target is not available here (rustup target add failed), so the"
  echo "      Metal build check did not run; .github/workflows/gpu.yml builds and tests on macOS"
fi

say "benches compile"
# In the test profile, beside the tests: clippy --all-targets has type-checked them already, and
# a release build of the whole workspace (wgpu included) only for this took a third of CI.
# (`cargo bench --bench layer` builds and runs them in release, as BENCHMARKS.md says.)
cargo test --workspace --all-features --locked --benches --no-run

say "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-features --locked 2>&1 | tee "$log" || status=$?
# Variants that a test could not run (moe_ep::testing::skip writes "SKIPPED <variant>: <reason>"
# past libtest's capture): repeated here so that no log reader misses them.
if grep -q 'SKIPPED ' "$log"; then
  say "variants not run"
  grep -o 'SKIPPED .*' "$log" | sort | uniq -c
fi
# One closing line over every test binary: "tests: N passed, M failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f; if (p == 0) { print "scripts/test.sh: no test ran" > "/dev/stderr"; exit 1 } }' "$log"
exit "$status"
