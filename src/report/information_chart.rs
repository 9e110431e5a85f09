//! Fig. 5 as the report draws it: measured lower bounds on I(y; z_s) and I(y; z_n), one
//! horizontal bar per bound, grouped by model and data set, with H(y) as the ceiling.
//!
//! Horizontal bars give every label its own line, so nothing overlaps however many models are
//! shown. A bound can be *vacuous*: H(y) − CE is negative when the probe is worse than the
//! label prior. Such a bound says nothing (the information is ≥ 0 anyway), so it is drawn as
//! an open marker at 0 with the words "vacuous" and its value, never as a bar below the axis.
//! (`figures::bar_chart` drew it as a zero-height bar whose label collided with its
//! neighbours'.)

use std::fmt::Write;

use super::svg_text;

const COLOURS: [&str; 2] = ["#1f77b4", "#d62728"];

/// One group: a model on one data set, with one bound per series (z_s, z_n).
pub struct BoundGroup {
    pub label: String,
    pub bounds: Vec<f64>,
}

/// The chart as SVG; `series` names the bounds of each group in order, `ceiling` is H(y).
pub fn information_chart(series: &[&str], groups: &[BoundGroup], ceiling: Option<f64>) -> String {
    let (left, plot_w, right) = (230.0, 420.0, 170.0);
    let (bar_h, gap) = (16.0, 14.0);
    let top = 40.0;
    let group_h = bar_h * series.len() as f64 + gap;
    let plot_h = group_h * groups.len() as f64;
    let bottom = 44.0;
    let (width, height) = (left + plot_w + right, top + plot_h + bottom);
    let x_max = groups
        .iter()
        .flat_map(|g| g.bounds.iter().copied())
        .chain(ceiling)
        .fold(0.0f64, f64::max)
        .max(0.5)
        .ceil();
    let px = |v: f64| left + v.max(0.0) / x_max * plot_w;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">Measured lower bounds on label information (bits)</text>"#,
        left + plot_w / 2.0
    );
    let ticks = x_max as usize;
    for t in 0..=ticks {
        let x = px(t as f64);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{t}</text>"##,
            top + plot_h,
            top + plot_h + 16.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">bits</text>"#,
        left + plot_w / 2.0,
        top + plot_h + 34.0
    );
    for (g, group) in groups.iter().enumerate() {
        let y0 = top + g as f64 * group_h + gap / 2.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y0 + bar_h * series.len() as f64 / 2.0 + 4.0,
            svg_text(&group.label)
        );
        for (i, &bound) in group.bounds.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let y = y0 + i as f64 * bar_h;
            if bound >= 0.0 {
                let _ = write!(
                    svg,
                    r#"<rect x="{left}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="11">{bound:.2}</text>"#,
                    px(bound) - left,
                    bar_h - 3.0,
                    px(bound) + 4.0,
                    y + bar_h - 5.0
                );
            } else {
                let _ = write!(
                    svg,
                    r#"<rect x="{left}" y="{y:.1}" width="5" height="{:.1}" fill="white" stroke="{colour}"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{colour}">vacuous ({bound:.2})</text>"#,
                    bar_h - 3.0,
                    left + 9.0,
                    y + bar_h - 5.0
                );
            }
        }
    }
    let _ = write!(
        svg,
        r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{:.1}" stroke="#333"/>"##,
        top + plot_h
    );
    if let Some(h) = ceiling {
        let x = px(h);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{:.1}" stroke="#333" stroke-dasharray="5,4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">H(y) = {h:.2}</text>"##,
            top + plot_h,
            top - 6.0
        );
    }
    for (i, name) in series.iter().enumerate() {
        let (lx, ly) = (left + plot_w + 20.0, top + 14.0 + 18.0 * i as f64);
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 10.0,
            COLOURS[i % COLOURS.len()],
            lx + 18.0,
            svg_text(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_bound_is_labelled_vacuous_inside_the_plot() {
        let groups = [BoundGroup {
            label: "probe_ce: clean test".into(),
            bounds: vec![3.1, -0.053],
        }];
        let svg = information_chart(&["I(y; z_s) ≥", "I(y; z_n) ≥"], &groups, Some(3.32));
        assert!(svg.contains("vacuous (-0.05)"), "{svg}");
        assert!(svg.contains(">3.10<"));
        // Nothing is drawn left of the axis (x < 230) except the group labels, which end there.
        for part in svg.split("<rect x=\"").skip(2) {
            let x: f64 = part.split('"').next().unwrap().parse().unwrap();
            assert!(x >= 230.0, "a mark at x = {x}");
        }
    }
}
