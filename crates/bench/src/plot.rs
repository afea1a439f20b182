//! The lateness CDF as a PNG (plotters, pure Rust; text in DejaVu Sans).

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the CDF of handler-start lateness (ms after due) for each series.
pub(crate) fn lateness_cdf(
    path: &str,
    title: &str,
    series: &[(&str, &[f64])],
) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .map_err(|e| anyhow::anyhow!("cannot read {FONT} ({e}); install fonts-dejavu-core"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load {FONT}"))?;
    let max_x = series
        .iter()
        .filter_map(|(_, s)| s.last().copied())
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("lateness: handler start − due time (ms)")
        .y_desc("fraction of tasks started")
        .label_style(("sans-serif", 14))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, (name, samples)) in series.iter().enumerate() {
        if samples.is_empty() {
            continue;
        }
        let n = samples.len() as f64;
        let step = (samples.len() / 2000).max(1);
        let points: Vec<(f64, f64)> = samples
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(j, &x)| (x, (j + 1) as f64 / n))
            .chain(std::iter::once((*samples.last().expect("non-empty"), 1.0)))
            .collect();
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
