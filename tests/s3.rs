//! The shared S3-compatible store (`--store s3://bucket/prefix`) against a real S3 server
//! (moto's, see `common::s3`) on 127.0.0.1, started by each test and stopped when it ends;
//! skipped with a message where moto cannot be installed from PyPI.
//!
//! What is pinned: `smoke` reproduces into the bucket and a second machine (an empty cache)
//! finds every stage a hit with the same `results.json`; a flipped byte in the bucket is
//! caught by `verify` and by a download, and `--repair` mends it; a damaged manifest is an
//! error naming it; `gc` keeps what the profiles need and deletes the rest; builds racing on
//! one key leave one manifest, which all of them adopt.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::s3::S3Server;
use common::{stderr, Sandbox};
use repro::engine::remote::Remote;
use repro::engine::{Manifest, Store};
use serde_json::Value;

/// The server, or `None` after saying why the test is skipped.
fn server(test: &str) -> Option<S3Server> {
    match S3Server::start() {
        Ok(server) => Some(server),
        Err(why) => {
            common::device::report(&format!("{test}: skipped: {why}"));
            None
        }
    }
}

/// Runs `repro` in `sandbox` against `store` (an s3:// URL) on `server`.
fn repro(sandbox: &Sandbox, server: &S3Server, store: &str, args: &[&str]) -> std::process::Output {
    let mut full = vec!["--store", store];
    full.extend(args);
    sandbox.repro_with_env(&full, &server.env())
}

fn ok(sandbox: &Sandbox, server: &S3Server, store: &str, args: &[&str]) -> Value {
    let out = repro(sandbox, server, store, args);
    assert!(
        out.status.success(),
        "repro {args:?} failed: {}",
        stderr(&out)
    );
    sandbox.last_record()
}

fn outcomes(record: &Value) -> Vec<(String, String)> {
    record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn smoke_reproduces_into_the_bucket_and_an_empty_cache_then_finds_every_stage_a_hit() {
    let Some(server) =
        server("smoke_reproduces_into_the_bucket_and_an_empty_cache_then_finds_every_stage_a_hit")
    else {
        return;
    };
    let store = server.url("team");
    let first = Sandbox::new();
    let built = ok(&first, &server, &store, &["reproduce", "--jobs", "2"]);
    assert!(outcomes(&built).iter().all(|(_, o)| o == "ran"), "{built}");
    // The bucket holds every manifest and object the cache does.
    let cached: BTreeSet<String> = std::fs::read_dir(first.path("artifacts/store/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let remote: BTreeSet<String> = server
        .keys("team/objects/")
        .into_iter()
        .map(|k| k.trim_start_matches("team/objects/").to_string())
        .collect();
    assert_eq!(cached, remote, "objects in the cache vs the bucket");
    assert_eq!(
        server.keys("team/manifests/").len(),
        outcomes(&built).len(),
        "one manifest per stage"
    );

    // Another machine: nothing local, everything a hit, the same results.
    let second = Sandbox::new();
    let again = ok(&second, &server, &store, &["reproduce"]);
    let not_hits: Vec<_> = outcomes(&again)
        .into_iter()
        .filter(|(_, o)| o != "hit")
        .collect();
    assert!(
        not_hits.is_empty(),
        "not hits from an empty cache: {not_hits:?}"
    );
    assert_eq!(
        read(&second.path("artifacts/report/results.json")),
        read(&first.path("artifacts/report/results.json")),
        "results.json from the bucket"
    );
    // Only what was exported came down, not every object.
    let downloaded = std::fs::read_dir(second.path("artifacts/store/objects"))
        .unwrap()
        .count();
    assert!(
        downloaded < cached.len(),
        "an all-hit run downloaded {downloaded} of {} objects",
        cached.len()
    );
}

#[test]
fn a_flipped_byte_in_the_bucket_is_caught_and_repair_mends_it() {
    let Some(server) = server("a_flipped_byte_in_the_bucket_is_caught_and_repair_mends_it") else {
        return;
    };
    let store = server.url("damaged");
    let first = Sandbox::new();
    ok(&first, &server, &store, &["run", "report"]);
    // train_ce's loss curve is also one of the report's exported figures: an all-hit run from
    // an empty cache must download it.
    let manifest = first.last_manifest("train_ce");
    let hash = manifest["outputs"]["curve.svg"]["hash"]
        .as_str()
        .unwrap()
        .to_string();
    server.flip_byte(&format!("damaged/objects/{hash}"), 100);

    let verify = repro(&first, &server, &store, &["verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", stderr(&verify));
    let message = stderr(&verify);
    assert!(
        message.contains(&format!(
            "s3://repro-test/damaged/objects/{hash} is corrupt"
        )) && message.contains("output `curve.svg` of stage `train_ce`"),
        "{message}"
    );

    // A machine without the object in its cache downloads it, and refuses it.
    let second = Sandbox::new();
    let out = repro(&second, &server, &store, &["run", "report"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("object {hash}")) && stderr(&out).contains("is corrupt"),
        "{}",
        stderr(&out)
    );
    assert!(
        !second
            .path(&format!("artifacts/store/objects/{hash}"))
            .exists(),
        "a corrupt download entered the cache"
    );

    // --repair from that machine rebuilds train_ce and uploads its (identical) bytes.
    let repaired = ok(&second, &server, &store, &["run", "report", "--repair"]);
    assert!(
        outcomes(&repaired).contains(&("train_ce".into(), "ran".into())),
        "{repaired}"
    );
    let verify = repro(&second, &server, &store, &["verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    assert_eq!(
        second.last_manifest("train_ce")["outputs"],
        manifest["outputs"]
    );
}

#[test]
fn a_damaged_manifest_in_the_bucket_is_an_error_naming_it_and_is_never_cached() {
    let Some(server) =
        server("a_damaged_manifest_in_the_bucket_is_an_error_naming_it_and_is_never_cached")
    else {
        return;
    };
    let store = server.url("torn");
    let first = Sandbox::new();
    ok(&first, &server, &store, &["run", "mnist"]);
    let key = first.last_manifest("mnist")["key"]
        .as_str()
        .unwrap()
        .to_string();
    server.boto(&format!(
        "s3.put_object(Bucket='repro-test', Key='torn/manifests/{key}.json', Body=b'{{\"stage\": ')"
    ));
    let second = Sandbox::new();
    let out = repro(&second, &server, &store, &["run", "mnist"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "manifest s3://repro-test/torn/manifests/{key}.json is malformed"
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        !second
            .path(&format!("artifacts/store/manifests/{key}.json"))
            .exists(),
        "a malformed manifest entered the cache"
    );
}

#[test]
fn gc_keeps_what_the_profiles_need_and_deletes_the_rest_from_the_bucket() {
    let Some(server) =
        server("gc_keeps_what_the_profiles_need_and_deletes_the_rest_from_the_bucket")
    else {
        return;
    };
    let store = server.url("gc");
    let sandbox = Sandbox::new();
    ok(&sandbox, &server, &store, &["run", "eval_ce"]);
    let needed = server.keys("gc/");
    // A build under another parameter: not what any profile needs once its run is forgotten.
    ok(
        &sandbox,
        &server,
        &store,
        &["run", "train_ce", "--set", "train_ce.lr=0.002"],
    );
    let stray_key = sandbox.last_manifest("train_ce")["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(server.keys("gc/").len() > needed.len());

    // Young objects are kept by default (a build elsewhere may be about to name them).
    let out = sandbox.repro_with_env(
        &["--store", &store, "gc", "--keep-runs", "0"],
        &server.env(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("younger than 24 h"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!server
        .keys("gc/manifests/")
        .contains(&format!("gc/manifests/{stray_key}.json")));

    let out = sandbox.repro_with_env(
        &[
            "--store",
            &store,
            "gc",
            "--keep-runs",
            "0",
            "--grace-hours",
            "0",
        ],
        &server.env(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Everything left is what the profiles need (the stray run's ref stays: refs only serve
    // `why`, and a ref to a deleted manifest reads as "not built").
    let left: Vec<String> = server
        .keys("gc/")
        .into_iter()
        .filter(|k| !k.starts_with("gc/refs/"))
        .collect();
    let needed: Vec<String> = needed
        .into_iter()
        .filter(|k| !k.starts_with("gc/refs/"))
        .collect();
    assert_eq!(left, needed);

    // And it still serves a fresh machine: all hits.
    let fresh = Sandbox::new();
    let record = ok(&fresh, &server, &store, &["run", "eval_ce"]);
    assert!(
        outcomes(&record).iter().all(|(_, o)| o == "hit"),
        "{record}"
    );
}

/// The manifest protocol itself: writers of one key with different manifests (as machines
/// whose stage is not bitwise reproducible would have), each having built it without seeing
/// the others; the first create goes through, every later one is refused by the conditional
/// put, and every writer returns and caches the first manifest, byte for byte. (One after
/// another: S3 makes a conditional create atomic, but moto checks and stores in two steps of a
/// threaded server, so truly simultaneous creates would test moto, not us.)
#[test]
fn writers_of_one_key_all_adopt_the_one_manifest_the_conditional_put_let_through() {
    let Some(server) =
        server("writers_of_one_key_all_adopt_the_one_manifest_the_conditional_put_let_through")
    else {
        return;
    };
    // A real manifest to vary: mnist's, from a smoke build.
    let sandbox = Sandbox::new();
    ok(&sandbox, &server, &server.url("source"), &["run", "mnist"]);
    let original: Manifest = serde_json::from_value(sandbox.last_manifest("mnist")).unwrap();

    let config = [
        ("aws_endpoint", server.endpoint.as_str()),
        ("aws_access_key_id", "repro-test"),
        ("aws_secret_access_key", "repro-test"),
        ("aws_region", "us-east-1"),
    ];
    let url = server.url("race");
    let caches: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores: Vec<Store> = caches
        .iter()
        .map(|c| {
            Store::open(c.path())
                .unwrap()
                .with_remote(Remote::open_with(&url, &config).unwrap())
        })
        .collect();
    let won: Vec<Manifest> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let mut mine = original.clone();
            mine.seconds = i as f64 + 1.0;
            store.write_manifest(&mine).unwrap()
        })
        .collect();
    assert!(
        won.iter().all(|m| m.seconds == 1.0),
        "later writers did not adopt the first manifest: {:?}",
        won.iter().map(|m| m.seconds).collect::<Vec<_>>()
    );
    assert_eq!(
        server.keys("race/manifests/"),
        vec![format!("race/manifests/{}.json", original.key)]
    );
    let in_bucket = server.boto(&format!(
        "import sys; sys.stdout.write(s3.get_object(Bucket='repro-test', \
         Key='race/manifests/{}.json')['Body'].read().decode())",
        original.key
    ));
    for cache in &caches {
        let cached = read(
            &cache
                .path()
                .join(format!("manifests/{}.json", original.key)),
        );
        assert_eq!(
            String::from_utf8(cached).unwrap(),
            in_bucket,
            "a cache holds another manifest than the bucket"
        );
    }
}

/// Two processes (two machines' worth: separate caches) building the same stage against one
/// bucket at once both succeed, and agree with the bucket on its one manifest.
#[test]
fn two_processes_building_one_stage_at_once_leave_one_manifest() {
    let Some(server) = server("two_processes_building_one_stage_at_once_leave_one_manifest") else {
        return;
    };
    let store = server.url("together");
    let (a, b) = (Sandbox::new(), Sandbox::new());
    ok(&a, &server, &store, &["run", "mnist"]);
    let outputs = std::thread::scope(|scope| {
        let one = scope.spawn(|| repro(&a, &server, &store, &["run", "train_ce"]));
        let two = scope.spawn(|| repro(&b, &server, &store, &["run", "train_ce"]));
        [one.join().unwrap(), two.join().unwrap()]
    });
    for out in &outputs {
        assert!(out.status.success(), "{}", stderr(out));
    }
    let (ma, mb) = (a.last_manifest("train_ce"), b.last_manifest("train_ce"));
    assert_eq!(
        ma, mb,
        "the two caches hold different manifests for one key"
    );
    let key = ma["key"].as_str().unwrap();
    assert!(server
        .keys("together/manifests/")
        .contains(&format!("together/manifests/{key}.json")));
    let both_built = [&a, &b]
        .iter()
        .all(|s| outcomes(&s.last_record()).contains(&("train_ce".into(), "ran".into())));
    eprintln!(
        "train_ce {} (the race is timing-dependent; the test above pins the protocol)",
        if both_built {
            "was built by both processes"
        } else {
            "was built by one process, a hit for the other"
        }
    );
}
