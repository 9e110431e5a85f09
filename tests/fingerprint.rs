//! The code fingerprint cannot silently miss code: every module a stage file uses must be
//! declared on its `//! Modules:` line (which build.rs hashes), and every stage file has a
//! fingerprint and a registry entry.

use std::collections::BTreeSet;
use std::path::Path;

fn stage_files() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stages");
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs") && p.file_stem().unwrap() != "mod")
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Module paths a source file mentions as `crate::a::b::...`, as "a/b" (two levels at most).
fn used_modules(source: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (i, _) in source.match_indices("crate::") {
        if i > 0 && source.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let path: String = source[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).take(2).collect();
        if !parts.is_empty() {
            used.insert(parts.join("/"));
        }
    }
    used
}

fn declared_modules(source: &str) -> BTreeSet<String> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("//! Modules:"))
        .flat_map(|list| list.split(',').map(|m| m.trim().to_string()))
        .filter(|m| !m.is_empty() && m != "none")
        .collect()
}

/// A use of `a/b` is covered by declaring `a` (the whole module) or `a/b` (that file alone).
/// The engine is the stage API, not stage code: changing it must not rerun training.
fn covered(used: &str, declared: &BTreeSet<String>) -> bool {
    let top = used.split('/').next().unwrap_or_default();
    top == "engine" || declared.contains(top) || declared.contains(used)
}

#[test]
fn every_stage_declares_the_modules_it_uses() {
    for (kind, source) in stage_files() {
        let declared = declared_modules(&source);
        for module in used_modules(&source) {
            assert!(covered(&module, &declared), "src/stages/{kind}.rs uses crate::{module} but its `//! Modules:` line declares only {declared:?}");
        }
        // A stage may reach into its siblings only for the fingerprint table.
        for (i, _) in source.match_indices("super::") {
            assert!(source[i..].starts_with("super::code_fingerprint"), "src/stages/{kind}.rs uses another stage's code via `super::`; move shared code into a declared module");
        }
    }
}

#[test]
fn every_stage_file_has_a_fingerprint_and_a_registry_entry() {
    let registry = repro::stages::registry();
    for (kind, _) in stage_files() {
        assert_eq!(repro::stages::code_fingerprint(&kind).len(), 64, "{kind}");
        assert!(
            registry.get(&kind).is_some(),
            "src/stages/{kind}.rs is not in stages::registry()"
        );
    }
}

#[test]
fn the_usage_scanner_sees_a_forgotten_module() {
    let source = "//! Modules: data, report/figures\nuse crate::data::idx;\nuse crate::nn::Conv2d;\nuse crate::report::render;\n";
    let declared = declared_modules(source);
    let used = used_modules(source);
    assert_eq!(
        used,
        BTreeSet::from([
            "data/idx".to_string(),
            "nn/Conv2d".to_string(),
            "report/render".to_string()
        ])
    );
    assert!(covered("data/idx", &declared));
    assert!(!covered("nn/Conv2d", &declared), "an undeclared module");
    assert!(
        !covered("report/render", &declared),
        "a sibling of a declared file"
    );
    assert!(covered("report/figures", &declared));
}
