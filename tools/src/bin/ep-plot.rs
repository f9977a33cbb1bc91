//! ep-plot: forward time against the rank (GPU) count from ep-bench JSON files, one line per
//! routing mode and tokens-per-rank value, as SVG; prints the table it plots with the scaling
//! efficiency (tokens/s per rank against the smallest world).
//!
//! ```text
//! ep-plot benchmarks/ep-bench-w1.json benchmarks/ep-bench-w2.json benchmarks/ep-bench-w4.json --svg benchmarks/scaling.svg
//! ```

use std::collections::BTreeMap;

use clap::Parser;
use moe_ep_tools::fmt_time;

#[derive(Parser, Debug)]
#[command(about = "Plot ep-bench results (JSON) against the rank count")]
struct Args {
    /// ep-bench --json files, one per world size.
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    #[arg(long)]
    svg: std::path::PathBuf,
    #[arg(long, default_value = "EP forward time against GPU count")]
    title: String,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("ep-plot: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    // (routing, tokens) -> [(world, seconds)]
    let mut lines: BTreeMap<(String, u64), Vec<(usize, f64)>> = BTreeMap::new();
    for f in &a.files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let world = v["world"].as_u64().ok_or_else(|| format!("{}: no world (not ep-bench JSON?)", f.display()))?;
        let points = v["points"].as_array().ok_or_else(|| format!("{}: no points", f.display()))?;
        for p in points {
            let key =
                (p["routing"].as_str().unwrap_or("uniform").to_string(), p["tokens_per_rank"].as_u64().unwrap_or(0));
            let secs = p["forward_s"].as_f64().ok_or_else(|| format!("{}: a point without forward_s", f.display()))?;
            lines.entry(key).or_default().push((world as usize, secs));
        }
    }
    println!("{:<8} {:>6} {:>6} {:>10} {:>12} {:>10}", "routing", "N", "ranks", "forward", "tokens/s", "scaling");
    let mut series = Vec::new();
    for ((routing, n), mut pts) in lines {
        pts.sort_by_key(|p| p.0);
        let (w0, t0) = pts[0];
        let base = (n as usize * w0) as f64 / t0 / w0 as f64;
        for &(w, t) in &pts {
            let tps = (n as usize * w) as f64 / t;
            println!(
                "{routing:<8} {n:>6} {w:>6} {:>10} {tps:>12.0} {:>9.0}%",
                fmt_time(t),
                100.0 * tps / w as f64 / base
            );
        }
        series.push((format!("{routing}, N={n}/rank"), pts));
    }
    moe_ep_tools::plot::scaling_svg(&a.svg, &a.title, &series)?;
    println!("wrote {}", a.svg.display());
    Ok(())
}
