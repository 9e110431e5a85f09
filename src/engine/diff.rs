//! `diff`: what differs between two runs of the pipeline, or between a run and what a profile
//! would build now.
//!
//! A *side* is a run record (`runs/<UTC timestamp>.json`: each stage's key and outcome) or a
//! profile's current keys (resolved as `status` resolves them, building nothing). The
//! comparison says:
//! - which stages exist on one side only;
//! - for every stage whose key differs, the key fields that differ, worded as `why` words them
//!   ([`diff_key_fields`]): kind, code fingerprint, each param, each input's content hash by
//!   name, the execution facts. A run record holds only keys, so its fields come from the
//!   manifest the store keeps for each key; a profile's are computed now;
//! - for such a stage built on both sides, which outputs' bytes changed. A stage that reran but
//!   published the same bytes is early cutoff: its dependants' keys do not move;
//! - the numbers: the results document one stage publishes (the report's `results.json`: a
//!   flat `metrics` map of name → number and `claims`, each with an `id` and a `verdict`), read
//!   from the store on each side: every metric that moved (old, new, absolute and relative
//!   change), metrics added and removed, claims whose verdict changed.
//!
//! The comparison is a value ([`Comparison`]) with two renderings: plain text for the terminal
//! ([`Comparison::text`]) and a self-contained HTML page ([`html::page`]). Both are
//! deterministic: stages in pipeline order (side A's, then B's own), metrics by name, claims
//! in the order the results document lists them.

pub mod html;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::key::KeyFields;
use super::run::{diff_key_fields, run_record_paths, Engine, RunRecord};
use super::store::{Manifest, Store};

/// A fact about one side of a comparison, or why it is not known (e.g. "the build failed, so
/// no manifest exists for this key").
pub type OrWhy<T> = std::result::Result<T, String>;

/// What a `diff` argument names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideSpec {
    /// A run record file.
    Run(PathBuf),
    /// `profile:NAME`: the keys the profile's stages have now.
    Profile(String),
}

impl SideSpec {
    /// Reads a `diff` argument: `profile:NAME`, or a run record (see [`find_run_record`]).
    pub fn parse(arg: &str, runs_dir: &Path) -> Result<SideSpec> {
        match arg.strip_prefix("profile:") {
            Some(name) => Ok(SideSpec::Profile(name.to_string())),
            None => find_run_record(arg, runs_dir).map(SideSpec::Run),
        }
    }
}

/// The run record `arg` names: a path to a file; or, in `runs_dir`, `last` (the newest
/// record), `last~N` (N before it), a file name, or a start timestamp with or without its
/// punctuation (`2026-12-03T17:53:33.760145Z`, `20261203T175333.760145Z`) or a prefix of one
/// that fits a single record (`20261203T1753`).
pub fn find_run_record(arg: &str, runs_dir: &Path) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let records = run_record_paths(runs_dir);
    let newest = || {
        records.last().map_or("none".to_string(), |p| {
            format!("the newest is {}", file_name(p))
        })
    };
    if let Some(back) = steps_back(arg) {
        return records.iter().rev().nth(back).cloned().with_context(|| {
            format!(
                "run record `{arg}`: {} has only {} run record(s)",
                runs_dir.display(),
                records.len()
            )
        });
    }
    // Records are named by their start time with ':' and '-' removed (a pid may follow).
    let compact = |s: &str| s.trim_end_matches(".json").replace([':', '-'], "");
    let wanted = compact(arg);
    if let Some(exact) = records.iter().find(|p| compact(&file_name(p)) == wanted) {
        return Ok(exact.clone());
    }
    let matching: Vec<&PathBuf> = records
        .iter()
        .filter(|p| !wanted.is_empty() && compact(&file_name(p)).starts_with(&wanted))
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no run record `{arg}`: it is not a file, and no record in {} has that name or \
             timestamp ({} record(s); {}). Give a path, a name from there, `last`, `last~N`, \
             or `profile:NAME` for a profile's current keys",
            runs_dir.display(),
            records.len(),
            newest()
        ),
        many => bail!(
            "run record `{arg}` is ambiguous in {}: it fits {}",
            runs_dir.display(),
            many.iter()
                .map(|p| file_name(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `last` → 0, `last~N` → N.
fn steps_back(arg: &str) -> Option<usize> {
    let rest = arg.strip_prefix("last")?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix('~')?.parse().ok()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// One side of a comparison, with what the store knows about each of its stages.
#[derive(Clone, Debug)]
pub struct Side {
    /// What the side is: the run record's path, or `profile:NAME`.
    pub label: String,
    /// One line about it: profile, command and start time of a run; the pipeline file of a
    /// profile.
    pub detail: String,
    pub stages: Vec<SideStage>,
}

/// One stage of a [`Side`].
#[derive(Clone, Debug)]
pub struct SideStage {
    pub name: String,
    pub kind: String,
    /// `None` when the key could not be computed (an upstream stage failed, was skipped or,
    /// for a profile, is not built yet).
    pub key: Option<String>,
    /// How the stage stands on this side: a run's outcome (with its message), or a profile's
    /// state (fresh, stale, missing) with the reasons.
    pub state: String,
    /// The key fields: from the store's manifest for `key` (run records), or computed now
    /// (profiles).
    pub fields: OrWhy<KeyFields>,
    /// The manifest the store holds for `key`, if the stage was built under it.
    pub manifest: OrWhy<Manifest>,
}

impl Side {
    /// A run record's side: its stages' keys, with the manifests the store holds for them.
    pub fn from_run_record(path: &Path, store: &Store) -> Result<Side> {
        let record = RunRecord::read(path)?;
        let mut stages = Vec::new();
        for s in &record.stages {
            let outcome = format!("{:?}", s.outcome).to_lowercase();
            let state = match &s.message {
                Some(m) => format!("{outcome}: {m}"),
                None => outcome.clone(),
            };
            let manifest = match &s.key {
                None => Err(format!("no key ({state})")),
                Some(key) => store.read_manifest(key)?.ok_or_else(|| {
                    format!(
                        "the store has no manifest for its key {} (outcome {outcome}{})",
                        short(key),
                        if matches!(outcome.as_str(), "hit" | "ran") {
                            "; removed by `gc`, or the run used another store"
                        } else {
                            ": nothing was published"
                        }
                    )
                }),
            };
            stages.push(SideStage {
                name: s.name.clone(),
                kind: s.kind.clone(),
                key: s.key.clone(),
                state,
                fields: manifest
                    .as_ref()
                    .map(|m| m.key_fields.clone())
                    .map_err(Clone::clone),
                manifest,
            });
        }
        Ok(Side {
            label: path.display().to_string(),
            detail: format!(
                "run of profile {}, `repro {}`, started {}",
                record.profile, record.command, record.started_utc
            ),
            stages,
        })
    }

    /// A profile's side: the keys its stages have now (as `status` computes them), with the
    /// manifests the store holds for them.
    pub fn from_engine(engine: &Engine) -> Result<Side> {
        let mut stages = Vec::new();
        for current in engine.current()? {
            let status = current.status;
            let state = format!("{:?}", status.state).to_lowercase();
            let state = if status.reasons.is_empty() {
                state
            } else {
                format!("{state}: {}", status.reasons.join("; "))
            };
            let manifest = match &status.key {
                None => Err(format!("no key yet ({state})")),
                Some(key) => engine.store.read_manifest(key)?.ok_or_else(|| {
                    format!("not built under its current key {} ({state})", short(key))
                }),
            };
            stages.push(SideStage {
                name: status.name,
                kind: current.kind,
                key: status.key,
                fields: current
                    .fields
                    .ok_or_else(|| format!("no key yet ({state})")),
                state,
                manifest,
            });
        }
        Ok(Side {
            label: format!("profile:{}", engine.pipeline.profile),
            detail: format!(
                "the current keys of profile {} ({})",
                engine.pipeline.profile,
                engine.pipeline.file.display()
            ),
            stages,
        })
    }

    fn stage(&self, name: &str) -> Option<&SideStage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// Which stage publishes the results document, and under which output name.
#[derive(Clone, Copy, Debug)]
pub struct ResultsSource<'a> {
    pub stage: &'a str,
    pub output: &'a str,
}

/// Everything that differs between side A and side B.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub a: SideSummary,
    pub b: SideSummary,
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
    /// Stages on both sides with different keys, in pipeline order.
    pub changed: Vec<StageChange>,
    /// Stages on both sides whose keys cannot be compared (one side has none), and why.
    pub uncompared: Vec<(String, String)>,
    /// Stages on both sides with the same key.
    pub unchanged: Vec<String>,
    pub results: ResultsComparison,
}

/// A side's label and one-line description.
#[derive(Clone, Debug)]
pub struct SideSummary {
    pub label: String,
    pub detail: String,
}

/// A stage whose key differs between the sides.
#[derive(Clone, Debug)]
pub struct StageChange {
    pub name: String,
    pub kind: String,
    pub key_a: String,
    pub key_b: String,
    /// The key fields that differ, one line each (`param lr: 0.001 -> 0.002`).
    pub fields: OrWhy<Vec<String>>,
    /// The outputs, when the stage is built on both sides.
    pub outputs: OrWhy<OutputChanges>,
}

/// How one stage's published outputs compare between two builds.
#[derive(Clone, Debug, Default)]
pub struct OutputChanges {
    /// Outputs whose content differs or that one side lacks: (name, hash on A, hash on B).
    pub changed: Vec<(String, Option<String>, Option<String>)>,
    /// Outputs with the same bytes on both sides.
    pub same: Vec<String>,
}

impl OutputChanges {
    /// The outputs with the same bytes, named when few (a report has a hundred).
    pub fn same_summary(&self) -> String {
        const NAMED: usize = 6;
        if self.same.len() <= NAMED {
            self.same.join(", ")
        } else {
            format!(
                "{}, and {} more",
                self.same[..NAMED].join(", "),
                self.same.len() - NAMED
            )
        }
    }
}

/// The results documents of the two sides and how their numbers differ.
#[derive(Clone, Debug)]
pub struct ResultsComparison {
    pub stage: String,
    pub output: String,
    /// Each side's document as `object <hash> (key <key>)`, or why it has none.
    pub a: OrWhy<String>,
    pub b: OrWhy<String>,
    /// When both sides have one.
    pub diff: Option<ResultsDiff>,
}

/// Numbers and verdicts that differ between two results documents.
#[derive(Clone, Debug, Default)]
pub struct ResultsDiff {
    /// Metrics present on both sides.
    pub compared: usize,
    pub moved: Vec<MetricMove>,
    pub added: Vec<(String, Value)>,
    pub removed: Vec<(String, Value)>,
    /// Claims whose verdict differs (or that one side lacks).
    pub verdicts: Vec<VerdictChange>,
}

/// A metric with different values on the two sides.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricMove {
    pub name: String,
    pub old: Value,
    pub new: Value,
}

impl MetricMove {
    /// `new − old`, when both are numbers.
    pub fn absolute(&self) -> Option<f64> {
        Some(self.new.as_f64()? - self.old.as_f64()?)
    }

    /// `(new − old) / |old|`, when both are numbers and `old` is not zero.
    pub fn relative(&self) -> Option<f64> {
        let old = self.old.as_f64()?;
        let new = self.new.as_f64()?;
        (old != 0.0).then(|| (new - old) / old.abs())
    }
}

/// A claim whose verdict differs between the sides (`None`: the side does not list it).
#[derive(Clone, Debug, PartialEq)]
pub struct VerdictChange {
    pub id: String,
    pub old: Option<String>,
    pub new: Option<String>,
    /// Our value on each side, as the document prints it.
    pub ours_old: Option<String>,
    pub ours_new: Option<String>,
}

/// The part of a results document `diff` reads (the report's `results.json`).
#[derive(Deserialize)]
struct ResultsDocument {
    metrics: BTreeMap<String, Value>,
    claims: Vec<ClaimRow>,
}

#[derive(Deserialize)]
struct ClaimRow {
    id: String,
    verdict: String,
    #[serde(default)]
    ours: Value,
}

/// Compares side `a` with side `b`; `results` names the stage and output holding the numbers.
/// Reading a results object that is corrupt or does not parse is an error naming it; one that
/// is absent is reported as such.
pub fn compare(a: &Side, b: &Side, store: &Store, results: ResultsSource) -> Result<Comparison> {
    let mut comparison = Comparison {
        a: SideSummary {
            label: a.label.clone(),
            detail: a.detail.clone(),
        },
        b: SideSummary {
            label: b.label.clone(),
            detail: b.detail.clone(),
        },
        only_a: Vec::new(),
        only_b: Vec::new(),
        changed: Vec::new(),
        uncompared: Vec::new(),
        unchanged: Vec::new(),
        results: compare_results(a, b, store, results)?,
    };
    for sa in &a.stages {
        let Some(sb) = b.stage(&sa.name) else {
            comparison.only_a.push(sa.name.clone());
            continue;
        };
        match (&sa.key, &sb.key) {
            (Some(ka), Some(kb)) if ka == kb => comparison.unchanged.push(sa.name.clone()),
            (Some(ka), Some(kb)) => comparison.changed.push(StageChange {
                name: sa.name.clone(),
                kind: if sa.kind == sb.kind {
                    sa.kind.clone()
                } else {
                    format!("{} -> {}", sa.kind, sb.kind)
                },
                key_a: ka.clone(),
                key_b: kb.clone(),
                fields: changed_fields(sa, sb),
                outputs: changed_outputs(sa, sb),
            }),
            (ka, kb) => {
                let mut why = Vec::new();
                if ka.is_none() {
                    why.push(format!("no key on A ({})", sa.state));
                }
                if kb.is_none() {
                    why.push(format!("no key on B ({})", sb.state));
                }
                comparison
                    .uncompared
                    .push((sa.name.clone(), why.join("; ")));
            }
        }
    }
    comparison.only_b = b
        .stages
        .iter()
        .filter(|s| a.stage(&s.name).is_none())
        .map(|s| s.name.clone())
        .collect();
    Ok(comparison)
}

fn changed_fields(a: &SideStage, b: &SideStage) -> OrWhy<Vec<String>> {
    let fa = a.fields.as_ref().map_err(|why| format!("A: {why}"))?;
    let fb = b.fields.as_ref().map_err(|why| format!("B: {why}"))?;
    let lines = diff_key_fields(fa, fb);
    if lines.is_empty() {
        // Only possible if a manifest's fields were edited by hand: the key is their hash.
        return Err("the key fields are equal, yet the keys differ".into());
    }
    Ok(lines)
}

fn changed_outputs(a: &SideStage, b: &SideStage) -> OrWhy<OutputChanges> {
    let ma = a.manifest.as_ref().map_err(|why| format!("A: {why}"))?;
    let mb = b.manifest.as_ref().map_err(|why| format!("B: {why}"))?;
    let mut changes = OutputChanges::default();
    let names: std::collections::BTreeSet<&String> =
        ma.outputs.keys().chain(mb.outputs.keys()).collect();
    for name in names {
        let ha = ma.outputs.get(name).map(|o| o.hash.clone());
        let hb = mb.outputs.get(name).map(|o| o.hash.clone());
        if ha == hb {
            changes.same.push(name.clone());
        } else {
            changes.changed.push((name.clone(), ha, hb));
        }
    }
    Ok(changes)
}

/// Loads one side's results document: its description, or why there is none.
fn results_document(
    side: &Side,
    store: &Store,
    source: ResultsSource,
) -> Result<OrWhy<(String, ResultsDocument)>> {
    let ResultsSource { stage, output } = source;
    let Some(s) = side.stage(stage) else {
        return Ok(Err(format!("{} has no stage {stage}", side.label)));
    };
    let manifest = match &s.manifest {
        Ok(m) => m,
        Err(why) => return Ok(Err(format!("stage {stage}: {why}"))),
    };
    let Some(object) = manifest.outputs.get(output) else {
        return Ok(Err(format!(
            "stage {stage} (key {}) published no {output}",
            short(&manifest.key)
        )));
    };
    if !store.object_available(&object.hash)? {
        return Ok(Err(format!(
            "object {} ({output} of stage {stage}) is not in the store; `gc` removed it",
            object.hash
        )));
    }
    let bytes = store.read_verified(&object.hash, &format!("{output} of stage `{stage}`"))?;
    let document = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{output} of stage {stage} ({}) is malformed",
            store.object_path(&object.hash).display()
        )
    })?;
    Ok(Ok((
        format!(
            "object {} (stage {stage}, key {})",
            short(&object.hash),
            short(&manifest.key)
        ),
        document,
    )))
}

fn compare_results(
    a: &Side,
    b: &Side,
    store: &Store,
    source: ResultsSource,
) -> Result<ResultsComparison> {
    let ra = results_document(a, store, source)?;
    let rb = results_document(b, store, source)?;
    let diff = match (&ra, &rb) {
        (Ok((_, da)), Ok((_, db))) => Some(diff_results(da, db)),
        _ => None,
    };
    Ok(ResultsComparison {
        stage: source.stage.to_string(),
        output: source.output.to_string(),
        a: ra.map(|(what, _)| what),
        b: rb.map(|(what, _)| what),
        diff,
    })
}

fn diff_results(a: &ResultsDocument, b: &ResultsDocument) -> ResultsDiff {
    let mut diff = ResultsDiff::default();
    for (name, old) in &a.metrics {
        match b.metrics.get(name) {
            None => diff.removed.push((name.clone(), old.clone())),
            Some(new) => {
                diff.compared += 1;
                if new != old {
                    diff.moved.push(MetricMove {
                        name: name.clone(),
                        old: old.clone(),
                        new: new.clone(),
                    });
                }
            }
        }
    }
    for (name, new) in &b.metrics {
        if !a.metrics.contains_key(name) {
            diff.added.push((name.clone(), new.clone()));
        }
    }
    let ours = |c: &ClaimRow| plain(&c.ours);
    for cb in &b.claims {
        let ca = a.claims.iter().find(|c| c.id == cb.id);
        if ca.is_none_or(|ca| ca.verdict != cb.verdict) {
            diff.verdicts.push(VerdictChange {
                id: cb.id.clone(),
                old: ca.map(|c| c.verdict.clone()),
                new: Some(cb.verdict.clone()),
                ours_old: ca.map(ours),
                ours_new: Some(ours(cb)),
            });
        }
    }
    for ca in a
        .claims
        .iter()
        .filter(|ca| !b.claims.iter().any(|cb| cb.id == ca.id))
    {
        diff.verdicts.push(VerdictChange {
            id: ca.id.clone(),
            old: Some(ca.verdict.clone()),
            new: None,
            ours_old: Some(ours(ca)),
            ours_new: None,
        });
    }
    diff
}

/// A JSON value as a reader wants it: strings without quotes, numbers as JSON writes them.
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `x` with an explicit sign, to 6 significant digits (`-1.5625`, `+0.2`, `+0.0000003`).
pub fn signed(x: f64) -> String {
    signed_to(x, 6)
}

/// A relative change in percent, with an explicit sign, to 3 significant digits (`+12.5 %`,
/// `-0.00139 %`: a tiny change does not print as zero).
pub fn percent(x: f64) -> String {
    format!("{} %", signed_to(x * 100.0, 3))
}

/// `x` with an explicit sign, rounded to `digits` significant digits and printed in its
/// shortest form.
fn signed_to(x: f64, digits: usize) -> String {
    let rounded: f64 = format!("{x:.*e}", digits.saturating_sub(1))
        .parse()
        .unwrap_or(x);
    format!("{rounded:+}")
}

/// The first 12 hex digits of a hash or key.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// [`short`], or `absent` for an output a side does not have.
pub fn short_or_absent(hash: &Option<String>) -> &str {
    hash.as_deref().map_or("absent", short)
}

impl Comparison {
    /// Whether the two sides agree on every stage they share and on every number.
    pub fn is_empty(&self) -> bool {
        self.only_a.is_empty()
            && self.only_b.is_empty()
            && self.changed.is_empty()
            && self.uncompared.is_empty()
            && self.results.diff.as_ref().is_none_or(|d| {
                d.moved.is_empty()
                    && d.added.is_empty()
                    && d.removed.is_empty()
                    && d.verdicts.is_empty()
            })
    }

    /// One line: no differences, or how many of each kind.
    pub fn headline(&self) -> String {
        if self.is_empty() {
            return "no differences: the same stages with the same keys, and the same numbers"
                .into();
        }
        let moved = self.results.diff.as_ref().map_or_else(
            || {
                format!(
                    "numbers not compared (a side has no {})",
                    self.results.output
                )
            },
            |d| {
                format!(
                    "{} metric(s) moved, {} claim verdict(s) changed",
                    d.moved.len(),
                    d.verdicts.len()
                )
            },
        );
        format!(
            "{} stage(s) with a new key, {} only in A, {} only in B; {moved}",
            self.changed.len(),
            self.only_a.len(),
            self.only_b.len()
        )
    }

    /// The comparison as plain text (what `repro diff` prints).
    pub fn text(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "A: {}\n   {}", self.a.label, self.a.detail);
        let _ = writeln!(w, "B: {}\n   {}", self.b.label, self.b.detail);
        let _ = writeln!(w, "\n{}\n", self.headline());
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        let _ = writeln!(w, "stages only in A: {}", list(&self.only_a));
        let _ = writeln!(w, "stages only in B: {}", list(&self.only_b));
        let shared = self.changed.len() + self.unchanged.len() + self.uncompared.len();
        let _ = writeln!(
            w,
            "stages in both: {shared}; key changed: {}, same key: {}, not comparable: {}",
            self.changed.len(),
            self.unchanged.len(),
            self.uncompared.len()
        );
        for change in &self.changed {
            let _ = writeln!(
                w,
                "\n{} ({}): key {} -> {}",
                change.name,
                change.kind,
                short(&change.key_a),
                short(&change.key_b)
            );
            match &change.fields {
                Ok(lines) => lines.iter().for_each(|l| {
                    let _ = writeln!(w, "  {l}");
                }),
                Err(why) => {
                    let _ = writeln!(w, "  key fields unknown: {why}");
                }
            }
            match &change.outputs {
                Ok(outputs) => {
                    for (name, ha, hb) in &outputs.changed {
                        let _ = writeln!(
                            w,
                            "  output {name} changed: {} -> {}",
                            short_or_absent(ha),
                            short_or_absent(hb)
                        );
                    }
                    if outputs.changed.is_empty() {
                        let _ = writeln!(
                            w,
                            "  outputs: all {} have the same bytes (early cutoff)",
                            outputs.same.len()
                        );
                    } else if !outputs.same.is_empty() {
                        let _ = writeln!(
                            w,
                            "  outputs with the same bytes: {}",
                            outputs.same_summary()
                        );
                    }
                }
                Err(why) => {
                    let _ = writeln!(w, "  outputs not compared: {why}");
                }
            }
        }
        if !self.uncompared.is_empty() {
            let _ = writeln!(w, "\nnot comparable:");
            for (name, why) in &self.uncompared {
                let _ = writeln!(w, "  {name}: {why}");
            }
        }
        self.results_text(w);
        out
    }

    fn results_text(&self, w: &mut String) {
        let r = &self.results;
        let _ = writeln!(w, "\n{} of stage {}:", r.output, r.stage);
        for (side, what) in [("A", &r.a), ("B", &r.b)] {
            match what {
                Ok(what) => {
                    let _ = writeln!(w, "  {side}: {what}");
                }
                Err(why) => {
                    let _ = writeln!(w, "  {side}: none: {why}");
                }
            }
        }
        let Some(d) = &r.diff else {
            let _ = writeln!(w, "  numbers not compared: a side has no {}", r.output);
            return;
        };
        let _ = writeln!(
            w,
            "  metrics moved: {} of {} on both sides",
            d.moved.len(),
            d.compared
        );
        let width = d.moved.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in &d.moved {
            let change = match (m.absolute(), m.relative()) {
                (Some(abs), Some(rel)) => format!("  ({}, {})", signed(abs), percent(rel)),
                (Some(abs), None) => format!("  ({}, from 0)", signed(abs)),
                _ => String::new(),
            };
            let _ = writeln!(
                w,
                "    {:<width$}  {} -> {}{change}",
                m.name,
                plain(&m.old),
                plain(&m.new)
            );
        }
        for (what, list) in [("added", &d.added), ("removed", &d.removed)] {
            if !list.is_empty() {
                let _ = writeln!(w, "  metrics {what}: {}", list.len());
                for (name, value) in list {
                    let _ = writeln!(w, "    {name} = {}", plain(value));
                }
            }
        }
        let _ = writeln!(w, "  claims with a different verdict: {}", d.verdicts.len());
        for v in &d.verdicts {
            let _ = writeln!(w, "    {}", verdict_line(v));
        }
    }
}

/// `C2: fail -> pass (ours 4.26 -> 0.31)`, `C16: absent -> pass (ours 1.2)`.
pub fn verdict_line(v: &VerdictChange) -> String {
    let or_absent = |s: &Option<String>| s.clone().unwrap_or_else(|| "absent".into());
    let ours = match (&v.ours_old, &v.ours_new) {
        (Some(a), Some(b)) => format!("ours {a} -> {b}"),
        (Some(a), None) => format!("ours was {a}"),
        (None, Some(b)) => format!("ours {b}"),
        (None, None) => String::new(),
    };
    format!(
        "{}: {} -> {} ({ours})",
        v.id,
        or_absent(&v.old),
        or_absent(&v.new)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_rounds_to_six_significant_digits_and_keeps_the_sign() {
        assert_eq!(signed(-1.5625), "-1.5625");
        assert_eq!(signed(0.1 + 0.2 - 0.1), "+0.2");
        assert_eq!(signed(3e-7), "+0.0000003");
        assert_eq!(signed(2.0), "+2");
        assert_eq!(percent(-0.0000139), "-0.00139 %");
        assert_eq!(percent(0.125), "+12.5 %");
    }

    #[test]
    fn steps_back_reads_last_and_last_tilde_n_only() {
        assert_eq!(steps_back("last"), Some(0));
        assert_eq!(steps_back("last~2"), Some(2));
        assert_eq!(steps_back("last~"), None);
        assert_eq!(steps_back("lastly"), None);
        assert_eq!(steps_back("20261203T1753"), None);
    }

    fn document(json: &str) -> ResultsDocument {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn results_diff_lists_moved_added_removed_metrics_and_new_verdicts() {
        let a = document(
            r#"{"metrics": {"x": 1.0, "y": 2.0, "gone": 3.0},
                "claims": [{"id": "C1", "verdict": "pass", "ours": "1.0"},
                           {"id": "C2", "verdict": "fail", "ours": "5"}]}"#,
        );
        let b = document(
            r#"{"metrics": {"x": 1.0, "y": 2.5, "new": 4.0},
                "claims": [{"id": "C1", "verdict": "fail", "ours": "1.5"},
                           {"id": "C2", "verdict": "fail", "ours": "6"}]}"#,
        );
        let d = diff_results(&a, &b);
        assert_eq!(d.compared, 2);
        assert_eq!(
            d.moved,
            vec![MetricMove {
                name: "y".into(),
                old: 2.0.into(),
                new: 2.5.into()
            }]
        );
        assert_eq!(d.moved[0].absolute(), Some(0.5));
        assert_eq!(d.moved[0].relative(), Some(0.25));
        assert_eq!(d.added, vec![("new".to_string(), Value::from(4.0))]);
        assert_eq!(d.removed, vec![("gone".to_string(), Value::from(3.0))]);
        assert_eq!(d.verdicts.len(), 1, "C2's verdict did not change");
        assert_eq!(
            verdict_line(&d.verdicts[0]),
            "C1: pass -> fail (ours 1.0 -> 1.5)"
        );
    }

    #[test]
    fn a_relative_change_from_zero_is_none_not_infinity() {
        let m = MetricMove {
            name: "z".into(),
            old: 0.0.into(),
            new: 1.0.into(),
        };
        assert_eq!(m.absolute(), Some(1.0));
        assert_eq!(m.relative(), None);
    }
}
