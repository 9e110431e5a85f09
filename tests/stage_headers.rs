//! Stage headers tell the truth about the paper's claims: each stage file's `//! Claims:` line
//! lists exactly the claims that `paper/claims.toml` says a stage of that kind measures
//! (`measured_by`, through the stage names in `pipeline/pipeline.toml`), and every claim id a
//! header mentions exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// (kind, the file's `//!` header) of every stage file.
fn stage_headers() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo().join("src/stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs") && p.file_stem().unwrap() != "mod")
        .map(|p| {
            let header: String = std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| format!("{l}\n"))
                .collect();
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                header,
            )
        })
        .collect();
    out.sort();
    out
}

/// Claim ids (`C` and digits, as whole words) in a text.
fn claim_ids(text: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('C') {
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            continue;
        }
        let digits: String = text[i + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let after = text[i + 1 + digits.len()..].chars().next();
        if !digits.is_empty() && !after.is_some_and(|c| c.is_ascii_alphanumeric()) {
            ids.insert(format!("C{digits}"));
        }
    }
    ids
}

/// The ids on a header's `//! Claims:` line (`none` for none).
fn declared_claims(header: &str) -> Option<BTreeSet<String>> {
    header
        .lines()
        .find_map(|l| l.strip_prefix("//! Claims:"))
        .map(claim_ids)
}

/// Stage name → kind, over every stage of pipeline.toml (all profiles).
fn stage_kinds() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("pipeline/pipeline.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    doc["stage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_stage_header_claims_exactly_what_claims_toml_says_it_measures() {
    let claims = repro::report::read_claims(&repo().join("paper/claims.toml")).unwrap();
    let kinds = stage_kinds();
    let mut measured: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for claim in &claims {
        for stage in claim
            .measured_by
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let kind = kinds.get(stage).unwrap_or_else(|| {
                panic!("claims.toml: {} is measured_by {stage:?}, which pipeline.toml does not declare", claim.id)
            });
            measured
                .entry(kind.clone())
                .or_default()
                .insert(claim.id.clone());
        }
    }
    let known: BTreeSet<String> = claims.iter().map(|c| c.id.clone()).collect();
    for (kind, header) in stage_headers() {
        let declared = declared_claims(&header)
            .unwrap_or_else(|| panic!("src/stages/{kind}.rs has no `//! Claims:` line"));
        let expected = measured.get(&kind).cloned().unwrap_or_default();
        assert_eq!(
            declared, expected,
            "src/stages/{kind}.rs: its `//! Claims:` line does not match the claims that paper/claims.toml's measured_by gives to its stages"
        );
        for id in claim_ids(&header) {
            assert!(
                known.contains(&id),
                "src/stages/{kind}.rs cites {id}, which paper/claims.toml does not have"
            );
        }
    }
}

#[test]
fn the_claim_scanner_reads_whole_ids_only() {
    assert_eq!(
        claim_ids("claims C1, C11 (C2). CE; C3x; aC4; C"),
        BTreeSet::from(["C1".to_string(), "C11".to_string(), "C2".to_string()])
    );
    assert_eq!(
        declared_claims("//! text C9\n//! Claims: none\n"),
        Some(BTreeSet::new())
    );
}
