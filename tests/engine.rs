//! Engine semantics on toy stage kinds defined here (no MNIST, no tensors), through the same
//! `StageKind` trait the paper's stages implement: caching, rerun-only-what-changed, early
//! cutoff, crash safety and resume, corruption detection and repair, concurrent runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use repro::engine::{
    maintain, Engine, Finished, NoParams, Outcome, Pipeline, Registry, RunOptions, RunRecord,
    StageContext, StageKind, State, Store, TypedParams,
};
use serde::Deserialize;

/// Writes its `text` param to `out.txt` (its `comment` param changes the key, not the bytes).
struct Source;
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceParams {
    text: String,
    #[allow(dead_code)]
    comment: String,
}
impl TypedParams for SourceParams {}
impl StageKind for Source {
    type Params = SourceParams;
    fn kind(&self) -> &str {
        "source"
    }
    fn code_fingerprint(&self) -> String {
        "source-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, params: &SourceParams) -> Result<Finished> {
        ctx.write_output("out.txt", params.text.as_bytes())?;
        Ok(Finished::Done)
    }
}

/// Upper-cases every input it reads.
struct Upper;
impl StageKind for Upper {
    type Params = NoParams;
    fn kind(&self) -> &str {
        "upper"
    }
    fn code_fingerprint(&self) -> String {
        "upper-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, _: &NoParams) -> Result<Finished> {
        let mut all = String::new();
        for stage in ctx
            .input_stages()
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
        {
            for name in ctx
                .input_names(&stage)
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
            {
                all.push_str(&String::from_utf8(ctx.input(&stage, &name)?)?.to_uppercase());
            }
        }
        ctx.write_output("upper.txt", all.as_bytes())?;
        Ok(Finished::Done)
    }
}

/// Renders its repository file `tpl/page.txt` around its input (a stand-in for the report).
struct Page;
impl StageKind for Page {
    type Params = NoParams;
    fn kind(&self) -> &str {
        "page"
    }
    fn code_fingerprint(&self) -> String {
        "page-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, _: &NoParams) -> Result<Finished> {
        let template = std::fs::read_to_string(ctx.repo_path("tpl/page.txt"))?;
        let body = String::from_utf8(ctx.input("upper", "upper.txt")?)?;
        ctx.write_output("page.txt", template.replace("BODY", &body).as_bytes())?;
        Ok(Finished::Done)
    }
}

/// Counts to `steps`, sleeping `step_ms` per step, checkpointing after each step.
/// Resumes from its checkpoint; records where it resumed from as a metric.
struct Slow;
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowParams {
    steps: i64,
    step_ms: u64,
}
impl TypedParams for SlowParams {}
impl StageKind for Slow {
    type Params = SlowParams;
    fn kind(&self) -> &str {
        "slow"
    }
    fn code_fingerprint(&self) -> String {
        "slow-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, params: &SlowParams) -> Result<Finished> {
        let (steps, step_ms) = (params.steps, params.step_ms);
        let start = match ctx.checkpoint_load("step")? {
            Some(bytes) => String::from_utf8(bytes)?.parse::<i64>()?,
            None => 0,
        };
        ctx.set_metric("resumed_from", start.into());
        // Half-written output: a kill leaves it in staging, never in the store.
        let partial = ctx.output_path("sum.txt")?;
        for step in start..steps {
            std::fs::write(&partial, format!("partial {step}"))?;
            std::thread::sleep(Duration::from_millis(step_ms));
            ctx.checkpoint_save("step", (step + 1).to_string().as_bytes())?;
        }
        ctx.write_output("sum.txt", format!("{}", steps * (steps - 1) / 2).as_bytes())?;
        Ok(Finished::Done)
    }
}

/// Fails or skips on demand.
struct Flaky;
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyParams {
    mode: FlakyMode,
}
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum FlakyMode {
    Ok,
    Fail,
    Skip,
    Panic,
}
impl TypedParams for FlakyParams {}
impl StageKind for Flaky {
    type Params = FlakyParams;
    fn kind(&self) -> &str {
        "flaky"
    }
    fn code_fingerprint(&self) -> String {
        "flaky-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, params: &FlakyParams) -> Result<Finished> {
        ctx.write_output("half.txt", b"written before failing")?;
        match params.mode {
            FlakyMode::Fail => anyhow::bail!("flaky was told to fail"),
            FlakyMode::Skip => Ok(Finished::Skipped("not installed here".into())),
            FlakyMode::Panic => panic!("flaky was told to panic"),
            FlakyMode::Ok => Ok(Finished::Done),
        }
    }
}

/// Waits (up to `wait_ms`) until `parties` stages of its `group` have started, then writes how many
/// had: it can only succeed when that many build at once.
struct Meet;
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeetParams {
    group: String,
    parties: usize,
    wait_ms: u64,
    /// Tells apart the keys of a group's stages (one key builds once at a time).
    #[allow(dead_code)]
    party: String,
}
impl TypedParams for MeetParams {}
/// Arrivals per group (tests in this binary run in parallel; each uses its own group).
static ARRIVED: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());
static MET: std::sync::Condvar = std::sync::Condvar::new();
impl StageKind for Meet {
    type Params = MeetParams;
    fn kind(&self) -> &str {
        "meet"
    }
    fn code_fingerprint(&self) -> String {
        "meet-v1".into()
    }
    fn run(&self, ctx: &mut StageContext, params: &MeetParams) -> Result<Finished> {
        let count = |arrived: &Vec<(String, usize)>| {
            arrived
                .iter()
                .find(|(g, _)| *g == params.group)
                .map_or(0, |(_, n)| *n)
        };
        let mut arrived = ARRIVED.lock().unwrap();
        match arrived.iter_mut().find(|(g, _)| *g == params.group) {
            Some((_, n)) => *n += 1,
            None => arrived.push((params.group.clone(), 1)),
        }
        MET.notify_all();
        let (arrived, _) = MET
            .wait_timeout_while(arrived, Duration::from_millis(params.wait_ms), |a| {
                count(a) < params.parties
            })
            .unwrap();
        let met = count(&arrived);
        anyhow::ensure!(met >= params.parties, "met {met} of {}", params.parties);
        ctx.write_output("met.txt", format!("{met}").as_bytes())?;
        Ok(Finished::Done)
    }
}

fn registry() -> Registry {
    Registry::new()
        .with(Source)
        .with(Upper)
        .with(Page)
        .with(Slow)
        .with(Flaky)
        .with(Meet)
}

const PIPELINE: &str = r#"
[[stage]]
name = "source"
kind = "source"
params = { text = "hello", comment = "" }

[[stage]]
name = "upper"
kind = "upper"
inputs = ["source"]
params = { seed = 0 }

[[stage]]
name = "page"
kind = "page"
inputs = ["upper/upper.txt"]
files = ["tpl"]

[[stage]]
name = "slow"
kind = "slow"
params = { steps = 3, step_ms = 1 }

[[stage]]
name = "after_slow"
kind = "upper"
inputs = ["slow"]
"#;

/// A scratch repository: pipeline/, profiles/test.toml, tpl/page.txt, artifacts/store.
struct Repo {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Repo {
    fn new(pipeline: &str) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("pipeline/profiles")).unwrap();
        std::fs::create_dir_all(root.join("tpl")).unwrap();
        std::fs::write(root.join("pipeline/pipeline.toml"), pipeline).unwrap();
        std::fs::write(root.join("pipeline/profiles/test.toml"), "").unwrap();
        std::fs::write(root.join("tpl/page.txt"), "<p>BODY</p>").unwrap();
        Repo { _dir: dir, root }
    }

    fn store_dir(&self) -> PathBuf {
        self.root.join("artifacts/store")
    }

    /// Loads the pipeline with the `test` profile and `sets`.
    fn load(&self, sets: &[&str]) -> Result<Pipeline, repro::engine::ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Pipeline::load(
            &self.root.join("pipeline/pipeline.toml"),
            "test",
            &sets,
            &registry(),
        )
    }

    fn pipeline(&self, sets: &[&str]) -> Pipeline {
        self.load(sets).unwrap()
    }

    fn run_with(&self, sets: &[&str], repair: bool) -> RunRecord {
        self.run_jobs(sets, repair, 1)
    }

    fn run_jobs(&self, sets: &[&str], repair: bool, jobs: usize) -> RunRecord {
        let registry = registry();
        let pipeline = self.pipeline(sets);
        let engine = Engine {
            registry: &registry,
            store: Store::open(&self.store_dir()).unwrap(),
            pipeline: &pipeline,
            device: "cpu".into(),
            dtype: "f32".into(),
            options: RunOptions {
                repair,
                progress: false,
                jobs,
                ..RunOptions::default()
            },
        };
        let all: Vec<_> = pipeline.stages.iter().collect();
        engine.run(&all, "test").unwrap()
    }

    fn run(&self, sets: &[&str]) -> RunRecord {
        self.run_with(sets, false)
    }

    fn status(&self, sets: &[&str]) -> Vec<repro::engine::StageStatus> {
        let registry = registry();
        let pipeline = self.pipeline(sets);
        let engine = Engine {
            registry: &registry,
            store: Store::open(&self.store_dir()).unwrap(),
            pipeline: &pipeline,
            device: "cpu".into(),
            dtype: "f32".into(),
            options: RunOptions::default(),
        };
        engine.status().unwrap()
    }

    fn output(&self, stage: &str, name: &str) -> Vec<u8> {
        let store = Store::open(&self.store_dir()).unwrap();
        let manifest = store.last_manifest(stage).unwrap().unwrap();
        store
            .read_verified(&manifest.outputs[name].hash, name)
            .unwrap()
    }
}

/// Whether the store's `tmp/` holds no staging directory (a stage's private scratch).
fn no_staging_left(repo: &Repo) -> bool {
    std::fs::read_dir(repo.store_dir().join("tmp"))
        .unwrap()
        .all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("stage-")
        })
}

fn outcomes(record: &RunRecord) -> Vec<(String, Outcome)> {
    record
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.outcome))
        .collect()
}

fn outcome(record: &RunRecord, stage: &str) -> Outcome {
    record
        .stages
        .iter()
        .find(|s| s.name == stage)
        .unwrap()
        .outcome
}

#[test]
fn second_run_with_nothing_changed_is_all_hits() {
    let repo = Repo::new(PIPELINE);
    let first = repo.run(&[]);
    assert!(
        first.stages.iter().all(|s| s.outcome == Outcome::Ran),
        "{:?}",
        outcomes(&first)
    );
    let second = repo.run(&[]);
    assert!(
        second.stages.iter().all(|s| s.outcome == Outcome::Hit),
        "{:?}",
        outcomes(&second)
    );
    assert_eq!(repo.output("page", "page.txt"), b"<p>HELLO</p>");
    // Same keys both times, and a run record on disk for each run.
    assert_eq!(
        first.stages.iter().map(|s| &s.key).collect::<Vec<_>>(),
        second.stages.iter().map(|s| &s.key).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read_dir(repo.root.join("artifacts/runs"))
            .unwrap()
            .count(),
        2
    );
    assert!(repo.status(&[]).iter().all(|s| s.state == State::Fresh));
}

#[test]
fn editing_a_template_reruns_only_the_stage_that_reads_it() {
    let repo = Repo::new(PIPELINE);
    repo.run(&[]);
    std::fs::write(repo.root.join("tpl/page.txt"), "<div>BODY</div>").unwrap();
    let status = repo.status(&[]);
    let page = status.iter().find(|s| s.name == "page").unwrap();
    assert_eq!(page.state, State::Stale);
    assert!(
        page.reasons
            .iter()
            .any(|r| r.contains("file tpl/page.txt changed")),
        "{:?}",
        page.reasons
    );
    let rerun = repo.run(&[]);
    assert_eq!(outcome(&rerun, "page"), Outcome::Ran);
    for stage in ["source", "upper", "slow", "after_slow"] {
        assert_eq!(outcome(&rerun, stage), Outcome::Hit, "{stage}");
    }
    assert_eq!(repo.output("page", "page.txt"), b"<div>HELLO</div>");
}

#[test]
fn changing_a_param_reruns_the_stage_and_all_its_dependants() {
    let repo = Repo::new(PIPELINE);
    repo.run(&[]);
    let rerun = repo.run(&["source.text=bye"]);
    for stage in ["source", "upper", "page"] {
        assert_eq!(outcome(&rerun, stage), Outcome::Ran, "{stage}");
    }
    for stage in ["slow", "after_slow"] {
        assert_eq!(outcome(&rerun, stage), Outcome::Hit, "{stage}");
    }
    assert_eq!(repo.output("page", "page.txt"), b"<p>BYE</p>");
    // Against the last build ("bye"), asking for a third value is stale for that reason.
    let why = repo.status(&["source.text=again"]);
    let source = why.iter().find(|s| s.name == "source").unwrap();
    assert_eq!(source.state, State::Stale);
    assert!(
        source
            .reasons
            .iter()
            .any(|r| r.contains("param text: \"bye\" -> \"again\"")),
        "{:?}",
        source.reasons
    );
}

#[test]
fn early_cutoff_stops_the_cascade_when_upstream_bytes_do_not_change() {
    let repo = Repo::new(PIPELINE);
    repo.run(&[]);
    // `comment` changes source's key but not its bytes: source reruns, nothing below does.
    let rerun = repo.run(&["source.comment=reworded"]);
    assert_eq!(outcome(&rerun, "source"), Outcome::Ran);
    assert_eq!(outcome(&rerun, "upper"), Outcome::Hit);
    assert_eq!(outcome(&rerun, "page"), Outcome::Hit);
}

#[test]
fn a_failed_stage_publishes_nothing_and_its_dependants_are_skipped() {
    let repo = Repo::new(
        r#"
[[stage]]
name = "flaky"
kind = "flaky"
params = { mode = "fail" }
[[stage]]
name = "after"
kind = "upper"
inputs = ["flaky"]
[[stage]]
name = "optional_reader"
kind = "upper"
inputs = ["flaky?"]
"#,
    );
    let record = repo.run(&[]);
    assert_eq!(
        outcomes(&record),
        vec![
            ("flaky".into(), Outcome::Failed),
            ("after".into(), Outcome::Skipped),
            ("optional_reader".into(), Outcome::Ran)
        ]
    );
    assert!(record.stages[0]
        .message
        .as_deref()
        .unwrap()
        .contains("flaky was told to fail"));
    let store = Store::open(&repo.store_dir()).unwrap();
    assert!(store.last_manifest("flaky").unwrap().is_none());
    // Only optional_reader's output and log entered the store; nothing of flaky's.
    assert_eq!(store.manifests().unwrap().len(), 1);
    assert!(no_staging_left(&repo));

    let skipped = repo.run(&["flaky.mode=skip"]);
    assert_eq!(outcome(&skipped, "flaky"), Outcome::Skipped);
    assert_eq!(outcome(&skipped, "after"), Outcome::Skipped);
    assert_eq!(
        outcome(&skipped, "optional_reader"),
        Outcome::Hit,
        "an absent optional input is the same key whether it failed or was skipped"
    );
}

const FLAKY_PIPELINE: &str = r#"
[[stage]]
name = "flaky"
kind = "flaky"
params = { mode = "ok" }
[[stage]]
name = "after"
kind = "upper"
inputs = ["flaky"]
[[stage]]
name = "independent"
kind = "source"
params = { text = "still built", comment = "" }
"#;

#[test]
fn a_panicking_stage_fails_with_its_message_its_dependants_are_skipped_and_the_run_goes_on() {
    let repo = Repo::new(FLAKY_PIPELINE);
    let record = repo.run(&["flaky.mode=panic"]);
    assert_eq!(
        outcomes(&record),
        vec![
            ("flaky".into(), Outcome::Failed),
            ("after".into(), Outcome::Skipped),
            ("independent".into(), Outcome::Ran)
        ]
    );
    let message = record.stages[0].message.as_deref().unwrap();
    assert!(
        message.contains("panicked") && message.contains("flaky was told to panic"),
        "{message}"
    );
    // The record is on disk, and the panicking stage left nothing in the store.
    let records = run_records(&repo.root);
    assert_eq!(records.len(), 1);
    assert_eq!(outcome(&records[0], "flaky"), Outcome::Failed);
    let store = Store::open(&repo.store_dir()).unwrap();
    assert!(store.last_manifest("flaky").unwrap().is_none());
    assert!(maintain::verify(&store).unwrap().is_empty());
    assert!(no_staging_left(&repo));
}

#[test]
fn jobs_2_builds_two_independent_stages_at_once() {
    let repo = Repo::new(
        r#"
[[stage]]
name = "left"
kind = "meet"
params = { group = "jobs_2_builds_two", parties = 2, wait_ms = 30000, party = "left" }
[[stage]]
name = "right"
kind = "meet"
params = { group = "jobs_2_builds_two", parties = 2, wait_ms = 30000, party = "right" }
[[stage]]
name = "both"
kind = "upper"
inputs = ["left", "right"]
"#,
    );
    let record = repo.run_jobs(&[], false, 2);
    assert_eq!(outcome(&record, "left"), Outcome::Ran, "{record:?}");
    assert_eq!(outcome(&record, "right"), Outcome::Ran, "{record:?}");
    assert_eq!(outcome(&record, "both"), Outcome::Ran, "{record:?}");
    // `both` waited for its inputs: it ended last.
    assert_eq!(record.stages[2].name, "both");
    assert_eq!(repo.output("both", "upper.txt"), b"22");
}

#[test]
fn jobs_1_builds_one_stage_at_a_time() {
    // Two such stages cannot meet under --jobs 1: each waits out its timeout alone.
    let repo = Repo::new(
        r#"
[[stage]]
name = "left"
kind = "meet"
params = { group = "jobs_1_builds_one", parties = 2, wait_ms = 500, party = "left" }
[[stage]]
name = "right"
kind = "meet"
params = { group = "jobs_1_builds_one", parties = 2, wait_ms = 500, party = "right" }
"#,
    );
    let record = repo.run_jobs(&[], false, 1);
    assert_eq!(outcome(&record, "left"), Outcome::Failed, "{record:?}");
    assert!(record.stages[0]
        .message
        .as_deref()
        .unwrap()
        .contains("met 1 of 2"));
}

#[test]
fn jobs_2_gives_the_keys_bytes_and_failures_of_jobs_1() {
    let pipeline = format!("{PIPELINE}{FLAKY_PIPELINE}");
    let sets = ["flaky.mode=fail"];
    let (one, two) = (Repo::new(&pipeline), Repo::new(&pipeline));
    let by_name = |record: &RunRecord| {
        let mut rows: Vec<_> = record
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.key.clone(), s.outcome))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    let (first, second) = (one.run_jobs(&sets, false, 1), two.run_jobs(&sets, false, 2));
    assert_eq!(by_name(&first), by_name(&second));
    assert_eq!(outcome(&second, "after"), Outcome::Skipped);
    assert_eq!(outcome(&second, "independent"), Outcome::Ran);
    for (stage, output) in [("page", "page.txt"), ("after_slow", "upper.txt")] {
        assert_eq!(one.output(stage, output), two.output(stage, output));
    }
    // The run record on disk is the one returned, every stage in it once.
    let on_disk = run_records(&two.root);
    assert_eq!(on_disk.len(), 1);
    assert_eq!(by_name(&on_disk[0]), by_name(&second));
    assert!(no_staging_left(&two));
}

#[test]
fn a_bad_param_value_is_a_config_error_at_load_naming_where_it_was_set() {
    let repo = Repo::new(FLAKY_PIPELINE);
    let load = |sets: &[&str]| repo.load(sets);
    // An unknown enum value from --set: named, with the allowed values.
    let err = load(&["flaky.mode=explode"]).unwrap_err();
    assert_eq!(err.location, "--set flaky.mode=explode");
    let text = err.to_string();
    assert!(
        text.contains("param mode") && text.contains("explode"),
        "{text}"
    );
    for allowed in ["ok", "fail", "skip", "panic"] {
        assert!(text.contains(allowed), "{text}");
    }
    // The same value from the profile: the profile file's line.
    std::fs::write(
        repo.root.join("pipeline/profiles/test.toml"),
        "[params.flaky]\nmode = \"explode\"\n",
    )
    .unwrap();
    let err = load(&[]).unwrap_err();
    assert!(err.location.ends_with("test.toml:2:1"), "{}", err.location);
    // And from pipeline.toml itself.
    std::fs::write(repo.root.join("pipeline/profiles/test.toml"), "").unwrap();
    std::fs::write(
        repo.root.join("pipeline/pipeline.toml"),
        FLAKY_PIPELINE.replace("mode = \"ok\"", "mode = \"explode\""),
    )
    .unwrap();
    let err = load(&[]).unwrap_err();
    assert!(
        err.location.contains("pipeline.toml:5:"),
        "{}",
        err.location
    );
    assert!(!repo.store_dir().exists(), "nothing touched the store");
}

#[test]
fn gc_waits_for_a_running_build_and_leaves_the_store_consistent() {
    let repo = Repo::new(PIPELINE);
    let sets = ["slow.steps=20", "slow.step_ms=50"];
    let store = Store::open(&repo.store_dir()).unwrap();
    let build = std::thread::scope(|scope| {
        let build = scope.spawn(|| repo.run(&sets));
        // Wait until the slow stage is building, then collect garbage.
        let checkpoints = repo.store_dir().join("tmp/checkpoints");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::fs::read_dir(&checkpoints).map_or(true, |mut d| d.next().is_none()) {
            assert!(std::time::Instant::now() < deadline, "slow never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let alone = store.lock_exclusive().unwrap();
        let gc_started = std::time::SystemTime::now();
        // What gc keeps: the current keys (nothing of a build in flight is among them yet).
        let keep = repo
            .status(&sets)
            .into_iter()
            .filter_map(|s| s.key)
            .collect();
        maintain::gc(&store, &keep).unwrap();
        drop(alone);
        let record = build.join().unwrap();
        // The build wrote the slow stage's ref while holding the store shared, so it must
        // predate gc's exclusive hold. (Timing the build's return instead raced: gc can wake
        // between the lock's release and the build thread reading its clock, under load.)
        let ref_written = std::fs::metadata(repo.store_dir().join("refs/slow"))
            .unwrap()
            .modified()
            .unwrap();
        assert!(
            ref_written <= gc_started,
            "gc started before the build it would race with had finished"
        );
        record
    });
    assert!(!build.failed(), "{:?}", outcomes(&build));
    assert!(maintain::verify(&store).unwrap().is_empty());
    let rerun = repo.run(&sets);
    assert!(
        rerun.stages.iter().all(|s| s.outcome == Outcome::Hit),
        "gc removed nothing the build published: {:?}",
        outcomes(&rerun)
    );
}

#[test]
fn cleaning_tmp_removes_only_what_dead_processes_left() {
    let repo = Repo::new(PIPELINE);
    let store = Store::open(&repo.store_dir()).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let alive = std::process::id();
    let tmp = repo.store_dir().join("tmp");
    for name in [
        format!("manifest-{alive}-0"),
        format!("manifest-{dead}-0"),
        format!("stage-abc-{dead}-1"),
        format!("stage-abc-{alive}-1"),
    ] {
        if name.starts_with("stage-") {
            std::fs::create_dir(tmp.join(name)).unwrap();
        } else {
            std::fs::write(tmp.join(name), b"half").unwrap();
        }
    }
    assert_eq!(store.clean_tmp().unwrap(), 2);
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            format!("manifest-{alive}-0"),
            format!("stage-abc-{alive}-1")
        ]
    );
}

#[test]
fn one_flipped_byte_is_found_by_verify_and_by_a_reader_and_repaired_under_repair() {
    let repo = Repo::new(PIPELINE);
    repo.run(&[]);
    let store = Store::open(&repo.store_dir()).unwrap();
    let source = store.last_manifest("source").unwrap().unwrap();
    let hash = source.outputs["out.txt"].hash.clone();
    let path = store.object_path(&hash);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let problems = maintain::verify(&store).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].message.contains(&hash) && problems[0].message.contains("stage `source`"),
        "{}",
        problems[0].message
    );

    // A stage that reads it fails, naming the object and the stage that owns it.
    let rerun = repo.run(&["upper.seed=1"]);
    assert_eq!(outcome(&rerun, "upper"), Outcome::Failed);
    let message = rerun
        .stages
        .iter()
        .find(|s| s.name == "upper")
        .unwrap()
        .message
        .clone()
        .unwrap();
    assert!(
        message.contains(&hash)
            && message.contains("stage `source`")
            && message.contains("corrupt"),
        "{message}"
    );

    // --repair re-hashes what it reuses, rebuilds the corrupt object, and the run succeeds.
    let repaired = repo.run_with(&["upper.seed=1"], true);
    assert_eq!(outcome(&repaired, "source"), Outcome::Ran);
    assert_eq!(outcome(&repaired, "upper"), Outcome::Ran);
    assert!(maintain::verify(&store).unwrap().is_empty());
}

#[test]
fn pipeline_mistakes_are_config_errors_with_file_and_location() {
    let cases = [
        ("[[stage]]\nname = \"a\"\nkind = \"source\"\nparams = { text = \"x\" \n", "malformed TOML"),
        ("[[stage]]\nname = \"a\"\nkind = \"nope\"\n", "unknown kind \"nope\"; valid kinds: source, upper, page, slow, flaky"),
        ("[[stage]]\nname = \"a\"\nkind = \"upper\"\ninputs = [\"ghost\"]\n", "names unknown stage \"ghost\"; valid stages: a"),
        ("[[stage]]\nname = \"a\"\nkind = \"upper\"\ninputs = [\"b\"]\n[[stage]]\nname = \"b\"\nkind = \"upper\"\ninputs = [\"a\"]\n", "cycle: a -> b -> a"),
        ("[[stage]]\nname = \"a\"\nkind = \"upper\"\nimputs = []\n", "unknown field `imputs`"),
    ];
    for (text, expected) in cases {
        let repo = Repo::new(text);
        let err = Pipeline::load(
            &repo.root.join("pipeline/pipeline.toml"),
            "test",
            &[],
            &registry(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
        assert!(
            err.location.contains("pipeline.toml:"),
            "location {}",
            err.location
        );
    }
    let repo = Repo::new(PIPELINE);
    let load = |sets: &[&str]| repo.load(sets);
    let err = load(&["source.txt=1"]).unwrap_err();
    assert!(
        err.to_string()
            .contains("no param \"txt\"; valid params: comment, text"),
        "{err}"
    );
    let err = load(&["sorce.text=1"]).unwrap_err();
    assert!(
        err.to_string().contains(
            "unknown stage \"sorce\"; valid stages: source, upper, page, slow, after_slow"
        ),
        "{err}"
    );
    let err = load(&["slow.steps=many"]).unwrap_err();
    assert!(
        err.to_string().contains("expected a integer")
            || err.to_string().contains("expected an integer")
            || err.to_string().contains("integer"),
        "{err}"
    );
    std::fs::write(
        repo.root.join("pipeline/profiles/test.toml"),
        "[params.upper]\nspeed = 2\n",
    )
    .unwrap();
    let err = load(&[]).unwrap_err();
    assert!(
        err.location.ends_with("test.toml:2:1") && err.to_string().contains("no param \"speed\""),
        "{err}"
    );
    let err = Pipeline::load(
        &repo.root.join("pipeline/pipeline.toml"),
        "fast",
        &[],
        &registry(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("valid profiles: test"), "{err}");
    assert!(
        !repo.store_dir().exists(),
        "loading a pipeline never touches the store"
    );
}

#[test]
fn a_stage_limited_to_other_profiles_is_dropped_with_its_optional_inputs() {
    let text = format!(
        "{PIPELINE}\n[[stage]]\nname = \"extra\"\nkind = \"upper\"\ninputs = [\"source\"]\nprofiles = [\"wide\"]\n\n[[stage]]\nname = \"reader\"\nkind = \"upper\"\ninputs = [\"source\", \"extra?\"]\n"
    );
    let repo = Repo::new(&text);
    std::fs::write(repo.root.join("pipeline/profiles/wide.toml"), "").unwrap();
    let load = |profile: &str| {
        Pipeline::load(
            &repo.root.join("pipeline/pipeline.toml"),
            profile,
            &[],
            &registry(),
        )
    };
    let narrow = load("test").unwrap();
    assert!(narrow.stage("extra").is_none());
    assert_eq!(narrow.stage("reader").unwrap().inputs.len(), 1);
    let wide = load("wide").unwrap();
    assert!(wide.stage("extra").is_some());
    assert_eq!(wide.stage("reader").unwrap().inputs.len(), 2);

    // A required input on a stage of another profile is a config error naming both.
    std::fs::write(
        repo.root.join("pipeline/pipeline.toml"),
        text.replace("\"extra?\"", "\"extra\""),
    )
    .unwrap();
    let err = load("test").unwrap_err();
    assert!(
        err.to_string()
            .contains("\"reader\" needs stage \"extra\", which exists only in profiles wide"),
        "{err}"
    );
    // So is a profile name that does not exist.
    std::fs::write(
        repo.root.join("pipeline/pipeline.toml"),
        text.replace("profiles = [\"wide\"]", "profiles = [\"wdie\"]"),
    )
    .unwrap();
    let err = load("test").unwrap_err();
    assert!(
        err.to_string().contains("unknown profile \"wdie\""),
        "{err}"
    );
    assert!(err.location.contains("pipeline.toml:"), "{}", err.location);
}

#[test]
fn the_same_key_gives_the_same_bytes_in_a_fresh_store() {
    let a = Repo::new(PIPELINE);
    let b = Repo::new(PIPELINE);
    let ra = a.run(&[]);
    let rb = b.run(&[]);
    assert_eq!(
        ra.stages.iter().map(|s| &s.key).collect::<Vec<_>>(),
        rb.stages.iter().map(|s| &s.key).collect::<Vec<_>>()
    );
    assert_eq!(a.output("page", "page.txt"), b.output("page", "page.txt"));
}

// ---- multi-process tests: the test binary re-runs itself as a child pipeline process ----

/// Entry point of a child process (does nothing in a normal test run).
#[test]
fn child_process_entry() {
    let Ok(root) = std::env::var("TOY_CHILD_ROOT") else {
        return;
    };
    let sets: Vec<String> = std::env::var("TOY_CHILD_SETS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let repo = Repo {
        _dir: tempfile::tempdir().unwrap(),
        root: PathBuf::from(root),
    };
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let record = repo.run(&sets);
    assert!(!record.failed(), "{:?}", outcomes(&record));
}

fn spawn_child(root: &Path, sets: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOY_CHILD_ROOT", root)
        .env("TOY_CHILD_SETS", sets)
        .spawn()
        .unwrap()
}

fn run_records(root: &Path) -> Vec<RunRecord> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("artifacts/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

#[test]
fn kill_9_mid_stage_leaves_nothing_half_written_and_the_rerun_resumes_from_its_checkpoint() {
    let repo = Repo::new(PIPELINE);
    let sets = "slow.steps=60 slow.step_ms=100";
    let mut child = spawn_child(&repo.root, sets);
    // Wait until the slow stage has checkpointed a few steps, then kill it hard.
    let checkpoints = repo.store_dir().join("tmp/checkpoints");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let step = std::fs::read_dir(&checkpoints)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read_to_string(e.unwrap().path().join("step")).ok())
            .and_then(|s| s.parse::<i64>().ok());
        if step.is_some_and(|s| s >= 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slow stage never checkpointed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The dead run's record says which stage was building.
    let records = run_records(&repo.root);
    assert_eq!(records.len(), 1);
    assert_eq!(outcome(&records[0], "slow"), Outcome::Interrupted);
    assert!(records[0].failed());

    let store = Store::open(&repo.store_dir()).unwrap();
    assert!(
        store.last_manifest("slow").unwrap().is_none(),
        "no manifest for the killed stage"
    );
    assert!(
        maintain::verify(&store).unwrap().is_empty(),
        "the store verifies clean after a kill"
    );
    for m in store.manifests().unwrap() {
        assert_ne!(m.stage, "slow");
    }

    let sets: Vec<&str> = sets.split_whitespace().collect();
    let rerun = repo.run(&sets);
    assert_eq!(outcome(&rerun, "slow"), Outcome::Ran);
    let manifest = store.last_manifest("slow").unwrap().unwrap();
    let resumed = manifest.metrics["resumed_from"].as_i64().unwrap();
    assert!(resumed >= 3, "resumed from step {resumed}");
    assert_eq!(repo.output("slow", "sum.txt"), b"1770");
    assert!(
        !store.checkpoint_dir(&manifest.key).exists(),
        "checkpoints go once the outputs are published"
    );
    // The dead process's staging directory is scratch that gc removes.
    let report = maintain::gc(
        &store,
        &store
            .manifests()
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect(),
    )
    .unwrap();
    assert_eq!(report.objects_removed, 0);
    assert!(no_staging_left(&repo));
}

#[test]
fn two_concurrent_runs_on_one_store_both_succeed_and_each_stage_runs_once() {
    let repo = Repo::new(PIPELINE);
    let sets = "slow.steps=10 slow.step_ms=50";
    let mut a = spawn_child(&repo.root, sets);
    let mut b = spawn_child(&repo.root, sets);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let records = run_records(&repo.root);
    assert_eq!(records.len(), 2);
    for stage in ["source", "upper", "page", "slow", "after_slow"] {
        let ran = records
            .iter()
            .filter(|r| outcome(r, stage) == Outcome::Ran)
            .count();
        let hit = records
            .iter()
            .filter(|r| outcome(r, stage) == Outcome::Hit)
            .count();
        assert_eq!((ran, hit), (1, 1), "stage {stage}");
    }
}

/// What a cluster job runs (`repro run-stage upper`): it builds its one stage on upstream
/// stages already in the store, and never builds an upstream itself.
#[test]
fn only_build_builds_one_stage_and_never_its_upstreams() {
    let repo = Repo::new(PIPELINE);
    let registry = registry();
    let pipeline = repo.pipeline(&[]);
    let engine = |only: &str| Engine {
        registry: &registry,
        store: Store::open(&repo.store_dir()).unwrap(),
        pipeline: &pipeline,
        device: "cpu".into(),
        dtype: "f32".into(),
        options: RunOptions {
            only_build: Some(only.to_string()),
            runs_dir: Some(repo.root.join("job-runs")),
            ..RunOptions::default()
        },
    };
    let targets = pipeline.with_ancestors("upper").unwrap();
    // `source` is not built: the job skips it and so cannot build `upper`.
    let record = engine("upper").run(&targets, "run-stage upper").unwrap();
    assert_eq!(outcome(&record, "source"), Outcome::Skipped);
    assert!(record.stages[0]
        .message
        .as_deref()
        .unwrap()
        .contains("builds only upper"));
    assert_eq!(outcome(&record, "upper"), Outcome::Skipped);
    // Once `source`'s own job has built it, `upper`'s job builds on it.
    let source_targets = pipeline.with_ancestors("source").unwrap();
    let record = engine("source")
        .run(&source_targets, "run-stage source")
        .unwrap();
    assert_eq!(outcome(&record, "source"), Outcome::Ran);
    let record = engine("upper").run(&targets, "run-stage upper").unwrap();
    assert_eq!(
        outcomes(&record),
        [
            ("source".into(), Outcome::Hit),
            ("upper".into(), Outcome::Ran)
        ]
    );
    // The job's records went where it was told, not into the user's runs/.
    assert_eq!(
        repro::engine::run_record_paths(&repo.root.join("job-runs")).len(),
        3
    );
    assert!(repro::engine::run_record_paths(&repo.root.join("artifacts/runs")).is_empty());
}

/// `[stage.resources]` in the pipeline, overridden field by field by a profile's
/// `[resources.<stage>]`; neither is part of the key.
#[test]
fn profile_resources_override_the_pipelines_field_by_field_and_change_no_key() {
    let with_resources = PIPELINE.replace(
        "params = { steps = 3, step_ms = 1 }",
        "params = { steps = 3, step_ms = 1 }\nresources = { cpus = 2, mem = \"4G\" }",
    );
    let repo = Repo::new(&with_resources);
    let keys_before = repo.status(&[]);
    let slow = |p: &Pipeline| {
        p.stages
            .iter()
            .find(|s| s.name == "slow")
            .unwrap()
            .resources
            .clone()
    };
    assert_eq!(slow(&repo.pipeline(&[])).cpus, Some(2));
    std::fs::write(
        repo.root.join("pipeline/profiles/test.toml"),
        "[resources.slow]\ngpus = 1\nmem = \"16G\"\n",
    )
    .unwrap();
    let resources = slow(&repo.pipeline(&[]));
    assert_eq!(
        (
            resources.cpus,
            resources.mem.as_deref(),
            resources.gpus,
            resources.time
        ),
        (Some(2), Some("16G"), Some(1), None)
    );
    let keys_after = repo.status(&[]);
    let keys = |rows: &[repro::engine::StageStatus]| {
        rows.iter().map(|r| r.key.clone()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&keys_before), keys(&keys_after));

    std::fs::write(
        repo.root.join("pipeline/profiles/test.toml"),
        "[resources.nope]\ncpus = 1\n",
    )
    .unwrap();
    let err = repo.load(&[]).unwrap_err();
    assert!(err.location.contains("test.toml:1:"), "{err}");
    assert!(err.message.contains("unknown stage \"nope\""), "{err}");
    std::fs::write(
        repo.root.join("pipeline/profiles/test.toml"),
        "[resources.slow]\ncores = 1\n",
    )
    .unwrap();
    let err = repo.load(&[]).unwrap_err();
    assert!(err.message.contains("cores"), "{err}");
}

/// A stage that declares two cores fills both of `--jobs 2`'s slots: nothing builds beside it.
#[test]
fn jobs_2_builds_a_stage_declaring_2_cpus_alone() {
    let repo = Repo::new(
        r#"
[[stage]]
name = "wide"
kind = "meet"
params = { group = "jobs_2_wide_alone", parties = 2, wait_ms = 500, party = "wide" }
resources = { cpus = 2 }
[[stage]]
name = "narrow"
kind = "meet"
params = { group = "jobs_2_wide_alone", parties = 2, wait_ms = 500, party = "narrow" }
"#,
    );
    let record = repo.run_jobs(&[], false, 2);
    assert_eq!(outcome(&record, "wide"), Outcome::Failed, "{record:?}");
    assert!(record.stages[0]
        .message
        .as_deref()
        .unwrap()
        .contains("met 1 of 2"));
    // Asking for more cores than there are slots takes all of them, and still builds.
    let repo = Repo::new(
        r#"
[[stage]]
name = "source"
kind = "source"
params = { text = "hi", comment = "" }
resources = { cpus = 64 }
"#,
    );
    assert_eq!(
        outcome(&repo.run_jobs(&[], false, 2), "source"),
        Outcome::Ran
    );
}
