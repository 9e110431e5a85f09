//! Stage `report`: renders the reproduction report, `artifacts/report/index.html`, and its
//! machine-readable twin `results.json`.
//!
//! Paper: all of it. At the top, every claim of `paper/claims.toml` (C1–C15) in one table
//! (statement, the paper's value, ours with its parts, the rule, the profiles it is judged on,
//! the verdict, a link to its section) under a one-sentence count of the verdicts; then each
//! section in the paper's order (Fig. 3 drawn from the trained configs; C2 and C4 with the
//! adversary and the fresh probe side by side and the ablation's cells) shows our number
//! beside the paper's, the verdict with its tolerance, the protocol note where we had to
//! decide, and provenance (stage, key, params, code fingerprint, device, wall time, log, every
//! output with its store object and its link under `exports/`). Last, the wall time of every
//! stage behind the report (it reads its ancestors' manifests). Claims no stage measures yet
//! say "not run", with the reason.
//! Inputs: every upstream stage declared in pipeline.toml, recognised by what it publishes
//! (`summary.json` a dataset, `evaluation.json` / `ensemble.json` an accuracy row,
//! `metrics.json` + `curve.svg` a training run, `metamers.json` + `triplets.png` a Fig. 4
//! set, `knn.json` the pixel-space judge, `invariance.json` / `pgd.json` an attack,
//! `shortcut.json` a shiftMNIST model, `spheres.json` / `misaligned.json` the spheres); runs of
//! one stage kind on different datasets are told apart by the dataset stage they read. Plus the
//! repository files
//! `paper/templates/`, `paper/text/`, `paper/claims.toml` (claims and their rules) and
//! `paper/tables.toml` (which stage fills which table row, and the paper's numbers).
//! Outputs: `index.html`, `results.json` (profile, every published number, the verdict count,
//! every claim with its rule, verdict and section), `figures/*.svg|png` (digit grids enlarged
//! to 84-pixel digits), `logs/<stage>.log` (all exported to artifacts/report/).
//! Deterministic: no clocks, no paths of this machine; the same inputs give the same bytes.
//!
//! Every upstream JSON is read through its contract (`crate::outputs`,
//! `crate::data::DatasetSummary`): a file that lacks a field fails the report naming the file
//! and the field. The report prints "—" only for what does not apply (a CE model has no
//! adversary), and says "not run" with the reason for what did not run.
//! Params: `profile` (the profile this report describes).
//!
//! Claims: none
//! Modules: ablation, data, nn, outputs, report

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ablation::{variant_name, AblationResult, AblationRow, CellObjective};
use crate::data::DatasetSummary;
use crate::engine::{Finished, Manifest, StageContext, StageKind, TypedParams};
use crate::nn::flow::RevNetConfig;
use crate::nn::model::ModelConfig;
use crate::outputs::{
    read_json, EnsembleResult, Evaluation, FeatureMatching, InterpolationResult, InvarianceResult,
    KnnResult, MetamerResult, MisalignedResult, PgdPoint, PgdResult, ProbeResult, ShortcutResult,
    SpheresFlowResult, TrainMetrics,
};
use crate::report::figures::{line_plot_panels, Series};
use crate::report::information_chart::{information_chart, BoundGroup};
use crate::report::{architecture, images};
use crate::report::{
    judge, markdown, read_claims, read_tables, render, Judgement, Provenance, ProvenanceOutput,
    Verdict,
};

pub struct Report;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// The profile this report describes (every profile file sets it to its own name).
    profile: String,
}

impl TypedParams for ReportParams {}

/// Where the exported outputs of every stage sit relative to the report directory
/// (`artifacts/report/` and `artifacts/exports/<stage>/`, written by `repro export-all`).
const EXPORTS: &str = "../exports";

fn provenance(manifest: &Manifest) -> Provenance {
    let fields = &manifest.key_fields;
    Provenance {
        stage: manifest.stage.clone(),
        kind: fields.kind.clone(),
        key: manifest.key.clone(),
        key_prefix: manifest.key[..12].to_string(),
        params: fields
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        code_fingerprint_prefix: fields.code_fingerprint[..12.min(fields.code_fingerprint.len())]
            .to_string(),
        device: fields.exec.device.clone(),
        dtype: fields.exec.dtype.clone(),
        seed: fields.exec.seed,
        started_utc: manifest.started_utc.clone(),
        wall_seconds: format!("{:.1}", manifest.seconds),
        log: format!("logs/{}.log", manifest.stage),
        log_object: manifest.log.clone(),
        threads: manifest.threads,
        outputs: manifest
            .outputs
            .iter()
            .map(|(name, o)| ProvenanceOutput {
                name: name.clone(),
                bytes: o.bytes,
                object: o.hash.clone(),
                link: format!("{EXPORTS}/{}/{name}", manifest.stage),
            })
            .collect(),
    }
}

/// The per-stage time table: every stage that led to this report, with the wall time it took
/// when it was built (a cache hit in a later run costs nothing), in pipeline order.
fn time_table(ctx: &StageContext) -> Value {
    let manifests = ctx.ancestor_manifests();
    let total: f64 = manifests.iter().map(|m| m.seconds).sum();
    let rows: Vec<Value> = manifests
        .iter()
        .map(|m| {
            json!({
                "stage": m.stage, "kind": m.key_fields.kind, "key_prefix": &m.key[..12],
                "started_utc": m.started_utc, "seconds": format!("{:.1}", m.seconds),
                "share": if total > 0.0 { format!("{:.1}", 100.0 * m.seconds / total) } else { "0.0".to_string() },
                "threads": m.threads, "device": m.key_fields.exec.device,
            })
        })
        .collect();
    // Under `--jobs N` stages overlap, so the sum overstates the wall time a reader waited; the
    // span from the first start to the last end says it (and spans several runs where the
    // stages were built in several).
    let span = manifests
        .iter()
        .filter_map(|m| {
            let start = humantime::parse_rfc3339_weak(&m.started_utc).ok()?;
            let start = start
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs_f64();
            Some((start, start + m.seconds))
        })
        .fold(None, |acc: Option<(f64, f64)>, (start, end)| match acc {
            None => Some((start, end)),
            Some((first, last)) => Some((first.min(start), last.max(end))),
        })
        .map(|(first, last)| format!("{:.1}", (last - first) / 60.0));
    json!({
        "rows": rows, "total_seconds": format!("{total:.0}"), "total_minutes": format!("{:.1}", total / 60.0),
        "span_minutes": span,
    })
}

/// Every number in a JSON output as `stage.field.subfield` (arrays are skipped: per-example
/// lists and histories are not claims' material).
fn flatten_numbers(prefix: &str, value: &Value, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Object(fields) => {
            for (field, v) in fields {
                flatten_numbers(&format!("{prefix}.{field}"), v, out);
            }
        }
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        _ => {}
    }
}

/// A contract struct as the JSON tree the templates and the claims' rules read.
fn tree<T: serde::Serialize>(value: &T) -> Result<Value> {
    Ok(serde_json::to_value(value)?)
}

/// The iCE settings of every iCE training run (the report says which variant each number
/// used).
fn ice_protocol(trainings: &[Value]) -> Vec<Value> {
    trainings
        .iter()
        .filter(|t| t["objective"] == "ice")
        .map(|t| json!({ "stage": t["stage"], "dataset": t["dataset"], "settings": t["settings"]["ice"] }))
        .collect()
}

/// Fig. 5 from the probes: bounds on I(y; z_s) and I(y; z_n) per model, on clean test data
/// and on metamers, as a bar chart and a table.
fn information(ctx: &mut StageContext, probes: &[(String, ProbeResult)]) -> Result<Value> {
    let mut groups = Vec::new();
    let mut rows = Vec::new();
    let mut entropy = None;
    for (stage, probe) in probes {
        let view = |name: &str| {
            probe
                .views
                .get(name)
                .with_context(|| format!("probe.json of stage {stage} has no view {name}"))
        };
        let (z_s, z_n) = (view("z_s")?, view("z_n")?);
        for (label, readouts) in [
            ("clean test", Some((&z_s.test, &z_n.test))),
            ("metamers", z_s.metamers.as_ref().zip(z_n.metamers.as_ref())),
        ] {
            // Metamer readouts exist only when the probe had a metamers input.
            let Some((s, n)) = readouts else {
                continue;
            };
            let h = n.label_entropy_bits;
            if label == "clean test" {
                entropy = entropy.or(Some(h));
            }
            groups.push(BoundGroup {
                label: format!("{stage}: {label}"),
                bounds: vec![s.information_bound_bits, n.information_bound_bits],
            });
            rows.push(json!({
                "stage": stage, "set": label,
                "z_s": format!("{:.3}", s.information_bound_bits), "z_n": format!("{:.3}", n.information_bound_bits),
                "entropy": format!("{h:.3}"),
                "z_s_error": format!("{:.2}", s.error),
                "z_n_error": format!("{:.2}", n.error),
            }));
        }
    }
    let figure = if groups.is_empty() {
        String::new()
    } else {
        let link = "figures/information_bars.svg".to_string();
        let svg = information_chart(&["I(y; z_s) ≥", "I(y; z_n) ≥"], &groups, entropy);
        ctx.write_output(&link, svg.as_bytes())?;
        link
    };
    let provenance: Vec<Provenance> = probes
        .iter()
        .map(|(stage, _)| upstream_provenance(ctx, stage))
        .collect();
    Ok(json!({ "figure": figure, "rows": rows, "provenance": provenance }))
}

/// Copies an upstream figure into the report as `figures/<stage>_<file>`; returns its link, or
/// an empty string when the stage did not publish (or declare) it.
fn copy_figure(ctx: &mut StageContext, stage: &str, file: &str) -> Result<String> {
    copy_figure_as(ctx, stage, file, Ok)
}

/// Copies a digit grid whose digits are `digit_pixels` wide into the report, enlarged so that a
/// digit is at least [`images::MIN_DIGIT_PIXELS`] wide; returns its link ("" when absent).
fn copy_digit_grid(
    ctx: &mut StageContext,
    stage: &str,
    file: &str,
    digit_pixels: usize,
) -> Result<String> {
    let factor = images::factor_for(digit_pixels);
    copy_figure_as(ctx, stage, file, |bytes| {
        if factor == 1 {
            return Ok(bytes);
        }
        images::upscale_png(&bytes, factor)
            .with_context(|| format!("enlarging {file} of stage {stage}"))
    })
}

/// [`copy_figure`] with the bytes passed through `shown` on the way.
fn copy_figure_as(
    ctx: &mut StageContext,
    stage: &str,
    file: &str,
    shown: impl FnOnce(Vec<u8>) -> Result<Vec<u8>>,
) -> Result<String> {
    if !ctx.input_names(stage).contains(&file) {
        return Ok(String::new());
    }
    let link = format!("figures/{stage}_{file}");
    let bytes = shown(ctx.input(stage, file)?)?;
    ctx.write_output(&link, &bytes)?;
    Ok(link)
}

fn upstream_provenance(ctx: &StageContext, stage: &str) -> Provenance {
    provenance(
        ctx.upstream_manifest(stage)
            .expect("an input that was read has a manifest"),
    )
}

/// One dataset row: sizes, class counts, content hashes, source, provenance.
fn dataset_entry(ctx: &StageContext, stage: &str) -> Result<Value> {
    let Some(manifest) = ctx.upstream_manifest(stage) else {
        return Ok(json!({ "stage": stage, "available": false }));
    };
    let summary: DatasetSummary = read_json(ctx, stage, "summary.json")?;
    let files: Vec<Value> = manifest
        .outputs
        .iter()
        .filter(|(name, _)| name.ends_with(".npy"))
        .map(|(name, o)| json!({ "file": name, "sha256": o.hash, "bytes": o.bytes }))
        .collect();
    Ok(json!({
        "stage": stage,
        "available": true,
        "name": summary.name,
        "train": summary.train,
        "test": summary.test,
        "source": summary.source,
        "files": files,
        "provenance": provenance(manifest),
    }))
}

/// Percent with one decimal, from a fraction.
fn percent(v: f64) -> String {
    format!("{:.1}", 100.0 * v)
}

/// One row of the invariance table: a stage's attack on one feature.
fn invariance_row(
    stage: &str,
    attacked: &str,
    model: &str,
    feature: &str,
    f: &FeatureMatching,
) -> Value {
    let judges = |j: Option<&crate::outputs::Judged>| match j {
        Some(j) => json!({
            "n": j.n, "oracle_source": percent(j.oracle.source), "oracle_target": percent(j.oracle.target),
            "knn_source": percent(j.knn.source), "knn_target": percent(j.knn.target), "agreement": percent(j.agreement),
        }),
        None => json!({ "n": 0 }),
    };
    json!({
        "stage": stage, "attacked_stage": attacked, "model": model, "feature": feature,
        "success": percent(f.success_rate), "model_says_target": percent(f.model_says_target),
        "relative_distance": format!("{:.2e}", f.relative_distance.median),
        "l2": format!("{:.2}", f.l2.median), "linf": format!("{:.2}", f.linf.median),
        "attacked": judges(Some(&f.attacked)), "successful": judges(f.successful.as_ref()),
    })
}

/// The model family a weights config names.
fn family(config: &ModelConfig) -> &'static str {
    match config {
        ModelConfig::Firevnet(_) => "fi-RevNet",
        ModelConfig::Cnn(_) => "CNN",
    }
}

/// The stage whose weights a stage read (its `*/weights.safetensors` input): the model an
/// attack attacked, or a `shortcut` stage scored.
fn attacked_stage(ctx: &StageContext, stage: &str) -> String {
    ctx.upstream_manifest(stage)
        .and_then(|m| {
            m.key_fields.inputs.iter().find_map(|i| {
                i.name
                    .strip_suffix("/weights.safetensors")
                    .map(String::from)
            })
        })
        .unwrap_or_default()
}

/// The dataset stage a stage reads directly (the first of its inputs that comes from one of
/// `dataset_stages`), or "" when it reads none: tells MNIST, Fashion-MNIST and shiftMNIST runs
/// of the same stage kind apart.
fn dataset_of(ctx: &StageContext, stage: &str, dataset_stages: &[String]) -> String {
    ctx.upstream_manifest(stage)
        .and_then(|m| {
            m.key_fields.inputs.iter().find_map(|i| {
                let from = i.name.split('/').next().unwrap_or_default();
                dataset_stages.iter().find(|d| d.as_str() == from).cloned()
            })
        })
        .unwrap_or_default()
}

/// shiftMNIST: one table per variant (dataset stage), one row per trained model, from the
/// `shortcut` stages; the CE / iCE ratio of the broken-shortcut error is C10's number.
fn shift_section(
    ctx: &mut StageContext,
    sets: &[(String, ShortcutResult)],
    trainings: &[Value],
    dataset_stages: &[String],
) -> Result<Vec<Value>> {
    let mut variants: Vec<String> = Vec::new();
    let mut rows: Vec<(String, Value)> = Vec::new();
    for (stage, result) in sets {
        let variant = dataset_of(ctx, stage, dataset_stages);
        if !variants.contains(&variant) {
            variants.push(variant.clone());
        }
        let trained = attacked_stage(ctx, stage);
        let objective = trainings
            .iter()
            .find(|t| t["stage"] == trained.as_str())
            .map_or("ce".to_string(), |t| {
                t["objective"].as_str().unwrap_or("ce").to_string()
            });
        let model = format!("{} ({})", family(&result.model), objective.to_uppercase());
        rows.push((
            variant,
            json!({
                "stage": stage, "trained_stage": trained, "model": model, "objective": objective,
                "is_revnet": family(&result.model) == "fi-RevNet",
                "n_train": result.n_train, "n_test": result.n_test,
                "train_error": format!("{:.2}", result.train_error),
                "present_error": format!("{:.2}", result.present_error),
                "broken_error": format!("{:.2}", result.broken_error),
                "removed_error": format!("{:.2}", result.removed_error),
                "follows_shortcut": format!("{:.1}", result.follows_shortcut),
                "broken_raw": result.broken_error,
                "provenance": upstream_provenance(ctx, stage),
            }),
        ));
    }
    let mut out = Vec::new();
    for variant in variants {
        let of_variant: Vec<Value> = rows
            .iter()
            .filter(|(v, _)| *v == variant)
            .map(|(_, r)| r.clone())
            .collect();
        let revnet = |objective: &str| {
            of_variant
                .iter()
                .find(|r| r["is_revnet"] == true && r["objective"] == objective)
                .and_then(|r| r["broken_raw"].as_f64())
        };
        let ratio = match (revnet("ce"), revnet("ice")) {
            (Some(ce), Some(ice)) if ice > 0.0 => format!("{:.2}", ce / ice),
            (Some(_), Some(_)) => "∞ (iCE made no error)".to_string(),
            _ => "not run".to_string(),
        };
        let name = if ctx.has_input(&variant) && ctx.input_names(&variant).contains(&"summary.json")
        {
            read_json::<DatasetSummary>(ctx, &variant, "summary.json")?.name
        } else {
            variant.clone()
        };
        out.push(json!({
            "dataset": variant, "name": name, "rows": of_variant, "ce_over_ice": ratio,
            "examples": copy_figure(ctx, &variant, "examples.png")?,
        }));
    }
    Ok(out)
}

/// One spheres fi-RevNet: its errors, its metamers, the nuisance classifier and the heat maps.
fn spheres_flow_entry(ctx: &mut StageContext, stage: &str, r: &SpheresFlowResult) -> Result<Value> {
    let q = |v: &crate::outputs::Quartiles| json!({ "q1": format!("{:.3}", v.q1), "median": format!("{:.3}", v.median), "q3": format!("{:.3}", v.q3) });
    let optional = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
    let panels: Vec<Value> = r
        .heatmaps
        .panels
        .iter()
        .map(|p| {
            json!({
                "plane": p.plane, "classifier": p.classifier,
                "fraction_outer": percent(p.fraction_outer),
                "inner_circle_error": format!("{:.1}", p.inner_circle_error),
                "outer_circle_error": format!("{:.1}", p.outer_circle_error),
                "p_outer_at_x": optional(p.p_outer_at_x), "p_outer_at_x_met": optional(p.p_outer_at_x_met),
            })
        })
        .collect();
    let m = &r.metamers;
    Ok(json!({
        "stage": stage,
        "objective": tree(&r.training.objective)?,
        "parameters": r.parameters,
        "n_train": r.n_train, "n_test": r.n_test,
        "train_error": format!("{:.2}", r.train_error), "test_error": format!("{:.2}", r.test_error),
        "metamers": {
            "pairs": m.pairs, "norm": q(&m.norm), "logit_source_norm": q(&m.logit_source_norm),
            "nuisance_source_norm": q(&m.nuisance_source_norm),
            "called_inner": percent(m.fraction_called_inner),
            "same_decision": percent(m.fraction_same_decision_as_logit_source),
            "nearer_outer": percent(m.fraction_nearer_outer),
            "nuisance_says_outer": percent(m.nuisance_classifier_says_outer),
            "max_logit_diff": format!("{:.2e}", m.max_logit_diff as f64),
            "reconstruction_data": format!("{:.2e}", m.reconstruction_data as f64),
            "reconstruction_metamer": format!("{:.2e}", m.reconstruction_metamer as f64),
        },
        "nuisance": {
            "test_error": format!("{:.2}", r.nuisance.test.error),
            "train_error": format!("{:.2}", r.nuisance.train.error),
            "adversary_test_error": r.nuisance.adversary_test.as_ref().map_or("—".to_string(), |a| format!("{:.2}", a.error)),
            "n_fit": r.nuisance.n_fit,
        },
        "heatmaps": copy_figure(ctx, stage, &r.heatmaps.file)?,
        "legend": r.heatmaps.legend, "extent": r.heatmaps.extent.to_string(), "grid": r.heatmaps.grid,
        "panels": panels,
        "curve": copy_figure(ctx, stage, "curve.svg")?,
        "provenance": upstream_provenance(ctx, stage),
    }))
}

/// The mis-aligned classifier of the paper's Example 6 and its aligned control.
fn misaligned_entry(ctx: &StageContext, stage: &str, r: &MisalignedResult) -> Value {
    let pct = |v: f64| format!("{v:.2}");
    json!({
        "stage": stage, "d": r.data.d, "ignored": r.ignored_coordinate + 1,
        "n_test": r.n_test, "n_moved": r.n_moved,
        "radius_error": format!("{:.1e}", r.moved_max_relative_radius_error),
        "clean": pct(r.clean_accuracy), "moved_set": pct(r.moved_set_accuracy), "moved_points": pct(r.moved_points_accuracy),
        "aligned_clean": pct(r.aligned.clean_accuracy), "aligned_moved_set": pct(r.aligned.moved_set_accuracy),
        "aligned_moved_points": pct(r.aligned.moved_points_accuracy),
        "provenance": upstream_provenance(ctx, stage),
    })
}

/// Sensitivity beside invariance, one row per attacked model: how far PGD must move an image
/// to change the decision, and how far feature matching moves it while the model sees another
/// image.
fn contrast_rows(invariance: &[Value], pgd: &Value) -> Vec<Value> {
    let mut models: Vec<String> = Vec::new();
    for r in invariance
        .iter()
        .chain(pgd["rows"].as_array().into_iter().flatten())
    {
        let m = r["attacked_stage"].as_str().unwrap_or_default().to_string();
        if !models.contains(&m) {
            models.push(m);
        }
    }
    models
        .iter()
        .map(|m| {
            let pgd_row = pgd["rows"].as_array().into_iter().flatten().find(|r| r["attacked_stage"] == m.as_str());
            let logits = invariance.iter().find(|r| r["attacked_stage"] == m.as_str() && r["feature"] == "logits");
            json!({
                "attacked_stage": m,
                "linf_half": pgd_row.map_or(json!("not run"), |r| r["linf_half"].clone()),
                "l2_half": pgd_row.map_or(json!("not run"), |r| r["l2_half"].clone()),
                "invariance_success": logits.map_or(json!("not run"), |r| r["success"].clone()),
                "invariance_l2": logits.map_or(json!("not run"), |r| r["l2"].clone()),
                "invariance_linf": logits.map_or(json!("not run"), |r| r["linf"].clone()),
                "oracle_source": logits.map_or(json!("not run"), |r| r["attacked"]["oracle_source"].clone()),
                "knn_source": logits.map_or(json!("not run"), |r| r["attacked"]["knn_source"].clone()),
            })
        })
        .collect()
}

/// The smallest ε at which robust accuracy falls below one half ("—" if it never does).
fn half_accuracy_epsilon(points: &[PgdPoint]) -> String {
    points
        .iter()
        .find(|p| p.robust_accuracy < 0.5)
        .map_or("> largest ε".to_string(), |p| p.epsilon.to_string())
}

/// The PGD section: one row per stage (robust accuracy per ε), and the curves of every
/// attacked model in one figure (L∞ and L2 panels).
fn pgd_section(ctx: &mut StageContext, sets: &[(String, PgdResult)]) -> Result<Value> {
    let mut rows = Vec::new();
    let (mut linf_series, mut l2_series) = (Vec::new(), Vec::new());
    for (stage, result) in sets {
        let cells = |points: &[PgdPoint]| -> Vec<Value> {
            points
                .iter()
                .map(|p| json!({
                    "epsilon": p.epsilon.to_string(), "robust": percent(p.robust_accuracy), "broken": p.broken,
                    "oracle_true": p.oracle_true.map_or("—".to_string(), percent),
                    "knn_true": p.knn_true.map_or("—".to_string(), percent),
                    "mean_l2": p.mean_l2.map_or("—".to_string(), |v| format!("{v:.2}")),
                }))
                .collect()
        };
        let name = format!("{stage} ({})", family(&result.model));
        let curve = |points: &[PgdPoint]| Series {
            name: name.clone(),
            points: points
                .iter()
                .map(|p| (p.epsilon, 100.0 * p.robust_accuracy))
                .collect(),
        };
        linf_series.push(curve(&result.linf));
        l2_series.push(curve(&result.l2));
        rows.push(json!({
            "stage": stage, "attacked_stage": attacked_stage(ctx, stage), "model": family(&result.model), "examples": result.examples, "steps": result.steps,
            "step_factor": result.step_factor.to_string(), "clean": percent(result.clean_accuracy),
            "linf": cells(&result.linf), "l2": cells(&result.l2),
            "linf_half": half_accuracy_epsilon(&result.linf), "l2_half": half_accuracy_epsilon(&result.l2),
            "examples_figure": copy_figure(ctx, stage, "examples.png")?,
            "provenance": upstream_provenance(ctx, stage),
        }));
    }
    let figure = if sets.is_empty() {
        String::new()
    } else {
        let link = "figures/pgd_curves.svg".to_string();
        let svg = line_plot_panels(
            "ε",
            "robust accuracy (%)",
            &[
                ("L∞ PGD".to_string(), linf_series),
                ("L2 PGD".to_string(), l2_series),
            ],
        );
        ctx.write_output(&link, svg.as_bytes())?;
        link
    };
    Ok(json!({ "rows": rows, "figure": figure }))
}

/// C2 and C4 side by side with how they are measured: per model the logit error, the jointly
/// trained adversary's error on z_n and the fresh probe's, and, when the ablation ran, its
/// last-epoch cells (CE, CE + MLE, iCE with and without the MLE term) so a reader sees whether
/// iCE's accuracy cost comes from the likelihood term or from the adversary.
fn nuisance_measures(
    metrics: &BTreeMap<String, f64>,
    ablations: &[(String, AblationResult)],
) -> Value {
    let get = |name: &str| {
        metrics
            .get(name)
            .map_or("not run".to_string(), |v| format!("{v:.2}"))
    };
    let models = [
        ("CE", "eval_ce", "probe_ce", false),
        ("iCE", "eval_ice", "probe_ice", true),
    ];
    let rows: Vec<Value> = models
        .iter()
        .map(|&(label, eval, probe, has_adversary)| {
            let adversary = |split: &str| {
                if has_adversary {
                    get(&format!("{eval}.adversary.{split}.error"))
                } else {
                    "—".to_string()
                }
            };
            json!({
                "model": label,
                "logit_test": get(&format!("{eval}.test_error")),
                "adversary_test": adversary("test"), "adversary_train": adversary("train"),
                "probe_test": get(&format!("{probe}.views.z_n.test.error")),
                "probe_train": get(&format!("{probe}.views.z_n.train.error")),
                "probe_bits": metrics.get(&format!("{probe}.views.z_n.test.information_bound_bits")).map_or("not run".to_string(), |v| format!("{v:.3}")),
            })
        })
        .collect();
    let evidence: Vec<Value> = ablations
        .iter()
        .map(|(stage, result)| {
            let last = result.grid_epochs.iter().copied().max().unwrap_or(0);
            let at_last: Vec<&AblationRow> = result.rows.iter().filter(|r| r.epoch == last).collect();
            let ce = at_last.iter().find(|r| r.objective == CellObjective::Ce).map(|r| r.logit_test_error);
            let optional = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}"));
            let cells: Vec<Value> = at_last
                .iter()
                .map(|r| {
                    json!({
                        "objective": r.objective.label(),
                        "adversary": r.adversary.map_or("—", variant_name),
                        "w_adv": r.w_adv.map_or("—".to_string(), |v| v.to_string()),
                        "w_mle": r.w_mle.map_or("—".to_string(), |v| v.to_string()),
                        "logit_test": format!("{:.2}", r.logit_test_error),
                        "cost": ce.map_or("—".to_string(), |ce| format!("{:+.2}", r.logit_test_error - ce)),
                        "adversary_test": optional(r.adversary_test_error),
                        "probe_test": format!("{:.2}", r.probe_test_error),
                    })
                })
                .collect();
            json!({ "stage": stage, "epoch": last, "n_train": result.base.train_limit, "n_test": result.n_test, "cells": cells })
        })
        .collect();
    json!({ "rows": rows, "ablation": evidence })
}

/// Fig. 3: one architecture figure per distinct fi-RevNet config among the training runs, with
/// the stages that trained it.
fn architectures(ctx: &mut StageContext, trained: &[(String, ModelConfig)]) -> Result<Vec<Value>> {
    let mut configs: Vec<(RevNetConfig, Vec<String>)> = Vec::new();
    for (stage, config) in trained {
        let ModelConfig::Firevnet(config) = config else {
            continue;
        };
        match configs.iter_mut().find(|(c, _)| c == config) {
            Some((_, stages)) => stages.push(stage.clone()),
            None => configs.push((config.clone(), vec![stage.clone()])),
        }
    }
    let mut out = Vec::new();
    for (i, (config, stages)) in configs.iter().enumerate() {
        let summary = architecture::summarise(config);
        let link = format!("figures/architecture_{}.svg", i + 1);
        ctx.write_output(&link, architecture::architecture_svg(&summary).as_bytes())?;
        let provenance: Vec<Provenance> = stages
            .iter()
            .map(|stage| upstream_provenance(ctx, stage))
            .collect();
        out.push(json!({
            "figure": link, "stages": stages, "summary": summary, "provenance": provenance,
            "levels": summary.levels.iter().map(|l| json!({
                "level": l.level + 1,
                "input": format!("{}×{}×{}", l.input[0], l.input[1], l.input[2]),
                "squeezed": format!("{}×{}×{}", l.squeezed[0], l.squeezed[1], l.squeezed[2]),
                "steps": l.steps,
                "split_off": l.split_off.map_or("— (final map)".to_string(), |s| format!("{}×{}×{}", s[0], s[1], s[2])),
                "parameters": l.parameters,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(out)
}

/// The claims' verdicts counted and listed, for the paragraph above the claims table (and
/// `results.json`): which claims reproduce on this profile, which do not, which did not run.
fn claims_summary(profile: &str, verdicts: &[(String, Verdict)]) -> Value {
    let with = |wanted: &[Verdict]| -> Vec<String> {
        verdicts
            .iter()
            .filter(|(_, v)| wanted.contains(v))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let pass = with(&[Verdict::Pass]);
    let fail = with(&[Verdict::Fail]);
    let not_run = with(&[Verdict::NotRun]);
    let unjudged = with(&[Verdict::Qualitative, Verdict::NotJudged]);
    let list = |ids: &[String]| {
        if ids.is_empty() {
            String::new()
        } else {
            format!(" ({})", ids.join(", "))
        }
    };
    let mut sentence = format!(
        "On the {profile} profile, {} of {} claims pass{}; {} fail{}; {} not run{}",
        pass.len(),
        verdicts.len(),
        list(&pass),
        fail.len(),
        list(&fail),
        not_run.len(),
        list(&not_run)
    );
    if !unjudged.is_empty() {
        sentence.push_str(&format!(
            "; {} measured without a rule on this profile{}",
            unjudged.len(),
            list(&unjudged)
        ));
    }
    sentence.push('.');
    json!({ "pass": pass, "fail": fail, "not_run": not_run, "unjudged": unjudged, "sentence": sentence })
}

impl StageKind for Report {
    type Params = ReportParams;

    fn kind(&self) -> &str {
        "report"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("report")
    }

    fn reads_provenance(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut StageContext, params: &ReportParams) -> Result<Finished> {
        let profile = params.profile.clone();
        let claims = read_claims(&ctx.repo_path("paper/claims.toml"))?;
        let tables = read_tables(&ctx.repo_path("paper/tables.toml"))?;
        let upstream: Vec<String> = ctx.input_stages().into_iter().map(String::from).collect();

        // Every number an upstream stage published, as `stage.field` (what claims' rules read).
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut datasets = Vec::new();
        let mut trainings = Vec::new();
        let mut trained_configs: Vec<(String, ModelConfig)> = Vec::new();
        let mut metamer_sets = Vec::new();
        let mut probes: Vec<(String, ProbeResult)> = Vec::new();
        let mut interpolations = Vec::new();
        let mut ablations = Vec::new();
        let mut ablation_results: Vec<(String, AblationResult)> = Vec::new();
        let mut knn_judges = Vec::new();
        let mut invariance_rows = Vec::new();
        let mut invariance_sets = Vec::new();
        let mut pgd_sets: Vec<(String, PgdResult)> = Vec::new();
        let mut shortcut_sets: Vec<(String, ShortcutResult)> = Vec::new();
        let mut spheres_flows = Vec::new();
        let mut misaligned = Vec::new();
        let dataset_stages: Vec<String> = upstream
            .iter()
            .filter(|s| ctx.input_names(s).contains(&"summary.json"))
            .cloned()
            .collect();
        for stage in &upstream {
            let dataset = dataset_of(ctx, stage, &dataset_stages);
            let names: Vec<String> = ctx
                .input_names(stage)
                .into_iter()
                .map(String::from)
                .collect();
            if names.iter().any(|n| n == "summary.json") || !ctx.has_input(stage) {
                datasets.push(dataset_entry(ctx, stage)?);
            }
            let has = |name: &str| names.iter().any(|n| n == name);
            if has("evaluation.json") {
                let evaluation: Evaluation = read_json(ctx, stage, "evaluation.json")?;
                flatten_numbers(stage, &tree(&evaluation)?, &mut metrics);
            }
            if has("ensemble.json") {
                let ensemble: EnsembleResult = read_json(ctx, stage, "ensemble.json")?;
                flatten_numbers(stage, &tree(&ensemble)?, &mut metrics);
            }
            if has("ablation.json") {
                let ablation: AblationResult = read_json(ctx, stage, "ablation.json")?;
                // "—": what a CE cell does not have (an adversary and its settings).
                let na = || "—".to_string();
                let rows: Vec<Value> = ablation
                    .rows
                    .iter()
                    .map(|r| {
                        json!({
                            "objective": r.objective.label(),
                            "w_mle": r.w_mle.map_or_else(na, |v| v.to_string()),
                            "adversary": r.adversary.map_or("—", variant_name),
                            // Stored as f32: print the f32 (0.1, not 0.10000000149011612).
                            "w_adv": r.w_adv.map_or_else(na, |v| v.to_string()),
                            "inner_steps": r.inner_steps.map_or_else(na, |v| v.to_string()),
                            "epoch": r.epoch, "logit_test_error": format!("{:.2}", r.logit_test_error),
                            "adversary_test_error": r.adversary_test_error.map_or_else(na, |v| format!("{v:.2}")),
                            "probe_test_error": format!("{:.2}", r.probe_test_error),
                            "probe_train_error": format!("{:.2}", r.probe_train_error),
                            "probe_bound_bits": format!("{:.3}", r.probe_bound_bits),
                        })
                    })
                    .collect();
                ablations.push(json!({
                    "stage": stage, "rows": rows, "figure": copy_figure(ctx, stage, "ablation.svg")?,
                    "n_train": ablation.base.train_limit, "n_test": ablation.n_test,
                    "n_probe_fit": ablation.n_probe_fit, "provenance": upstream_provenance(ctx, stage),
                }));
                ablation_results.push((stage.clone(), ablation));
            }
            if has("probe.json") {
                let probe: ProbeResult = read_json(ctx, stage, "probe.json")?;
                flatten_numbers(stage, &tree(&probe)?, &mut metrics);
                probes.push((stage.clone(), probe));
            }
            if has("interpolation.json") {
                let result: InterpolationResult = read_json(ctx, stage, "interpolation.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                let pct = |v: f64| format!("{:.1}", 100.0 * v);
                interpolations.push(json!({
                    "stage": stage, "dataset": dataset, "paths": result.paths, "steps": result.steps,
                    // Drawn 2× (56-pixel digits) by the interpolate stage.
                    "strips": copy_digit_grid(ctx, stage, "strips.png", 56)?,
                    "changes": pct(result.fraction_label_changes),
                    "ends_as_b": pct(result.fraction_ends_as_nuisance_source),
                    "starts_as_a": pct(result.fraction_starts_as_logit_source),
                    "max_logit_drift": format!("{:.2e}", result.max_logit_drift as f64),
                    "provenance": upstream_provenance(ctx, stage),
                }));
            }
            if has("metamers.json") {
                let result: MetamerResult = read_json(ctx, stage, "metamers.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                let pct = |v: f64| format!("{:.1}", 100.0 * v);
                let sci = |v: f32| format!("{:.2e}", v as f64);
                metamer_sets.push(json!({
                    "stage": stage, "dataset": dataset, "pairs": result.pairs, "grid": copy_digit_grid(ctx, stage, "triplets.png", 56)?,
                    "max_logit_diff": sci(result.max_logit_diff), "reconstruction_data": sci(result.reconstruction_data),
                    "reconstruction_metamer": sci(result.reconstruction_metamer),
                    "like_logit_source": pct(result.oracle_agrees_with_logit_source),
                    "like_nuisance_source": pct(result.oracle_agrees_with_nuisance_source),
                    "provenance": upstream_provenance(ctx, stage),
                }));
            }
            if has("knn.json") {
                let knn: KnnResult = read_json(ctx, stage, "knn.json")?;
                flatten_numbers(stage, &tree(&knn)?, &mut metrics);
                knn_judges.push(json!({
                    "stage": stage, "k": knn.k, "n_train": knn.n_train, "n_test": knn.n_test,
                    "test_error": format!("{:.2}", knn.test_error), "provenance": upstream_provenance(ctx, stage),
                }));
            }
            if has("invariance.json") {
                let result: InvarianceResult = read_json(ctx, stage, "invariance.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                for (feature, f) in &result.features {
                    invariance_rows.push(invariance_row(
                        stage,
                        &attacked_stage(ctx, stage),
                        family(&result.model),
                        feature,
                        f,
                    ));
                }
                invariance_sets.push(json!({
                    "stage": stage, "model": family(&result.model), "pairs": result.pairs, "steps": result.steps,
                    "lr": result.lr.to_string(), "success_distance": result.success_distance.to_string(),
                    "features": result.features.keys().collect::<Vec<_>>(),
                    "grid": copy_figure(ctx, stage, "pairs.png")?, "provenance": upstream_provenance(ctx, stage),
                }));
            }
            if has("pgd.json") {
                let result: PgdResult = read_json(ctx, stage, "pgd.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                pgd_sets.push((stage.clone(), result));
            }
            if has("spheres.json") {
                let result: SpheresFlowResult = read_json(ctx, stage, "spheres.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                spheres_flows.push(spheres_flow_entry(ctx, stage, &result)?);
            }
            if has("misaligned.json") {
                let result: MisalignedResult = read_json(ctx, stage, "misaligned.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                misaligned.push(misaligned_entry(ctx, stage, &result));
            }
            if has("shortcut.json") {
                let result: ShortcutResult = read_json(ctx, stage, "shortcut.json")?;
                flatten_numbers(stage, &tree(&result)?, &mut metrics);
                shortcut_sets.push((stage.clone(), result));
            }
            if has("metrics.json") {
                let m: TrainMetrics = read_json(ctx, stage, "metrics.json")?;
                trained_configs.push((stage.clone(), m.model.clone()));
                // The learning rate is an f32: print it as one (0.001, not the f64 widening
                // 0.0010000000474974513).
                let mut history = tree(&m.history)?;
                for (entry, epoch) in history.as_array_mut().into_iter().flatten().zip(&m.history) {
                    entry["lr"] = json!(epoch.lr.to_string());
                }
                trainings.push(json!({
                    "stage": stage, "dataset": dataset, "model": m.model, "objective": m.objective, "settings": m.settings,
                    "parameters": m.parameters, "history": history,
                    "curve": copy_figure(ctx, stage, "curve.svg")?, "provenance": upstream_provenance(ctx, stage),
                }));
            }
        }

        // A row whose stage ran must find every field it names: a missing one is an error
        // naming the row, not a silent "—". An empty field name means "not measured" (the
        // oracle has no training error of its own).
        let mut accuracy: Vec<Value> = Vec::new();
        for row in &tables.accuracy {
            let ran = !row.stage.is_empty() && ctx.has_input(&row.stage);
            let get = |field: &str| -> Result<String> {
                if field.is_empty() {
                    return Ok("not measured".into());
                }
                if row.stage.is_empty() {
                    return Ok("quoted".into());
                }
                if !ran {
                    // The row's cells say "not run" (the stage is not in this profile).
                    return Ok("—".into());
                }
                let name = format!("{}.{field}", row.stage);
                metrics.get(&name).copied().map(|v| {
                    if field.starts_with("n_") || field.ends_with(".n") { v.to_string() } else { format!("{v:.2}") }
                }).with_context(|| format!("paper/tables.toml: row {:?} reads {name}, which stage {} did not publish", row.label, row.stage))
            };
            let paper =
                |v: Option<f64>| v.map_or("not reported".to_string(), |v| format!("{v:.2}"));
            accuracy.push(json!({
                "label": row.label, "stage": row.stage, "measured": ran,
                "quoted_only": row.stage.is_empty(), "group": row.group, "note": row.note,
                "test_error": get(&row.test_metric)?,
                "train_error": get(&row.train_metric)?,
                "n_test": get(&row.n_test_metric)?,
                "n_train": get(&row.n_train_metric)?,
                "paper_test": paper(row.paper_test),
                "paper_train": paper(row.paper_train),
                "paper_top5": paper(row.paper_top5),
                "provenance": ctx.upstream_manifest(&row.stage).map(provenance),
            }));
        }

        let judgements: Vec<Judgement> = claims
            .iter()
            .map(|c| judge(c, &profile, &metrics))
            .collect();
        let claim_rows: Vec<Value> = claims
            .iter()
            .zip(&judgements)
            .map(|(c, judged)| {
                json!({
                    "id": c.id, "statement": c.statement, "paper_value": c.paper_value,
                    "tolerance": c.tolerance, "profiles": c.profiles.join(", "), "source": c.source,
                    "section": c.section,
                    "ours": if judged.shown.is_empty() { "—".to_string() } else { judged.shown.join("; ") },
                    "values": judged.values,
                    "verdict": judged.verdict, "note": judged.note,
                    "judged_here": c.profiles.contains(&profile),
                })
            })
            .collect();
        let verdicts: Vec<(String, Verdict)> = claims
            .iter()
            .zip(&judgements)
            .map(|(c, judged)| (c.id.clone(), judged.verdict))
            .collect();
        let summary = claims_summary(&profile, &verdicts);
        let mut texts = BTreeMap::new();
        let text_dir = ctx.repo_path("paper/text");
        for entry in std::fs::read_dir(&text_dir)
            .with_context(|| format!("listing {}", text_dir.display()))?
        {
            let path = entry?.path();
            if let (Some(stem), Some("md")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|e| e.to_str()),
            ) {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                texts.insert(stem.to_string(), markdown(&text));
            }
        }

        let pgd = pgd_section(ctx, &pgd_sets)?;
        let shift = shift_section(ctx, &shortcut_sets, &trainings, &dataset_stages)?;
        let context = json!({
            "profile": profile,
            "claims": claim_rows,
            "summary": summary,
            "nuisance": nuisance_measures(&metrics, &ablation_results),
            "architectures": architectures(ctx, &trained_configs)?,
            "time": time_table(ctx),
            "datasets": datasets,
            "accuracy": accuracy,
            "trainings": trainings,
            "metamers": metamer_sets,
            "ice": ice_protocol(&trainings),
            "information": information(ctx, &probes)?,
            "interpolations": interpolations,
            "ablations": ablations,
            "attacks": {
                "contrast": contrast_rows(&invariance_rows, &pgd),
                "knn": knn_judges,
                "invariance": invariance_rows,
                "invariance_sets": invariance_sets,
                "pgd": pgd,
            },
            "shift": shift,
            "spheres": { "flows": spheres_flows, "misaligned": misaligned },
            "text": texts,
        });
        let html = render(
            &ctx.repo_path("paper/templates"),
            "index.html.tera",
            &context,
        )?;
        ctx.write_output("index.html", html.as_bytes())?;

        let results = json!({
            "profile": profile,
            "metrics": metrics,
            "datasets": datasets.iter().filter(|d| d["available"] == true).map(|d| json!({
                "stage": d["stage"], "name": d["name"], "train": d["train"], "test": d["test"],
                "files": d["files"], "source": d["source"],
            })).collect::<Vec<_>>(),
            "summary": summary,
            "claims": claim_rows.iter().map(|c| json!({
                "id": c["id"], "statement": c["statement"], "paper_value": c["paper_value"],
                "ours": c["ours"], "values": c["values"], "rule": c["tolerance"],
                "judged_on": c["profiles"], "judged_here": c["judged_here"],
                "verdict": c["verdict"], "note": c["note"], "section": c["section"],
            })).collect::<Vec<_>>(),
        });
        ctx.write_output("results.json", &serde_json::to_vec_pretty(&results)?)?;

        for stage in &upstream {
            if ctx.has_input(stage) {
                let log = ctx.upstream_log(stage)?;
                ctx.write_output(&format!("logs/{stage}.log"), &log)?;
            }
        }
        ctx.log(format!(
            "rendered {} claims, {} datasets, {} trainings for profile {profile}",
            claims.len(),
            datasets.len(),
            trainings.len()
        ));
        Ok(Finished::Done)
    }
}
