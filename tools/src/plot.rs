//! SVG plots of the tools' results (plotters' SVG backend: no system fonts needed).

use plotters::prelude::*;

/// One line of a plot: its legend label, colour and points (x, y).
type Line = (String, RGBAColor, Vec<(f64, f64)>);

/// Lines with points on log-log axes, a legend in the upper left, written as SVG to `path`.
fn log_log_lines(
    path: &std::path::Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
) -> Result<(), String> {
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.2.iter().copied()).collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let fold =
        |f: fn(&(f64, f64)) -> f64| all.iter().map(f).fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let ((x_min, x_max), (y_min, y_max)) = (fold(|p| p.0), fold(|p| p.1));
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), (y_min * 0.7..y_max * 1.4).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (label, color, pts) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// EP and TP forward time against tokens per rank, both axes logarithmic; `points` are
/// (tokens, ep seconds, tp seconds).
pub fn ep_vs_tp_svg(path: &std::path::Path, title: &str, points: &[(usize, f64, f64)]) -> Result<(), String> {
    let line = |pick: fn(&(usize, f64, f64)) -> f64| points.iter().map(|p| (p.0 as f64, pick(p) * 1e6)).collect();
    let lines = [("EP".to_string(), BLUE.to_rgba(), line(|p| p.1)), ("TP".to_string(), RED.to_rgba(), line(|p| p.2))];
    log_log_lines(path, title, "tokens per rank", "forward time (us)", &lines)
}

/// Forward time against the GPU (rank) count, one line per tokens-per-rank value, log-log;
/// `series` are (label, [(ranks, seconds)]).
pub fn scaling_svg(path: &std::path::Path, title: &str, series: &[(String, Vec<(usize, f64)>)]) -> Result<(), String> {
    let lines: Vec<Line> = series
        .iter()
        .enumerate()
        .map(|(i, (label, pts))| {
            (label.clone(), Palette99::pick(i).to_rgba(), pts.iter().map(|p| (p.0 as f64, p.1 * 1e3)).collect())
        })
        .collect();
    log_log_lines(path, title, "GPUs (one rank each)", "forward time (ms)", &lines)
}
