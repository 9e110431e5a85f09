//! `repro diff` end to end: two real smoke runs that differ in one parameter of one stage, then
//! the comparison checked against what the run records, manifests and both results.json files
//! say (read here, independently of the command). Also the errors: a malformed run record, a
//! record that does not exist, an unknown profile, a missing store.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{stderr, Sandbox};
use serde_json::Value;

/// The run records in the sandbox, oldest first.
fn run_records(sb: &Sandbox) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(sb.path("artifacts/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    runs.sort();
    runs
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Stage name → key, from a run record.
fn keys(record: &Value) -> BTreeMap<String, String> {
    record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The results.json the run's report stage published, read from the store.
fn results_of(sb: &Sandbox, record: &Value) -> Value {
    let key = &keys(record)["report"];
    let manifest = read_json(&sb.path(&format!("artifacts/store/manifests/{key}.json")));
    let hash = manifest["outputs"]["results.json"]["hash"]
        .as_str()
        .unwrap();
    read_json(&sb.path(&format!("artifacts/store/objects/{hash}")))
}

/// The lines of the section `diff` prints for one changed stage (header to blank line).
fn section<'a>(text: &'a str, stage: &str) -> Vec<&'a str> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{stage} (")));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no section for {stage}:\n{text}"));
    std::iter::once(header)
        .chain(lines.take_while(|l| !l.is_empty()))
        .collect()
}

#[test]
fn diff_of_two_runs_names_the_changed_param_its_dependants_and_the_moved_numbers() {
    let sb = Sandbox::new();
    let before = sb.run(&["reproduce"]);
    // One parameter of one stage changes, in the sandbox's copy of the smoke profile.
    let profile = sb.path("pipeline/profiles/smoke.toml");
    let text = std::fs::read_to_string(&profile).unwrap();
    let edited = text.replacen("[params.train_ce]\n", "[params.train_ce]\nlr = 0.002\n", 1);
    assert_ne!(edited, text, "the profile edit matched nothing");
    std::fs::write(&profile, edited).unwrap();
    let after = sb.run(&["reproduce"]);
    let runs = run_records(&sb);
    assert_eq!(runs.len(), 2);
    let (a, b) = (runs[0].to_str().unwrap(), runs[1].to_str().unwrap());

    let out = sb.ok(&["diff", a, b]);

    // Which stages changed is read from the two records, not assumed.
    let (keys_a, keys_b) = (keys(&before), keys(&after));
    assert_eq!(
        keys_a.keys().collect::<Vec<_>>(),
        keys_b.keys().collect::<Vec<_>>()
    );
    let changed: Vec<&String> = keys_a
        .keys()
        .filter(|name| keys_a[*name] != keys_b[*name])
        .collect();
    assert!(changed.iter().any(|s| *s == "train_ce") && changed.iter().any(|s| *s == "report"));
    assert!(out.contains("stages only in A: none") && out.contains("stages only in B: none"));
    assert!(
        out.contains(&format!(
            "key changed: {}, same key: {}",
            changed.len(),
            keys_a.len() - changed.len()
        )),
        "{out}"
    );
    for name in keys_a.keys() {
        let listed = out
            .lines()
            .any(|l| l.starts_with(&format!("{name} (")) && l.contains(": key "));
        assert_eq!(
            listed,
            changed.contains(&name),
            "{name} listed as changed: {listed}\n{out}"
        );
    }

    // The stage whose param changed: the param, old -> new, and nothing else in its key.
    let train = section(&out, "train_ce");
    assert_eq!(
        train[0],
        format!(
            "train_ce (train): key {} -> {}",
            &keys_a["train_ce"][..12],
            &keys_b["train_ce"][..12]
        )
    );
    assert!(train.contains(&"  param lr: 0.001 -> 0.002"), "{train:#?}");
    assert!(
        !train
            .iter()
            .any(|l| l.starts_with("  input") || l.starts_with("  code")),
        "{train:#?}"
    );
    assert!(
        train
            .iter()
            .any(|l| l.starts_with("  output weights.safetensors changed: ")),
        "{train:#?}"
    );
    // A dependant changed through its input, named, with no param of its own changed.
    let eval = section(&out, "eval_ce");
    assert!(
        eval.iter()
            .any(|l| l.starts_with("  input train_ce/weights.safetensors changed: ")),
        "{eval:#?}"
    );
    assert!(!eval.iter().any(|l| l.starts_with("  param")), "{eval:#?}");
    let report = section(&out, "report");
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("  input eval_ce/evaluation.json changed: ")),
        "{report:#?}"
    );

    // The numbers: every metric that differs between the two results.json, with its values.
    let (results_a, results_b) = (results_of(&sb, &before), results_of(&sb, &after));
    let (metrics_a, metrics_b) = (
        results_a["metrics"].as_object().unwrap(),
        results_b["metrics"].as_object().unwrap(),
    );
    let moved: Vec<(&String, &Value, &Value)> = metrics_a
        .iter()
        .filter_map(|(name, old)| {
            let new = metrics_b.get(name)?;
            (new != old).then_some((name, old, new))
        })
        .collect();
    assert!(!moved.is_empty(), "a new learning rate moves some number");
    let shared = metrics_a
        .keys()
        .filter(|k| metrics_b.contains_key(*k))
        .count();
    assert!(
        out.contains(&format!(
            "metrics moved: {} of {shared} on both sides",
            moved.len()
        )),
        "{out}"
    );
    for (name, old, new) in &moved {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        assert!(line.contains(&format!(" {old} -> {new} ")), "{line}");
        let abs = new.as_f64().unwrap() - old.as_f64().unwrap();
        let sign = if abs > 0.0 { "(+" } else { "(-" };
        assert!(line.contains(sign), "{line}");
    }

    // The same comparison named by position in runs/, and as a page.
    let by_position = sb.ok(&["diff", "last~1", "last", "--html=page.html"]);
    assert_eq!(
        by_position.lines().skip(4).collect::<Vec<_>>(),
        out.lines().skip(4).collect::<Vec<_>>(),
        "only the A:/B: labels differ"
    );
    let page = std::fs::read_to_string(sb.path("page.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for name in &changed {
        assert!(
            page.contains(&format!("<code>{name}</code>")),
            "page lacks {name}"
        );
    }
    assert!(
        page.contains("param lr: 0.001 -&gt; 0.002"),
        "the param line, escaped"
    );
    // Self-contained: nothing to run, nothing fetched.
    assert!(!page.contains("<script") && !page.contains("src=") && !page.contains("<link"));
    // `--html` alone puts it next to the report.
    sb.ok(&["diff", a, b, "--html"]);
    assert!(sb.path("artifacts/report/diff.html").is_file());

    // A profile's current keys are the last run's: no differences; the first run differs from
    // them as it does from the second.
    let same = sb.ok(&["diff", "profile:smoke", b]);
    assert!(same.contains("no differences"), "{same}");
    let vs_profile = sb.ok(&["diff", a, "profile:smoke"]);
    assert!(
        vs_profile.contains("  param lr: 0.001 -> 0.002"),
        "{vs_profile}"
    );

    // A run compared with itself.
    let itself = sb.ok(&["diff", a, a]);
    assert!(itself.contains("no differences"), "{itself}");
    assert!(itself.contains("key changed: 0,"), "{itself}");
    assert!(
        itself.contains(&format!("metrics moved: 0 of {}", metrics_a.len())),
        "{itself}"
    );
}

#[test]
fn a_malformed_or_missing_run_record_or_unknown_profile_is_an_error_naming_it() {
    let sb = Sandbox::new();
    let out = sb.repro(&["diff", "last", "last"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no store at artifacts/store"));

    std::fs::create_dir_all(sb.path("artifacts/store")).unwrap();
    std::fs::create_dir_all(sb.path("artifacts/runs")).unwrap();
    let bad = sb.path("artifacts/runs/20260101T000000.000000Z.json");
    std::fs::write(&bad, r#"{"profile": "smoke", "stages": 3}"#).unwrap();
    // By path and by timestamp: both name the file.
    for arg in [bad.to_str().unwrap(), "2026-01-01T00:00:00.000000Z"] {
        let out = sb.repro(&["diff", arg, "last"]);
        assert_eq!(out.status.code(), Some(1), "{arg}");
        let err = stderr(&out);
        assert!(
            err.contains("20260101T000000.000000Z.json") && err.contains("malformed"),
            "{err}"
        );
    }

    let out = sb.repro(&["diff", "last", "20991231"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("no run record `20991231`") && err.contains("artifacts/runs"),
        "{err}"
    );

    let out = sb.repro(&["diff", "profile:ghost", "last"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("profile:ghost") && err.contains("valid profiles: ablation, cpu"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn diff_help_names_both_kinds_of_side_and_the_html_page() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["diff", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "profile:NAME",
        "last~N",
        "--html",
        "diff.html",
        "results.json",
    ] {
        assert!(help.contains(needle), "help lacks {needle}: {help}");
    }
}
