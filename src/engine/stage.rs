//! The seam between the engine and the paper: the [`StageKind`] trait every stage kind
//! implements, the [`StageContext`] a running stage sees, and the [`Registry`] of kinds.
//!
//! A stage reads its parameters and its declared inputs (verified against their hashes),
//! writes named outputs into a private staging directory, logs, and may checkpoint. It never
//! sees the store's layout: the engine publishes its outputs only if `run` returns `Ok`.

use fs_err as fs;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::key::ExecFacts;
use super::params::{parse_params, ParamError, Params, StageParams};
use super::pipeline::Stage;
use super::store::{atomic_write, check_output_name, Manifest, Store};

/// How a stage run ended, short of an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Outputs are written; the engine publishes them.
    Done,
    /// The stage cannot run here (e.g. an optional dataset is not installed); nothing is
    /// stored, dependants are skipped too, and the reason is shown to the user.
    Skipped(String),
}

/// A kind of stage: what the `kind` field of `pipeline.toml` names.
pub trait StageKind: Send + Sync {
    /// The parameters this kind reads, checked when the pipeline loads.
    type Params: StageParams;

    /// The name used in `pipeline.toml`.
    fn kind(&self) -> &str;

    /// Hash of the code that can change this kind's outputs (the paper's stages get theirs
    /// from the build script, over the modules each stage file declares).
    fn code_fingerprint(&self) -> String;

    /// Files outside the repository whose content the outputs depend on (a dataset directory
    /// given as a parameter); their hashes go into the key. Missing files hash as `absent`.
    fn external_files(&self, _params: &Self::Params) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }

    /// Whether the stage prints its upstreams' provenance (keys, timings): then the hashes of
    /// upstream manifests go into its key as well, so the same key always means the same bytes.
    fn reads_provenance(&self) -> bool {
        false
    }

    /// Produces the outputs.
    fn run(&self, ctx: &mut StageContext, params: &Self::Params) -> Result<Finished>;
}

/// A [`StageKind`] with its parameters still untyped: what the [`Registry`] holds and the
/// engine calls. Every `StageKind` is one.
pub trait AnyStageKind: Send + Sync {
    fn kind(&self) -> &str;
    fn code_fingerprint(&self) -> String;
    /// Parses `params` through the kind's [`StageKind::Params`].
    fn check_params(&self, params: &Params) -> Result<(), ParamError>;
    fn external_files(&self, params: &Params) -> Result<Vec<PathBuf>>;
    fn reads_provenance(&self) -> bool;
    fn run(&self, ctx: &mut StageContext) -> Result<Finished>;
}

impl<K: StageKind> AnyStageKind for K {
    fn kind(&self) -> &str {
        StageKind::kind(self)
    }

    fn code_fingerprint(&self) -> String {
        StageKind::code_fingerprint(self)
    }

    fn check_params(&self, params: &Params) -> Result<(), ParamError> {
        parse_params::<K::Params>(params).map(drop)
    }

    fn external_files(&self, params: &Params) -> Result<Vec<PathBuf>> {
        StageKind::external_files(self, &parse_params::<K::Params>(params)?)
    }

    fn reads_provenance(&self) -> bool {
        StageKind::reads_provenance(self)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<Finished> {
        let params = parse_params::<K::Params>(&ctx.stage.params)?;
        StageKind::run(self, ctx, &params)
    }
}

/// The registered stage kinds.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn AnyStageKind>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn with(mut self, kind: impl StageKind + 'static) -> Registry {
        self.kinds.push(Box::new(kind));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&dyn AnyStageKind> {
        self.kinds
            .iter()
            .find(|k| k.kind() == kind)
            .map(|k| k.as_ref())
    }

    pub fn names(&self) -> Vec<&str> {
        self.kinds.iter().map(|k| k.kind()).collect()
    }
}

/// One upstream output a stage may read.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedInput {
    pub stage: String,
    pub output: String,
    pub hash: String,
}

/// What a running stage sees.
pub struct StageContext<'a> {
    pub(crate) stage: &'a Stage,
    pub(crate) store: &'a Store,
    pub(crate) key: String,
    pub(crate) staging: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) exec: ExecFacts,
    pub(crate) inputs: Vec<ResolvedInput>,
    pub(crate) upstream: BTreeMap<String, Manifest>,
    /// Manifests of every built ancestor, direct or not, in pipeline order (only for kinds
    /// that read provenance).
    pub(crate) ancestors: Vec<Manifest>,
    pub(crate) outputs: Vec<String>,
    pub(crate) log: String,
    pub(crate) metrics: serde_json::Map<String, serde_json::Value>,
    /// Where bars draw: one set per run, shared by the stages building at once; `None` hides
    /// them.
    pub(crate) progress: Option<MultiProgress>,
}

impl StageContext<'_> {
    /// The stage's name in the pipeline.
    pub fn name(&self) -> &str {
        &self.stage.name
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn exec(&self) -> &ExecFacts {
        &self.exec
    }

    /// The stage's parameters as they go into its key (the typed view is `run`'s argument).
    pub fn params(&self) -> &Params {
        &self.stage.params
    }

    /// The stage's seed (its `seed` param, else the pipeline's).
    pub fn seed(&self) -> u64 {
        self.stage.seed
    }

    /// A path inside the repository (templates, claims), resolved against the pipeline root.
    pub fn repo_path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The upstream stages this stage declares, in declared order (produced or not).
    pub fn input_stages(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for input in &self.stage.inputs {
            if !names.contains(&input.stage.as_str()) {
                names.push(&input.stage);
            }
        }
        names
    }

    /// Whether an (optional) upstream stage produced outputs for this run.
    pub fn has_input(&self, stage: &str) -> bool {
        self.upstream.contains_key(stage)
    }

    /// Names of the outputs of `stage` this stage may read.
    pub fn input_names(&self, stage: &str) -> Vec<&str> {
        self.inputs
            .iter()
            .filter(|i| i.stage == stage)
            .map(|i| i.output.as_str())
            .collect()
    }

    /// Reads one upstream output, verified against its content hash.
    pub fn input(&self, stage: &str, output: &str) -> Result<Vec<u8>> {
        let input = self
            .inputs
            .iter()
            .find(|i| i.stage == stage && i.output == output)
            .ok_or_else(|| {
                anyhow!(
                    "stage {:?} did not declare input {stage}/{output}",
                    self.stage.name
                )
            })?;
        self.store.read_verified(
            &input.hash,
            &format!("output `{output}` of stage `{stage}`"),
        )
    }

    /// Reads the one declared input whose output is called `output`, whichever stage made it
    /// (so stage code does not hard-code upstream stage names).
    pub fn input_named(&self, output: &str) -> Result<Vec<u8>> {
        let matches: Vec<&ResolvedInput> =
            self.inputs.iter().filter(|i| i.output == output).collect();
        match matches.as_slice() {
            [one] => self.input(&one.stage.clone(), output),
            [] => bail!(
                "stage {:?} needs an input named {output}; declare it in pipeline.toml",
                self.stage.name
            ),
            many => bail!(
                "stage {:?} has {} inputs named {output} (from {}); declare only one",
                self.stage.name,
                many.len(),
                many.iter()
                    .map(|i| i.stage.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// [`StageContext::input_named`] for an output the stage can do without: `None` when no
    /// input of this run is called `output`.
    pub fn optional_input_named(&self, output: &str) -> Result<Option<Vec<u8>>> {
        if self.inputs.iter().any(|i| i.output == output) {
            self.input_named(output).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The manifest of an upstream stage (provenance: key, params, timings, log object).
    pub fn upstream_manifest(&self, stage: &str) -> Option<&Manifest> {
        self.upstream.get(stage)
    }

    /// The manifest of every built stage this one depends on, directly or not, in pipeline
    /// order (empty unless the kind reads provenance).
    pub fn ancestor_manifests(&self) -> &[Manifest] {
        &self.ancestors
    }

    /// Reads an upstream stage's log, verified.
    pub fn upstream_log(&self, stage: &str) -> Result<Vec<u8>> {
        let manifest = self
            .upstream_manifest(stage)
            .ok_or_else(|| anyhow!("no upstream {stage}"))?;
        self.store
            .read_verified(&manifest.log, &format!("log of stage `{stage}`"))
    }

    /// Path to write output `name` to (parent directories created). The file becomes an
    /// output only if the stage returns `Ok(Finished::Done)`.
    pub fn output_path(&mut self, name: &str) -> Result<PathBuf> {
        check_output_name(name)?;
        let path = self.staging.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        if !self.outputs.iter().any(|o| o == name) {
            self.outputs.push(name.to_string());
        }
        Ok(path)
    }

    pub fn write_output(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.output_path(name)?;
        fs::write(&path, bytes).with_context(|| format!("writing output {name}"))
    }

    /// Records a small number in the manifest (shown by `status`, not read by other stages).
    pub fn set_metric(&mut self, name: &str, value: serde_json::Value) {
        self.metrics.insert(name.to_string(), value);
    }

    /// One line into the stage's log (stored with its outputs) and onto the console.
    pub fn log(&mut self, line: impl AsRef<str>) {
        let line = line.as_ref();
        tracing::info!(stage = %self.stage.name, "{line}");
        self.log.push_str(line);
        self.log.push('\n');
    }

    /// A progress bar on stderr; hidden when stderr is not a terminal or bars are off.
    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        let Some(bars) = &self.progress else {
            return ProgressBar::hidden();
        };
        let bar = bars.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(self.stage.name.clone());
        bar.set_message(what.to_string());
        bar
    }

    /// Saves a checkpoint atomically under this key; it survives a crash or kill, is never an
    /// output, and is deleted once the stage's outputs are published.
    pub fn checkpoint_save(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_output_name(name)?;
        let dir = self.store.checkpoint_dir(&self.key);
        fs::create_dir_all(&dir)?;
        atomic_write(
            &dir.join(name),
            bytes,
            &self.store.unique_tmp_path("checkpoint"),
        )
    }

    /// The last checkpoint saved under this key with this name, if any.
    pub fn checkpoint_load(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.store.checkpoint_dir(&self.key).join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading checkpoint {}", path.display())),
        }
    }
}

/// Files under `path` (itself if a file), as paths relative to `root`, sorted.
pub(crate) fn files_under(root: &Path, path: &str) -> Result<Vec<String>> {
    let full = root.join(path);
    if !full.exists() {
        bail!("file {} (listed in `files`) does not exist", full.display());
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&full) {
        let entry = entry.with_context(|| format!("listing {}", full.display()))?;
        if !entry.file_type().is_dir() {
            let rel = entry.path().strip_prefix(root).expect("walked below root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    out.sort();
    Ok(out)
}
