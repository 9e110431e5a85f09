//! The smoke report in a real, headless Chromium (driven by python/browser_check.py, which keeps
//! it off the network): no console errors, no request that is not a local file, no broken
//! image, a claims table with a row for every claim of paper/claims.toml, no sideways scrolling
//! at a phone's width, and under 20 MB. A page built to break each check shows that the checks
//! can fail (and that a page's request to the internet ends at the checker's proxy on
//! 127.0.0.1); a clean page shows that they can pass.
//!
//! Chromium is /usr/bin/chromium or $REPRO_CHROMIUM; where it is not installed both tests print
//! "skipped: ..." and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Sandbox;
use serde_json::Value;

/// The report must stay small enough to mail and to keep in a repository.
const MAX_REPORT_BYTES: u64 = 20 * 1024 * 1024;

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REPRO_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "REPRO_CHROMIUM={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let path = PathBuf::from("/usr/bin/chromium");
    path.is_file().then_some(path)
}

/// Runs the checker on `page` and returns its findings (it must have run the browser).
fn check(chromium: &Path, page: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/browser_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(page)
        .arg("--chromium")
        .arg(chromium)
        // The 60 s default is for a quiet machine; tests share the cores with each other.
        .args(["--timeout", "180"])
        .output()
        .expect("running python3 (needed for the browser test)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser_check.py on {} failed ({}):\n{stderr}",
        page.display(),
        out.status
    );
    let findings: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "browser_check.py printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!(
        "browser_check.py on {}:\n{}",
        page.display(),
        serde_json::to_string_pretty(&findings).unwrap()
    );
    findings
}

fn list(findings: &Value, pointer: &str) -> Vec<Value> {
    findings
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("the findings lack {pointer}"))
        .clone()
}

/// Sums the sizes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = std::fs::metadata(entry.path()).unwrap();
            if meta.is_dir() {
                dir_bytes(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// What is wrong with the findings for a report that should show `claim_ids`; empty when all
/// is well.
fn problems(findings: &Value, claim_ids: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for error in list(findings, "/console_errors") {
        problems.push(format!(
            "console error ({}): {} at {}",
            error["source"], error["text"], error["url"]
        ));
    }
    for request in list(findings, "/network_requests") {
        problems.push(format!(
            "the report requests {} (outcome {}); it must need no network",
            request["url"], request["outcome"]
        ));
    }
    for image in list(findings, "/images/broken") {
        problems.push(format!(
            "broken image {} (complete {}, naturalWidth {})",
            image["src"], image["complete"], image["naturalWidth"]
        ));
    }
    let table = &findings["claims_table"];
    if table["found"] != true {
        problems.push(match table["tag"].as_str() {
            Some(tag) => format!(r#"id="claims-table" is on a <{tag}>, not a <table>"#),
            None => r#"no <table id="claims-table"> in the report"#.into(),
        });
    } else if table["rows"].as_u64().unwrap_or(0) == 0 {
        problems.push("the claims table has no rows".into());
    }
    let shown: Vec<String> = list(findings, "/claims_table/claim_ids")
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&str> = claim_ids
        .iter()
        .filter(|id| !shown.contains(id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            r#"the claims table has no <tr id="claim-ID"> row for {} (rows for: {shown:?})"#,
            missing.join(", ")
        ));
    }
    let phone = &findings["phone"];
    if phone["overflows"] != false {
        let hint = if phone["viewport_meta"] == true {
            String::new()
        } else {
            r#" (no <meta name="viewport" content="width=device-width">)"#.to_string()
        };
        let sticking: Vec<String> = list(findings, "/phone/sticking_out")
            .iter()
            .take(5)
            .map(|e| {
                let under = e["under"].as_str().unwrap_or("the top of the page");
                format!("<{}> under {under:?}", e["element"].as_str().unwrap_or("?"))
            })
            .collect();
        problems.push(format!(
            "at a phone's {} px the page is {} px wide{hint}; sticking out: {}",
            phone["width"],
            phone["scroll_width"],
            sticking.join(", ")
        ));
    }
    problems
}

#[test]
fn smoke_report_renders_cleanly_in_chromium() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let sb = Sandbox::new();
    sb.ok(&["--profile", "smoke", "reproduce"]);
    let report = sb.path("artifacts/report");
    let findings = check(&chromium, &report.join("index.html"));

    let claims = repro::report::read_claims(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("paper/claims.toml"),
    )
    .unwrap();
    let ids: Vec<String> = claims.into_iter().map(|c| c.id).collect();
    assert!(!ids.is_empty(), "paper/claims.toml lists no claims");
    let mut problems = problems(&findings, &ids);
    let bytes = dir_bytes(&report);
    if bytes > MAX_REPORT_BYTES {
        problems.push(format!(
            "{} holds {:.1} MB (limit {} MB)",
            report.display(),
            bytes as f64 / 1e6,
            MAX_REPORT_BYTES / (1024 * 1024)
        ));
    }
    assert!(
        problems.is_empty(),
        "the smoke report in Chromium:\n  - {}",
        problems.join("\n  - ")
    );
}

/// A page that breaks every check, and a clean one: the checker must tell them apart.
#[test]
fn checker_flags_a_broken_page_and_passes_a_clean_one() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.html");
    std::fs::write(
        &broken,
        r#"<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>broken</title></head><body>
<img src="figures/missing.png" alt="a figure that is not there">
<table id="claims-table"><thead><tr><th>id</th></tr></thead><tbody></tbody></table>
<div id="wide" style="width: 2000px">too wide for a phone</div>
<script>
console.error("deliberate console error");
fetch("http://example.invalid/");
</script>
</body></html>
"#,
    )
    .unwrap();
    let findings = check(&chromium, &broken);
    let errors = list(&findings, "/console_errors");
    assert!(
        errors
            .iter()
            .any(|e| e["text"] == "deliberate console error"),
        "console.error() not reported: {errors:?}"
    );
    let requests = list(&findings, "/network_requests");
    let fetch = requests
        .iter()
        .find(|r| r["url"] == "http://example.invalid/")
        .unwrap_or_else(|| panic!("the fetch is not among the requests: {requests:?}"));
    // The checker's proxy, on 127.0.0.1, received the request and forwarded nothing: the page
    // got no response.
    let stopped = list(&findings, "/stopped_at_proxy");
    assert!(
        stopped.contains(&Value::from("GET http://example.invalid/ HTTP/1.1")),
        "the fetch did not end at the checker's local proxy: {stopped:?}"
    );
    assert!(
        fetch["outcome"]
            .as_str()
            .unwrap_or("")
            .starts_with("net::ERR_"),
        "the fetch got an answer: {fetch}"
    );
    let broken_images = list(&findings, "/images/broken");
    assert!(
        broken_images
            .iter()
            .any(|i| i["src"] == "figures/missing.png"),
        "the missing image is not reported: {broken_images:?}"
    );
    let found = problems(&findings, &["C1".to_string()]);
    for expected in [
        "console error",
        "requests \"http://example.invalid/\"",
        "broken image \"figures/missing.png\"",
        "the claims table has no rows",
        "no <tr id=\"claim-ID\"> row for C1",
        "at a phone's 390 px the page is",
        "div#wide",
    ] {
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "no problem mentions {expected:?}: {found:#?}"
        );
    }

    // The same checks pass on a page that does everything right.
    let clean = dir.path().join("clean.html");
    std::fs::write(
        &clean,
        r#"<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>clean</title></head><body>
<img alt="a dot" src="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='4' height='4'/%3E">
<div style="overflow-x: auto"><table id="claims-table" style="width: 2000px">
<thead><tr><th>id</th></tr></thead>
<tbody><tr id="claim-C1"><td>C1</td></tr><tr id="claim-C2"><td>C2</td></tr></tbody>
</table></div>
</body></html>
"#,
    )
    .unwrap();
    let findings = check(&chromium, &clean);
    let found = problems(&findings, &["C1".to_string(), "C2".to_string()]);
    assert!(found.is_empty(), "a clean page has problems: {found:#?}");
    assert_eq!(findings["claims_table"]["rows"], 2);
}
