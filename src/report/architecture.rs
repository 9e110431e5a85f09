//! The fi-RevNet's architecture as the paper's Fig. 3 draws it (final version), but drawn from
//! a trained model's own config: per level the tensor shape after the squeeze, the flow steps,
//! the split-off block that joins z_n, and the parameter count; at the end z_s (the logits, C
//! coordinates of the final map) and z_n (everything else).
//!
//! The counts come from building the network from its config and counting what it holds, so
//! the figure cannot drift from the model; the drawing is a plain hand-written SVG (boxes and
//! text, no fonts embedded, deterministic bytes).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::svg_text;
use crate::nn::flow::{CouplingKind, FiRevNet, RevNetConfig};
use crate::nn::{device, rng_for, HasParams};

/// One level of the network as the figure and the table show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LevelSummary {
    pub level: usize,
    /// Shape entering the level, `channels × side × side`.
    pub input: [usize; 3],
    /// Shape after the 2×2 squeeze, which the flow steps keep.
    pub squeezed: [usize; 3],
    pub steps: usize,
    /// Shape of the block split off into z_n at the end of the level (none for the last).
    pub split_off: Option<[usize; 3]>,
    /// Trained parameters of the level (its steps and its split prior).
    pub parameters: usize,
}

/// The whole network: levels, the latent split, totals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArchitectureSummary {
    pub levels: Vec<LevelSummary>,
    /// Dimension of the input and of the latent (a bijection keeps it).
    pub dims: usize,
    pub classes: usize,
    pub coupling: String,
    pub hidden: usize,
    /// Parameters outside the levels (the logit BatchNorm, when the config has one).
    pub other_parameters: usize,
    pub parameters: usize,
}

/// Builds the network from `config` and measures it (on the CPU, with a fixed seed: counts and
/// shapes do not depend on the weights).
pub fn summarise(config: &RevNetConfig) -> ArchitectureSummary {
    let flow = FiRevNet::new(&device(), config.clone(), &mut rng_for(0, "architecture"));
    let mut per_level: BTreeMap<usize, usize> = BTreeMap::new();
    let mut other = 0;
    flow.visit(&mut |p| {
        let count: usize = p.shape.iter().product();
        // Parameter names start with `level{l}.` (see `FiRevNet::new`).
        let level = p
            .name
            .strip_prefix("level")
            .and_then(|rest| rest.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        match level {
            Some(l) => *per_level.entry(l).or_default() += count,
            None => other += count,
        }
    });
    let (mut channels, mut side) = (config.in_channels, config.size);
    let levels: Vec<LevelSummary> = flow
        .levels
        .iter()
        .enumerate()
        .map(|(l, level)| {
            let input = [channels, side, side];
            let squeezed = [level.channels, level.side, level.side];
            let split_off = level
                .split
                .as_ref()
                .map(|_| [level.channels - level.channels / 2, level.side, level.side]);
            channels = level.channels - split_off.map_or(0, |s| s[0]);
            side = level.side;
            LevelSummary {
                level: l,
                input,
                squeezed,
                steps: level.steps.len(),
                split_off,
                parameters: per_level.get(&l).copied().unwrap_or(0),
            }
        })
        .collect();
    let parameters = per_level.values().sum::<usize>() + other;
    ArchitectureSummary {
        levels,
        dims: flow.dims(),
        classes: config.classes,
        coupling: match config.coupling {
            CouplingKind::Additive => "additive".into(),
            CouplingKind::Affine => "affine".into(),
        },
        hidden: config.hidden,
        other_parameters: other,
        parameters,
    }
}

fn shape(s: [usize; 3]) -> String {
    format!("{}×{}×{}", s[0], s[1], s[2])
}

/// The figure: input → one column of boxes per level (squeeze, K steps, split) → z_s / z_n.
pub fn architecture_svg(summary: &ArchitectureSummary) -> String {
    let column = 230;
    let width = 40 + column * summary.levels.len() + 230;
    let height = 330;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#444"/></marker></defs>
"##
    );
    let text = |svg: &mut String, x: usize, y: usize, anchor: &str, weight: &str, s: &str| {
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{y}" text-anchor="{anchor}" font-weight="{weight}">{}</text>"#,
            svg_text(s)
        );
    };
    let arrow = |svg: &mut String, x1: usize, y1: usize, x2: usize, y2: usize| {
        let _ = writeln!(
            svg,
            r##"<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#444" stroke-width="1.5" marker-end="url(#arrow)"/>"##
        );
    };
    let first = summary.levels.first().map_or([0, 0, 0], |l| l.input);
    text(&mut svg, 20, 30, "start", "bold", "input x");
    text(&mut svg, 20, 48, "start", "normal", &shape(first));
    for (i, level) in summary.levels.iter().enumerate() {
        let x = 40 + column * i + 20;
        let box_width = column - 40;
        arrow(&mut svg, x - 40, 110, x, 110);
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="60" width="{box_width}" height="120" rx="6" fill="#eef3fb" stroke="#4a6fa5"/>"##
        );
        let centre = x + box_width / 2;
        text(
            &mut svg,
            centre,
            80,
            "middle",
            "bold",
            &format!("level {}", level.level + 1),
        );
        text(
            &mut svg,
            centre,
            100,
            "middle",
            "normal",
            &format!("squeeze → {}", shape(level.squeezed)),
        );
        text(
            &mut svg,
            centre,
            120,
            "middle",
            "normal",
            &format!("{} × [ActNorm, permute,", level.steps),
        );
        text(
            &mut svg,
            centre,
            138,
            "middle",
            "normal",
            &format!("{} coupling ({})]", summary.coupling, summary.hidden),
        );
        text(
            &mut svg,
            centre,
            166,
            "middle",
            "normal",
            &format!("{} parameters", level.parameters),
        );
        if let Some(split) = level.split_off {
            arrow(&mut svg, centre, 180, centre, 235);
            let _ = writeln!(
                svg,
                r##"<rect x="{}" y="240" width="{}" height="46" rx="6" fill="#fbeeee" stroke="#a54a4a"/>"##,
                x + 10,
                box_width - 20
            );
            text(
                &mut svg,
                centre,
                259,
                "middle",
                "normal",
                &format!("split off {}", shape(split)),
            );
            text(
                &mut svg,
                centre,
                277,
                "middle",
                "normal",
                "→ z_n (Gaussian prior)",
            );
        }
    }
    let x = 40 + column * summary.levels.len();
    let last = summary.levels.last();
    arrow(&mut svg, x - 20, 110, x + 10, 110);
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="60" width="200" height="120" rx="6" fill="#eefbef" stroke="#4aa55a"/>"##,
        x + 14
    );
    text(&mut svg, x + 114, 80, "middle", "bold", "final map");
    if let Some(level) = last {
        text(
            &mut svg,
            x + 114,
            100,
            "middle",
            "normal",
            &shape(level.squeezed),
        );
    }
    text(
        &mut svg,
        x + 114,
        124,
        "middle",
        "normal",
        &format!("z_s: {} logits", summary.classes),
    );
    text(
        &mut svg,
        x + 114,
        142,
        "middle",
        "normal",
        "(centre pixel, first C channels)",
    );
    text(
        &mut svg,
        x + 114,
        166,
        "middle",
        "normal",
        &format!("z_n: the other {}", summary.dims - summary.classes),
    );
    text(
        &mut svg,
        20,
        height - 14,
        "start",
        "normal",
        &format!(
            "bijective: {} input dimensions = {} latent dimensions; {} parameters in all",
            summary.dims, summary.dims, summary.parameters
        ),
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::flow::Permutation;

    fn config(levels: usize, logit_batchnorm: bool) -> RevNetConfig {
        RevNetConfig {
            in_channels: 1,
            size: 32,
            levels,
            steps: 2,
            hidden: 8,
            coupling: CouplingKind::Additive,
            permutation: Permutation::Reverse,
            dropout: 0.0,
            classes: 10,
            permutation_seed: 0,
            logit_batchnorm,
        }
    }

    #[test]
    fn levels_add_up_to_the_models_parameters_and_dimensions() {
        for (levels, batchnorm) in [(3, false), (4, true)] {
            let config = config(levels, batchnorm);
            let summary = summarise(&config);
            let flow = FiRevNet::new(&device(), config.clone(), &mut rng_for(1, "x"));
            let total: usize = flow
                .params()
                .iter()
                .map(|p| p.shape.iter().product::<usize>())
                .sum();
            assert_eq!(summary.parameters, total);
            assert_eq!(summary.levels.len(), levels);
            assert!(summary.levels.iter().all(|l| l.parameters > 0));
            assert_eq!(summary.other_parameters > 0, batchnorm);
            // What leaves at the splits plus the final map is the whole latent.
            let split: usize = summary
                .levels
                .iter()
                .filter_map(|l| l.split_off)
                .map(|s| s.iter().product::<usize>())
                .sum();
            let last = summary.levels.last().unwrap().squeezed;
            assert_eq!(split + last.iter().product::<usize>(), 32 * 32);
            assert_eq!(summary.levels[0].input, [1, 32, 32]);
            assert_eq!(summary.levels[0].squeezed, [4, 16, 16]);
        }
    }

    #[test]
    fn the_figure_names_every_level_and_the_total() {
        let summary = summarise(&config(3, false));
        let svg = architecture_svg(&summary);
        for level in 1..=3 {
            assert!(svg.contains(&format!("level {level}")));
        }
        assert!(svg.contains(&format!("{} parameters in all", summary.parameters)));
        assert!(svg.contains("16×4×4"), "{svg}");
    }
}
