//! The report as a reviewer relies on it: rendering is strict (an undefined value fails, never
//! prints blank), every claim of `paper/claims.toml` is in the page and in `results.json` with
//! a link to a section that exists, and every provenance block names a manifest and objects
//! that are in the store (and, after `export-all`, files that its links reach).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::Sandbox;
use serde_json::Value;

#[test]
fn rendering_an_undefined_value_fails_naming_the_template_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("page.html.tera"),
        "<p>{{ defined }}</p>\n<p>{{ claims.C2.ours }}</p>\n",
    )
    .unwrap();
    let context = serde_json::json!({ "defined": 1, "claims": { "C1": { "ours": "1.25" } } });
    let error = repro::report::render(dir.path(), "page.html.tera", &context)
        .expect_err("an undefined value must fail the render")
        .to_string();
    assert!(error.contains("page.html.tera"), "{error}");
    assert!(error.contains("claims.C2"), "{error}");
    // The same template renders once the value exists: the failure was the missing value.
    let complete = serde_json::json!({ "defined": 1, "claims": { "C2": { "ours": "4.18" } } });
    let html = repro::report::render(dir.path(), "page.html.tera", &complete).unwrap();
    assert!(html.contains("4.18"));
}

/// Every value of `attribute="…"` in `html`, unescaped as a browser reads it (tera escapes
/// `/` as `&#x2F;`).
fn attribute_values(html: &str, attribute: &str) -> Vec<String> {
    let needle = format!(" {attribute}=\"");
    html.match_indices(&needle)
        .map(|(i, _)| {
            let rest = &html[i + needle.len()..];
            rest[..rest.find('"').unwrap()]
                .replace("&#x2F;", "/")
                .replace("&amp;", "&")
        })
        .collect()
}

#[test]
fn every_claim_is_in_the_page_and_results_and_every_provenance_names_stored_objects() {
    let sb = Sandbox::new();
    sb.ok(&["reproduce"]);
    sb.ok(&["export-all"]);
    let html = std::fs::read_to_string(sb.path("artifacts/report/index.html")).unwrap();
    let results: Value =
        serde_json::from_slice(&std::fs::read(sb.path("artifacts/report/results.json")).unwrap())
            .unwrap();
    let claims = repro::report::read_claims(&sb.path("paper/claims.toml")).unwrap();
    assert!(claims.len() >= 15);
    let ids_in_page: BTreeSet<String> = attribute_values(&html, "id").into_iter().collect();
    let in_results: Vec<&Value> = results["claims"].as_array().unwrap().iter().collect();
    for claim in &claims {
        assert!(
            ids_in_page.contains(&format!("claim-{}", claim.id)),
            "claim {} has no row in the claims table",
            claim.id
        );
        assert!(
            ids_in_page.contains(&claim.section),
            "claim {} links to section #{}, which the page lacks",
            claim.id,
            claim.section
        );
        let row = in_results
            .iter()
            .find(|c| c["id"] == claim.id.as_str())
            .unwrap_or_else(|| panic!("results.json lacks claim {}", claim.id));
        for field in [
            "statement",
            "paper_value",
            "ours",
            "rule",
            "verdict",
            "note",
            "section",
        ] {
            assert!(
                row[field].is_string(),
                "claim {}: no {field} in results.json",
                claim.id
            );
        }
    }
    // The summary paragraph counts what the table shows.
    let summary = results["summary"]["sentence"].as_str().unwrap();
    assert!(
        summary.contains(&format!("of {} claims pass", claims.len())),
        "{summary}"
    );
    assert!(html.contains(summary), "the page shows the summary");

    // Provenance: every block's key is a manifest in the store, every object it names exists
    // and has the bytes its name promises, and every output link reaches an exported file.
    let store = sb.path("artifacts/store");
    let keys = attribute_values(&html, "data-key");
    assert!(keys.len() > 20, "only {} provenance blocks", keys.len());
    for key in &keys {
        assert!(
            store
                .join("manifests")
                .join(format!("{key}.json"))
                .is_file(),
            "provenance names key {key}, which has no manifest in the store"
        );
    }
    let objects: BTreeSet<String> = attribute_values(&html, "data-object").into_iter().collect();
    assert!(
        objects.len() > keys.len(),
        "every block names its log and outputs"
    );
    for object in &objects {
        let path = store.join("objects").join(object);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|_| panic!("provenance names object {object}, not in the store"));
        assert_eq!(&sha256_hex(&bytes), object, "object {object} is corrupt");
    }
    let report_dir = sb.path("artifacts/report");
    let links: Vec<String> = attribute_values(&html, "href")
        .into_iter()
        .filter(|l| l.starts_with("../exports/"))
        .collect();
    assert!(!links.is_empty());
    for link in &links {
        assert!(
            report_dir.join(link).is_file(),
            "provenance links {link}, which export-all did not write"
        );
    }
    // Every local link and image of the page resolves (logs, figures).
    for link in attribute_values(&html, "src")
        .into_iter()
        .chain(attribute_values(&html, "href"))
        .filter(|l| !l.starts_with('#') && !l.starts_with("../exports/"))
    {
        assert!(
            !link.contains("://"),
            "the report must need no network: {link}"
        );
        assert!(
            Path::new(&report_dir.join(&link)).is_file(),
            "{link} is missing"
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
