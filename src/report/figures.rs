//! Figure writers. Plots are hand-written SVG (no fonts embedded, no clocks: the same numbers
//! give the same bytes); image grids are PNG (issue 4).

use std::fmt::Write;

/// One line of a plot.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    let steps = [1.0, 2.0, 2.5, 5.0, 10.0];
    steps
        .iter()
        .map(|s| s * magnitude)
        .find(|&m| m >= v)
        .unwrap_or(10.0 * magnitude)
}

/// A line plot with axes from 0 (x from the smallest x), ticks, a legend and a title.
pub fn line_plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    plot(title, x_label, y_label, series, true)
}

/// Several line plots side by side in one SVG (one panel per title, each with its own axes):
/// e.g. robust accuracy against ε under L∞ and under L2, whose ε scales differ.
pub fn line_plot_panels(x_label: &str, y_label: &str, panels: &[(String, Vec<Series>)]) -> String {
    let (width, height) = (560.0, 340.0);
    let total = width * panels.len().max(1) as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" viewBox="0 0 {total} {height}">"#
    );
    for (i, (title, series)) in panels.iter().enumerate() {
        let panel = line_plot(title, x_label, y_label, series);
        // A nested <svg> is positioned by x; the panel's own root element becomes it.
        let _ = write!(svg, r#"<g transform="translate({} 0)">"#, width * i as f64);
        svg.push_str(panel.trim_end());
        svg.push_str("</g>");
    }
    svg.push_str("</svg>\n");
    svg
}

/// The same axes with unconnected points (each point its own configuration).
pub fn scatter_plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    plot(title, x_label, y_label, series, false)
}

fn plot(title: &str, x_label: &str, y_label: &str, series: &[Series], lines: bool) -> String {
    let (width, height) = (560.0, 340.0);
    let (left, right, top, bottom) = (64.0, 150.0, 36.0, 48.0);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_min = xs.clone().fold(f64::INFINITY, f64::min).min(f64::INFINITY);
    let x_max = xs.fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_max) = if !lines {
        // Scatter: both axes from 0, so distances to the origin read as ratios.
        (0.0, nice_max(x_max.max(0.0)))
    } else if x_min.is_finite() && x_max > x_min {
        (x_min, x_max)
    } else {
        (0.0, 1.0)
    };
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let px = |x: f64| left + (x - x_min) / (x_max - x_min) * plot_w;
    let py = |y: f64| top + plot_h - y / y_max * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        left + plot_w / 2.0,
        escape(title)
    );
    for i in 0..=4 {
        let y = y_max * i as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            py(y) + 4.0,
            fmt_tick(y),
            py = py(y)
        );
    }
    let x_ticks = 5.min((x_max - x_min).round() as usize).max(1);
    for i in 0..=x_ticks {
        let x = x_min + (x_max - x_min) * i as f64 / x_ticks as f64;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            top + plot_h + 18.0,
            fmt_tick(x)
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        height - 10.0,
        escape(x_label)
    );
    let _ = write!(
        svg,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if lines {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
        }
        for &(x, y) in &s.points {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(x),
                py(y)
            );
        }
        let ly = top + 14.0 + 18.0 * i as f64;
        let lx = left + plot_w + 12.0;
        let _ = write!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One group of bars (e.g. one model on one data set), one value per series.
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grey-scale image grid as PNG: rows of equally sized tiles (values in [0, 1], clamped;
/// white digit on black, as MNIST), one grey pixel of separation, `scale`× nearest-neighbour
/// enlargement. Deterministic.
pub fn image_grid_png(rows: &[Vec<&[f32]>], side: usize, scale: usize) -> anyhow::Result<Vec<u8>> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let tile = side * scale + 2;
    let (width, height) = (cols * tile, rows.len() * tile);
    let mut pixels = vec![128u8; width * height];
    for (r, row) in rows.iter().enumerate() {
        for (c, image) in row.iter().enumerate() {
            anyhow::ensure!(
                image.len() == side * side,
                "tile of {} values, expected {}",
                image.len(),
                side * side
            );
            for y in 0..side * scale {
                for x in 0..side * scale {
                    let v = image[(y / scale) * side + x / scale].clamp(0.0, 1.0);
                    pixels[(r * tile + 1 + y) * width + c * tile + 1 + x] =
                        (v * 255.0).round() as u8;
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}
