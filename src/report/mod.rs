//! The report: the paper's claims file, literate section texts (markdown) and strict tera
//! rendering of `paper/templates/` into one HTML page. Figure writers join this module as
//! the stages that need them arrive. Nothing here knows the engine: the report stage turns
//! manifests into [`Provenance`] rows and calls [`render`].

pub mod architecture;
pub mod figures;
pub mod images;
pub mod information_chart;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One claim of the paper as `paper/claims.toml` states it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub id: String,
    pub statement: String,
    /// The paper's number, or "qualitative".
    pub paper_value: String,
    /// How close ours must be to count as reproduced, in words a reviewer can check.
    pub tolerance: String,
    /// Profiles on which the claim is judged (others show the number without a verdict).
    pub profiles: Vec<String>,
    /// Where in the paper (section, table, figure).
    pub source: String,
    /// Which stage(s) will measure it; empty until one exists.
    #[serde(default)]
    pub measured_by: String,
    /// The report section (HTML anchor) holding the claim's evidence.
    pub section: String,
    /// `%` when the rule's metrics are percentages: differences then print in points.
    #[serde(default)]
    pub unit: Option<String>,
    /// Why no stage can measure it here (shown with "not run").
    #[serde(default)]
    pub not_run: Option<String>,
    /// How the claim is judged, per profile (profiles without a rule show the number only).
    #[serde(default)]
    pub rules: BTreeMap<String, Rules>,
}

/// One rule, or several that must all hold (e.g. "CE metamers look like B *and* iCE metamers
/// look like A").
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Rules {
    One(Rule),
    All(Vec<Rule>),
}

impl Rules {
    fn all(&self) -> &[Rule] {
        match self {
            Rules::One(rule) => std::slice::from_ref(rule),
            Rules::All(rules) => rules,
        }
    }
}

/// A check of one measured quantity: `metric`, optionally `minus` or `over` a second metric
/// (a difference or a ratio, for claims about directions), against `at_most`, `at_least`,
/// `above` (strictly), or `near` ± `within`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `stage.field` of a number some stage published (e.g. `eval_ce.test_error`; nested
    /// JSON fields are joined with dots: `probe_ce.views.z_n.test.error`).
    pub metric: String,
    pub minus: Option<String>,
    pub over: Option<String>,
    pub at_most: Option<f64>,
    pub at_least: Option<f64>,
    pub above: Option<f64>,
    pub near: Option<f64>,
    pub within: Option<f64>,
}

impl Rule {
    /// The quantity the rule checks, when every metric it reads was measured.
    fn value(&self, metrics: &BTreeMap<String, f64>) -> Option<f64> {
        let v = *metrics.get(&self.metric)?;
        Some(match (&self.minus, &self.over) {
            (Some(m), _) => v - metrics.get(m)?,
            (None, Some(o)) => v / metrics.get(o)?,
            (None, None) => v,
        })
    }

    /// The measured quantity with its parts, as a reader checks it: `5.62 % vs 1.44 %
    /// (+4.18 pt)` for a difference, `4.30 % / 1.24 % = 3.47×` for a ratio.
    fn display(&self, metrics: &BTreeMap<String, f64>, unit: Option<&str>) -> Option<String> {
        let v = *metrics.get(&self.metric)?;
        let percent = unit == Some("%");
        let with_unit = |x: f64| {
            if percent {
                format!("{} %", number(x))
            } else {
                number(x)
            }
        };
        Some(match (&self.minus, &self.over) {
            (Some(m), _) => {
                let w = *metrics.get(m)?;
                let sign = if v - w >= 0.0 { "+" } else { "−" };
                let points = if percent { " pt" } else { "" };
                format!(
                    "{} vs {} ({sign}{}{points})",
                    with_unit(v),
                    with_unit(w),
                    number((v - w).abs())
                )
            }
            (None, Some(o)) => {
                let w = *metrics.get(o)?;
                format!("{} / {} = {}×", with_unit(v), with_unit(w), number(v / w))
            }
            (None, None) => with_unit(v),
        })
    }

    fn holds(&self, value: f64) -> bool {
        self.at_most.is_none_or(|m| value <= m)
            && self.at_least.is_none_or(|m| value >= m)
            && self.above.is_none_or(|m| value > m)
            && self
                .near
                .is_none_or(|n| (value - n).abs() <= self.within.unwrap_or(0.0))
    }

    fn quantity(&self) -> String {
        match (&self.minus, &self.over) {
            (Some(m), _) => format!("{} − {m}", self.metric),
            (None, Some(o)) => format!("{} / {o}", self.metric),
            (None, None) => self.metric.clone(),
        }
    }

    fn metrics(&self) -> Vec<&str> {
        std::iter::once(self.metric.as_str())
            .chain(self.minus.as_deref())
            .chain(self.over.as_deref())
            .collect()
    }

    fn describe(&self) -> String {
        let q = self.quantity();
        let mut parts = Vec::new();
        if let Some(m) = self.at_most {
            parts.push(format!("{q} ≤ {m}"));
        }
        if let Some(m) = self.at_least {
            parts.push(format!("{q} ≥ {m}"));
        }
        if let Some(m) = self.above {
            parts.push(format!("{q} > {m}"));
        }
        if let Some(n) = self.near {
            parts.push(format!("{q} = {n} ± {}", self.within.unwrap_or(0.0)));
        }
        parts.join(" and ")
    }
}

/// Two decimals for percentages and the like; scientific notation for tiny numbers (float
/// errors), so that 4.8e-7 does not print as 0.00.
pub fn number(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.2}")
    }
}

/// A claim judged on one profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// The measured quantity of each rule (empty when not measured).
    pub values: Vec<f64>,
    /// Each rule's quantity with its parts, as printed (see [`Rule::display`]).
    pub shown: Vec<String>,
    pub verdict: Verdict,
    /// The rule in words, or why there is no verdict.
    pub note: String,
}

/// A claim's verdict on one profile: the measured quantities (one per rule), the verdict and
/// why.
pub fn judge(claim: &Claim, profile: &str, metrics: &BTreeMap<String, f64>) -> Judgement {
    let rules = claim.rules.get(profile);
    let shown_rules = rules.or_else(|| claim.rules.values().next());
    let unit = claim.unit.as_deref();
    let measured: Option<Vec<(f64, String)>> = shown_rules.map(|r| {
        r.all()
            .iter()
            .filter_map(|rule| Some((rule.value(metrics)?, rule.display(metrics, unit)?)))
            .collect()
    });
    let complete =
        shown_rules.is_some_and(|r| measured.as_ref().is_some_and(|v| v.len() == r.all().len()));
    let (values, shown): (Vec<f64>, Vec<String>) = measured.unwrap_or_default().into_iter().unzip();
    let judgement = |verdict, note: String, measured: bool| Judgement {
        values: if measured { values.clone() } else { Vec::new() },
        shown: if measured { shown.clone() } else { Vec::new() },
        verdict,
        note,
    };
    match (rules, complete) {
        (Some(rules), true) => {
            let verdict = if rules.all().iter().zip(&values).all(|(r, &v)| r.holds(v)) {
                Verdict::Pass
            } else {
                Verdict::Fail
            };
            let described: Vec<String> = rules.all().iter().map(Rule::describe).collect();
            judgement(
                verdict,
                format!("rule on {profile}: {}", described.join("; ")),
                true,
            )
        }
        (Some(rules), false) => {
            let missing: Vec<&str> = rules
                .all()
                .iter()
                .flat_map(Rule::metrics)
                .filter(|m| !metrics.contains_key(*m))
                .collect();
            judgement(
                Verdict::NotRun,
                format!("{} not measured in this run", missing.join(", ")),
                false,
            )
        }
        // Measured where the paper only shows figures: the reader judges the figure.
        (None, true) if claim.paper_value.starts_with("qualitative") => judgement(
            Verdict::Qualitative,
            format!("no rule for the {profile} profile: judge the figure"),
            true,
        ),
        (None, true) => judgement(
            Verdict::NotJudged,
            format!("no rule for the {profile} profile"),
            true,
        ),
        (None, false) => {
            let note = match (&claim.not_run, claim.measured_by.is_empty()) {
                (Some(reason), _) => reason.clone(),
                (None, true) => "no stage measures this yet".into(),
                (None, false) => format!("measured by {}; not run here", claim.measured_by),
            };
            judgement(Verdict::NotRun, note, false)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsFile {
    claim: Vec<Claim>,
}

/// Reads `claims.toml`; errors name the file and the TOML location.
pub fn read_claims(path: &Path) -> Result<Vec<Claim>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ClaimsFile =
        toml::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    let mut seen = std::collections::BTreeSet::new();
    for claim in &file.claim {
        anyhow::ensure!(
            seen.insert(claim.id.clone()),
            "{}: claim {} is listed twice",
            path.display(),
            claim.id
        );
    }
    Ok(file.claim)
}

/// A claim's verdict as the report prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// Measured, but the claim has no rule for this profile (e.g. `smoke`) and the paper
    /// only shows figures: the reader judges them.
    Qualitative,
    /// Measured, but the claim has no rule for this profile.
    NotJudged,
    NotRun,
}

/// Where a number came from: the stage, its key, its params, how it ran and the objects it
/// published.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub stage: String,
    pub kind: String,
    /// The full stage key (the store's manifest name) and its first 12 hex digits.
    pub key: String,
    pub key_prefix: String,
    pub params: BTreeMap<String, String>,
    pub code_fingerprint_prefix: String,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub started_utc: String,
    pub wall_seconds: String,
    /// Relative link to the stage's log inside the report directory.
    pub log: String,
    /// The store object holding the log.
    pub log_object: String,
    pub threads: usize,
    /// What the stage published, each with its store object and its link among the exported
    /// outputs (`repro export-all`).
    pub outputs: Vec<ProvenanceOutput>,
}

/// One published output of a stage.
#[derive(Clone, Debug, Serialize)]
pub struct ProvenanceOutput {
    pub name: String,
    pub bytes: u64,
    /// SHA-256 of the bytes: the object's name in the store.
    pub object: String,
    /// Relative link from the report directory to the exported file.
    pub link: String,
}

/// Text for an SVG `<text>` element (the report's own figures).
pub fn svg_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Markdown to HTML (the literate texts under `paper/text/`).
pub fn markdown(text: &str) -> String {
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, pulldown_cmark::Parser::new(text));
    html
}

/// Renders `template` from the templates directory with `context`. Strict: an undefined
/// variable is an error naming the template, so a missing number cannot render as blank.
pub fn render(templates: &Path, template: &str, context: &serde_json::Value) -> Result<String> {
    let glob = format!("{}/**/*.tera", templates.display());
    let mut tera = tera::Tera::new(&glob)
        .with_context(|| format!("loading templates from {}", templates.display()))?;
    tera.autoescape_on(vec![".html.tera"]);
    let context = tera::Context::from_value(context.clone())
        .context("report context must be a JSON object")?;
    tera.render(template, &context).map_err(|e| {
        // tera hides the useful part in the error's source chain.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        anyhow::anyhow!("rendering {}/{template}: {message}", templates.display())
    })
}

/// Rows of the paper's tables that our stages fill (`paper/tables.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tables {
    pub accuracy: Vec<AccuracyRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyRow {
    /// The stage whose `evaluation.json` / `ensemble.json` / `probe.json` fills the row; empty
    /// for a row that only quotes the paper.
    #[serde(default)]
    pub stage: String,
    /// The fields read (below the stage), by default `test_error` / `train_error`; empty =
    /// not measured for this row (shown as such). A named field the stage did not publish is
    /// an error.
    #[serde(default = "default_test_metric")]
    pub test_metric: String,
    #[serde(default = "default_train_metric")]
    pub train_metric: String,
    /// The field holding the number of test / train examples (default `n_test` / `n_train`).
    #[serde(default = "default_n_test")]
    pub n_test_metric: String,
    #[serde(default = "default_n_train")]
    pub n_train_metric: String,
    /// Which table the row belongs to (`table2`, `baselines`, `imagenet` (Table 1 as quoted),
    /// `fashion` (our Table 1 analogue)).
    #[serde(default = "default_group")]
    pub group: String,
    /// A short protocol note shown under the table for this row.
    #[serde(default)]
    pub note: String,
    pub label: String,
    /// The paper's % error, where it reports one.
    pub paper_test: Option<f64>,
    pub paper_train: Option<f64>,
    /// The paper's top-5 % error (Table 1's ImageNet rows only).
    #[serde(default)]
    pub paper_top5: Option<f64>,
}

fn default_test_metric() -> String {
    "test_error".into()
}
fn default_train_metric() -> String {
    "train_error".into()
}
fn default_n_test() -> String {
    "n_test".into()
}
fn default_n_train() -> String {
    "n_train".into()
}
fn default_group() -> String {
    "table2".into()
}

pub fn read_tables(path: &Path) -> Result<Tables> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(rules: &str) -> Claim {
        let text = format!("id = \"C1\"\nsection = \"table2\"\nunit = \"%\"\nstatement = \"s\"\npaper_value = \"0.39\"\ntolerance = \"t\"\nprofiles = [\"cpu\"]\nsource = \"x\"\nmeasured_by = \"eval_ce\"\n{rules}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn rules_pass_fail_and_say_when_nothing_was_measured() {
        let c = claim("[rules]\ncpu = { metric = \"eval_ce.test_error\", at_most = 1.5 }\npaper = { metric = \"eval_ce.test_error\", near = 0.39, within = 0.2 }\n");
        let metrics = BTreeMap::from([("eval_ce.test_error".to_string(), 1.2)]);
        assert_eq!(judge(&c, "cpu", &metrics).verdict, Verdict::Pass);
        assert_eq!(judge(&c, "paper", &metrics).verdict, Verdict::Fail);
        assert_eq!(judge(&c, "smoke", &metrics).verdict, Verdict::NotJudged);
        assert_eq!(judge(&c, "cpu", &BTreeMap::new()).verdict, Verdict::NotRun);
        let worse = BTreeMap::from([("eval_ce.test_error".to_string(), 1.6)]);
        assert_eq!(judge(&c, "cpu", &worse).verdict, Verdict::Fail);
        assert_eq!(judge(&c, "cpu", &worse).shown, vec!["1.60 %".to_string()]);
    }

    #[test]
    fn compound_rules_need_every_part_and_read_differences_and_ratios() {
        let c = claim("[rules]\ncpu = [{ metric = \"a.x\", minus = \"b.x\", above = 0.0 }, { metric = \"a.y\", over = \"b.y\", at_least = 10.0 }]\n");
        let m = |ax: f64, bx: f64, ay: f64, by: f64| {
            BTreeMap::from([
                ("a.x".to_string(), ax),
                ("b.x".to_string(), bx),
                ("a.y".to_string(), ay),
                ("b.y".to_string(), by),
            ])
        };
        let judged = judge(&c, "cpu", &m(0.6, 0.2, 30.0, 2.0));
        assert_eq!(judged.verdict, Verdict::Pass);
        let values = &judged.values;
        assert!((values[0] - 0.4).abs() < 1e-12 && (values[1] - 15.0).abs() < 1e-12);
        // A compound claim shows its parts, not only the difference or the ratio.
        assert_eq!(
            judged.shown,
            vec!["0.60 % vs 0.20 % (+0.40 pt)", "30.00 % / 2.00 % = 15.00×"]
        );
        // A tie is not "more often": `above` is strict.
        assert_eq!(
            judge(&c, "cpu", &m(0.2, 0.2, 30.0, 2.0)).verdict,
            Verdict::Fail
        );
        assert_eq!(
            judge(&c, "cpu", &m(0.6, 0.2, 10.0, 2.0)).verdict,
            Verdict::Fail
        );
        let mut partial = m(0.6, 0.2, 30.0, 2.0);
        partial.remove("b.y");
        let judged = judge(&c, "cpu", &partial);
        assert_eq!(judged.verdict, Verdict::NotRun);
        assert!(judged.note.contains("b.y"), "{}", judged.note);
    }
}
