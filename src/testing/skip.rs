//! Saying that a test did not run a variant, so that CI's log shows it.

use std::io::Write;

/// Write `SKIPPED <variant>: <reason>` to the process's standard error, past libtest's output
/// capture (which takes `println!`/`eprintln!`, not direct writes), so the line appears in the
/// log whether the test passes or not; `scripts/test.sh` repeats every such line in its closing
/// summary. Call it where a test cannot run a variant (an optional adapter feature missing),
/// then return from that variant. (The example does not run, so CI's summary stays true.)
///
/// ```no_run
/// moe_ep::testing::skip("cooperative-matrix f16", "the adapter lacks EXPERIMENTAL_COOPERATIVE_MATRIX");
/// ```
pub fn skip(variant: &str, reason: &str) {
    let line = format!("SKIPPED {variant}: {reason}\n");
    // One write of the whole line, so lines of tests running in parallel do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
