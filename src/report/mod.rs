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
    Qualitative,
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
