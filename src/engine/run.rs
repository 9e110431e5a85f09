//! Running a pipeline: resolve each stage's key from its upstreams' *content*, reuse a
//! manifest when one exists (a `hit`), otherwise take the key's lock and build it (`ran`).
//! Also the read-only views: `status` (fresh / stale / missing, with reasons) and `why`.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use fs_err as fs;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::key::{ExecFacts, HashedInput, KeyFields, KEY_SCHEMA_VERSION};
use super::pipeline::{Pipeline, Stage};
use super::stage::{files_under, Finished, Registry, ResolvedInput, StageContext};
use super::store::{
    atomic_write, hash_file, sha256_hex, write_synced, Manifest, RemoteCopy, Store,
};

/// How one stage went in a run. The names are a public format (outside checks parse them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Hit,
    Ran,
    Failed,
    Skipped,
    /// The process was stopped (Ctrl-C, SIGTERM, or killed) while the stage was building.
    Interrupted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub key: Option<String>,
    pub outcome: Outcome,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The cluster job that built it (`--executor slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

impl StageRecord {
    /// The record of `stage` built in this process (no cluster job).
    pub fn new(
        stage: &Stage,
        key: Option<String>,
        outcome: Outcome,
        seconds: f64,
        message: Option<String>,
    ) -> StageRecord {
        StageRecord {
            name: stage.name.clone(),
            kind: stage.kind.clone(),
            key,
            outcome,
            seconds,
            message,
            job_id: None,
        }
    }
}

/// `artifacts/runs/<UTC timestamp>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub profile: String,
    pub command: String,
    pub started_utc: String,
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    pub fn failed(&self) -> bool {
        self.stages
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Failed | Outcome::Interrupted))
    }

    /// Reads a run record; a file that does not parse is an error naming it.
    pub fn read(path: &Path) -> Result<RunRecord> {
        let bytes = fs::read(path)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("run record {} is malformed", path.display()))
    }
}

/// The run records (`*.json`) in `runs_dir`, oldest first: their names are UTC timestamps, so
/// name order is start order. A missing directory has none.
pub fn run_record_paths(runs_dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(runs_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    runs.sort();
    runs
}

/// The run record of a run in progress, kept on disk as the run goes: when a stage starts
/// building, the record is written with it as `interrupted` (what it will say if the process
/// dies), and rewritten when it ends. A Ctrl-C / SIGTERM handler calls
/// [`record_interrupted_runs`] to write it once more with the time spent.
struct Journal {
    state: Mutex<JournalState>,
    /// The run's progress bars (stderr), when they are on.
    bars: Option<indicatif::MultiProgress>,
}

struct JournalState {
    record: RunRecord,
    path: PathBuf,
    tmp_dir: PathBuf,
    /// The stages building now (several under `--jobs`) and when each started.
    in_flight: Vec<(StageRecord, Instant)>,
}

impl JournalState {
    fn write(&self) -> Result<()> {
        let mut record = self.record.clone();
        for (stage, start) in &self.in_flight {
            record.stages.push(StageRecord {
                seconds: start.elapsed().as_secs_f64(),
                ..stage.clone()
            });
        }
        let tmp = self.tmp_dir.join(format!(
            "run-{}-{}",
            std::process::id(),
            JOURNAL_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        atomic_write(&self.path, &serde_json::to_vec_pretty(&record)?, &tmp)
    }
}

static JOURNAL_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The runs of this process in progress (for the signal handler).
static ACTIVE_RUNS: Mutex<Vec<Arc<Journal>>> = Mutex::new(Vec::new());

/// Writes the record of every run in progress in this process, with the stages building now as
/// `interrupted`. Called from the CLI's Ctrl-C / SIGTERM handler just before it exits; returns
/// the records' paths.
pub fn record_interrupted_runs() -> Vec<PathBuf> {
    let active = ACTIVE_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut paths = Vec::new();
    for journal in active.iter() {
        let state = journal.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.write().is_ok() {
            paths.push(state.path.clone());
        }
    }
    paths
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// `status --json` rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageStatus {
    pub name: String,
    pub state: State,
    pub key: Option<String>,
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Fresh,
    Stale,
    Missing,
}

/// One stage as [`Engine::current`] resolves it.
#[derive(Clone, Debug)]
pub struct CurrentStage {
    pub status: StageStatus,
    pub kind: String,
    /// The fields of `status.key`; `None` when the key waits on an upstream stage.
    pub fields: Option<KeyFields>,
}

/// Options that do not change any key.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Re-hash every object a stage reuses, and rebuild what is corrupt.
    pub repair: bool,
    /// Draw progress bars (the CLI turns them on only when stderr is a terminal).
    pub progress: bool,
    /// How many job slots (`--jobs`; 0 counts as 1): independent stages build at once while
    /// the cores they declare (`[stage.resources] cpus`, default 1) fit in them. They share the
    /// process's rayon pool, so a stage alone still gets every core for its parallel loops;
    /// the kernels' work splits do not depend on threads, so the bytes do not depend on this.
    pub jobs: usize,
    /// Where run records go (default: `runs/` beside the store). A cluster job's own record
    /// goes beside its log, so that `runs/` holds the records of the runs a user started.
    pub runs_dir: Option<PathBuf>,
    /// Build only this stage: any other stage must be a hit, else it is skipped (a cluster
    /// job builds its one stage on what its dependencies' jobs published).
    pub only_build: Option<String>,
}

/// What is known about a stage while resolving a pipeline.
#[derive(Clone)]
enum Resolved {
    Built(Box<Manifest>),
    /// Could not be built (skipped, failed, or not built yet, for `status`), with the reason.
    Unavailable(String),
}

/// Runs a [`Pipeline`] against a [`Store`] with the kinds of a [`Registry`].
pub struct Engine<'a> {
    pub registry: &'a Registry,
    pub store: Store,
    pub pipeline: &'a Pipeline,
    /// Device and dtype for every key (the seed comes from each stage).
    pub device: String,
    pub dtype: String,
    pub options: RunOptions,
}

impl<'a> Engine<'a> {
    /// The artifacts directory: the store's parent (runs/, report/ and exports live there).
    pub fn artifacts_dir(&self) -> PathBuf {
        self.store
            .root()
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf()
    }

    /// Builds `targets` (and nothing else; the caller includes their ancestors) in order.
    /// A stage that fails (or panics) is `failed` and its dependants `skipped`; the run goes
    /// on and its record is always written.
    pub fn run(&self, targets: &[&Stage], command: &str) -> Result<RunRecord> {
        // Builds share the store; `gc` takes it alone, so it never deletes an object that a
        // build has published but not yet named in a manifest.
        let _in_use = self.store.lock_shared()?;
        // With a shared store: every stage's last manifest at once, not one request per stage.
        let names: Vec<String> = targets.iter().map(|s| s.name.clone()).collect();
        self.store.prefetch_manifests(&names)?;
        let record = RunRecord {
            profile: self.pipeline.profile.clone(),
            command: command.to_string(),
            started_utc: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            stages: Vec::new(),
        };
        let journal = Arc::new(Journal {
            state: Mutex::new(JournalState {
                path: self.create_run_record(&record)?,
                record,
                tmp_dir: self.store.root().join("tmp"),
                in_flight: Vec::new(),
            }),
            bars: self.options.progress.then(|| {
                indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
            }),
        });
        ACTIVE_RUNS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(journal.clone());
        let result = self.run_journaled(targets, &journal);
        ACTIVE_RUNS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|j| !Arc::ptr_eq(j, &journal));
        result
    }

    /// Builds `targets` in dependency order, up to `jobs` at once. Each stage builds on a
    /// thread of its own; this thread starts the stages whose inputs are resolved (in
    /// pipeline order) and records each as it ends, so the run record lists stages in the order
    /// they ended (pipeline order under `--jobs 1`).
    fn run_journaled(&self, targets: &[&Stage], journal: &Arc<Journal>) -> Result<RunRecord> {
        let jobs = self.options.jobs.max(1);
        let index: HashMap<&str, usize> = targets
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        // Inputs outside `targets` are never resolved: `key_fields` says so and skips.
        let waits_on: Vec<Vec<usize>> = targets
            .iter()
            .map(|s| {
                s.inputs
                    .iter()
                    .filter_map(|i| index.get(i.stage.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut resolved: HashMap<String, Resolved> = HashMap::new();
        let mut started = vec![false; targets.len()];
        let mut done = vec![false; targets.len()];
        // A stage takes as many of the `jobs` slots as the cores it declares
        // (`[stage.resources] cpus`, default 1; at most all of them), like Snakemake's
        // `threads` under `--cores`.
        let slots: Vec<usize> = targets
            .iter()
            .map(|s| (s.resources.cpus.unwrap_or(1) as usize).clamp(1, jobs))
            .collect();
        std::thread::scope(|scope| -> Result<()> {
            let (finished_tx, finished_rx) = std::sync::mpsc::channel();
            let (mut running, mut slots_used) = (0, 0);
            loop {
                for (i, stage) in targets.iter().enumerate() {
                    if slots_used == jobs {
                        break;
                    }
                    // A stage too wide for the free slots waits; a narrower one after it in
                    // pipeline order may go first.
                    if started[i]
                        || slots_used + slots[i] > jobs
                        || !waits_on[i].iter().all(|&d| done[d])
                    {
                        continue;
                    }
                    started[i] = true;
                    running += 1;
                    slots_used += slots[i];
                    // What the stage may read: its ancestors' states, as of now (all final).
                    let known: HashMap<String, Resolved> = self
                        .pipeline
                        .with_ancestors(&stage.name)
                        .into_iter()
                        .flatten()
                        .filter_map(|a| Some((a.name.clone(), resolved.get(&a.name)?.clone())))
                        .collect();
                    let finished_tx = finished_tx.clone();
                    std::thread::Builder::new()
                        .name(stage.name.clone())
                        // As much stack as the main thread has (the default for spawned
                        // threads is 2 MiB).
                        .stack_size(8 << 20)
                        .spawn_scoped(scope, move || {
                            let start = Instant::now();
                            let outcome = catch_unwind(AssertUnwindSafe(|| {
                                self.run_one(stage, &known, journal)
                            }))
                            .unwrap_or_else(|payload| {
                                let m = format!("panicked: {}", panic_message(payload.as_ref()));
                                (
                                    Outcome::Failed,
                                    None,
                                    Some(m.clone()),
                                    Resolved::Unavailable(m),
                                )
                            });
                            // The receiver lives until every stage has reported.
                            let _ = finished_tx.send((i, outcome, start.elapsed().as_secs_f64()));
                        })
                        .with_context(|| format!("starting a thread for stage {}", stage.name))?;
                }
                if running == 0 {
                    return Ok(());
                }
                let (i, (outcome, key, message, state), seconds) =
                    finished_rx.recv().expect("a running stage always reports");
                running -= 1;
                slots_used -= slots[i];
                done[i] = true;
                let stage = targets[i];
                self.record_finished(stage, journal, outcome, key, message, seconds);
                resolved.insert(stage.name.clone(), state);
            }
        })?;
        let state = journal.state.lock().unwrap_or_else(|e| e.into_inner());
        state.write()?;
        Ok(state.record.clone())
    }

    /// Logs how a stage ended and moves it from the journal's in-flight list to its record.
    fn record_finished(
        &self,
        stage: &Stage,
        journal: &Journal,
        outcome: Outcome,
        key: Option<String>,
        message: Option<String>,
        seconds: f64,
    ) {
        match (&outcome, &message) {
            (Outcome::Failed, Some(m)) => tracing::error!("{}: failed: {m}", stage.name),
            (Outcome::Skipped, Some(m)) => tracing::warn!("{}: skipped: {m}", stage.name),
            _ => tracing::info!(
                "{}: {} ({:.2} s, key {})",
                stage.name,
                if outcome == Outcome::Hit {
                    "hit"
                } else {
                    "ran"
                },
                seconds,
                key.as_deref().map_or("?", |k| &k[..12])
            ),
        }
        let mut state = journal.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight.retain(|(s, _)| s.name != stage.name);
        state
            .record
            .stages
            .push(StageRecord::new(stage, key, outcome, seconds, message));
    }

    fn run_one(
        &self,
        stage: &Stage,
        resolved: &HashMap<String, Resolved>,
        journal: &Journal,
    ) -> (Outcome, Option<String>, Option<String>, Resolved) {
        let fields = match self.key_fields(stage, resolved) {
            Ok(Ok(fields)) => fields,
            Ok(Err(reason)) => {
                return (
                    Outcome::Skipped,
                    None,
                    Some(reason.clone()),
                    Resolved::Unavailable(reason),
                )
            }
            Err(e) => {
                let m = format!("{e:#}");
                return (
                    Outcome::Failed,
                    None,
                    Some(m.clone()),
                    Resolved::Unavailable(m),
                );
            }
        };
        let key = fields.key();
        match self.build(stage, &key, fields, resolved, journal) {
            Ok((outcome, Some(manifest))) => {
                if let Err(e) = self.export(stage, &manifest) {
                    let m = format!("{e:#}");
                    return (
                        Outcome::Failed,
                        Some(key),
                        Some(m.clone()),
                        Resolved::Unavailable(m),
                    );
                }
                (
                    outcome,
                    Some(key),
                    None,
                    Resolved::Built(Box::new(manifest)),
                )
            }
            Ok((_, None)) => unreachable!("build returns a manifest unless skipped"),
            Err(BuildError::Skipped(reason)) => (
                Outcome::Skipped,
                Some(key),
                Some(reason.clone()),
                Resolved::Unavailable(format!("stage {} was skipped: {reason}", stage.name)),
            ),
            Err(BuildError::Failed(e)) => {
                let m = format!("{e:#}");
                (
                    Outcome::Failed,
                    Some(key),
                    Some(m),
                    Resolved::Unavailable(format!("stage {} failed", stage.name)),
                )
            }
        }
    }

    /// A usable manifest for `key`: published (here or in the shared store), with every
    /// object present (here or there). Under `--repair` every copy is re-hashed: a corrupt one
    /// is deleted, and the stage rebuilds it unless an intact copy in the cache can be
    /// uploaded in its place. A key complete here but missing from the shared store is
    /// uploaded ([`Store::push`]).
    fn usable_manifest(&self, key: &str) -> Result<Option<Manifest>> {
        let Some(manifest) = self.store.read_manifest(key)? else {
            return Ok(None);
        };
        let hashes = manifest
            .outputs
            .values()
            .map(|o| o.hash.as_str())
            .chain([manifest.log.as_str()]);
        let mut usable = true;
        for hash in hashes {
            let mut here = self.store.has_object(hash);
            if here && self.options.repair && self.store.check_object(hash)?.is_some() {
                tracing::warn!(
                    "{}: object {hash} is corrupt; rebuilding it (--repair)",
                    manifest.stage
                );
                self.store.remove_object(hash)?;
                here = false;
            }
            if self.options.repair {
                if let RemoteCopy::Corrupt(actual) = self.store.check_remote_object(hash)? {
                    let url = self.store.remote().map(|r| r.object_url(hash));
                    tracing::warn!(
                        "{}: {} is corrupt (its content hashes to {actual}); {} (--repair)",
                        manifest.stage,
                        url.unwrap_or_default(),
                        if here {
                            "uploading the intact copy from the cache"
                        } else {
                            "rebuilding it"
                        }
                    );
                    self.store.remove_remote_object(hash)?;
                    if here {
                        self.store.upload_object(hash)?;
                    }
                }
            }
            if !here && !self.store.object_available(hash)? {
                usable = false;
            }
        }
        if !usable {
            return Ok(None);
        }
        self.store.push(&manifest).map(Some)
    }

    fn build(
        &self,
        stage: &Stage,
        key: &str,
        fields: KeyFields,
        resolved: &HashMap<String, Resolved>,
        journal: &Journal,
    ) -> Result<(Outcome, Option<Manifest>), BuildError> {
        if let Some(m) = self.usable_manifest(key)? {
            return Ok((Outcome::Hit, Some(m)));
        }
        if let Some(only) = self
            .options
            .only_build
            .as_ref()
            .filter(|o| **o != stage.name)
        {
            return Err(BuildError::Skipped(format!(
                "not in the store under key {key}, and this process builds only {only}"
            )));
        }
        let (_lock, waited) = self.store.lock(key)?;
        if waited {
            tracing::info!(
                "{}: waited for another process building the same key",
                stage.name
            );
        }
        // Another process may have published it while we waited for the lock.
        if let Some(m) = self.usable_manifest(key)? {
            return Ok((Outcome::Hit, Some(m)));
        }
        let kind = self
            .registry
            .get(&stage.kind)
            .expect("pipeline kinds are validated");
        let staging = self.store.staging_dir(key)?;
        let mut ctx = StageContext {
            stage,
            store: &self.store,
            key: key.to_string(),
            staging: staging.clone(),
            root: self.pipeline.root.clone(),
            exec: fields.exec.clone(),
            inputs: self.resolved_inputs(stage, resolved),
            upstream: stage
                .inputs
                .iter()
                .filter_map(|i| match resolved.get(&i.stage) {
                    Some(Resolved::Built(m)) => Some((i.stage.clone(), (**m).clone())),
                    _ => None,
                })
                .collect(),
            ancestors: if kind.reads_provenance() {
                self.built_ancestors(stage, resolved, true)
                    .into_iter()
                    .map(|(_, m)| m.clone())
                    .collect()
            } else {
                Vec::new()
            },
            outputs: Vec::new(),
            log: String::new(),
            metrics: serde_json::Map::new(),
            progress: journal.bars.clone(),
        };
        {
            // From here on a dead process leaves a record saying this stage was interrupted.
            let mut state = journal.state.lock().unwrap_or_else(|e| e.into_inner());
            state.in_flight.push((
                StageRecord::new(
                    stage,
                    Some(key.to_string()),
                    Outcome::Interrupted,
                    0.0,
                    Some("the process stopped while this stage was building".into()),
                ),
                Instant::now(),
            ));
            state.write()?;
        }
        let started_utc = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let start = Instant::now();
        // A panic inside a stage is that stage's failure, not the run's.
        let result = catch_unwind(AssertUnwindSafe(|| kind.run(&mut ctx))).unwrap_or_else(|p| {
            Err(anyhow::anyhow!(
                "stage {} panicked: {}",
                stage.name,
                panic_message(p.as_ref())
            ))
        });
        let seconds = start.elapsed().as_secs_f64();
        let cleanup = || {
            let _ = fs::remove_dir_all(&staging);
        };
        let published = match result {
            Ok(Finished::Done) => self.publish(stage, key, fields, ctx, started_utc, seconds),
            Ok(Finished::Skipped(reason)) => {
                cleanup();
                return Err(BuildError::Skipped(reason));
            }
            Err(e) => Err(e),
        };
        cleanup();
        match published {
            Ok(manifest) => {
                let _ = fs::remove_dir_all(self.store.checkpoint_dir(key));
                Ok((Outcome::Ran, Some(manifest)))
            }
            Err(e) => Err(BuildError::Failed(e)),
        }
    }

    fn publish(
        &self,
        stage: &Stage,
        key: &str,
        key_fields: KeyFields,
        ctx: StageContext,
        started_utc: String,
        seconds: f64,
    ) -> Result<Manifest> {
        let mut outputs = BTreeMap::new();
        for name in &ctx.outputs {
            let path = ctx.staging.join(name);
            if !path.is_file() {
                bail!("stage {} did not write its output {name}", stage.name);
            }
            let output = self
                .store
                .publish_file(&path)
                .with_context(|| format!("publishing output {name} of stage {}", stage.name))?;
            outputs.insert(name.clone(), output);
        }
        let log = self.store.put_bytes(ctx.log.as_bytes())?;
        self.store.sync_objects()?;
        let manifest = Manifest {
            stage: stage.name.clone(),
            key: key.to_string(),
            key_fields,
            outputs,
            log: log.hash,
            metrics: ctx.metrics,
            started_utc,
            seconds,
            // The pool its parallel loops ran on (shared with the stages beside it under
            // `--jobs`).
            threads: rayon::current_num_threads(),
        };
        // With a shared store another build may have published this key first: its stands.
        self.store.write_manifest(&manifest)
    }

    fn resolved_inputs(
        &self,
        stage: &Stage,
        resolved: &HashMap<String, Resolved>,
    ) -> Vec<ResolvedInput> {
        let mut out = Vec::new();
        for input in &stage.inputs {
            if let Some(Resolved::Built(m)) = resolved.get(&input.stage) {
                for (name, o) in &m.outputs {
                    if input.output.as_ref().is_none_or(|want| want == name) {
                        out.push(ResolvedInput {
                            stage: input.stage.clone(),
                            output: name.clone(),
                            hash: o.hash.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The built ancestors of `stage` in pipeline order: all of them, or only those it does not
    /// read directly.
    fn built_ancestors<'m>(
        &self,
        stage: &Stage,
        resolved: &'m HashMap<String, Resolved>,
        with_direct: bool,
    ) -> Vec<(String, &'m Manifest)> {
        let direct = |name: &str| stage.inputs.iter().any(|i| i.stage == name);
        self.pipeline
            .with_ancestors(&stage.name)
            .expect("a pipeline stage has ancestors")
            .into_iter()
            .filter(|s| s.name != stage.name && (with_direct || !direct(&s.name)))
            .filter_map(|s| match resolved.get(&s.name) {
                Some(Resolved::Built(m)) => Some((s.name.clone(), &**m)),
                _ => None,
            })
            .collect()
    }

    /// The stage's key fields, or `Ok(Err(reason))` when a required upstream is unavailable.
    fn key_fields(
        &self,
        stage: &Stage,
        resolved: &HashMap<String, Resolved>,
    ) -> Result<std::result::Result<KeyFields, String>> {
        let kind = self
            .registry
            .get(&stage.kind)
            .expect("pipeline kinds are validated");
        let mut inputs = Vec::new();
        let mut upstream_manifests = Vec::new();
        for input in &stage.inputs {
            match resolved.get(&input.stage) {
                Some(Resolved::Built(m)) => {
                    let mut any = false;
                    for (name, o) in &m.outputs {
                        if input.output.as_ref().is_none_or(|want| want == name) {
                            inputs.push(HashedInput {
                                name: format!("{}/{name}", input.stage),
                                hash: o.hash.clone(),
                            });
                            any = true;
                        }
                    }
                    if !any {
                        anyhow::bail!(
                            "stage {} reads {}/{}, which stage {} does not produce (it produces: {})",
                            stage.name,
                            input.stage,
                            input.output.as_deref().unwrap_or(""),
                            input.stage,
                            m.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                        );
                    }
                    if kind.reads_provenance() {
                        let json = serde_json::to_vec(&**m).expect("manifests serialise");
                        upstream_manifests.push(HashedInput {
                            name: input.stage.clone(),
                            hash: sha256_hex(&json),
                        });
                    }
                }
                Some(Resolved::Unavailable(_)) if input.optional => {
                    inputs.push(HashedInput {
                        name: input.stage.clone(),
                        hash: "absent".into(),
                    });
                }
                Some(Resolved::Unavailable(reason)) => {
                    return Ok(Err(format!(
                        "input {} is unavailable: {reason}",
                        input.stage
                    )))
                }
                None => return Ok(Err(format!("input {} was not resolved", input.stage))),
            }
        }
        if kind.reads_provenance() {
            // A stage that reads provenance also reads its indirect ancestors' manifests (the
            // report's per-stage time table lists every stage that led to it), so they are in
            // its key too.
            for (name, manifest) in self.built_ancestors(stage, resolved, false) {
                let json = serde_json::to_vec(manifest).expect("manifests serialise");
                upstream_manifests.push(HashedInput {
                    name,
                    hash: sha256_hex(&json),
                });
            }
        }
        let mut files = Vec::new();
        for entry in &stage.files {
            for rel in files_under(&self.pipeline.root, entry)? {
                let hash = hash_file(&self.pipeline.root.join(&rel))?;
                files.push(HashedInput { name: rel, hash });
            }
        }
        for path in kind.external_files(&stage.params)? {
            let hash = if path.is_file() {
                hash_file(&path)?
            } else {
                "absent".to_string()
            };
            files.push(HashedInput {
                name: path.display().to_string(),
                hash,
            });
        }
        Ok(Ok(KeyFields {
            key_schema: KEY_SCHEMA_VERSION,
            kind: stage.kind.clone(),
            code_fingerprint: kind.code_fingerprint(),
            params: stage.params.clone(),
            inputs,
            files,
            upstream_manifests,
            exec: ExecFacts {
                device: self.device.clone(),
                dtype: self.dtype.clone(),
                seed: stage.seed,
            },
        }))
    }

    /// Copies a stage's outputs to `artifacts/<export>/` (atomically per file).
    fn export(&self, stage: &Stage, manifest: &Manifest) -> Result<()> {
        let Some(export) = &stage.export else {
            return Ok(());
        };
        let dir = self.artifacts_dir().join(export);
        for (name, output) in &manifest.outputs {
            let dest = dir.join(name);
            let parent = dest.parent().expect("joined path has a parent");
            fs::create_dir_all(parent)?;
            let path = self.store.fetch(
                &output.hash,
                &format!("output `{name}` of stage `{}`", stage.name),
            )?;
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            atomic_write(
                &dest,
                &bytes,
                &parent.join(format!(".{}.tmp", std::process::id())),
            )?;
        }
        Ok(())
    }

    /// Creates this run's record, `runs/<UTC timestamp>.json` (with the pid if another run
    /// started in the same microsecond), holding `record`; returns its path. The file appears
    /// whole and is never shared: it is hard-linked into place, which fails if the name is taken.
    /// Writes `record` as a new run record (never replacing one) and returns its path.
    pub fn create_run_record(&self, record: &RunRecord) -> Result<PathBuf> {
        let dir = self
            .options
            .runs_dir
            .clone()
            .unwrap_or_else(|| self.artifacts_dir().join("runs"));
        fs::create_dir_all(&dir)?;
        let stamp = record.started_utc.replace([':', '-'], "");
        let staged = self.store.unique_tmp_path("run");
        write_synced(&staged, &serde_json::to_vec_pretty(record)?)?;
        let candidates = [
            dir.join(format!("{stamp}.json")),
            dir.join(format!("{stamp}-{}.json", std::process::id())),
        ];
        let mut claimed = None;
        for path in candidates {
            match std::fs::hard_link(&staged, &path) {
                Ok(()) => {
                    claimed = Some(path);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating run record {}", path.display()))
                }
            }
        }
        fs::remove_file(&staged)?;
        let path = claimed.with_context(|| {
            format!("run records {}/{stamp}*.json are all taken", dir.display())
        })?;
        super::store::sync_dir(&dir)?;
        Ok(path)
    }

    /// Current state of every stage, without building anything.
    pub fn status(&self) -> Result<Vec<StageStatus>> {
        Ok(self.current()?.into_iter().map(|c| c.status).collect())
    }

    /// Every stage as the pipeline and the store resolve it now, without building anything:
    /// its status and, where its key can be computed, the key fields (for `diff`, which
    /// compares them with another run's).
    pub fn current(&self) -> Result<Vec<CurrentStage>> {
        let mut resolved: HashMap<String, Resolved> = HashMap::new();
        let mut rows = Vec::new();
        for stage in &self.pipeline.stages {
            let last = self.store.last_manifest(&stage.name)?;
            let (status, fields, state) = match self.key_fields(stage, &resolved)? {
                Ok(fields) => {
                    let key = fields.key();
                    match self.usable_manifest(&key)? {
                        Some(m) => (
                            StageStatus {
                                name: stage.name.clone(),
                                state: State::Fresh,
                                key: Some(key),
                                reasons: vec![],
                            },
                            Some(fields),
                            Resolved::Built(Box::new(m)),
                        ),
                        None => {
                            let reasons = match &last {
                                Some(prev) if prev.key == key => {
                                    vec!["outputs are missing from the store".to_string()]
                                }
                                Some(prev) => diff_key_fields(&prev.key_fields, &fields),
                                None => vec!["never built".to_string()],
                            };
                            let state = unbuilt_state(&last);
                            (
                                StageStatus {
                                    name: stage.name.clone(),
                                    state,
                                    key: Some(key),
                                    reasons,
                                },
                                Some(fields),
                                Resolved::Unavailable(format!("{} is not built", stage.name)),
                            )
                        }
                    }
                }
                Err(reason) => {
                    let state = unbuilt_state(&last);
                    (
                        StageStatus {
                            name: stage.name.clone(),
                            state,
                            key: None,
                            reasons: vec![reason],
                        },
                        None,
                        Resolved::Unavailable(format!("{} is not built", stage.name)),
                    )
                }
            };
            rows.push(CurrentStage {
                status,
                kind: stage.kind.clone(),
                fields,
            });
            resolved.insert(stage.name.clone(), state);
        }
        Ok(rows)
    }

    /// The current keys of every stage that can be resolved from what is in the store.
    pub fn current_keys(&self) -> Result<Vec<String>> {
        Ok(self.status()?.into_iter().filter_map(|s| s.key).collect())
    }

    /// Every key field that differs between the last build of `name` and now. An unknown
    /// stage is a [`ConfigError`](super::ConfigError).
    pub fn why(&self, name: &str) -> Result<Vec<String>> {
        self.pipeline.with_ancestors(name)?;
        let status = self.status()?;
        let row = status
            .iter()
            .find(|s| s.name == name)
            .expect("with_ancestors checked the name");
        let mut lines = vec![format!("{name}: {:?}", row.state).to_lowercase()];
        if let Some(key) = &row.key {
            lines.push(format!("current key: {key}"));
        }
        if let Some(prev) = self.store.last_manifest(name)? {
            lines.push(format!(
                "last built key: {} ({}, {:.2} s)",
                prev.key, prev.started_utc, prev.seconds
            ));
        }
        lines.extend(row.reasons.iter().map(|r| format!("  {r}")));
        Ok(lines)
    }
}

enum BuildError {
    Skipped(String),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for BuildError {
    fn from(e: anyhow::Error) -> Self {
        BuildError::Failed(e)
    }
}

/// A stage without a usable manifest for its current key: stale if it was ever built.
fn unbuilt_state(last: &Option<Manifest>) -> State {
    if last.is_some() {
        State::Stale
    } else {
        State::Missing
    }
}

/// Human-readable differences between two sets of key fields.
pub fn diff_key_fields(old: &KeyFields, new: &KeyFields) -> Vec<String> {
    let mut out = Vec::new();
    if old.key_schema != new.key_schema {
        out.push(format!(
            "key schema {} -> {}",
            old.key_schema, new.key_schema
        ));
    }
    if old.kind != new.kind {
        out.push(format!("kind {} -> {}", old.kind, new.kind));
    }
    if old.code_fingerprint != new.code_fingerprint {
        out.push(format!(
            "code fingerprint {} -> {}",
            short(&old.code_fingerprint),
            short(&new.code_fingerprint)
        ));
    }
    for (name, value) in &new.params {
        match old.params.get(name) {
            None => out.push(format!("param {name} added: {value}")),
            Some(prev) if prev != value => out.push(format!("param {name}: {prev} -> {value}")),
            _ => {}
        }
    }
    for name in old.params.keys().filter(|k| !new.params.contains_key(*k)) {
        out.push(format!("param {name} removed"));
    }
    for (what, a, b) in [
        ("input", &old.inputs, &new.inputs),
        ("file", &old.files, &new.files),
        (
            "upstream manifest",
            &old.upstream_manifests,
            &new.upstream_manifests,
        ),
    ] {
        for input in b {
            match a.iter().find(|i| i.name == input.name) {
                None => out.push(format!("{what} {} added", input.name)),
                Some(prev) if prev.hash != input.hash => out.push(format!(
                    "{what} {} changed: {} -> {}",
                    input.name,
                    short(&prev.hash),
                    short(&input.hash)
                )),
                _ => {}
            }
        }
        for input in a.iter().filter(|i| !b.iter().any(|n| n.name == i.name)) {
            out.push(format!("{what} {} removed", input.name));
        }
    }
    if old.exec != new.exec {
        out.push(format!(
            "execution {}/{}/seed {} -> {}/{}/seed {}",
            old.exec.device,
            old.exec.dtype,
            old.exec.seed,
            new.exec.device,
            new.exec.dtype,
            new.exec.seed
        ));
    }
    // A stage reading two outputs of one upstream lists that upstream's manifest twice.
    let mut seen = std::collections::HashSet::new();
    out.retain(|line| seen.insert(line.clone()));
    out
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}
