//! SVG plots of the tools' results (plotters' SVG backend: no system fonts needed).

use plotters::prelude::*;

/// EP and TP forward time against tokens per rank, both axes logarithmic; `points` are
/// (tokens, ep seconds, tp seconds).
pub fn ep_vs_tp_svg(path: &std::path::Path, title: &str, points: &[(usize, f64, f64)]) -> Result<(), String> {
    if points.is_empty() {
        return Err("nothing to plot".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let us = |s: f64| s * 1e6;
    let x_max = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let x_min = points.iter().map(|p| p.0).min().unwrap_or(1) as f64;
    let ys = points.iter().flat_map(|p| [us(p.1), us(p.2)]);
    let (y_min, y_max) = ys.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
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
        .x_desc("tokens per rank")
        .y_desc("forward time (us)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, color, pick) in [("EP", BLUE, 1usize), ("TP", RED, 2)] {
        let series: Vec<(f64, f64)> =
            points.iter().map(|p| (p.0 as f64, us(if pick == 1 { p.1 } else { p.2 }))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(series.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
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

/// Forward time against the GPU (rank) count, one line per tokens-per-rank value, log-log;
/// `series` are (label, [(ranks, seconds)]).
pub fn scaling_svg(path: &std::path::Path, title: &str, series: &[(String, Vec<(usize, f64)>)]) -> Result<(), String> {
    let all: Vec<(usize, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let x_max = all.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let (y_min, y_max) = all.iter().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.1 * 1e3), hi.max(p.1 * 1e3)));
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8..x_max * 1.25).log_scale(), (y_min * 0.7..y_max * 1.4).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("GPUs (one rank each)")
        .y_desc("forward time (ms)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.0 as f64, p.1 * 1e3)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
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
