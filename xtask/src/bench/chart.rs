//! The SVG chart of the start-latency distributions: one empirical CDF per series on a log
//! time axis (husk under TCG and runc differ by an order of magnitude). `plotters`' SVG
//! backend only: text is written as SVG `<text>`, so no font or system library is needed.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const COLOURS: [RGBColor; 6] = [
    RGBColor(200, 60, 40),
    RGBColor(40, 90, 200),
    RGBColor(230, 140, 20),
    RGBColor(30, 150, 90),
    RGBColor(140, 60, 170),
    RGBColor(90, 90, 90),
];

/// Points of the empirical CDF of `samples`: (value, fraction of samples ≤ value).
pub fn ecdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let n = s.len() as f64;
    s.iter()
        .enumerate()
        .map(|(i, v)| {
            #[allow(clippy::cast_precision_loss)]
            let f = (i + 1) as f64 / n;
            (*v, f)
        })
        .collect()
}

/// Writes the chart of `series` (label, samples in ms) to `path`.
pub fn write_svg(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> Result<()> {
    let all = series.iter().flat_map(|(_, s)| s.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= 0.0 {
        return Err(anyhow!("no samples to chart"));
    }
    let (lo, hi) = ((lo.max(0.1) * 0.8), hi * 1.25);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    let e = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of runs ≤ x")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (label, samples)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts = ecdf(samples);
        // A step function: each sample raises the curve at its value.
        let mut steps = Vec::with_capacity(pts.len() * 2);
        let mut prev = 0.0;
        for (x, y) in &pts {
            steps.push((*x, prev));
            steps.push((*x, *y));
            prev = *y;
        }
        chart
            .draw_series(LineSeries::new(steps, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdf_rises_to_one() {
        assert_eq!(ecdf(&[3.0, 1.0]), vec![(1.0, 0.5), (3.0, 1.0)]);
    }

    #[test]
    fn writes_an_svg_without_fonts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.svg");
        write_svg(
            &p,
            "start",
            &[
                ("husk".into(), vec![1800.0, 2100.0]),
                ("runc".into(), vec![120.0, 150.0, 140.0]),
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("runc") && svg.contains("<circle"),
            "{svg}"
        );
    }
}
