//! The report: the paper's claims file, literate section texts (markdown) and strict tera
//! rendering of `paper/templates/` into one HTML page. Figure writers join this module as
//! the stages that need them arrive. Nothing here knows the engine: the report stage turns
//! manifests into [`Provenance`] rows and calls [`render`].

pub mod figures;

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
    /// How the claim is judged, per profile (profiles without a rule show the number only).
    #[serde(default)]
    pub rules: BTreeMap<String, Rule>,
}

/// A check of one measured number: `at_most`, `at_least`, or `near` ± `within`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `stage.field` of a number some stage published (e.g. `eval_ce.test_error`).
    pub metric: String,
    pub at_most: Option<f64>,
    pub at_least: Option<f64>,
    pub near: Option<f64>,
    pub within: Option<f64>,
}

impl Rule {
    fn holds(&self, value: f64) -> bool {
        self.at_most.is_none_or(|m| value <= m)
            && self.at_least.is_none_or(|m| value >= m)
            && self
                .near
                .is_none_or(|n| (value - n).abs() <= self.within.unwrap_or(0.0))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.at_most {
            parts.push(format!("{} ≤ {m}", self.metric));
        }
        if let Some(m) = self.at_least {
            parts.push(format!("{} ≥ {m}", self.metric));
        }
        if let Some(n) = self.near {
            parts.push(format!(
                "{} = {n} ± {}",
                self.metric,
                self.within.unwrap_or(0.0)
            ));
        }
        parts.join(" and ")
    }
}

/// A claim's verdict on one profile: the measured value (if any), the verdict and why.
pub fn judge(
    claim: &Claim,
    profile: &str,
    metrics: &BTreeMap<String, f64>,
) -> (Option<f64>, Verdict, String) {
    let rule = claim.rules.get(profile);
    let metric = rule
        .or_else(|| claim.rules.values().next())
        .map(|r| r.metric.clone());
    let value = metric.as_ref().and_then(|m| metrics.get(m).copied());
    match (rule, value) {
        (Some(rule), Some(v)) => {
            let verdict = if rule.holds(v) {
                Verdict::Pass
            } else {
                Verdict::Fail
            };
            (
                Some(v),
                verdict,
                format!("rule on {profile}: {}", rule.describe()),
            )
        }
        (Some(rule), None) => (
            None,
            Verdict::NotRun,
            format!("{} was not measured in this run", rule.metric),
        ),
        (None, Some(v)) => (
            Some(v),
            Verdict::NotJudged,
            format!("no rule for the {profile} profile"),
        ),
        (None, None) if claim.measured_by.is_empty() => {
            (None, Verdict::NotRun, "no stage measures this yet".into())
        }
        (None, None) => (
            None,
            Verdict::NotRun,
            format!("measured by {}; not run here", claim.measured_by),
        ),
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
    /// Measured, but the claim has no rule for this profile (e.g. `smoke`).
    NotJudged,
    NotRun,
}

/// Where a number came from: the stage, its key, its params and how it ran.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub stage: String,
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
    /// The stage whose `evaluation.json` / `ensemble.json` fills the row; empty for a row that
    /// only quotes the paper.
    #[serde(default)]
    pub stage: String,
    pub label: String,
    /// The paper's % error, where it reports one.
    pub paper_test: Option<f64>,
    pub paper_train: Option<f64>,
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
        let text = format!("id = \"C1\"\nstatement = \"s\"\npaper_value = \"0.39\"\ntolerance = \"t\"\nprofiles = [\"cpu\"]\nsource = \"x\"\nmeasured_by = \"eval_ce\"\n{rules}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn rules_pass_fail_and_say_when_nothing_was_measured() {
        let c = claim("[rules]\ncpu = { metric = \"eval_ce.test_error\", at_most = 1.5 }\npaper = { metric = \"eval_ce.test_error\", near = 0.39, within = 0.2 }\n");
        let metrics = BTreeMap::from([("eval_ce.test_error".to_string(), 1.2)]);
        assert_eq!(judge(&c, "cpu", &metrics).1, Verdict::Pass);
        assert_eq!(judge(&c, "paper", &metrics).1, Verdict::Fail);
        assert_eq!(judge(&c, "smoke", &metrics).1, Verdict::NotJudged);
        assert_eq!(judge(&c, "cpu", &BTreeMap::new()).1, Verdict::NotRun);
        let worse = BTreeMap::from([("eval_ce.test_error".to_string(), 1.6)]);
        assert_eq!(judge(&c, "cpu", &worse).1, Verdict::Fail);
    }
}
