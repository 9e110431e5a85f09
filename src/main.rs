//! `repro`: the command line over the pipeline engine and the paper's stages.
//!
//! Exit status: 0 success, 1 a stage failed or the store is damaged, 2 a mistake in the
//! pipeline description, profile or `--set` (nothing was touched), 130 stopped by Ctrl-C or
//! SIGTERM (the run record names the stage that was building as `interrupted`).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

// Training allocates and frees buffers of tens of MB every step: see src/allocator.rs.
#[global_allocator]
static ALLOCATOR: repro::allocator::Allocator = mimalloc::MiMalloc;

use repro::engine::diff::{self, ResultsSource, Side, SideSpec};
use repro::engine::remote::{is_remote, Remote};
use repro::engine::store::atomic_write;
use repro::engine::{
    maintain, pipeline, run_record_paths, ConfigError, Engine, Outcome, Pipeline, RunOptions,
    RunRecord, Store,
};

#[derive(Parser)]
#[command(
    name = "repro",
    version,
    about = "Reproduce Jacobsen et al., Excessive Invariance Causes Adversarial Vulnerability (ICLR 2019)"
)]
struct Cli {
    /// Parameter profile from pipeline/profiles/ (smoke, cpu, paper, ...).
    #[arg(long, global = true, default_value = "cpu")]
    profile: String,
    /// The content-addressed store: a directory (runs/ and report/ go next to it), or a shared
    /// S3-compatible store `s3://bucket/prefix` (endpoint, region and credentials from the
    /// standard AWS environment variables) with --cache in front of it.
    #[arg(
        long,
        global = true,
        env = "REPRO_STORE",
        default_value = "artifacts/store"
    )]
    store: String,
    /// With an s3:// store: the local read-through cache (runs/ and report/ go next to it).
    #[arg(
        long,
        global = true,
        env = "REPRO_CACHE",
        default_value = "artifacts/store"
    )]
    cache: PathBuf,
    /// Override a parameter: STAGE.PARAM=VALUE (repeatable; VALUE is a TOML literal or text).
    #[arg(long = "set", global = true, value_name = "STAGE.PARAM=VALUE")]
    sets: Vec<String>,
    /// The pipeline description.
    #[arg(long, global = true, default_value = "pipeline/pipeline.toml")]
    pipeline: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Executor {
    /// In this process (`--jobs` at once).
    Local,
    /// One Slurm job per stage.
    Slurm,
}

/// How `reproduce` and `run` build.
#[derive(clap::Args)]
struct BuildArgs {
    /// Re-hash reused objects and rebuild any that are corrupt.
    #[arg(long)]
    repair: bool,
    /// N job slots: independent stages build at once while the cores they declare
    /// ([stage.resources] cpus, default 1) fit (they share the cores; the results are the
    /// same bytes for any N).
    #[arg(short = 'j', long, default_value_t = 1, value_name = "N")]
    jobs: usize,
    /// Where stages build: in this process, or as Slurm jobs (one `sbatch` job per stage
    /// that is not a hit, chained with afterok; the store must be shared).
    #[arg(long, value_enum, default_value_t = Executor::Local)]
    executor: Executor,
    /// How often the Slurm executor asks about its jobs, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    poll: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Build every stage of the pipeline (reusing what is cached) and the report.
    Reproduce {
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Build one stage and what it depends on.
    Run {
        /// Stage name from pipeline.toml.
        stage: String,
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Build exactly one stage whose upstream stages are in the store (what a Slurm job runs);
    /// exit 1 unless the stage ends built.
    #[command(hide = true)]
    RunStage {
        stage: String,
        /// The key the submitter computed; building under another is refused.
        #[arg(long)]
        key: Option<String>,
        /// Where this run's record goes.
        #[arg(long)]
        runs_dir: PathBuf,
    },
    /// Show each stage as fresh, stale or missing, with the reasons.
    Status {
        /// Print `[{name, state, key, reasons}]` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain in full why a stage would (or would not) rerun.
    Why {
        /// Stage name from pipeline.toml.
        stage: String,
    },
    /// Re-hash every object in the store; exit 1 naming each damaged object and its stage.
    Verify,
    /// Delete objects no current manifest (any profile) or recent run needs.
    Gc {
        /// Also keep everything the last N run records used.
        #[arg(long, default_value_t = 5)]
        keep_runs: usize,
        /// With an s3:// store: delete an unreachable object there only once it is this many
        /// hours old (a build on another machine uploads its objects before its manifest).
        #[arg(long, default_value_t = 24.0)]
        grace_hours: f64,
    },
    /// Build the report stage (and what it needs) and print where it landed.
    Report,
    /// List a stage's outputs under its current key: store paths, sizes, the key (exit 1 if
    /// the stage is not built under this profile and `--set`).
    Show {
        /// Stage name from pipeline.toml.
        stage: String,
    },
    /// Copy a stage's current outputs into DIR under their output names (hard links where
    /// possible, made read-only since they share the store's bytes; each file appears whole).
    Export {
        /// Stage name from pipeline.toml.
        stage: String,
        /// Target directory (created if needed; files of the same names are replaced).
        dir: PathBuf,
    },
    /// Export every stage built under its current key into DIR/<stage>/ (default: `exports/`
    /// beside the store, where the report's provenance blocks link). Stages not built are
    /// listed and skipped.
    ExportAll {
        /// Target directory (default: the store's parent directory + `exports`).
        dir: Option<PathBuf>,
    },
    /// Compare two runs: which stages changed and why, and which results moved.
    ///
    /// Prints the stages only in A or only in B; for each stage whose key changed, the key
    /// fields that differ (kind, code fingerprint, params old -> new, input content hashes by
    /// name, device/dtype/seed) and, where both builds are in the store, which outputs' bytes
    /// changed (none: early cutoff); then every number of the report's results.json that moved
    /// (old, new, absolute and relative change), metrics added or removed, and claims whose
    /// verdict changed. Stages are listed in pipeline order, metrics by name. Exits 0 whenever
    /// both sides load: differences are information, not failure.
    Diff {
        /// Side A: a run record, or `profile:NAME` for that profile's current keys (as `status`
        /// computes them, with any --set; nothing is built). A run record is a path, or in the
        /// runs/ directory next to the store: a file name, a start timestamp (with or without
        /// its ':' and '-'), a prefix of one that fits a single record, `last`, or `last~N`.
        a: String,
        /// Side B, in the same forms as A.
        b: String,
        /// Also write the comparison as a self-contained HTML page: `--html=PATH`, or `--html`
        /// alone for diff.html next to the report (the report/ directory beside the store).
        #[arg(long, value_name = "PATH", num_args = 0..=1, require_equals = true)]
        html: Option<Option<PathBuf>>,
    },
}

fn main() -> ExitCode {
    repro::allocator::keep_freed_memory();
    let cli = Cli::parse();
    // Ctrl-C / SIGTERM: record what was building as `interrupted`, then stop. What it left in
    // the store's tmp/ is never a result (and `gc` removes it); its checkpoints let the next
    // run resume.
    let _ = ctrlc::set_handler(|| {
        for id in repro::slurm::cancel_submitted() {
            eprintln!("interrupted; cancelled Slurm job {id}");
        }
        for path in repro::engine::record_interrupted_runs() {
            eprintln!("interrupted; run record: {}", path.display());
        }
        std::process::exit(130);
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(config) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {config}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The device as it goes into every stage key. On CPU it names the conv kernels' instruction
/// set: AVX-512, AVX2 and portable kernels agree only to the last bits (FMA, lane blocking),
/// and one key must always mean the same bytes.
fn device() -> String {
    if cfg!(feature = "cuda") {
        "cuda".to_string()
    } else {
        format!("cpu-{}", repro::nn::conv::kernels())
    }
}

fn engine<'a>(
    cli: &Cli,
    registry: &'a repro::engine::Registry,
    pipeline: &'a Pipeline,
    repair: bool,
) -> Result<Engine<'a>> {
    Ok(Engine {
        registry,
        store: open_store(cli)?,
        pipeline,
        device: device(),
        dtype: "f32".to_string(),
        options: RunOptions {
            repair,
            progress: std::io::stderr().is_terminal(),
            jobs: 1,
            ..RunOptions::default()
        },
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let registry = repro::stages::registry();
    // `diff` loads the pipeline only for a `profile:` side, under that side's profile.
    if let Command::Diff { a, b, html } = &cli.command {
        return diff(&cli, &registry, a, b, html.as_ref());
    }
    // Everything is validated before the store is opened: a bad pipeline touches nothing.
    let pipeline = Pipeline::load(&cli.pipeline, &cli.profile, &cli.sets, &registry)?;
    match &cli.command {
        Command::Reproduce { build } => {
            let all: Vec<_> = pipeline.stages.iter().collect();
            build_targets(&cli, &registry, &pipeline, &all, "reproduce", build)
        }
        Command::Run { stage, build } => {
            let targets = pipeline.with_ancestors(stage)?;
            let command = format!("run {stage}");
            build_targets(&cli, &registry, &pipeline, &targets, &command, build)
        }
        Command::RunStage {
            stage,
            key,
            runs_dir,
        } => {
            let targets = pipeline.with_ancestors(stage)?;
            let mut engine = engine(&cli, &registry, &pipeline, false)?;
            engine.options.only_build = Some(stage.clone());
            engine.options.runs_dir = Some(runs_dir.clone());
            if let Some(expected) = key {
                let here = engine
                    .status()?
                    .into_iter()
                    .find(|s| &s.name == stage)
                    .and_then(|s| s.key);
                if here.as_deref() != Some(expected.as_str()) {
                    anyhow::bail!(
                        "stage {stage}: the submitter computed key {expected}, this machine {}: \
                         its code, device ({}) or store differs",
                        here.as_deref()
                            .unwrap_or("none (an upstream stage is not in the store)"),
                        device()
                    );
                }
            }
            let record = engine.run(&targets, &format!("run-stage {stage}"))?;
            let built = record
                .stages
                .iter()
                .any(|s| &s.name == stage && matches!(s.outcome, Outcome::Ran | Outcome::Hit));
            let code = finish(&engine, record)?;
            Ok(if built { code } else { ExitCode::FAILURE })
        }
        Command::Report => {
            let targets = pipeline.with_ancestors("report")?;
            let engine = engine(&cli, &registry, &pipeline, false)?;
            finish(&engine, engine.run(&targets, "report")?)
        }
        Command::Status { json } => {
            let engine = engine(&cli, &registry, &pipeline, false)?;
            let rows = engine.status()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "profile {}: {}",
                    pipeline.profile, pipeline.profile_description
                );
                for row in rows {
                    let key = row.key.as_deref().map_or("-", |k| &k[..12]);
                    println!(
                        "{:<16} {:<8} {key}  {}",
                        row.name,
                        format!("{:?}", row.state).to_lowercase(),
                        row.reasons.join("; ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Why { stage } => {
            let engine = engine(&cli, &registry, &pipeline, false)?;
            engine.why(stage)?.iter().for_each(|l| println!("{l}"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let store = open_store(&cli)?;
            let problems = maintain::verify(&store)?;
            for p in &problems {
                eprintln!("error: {}", p.message);
            }
            if problems.is_empty() {
                let here = store.objects()?.len();
                match store.remote() {
                    Some(remote) => println!(
                        "{} objects verified in {} and {here} in its cache {}",
                        remote.objects()?.len(),
                        remote.url(),
                        store.root().display()
                    ),
                    None => println!("{here} objects verified in {}", store.root().display()),
                }
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "{} problem(s) in {}; `repro reproduce --repair` rebuilds them",
                    problems.len(),
                    store.location()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Gc {
            keep_runs,
            grace_hours,
        } => gc(&cli, &registry, *keep_runs, *grace_hours),
        Command::Show { stage } => show(&cli, &registry, &pipeline, stage),
        Command::Export { stage, dir } => export(&cli, &registry, &pipeline, stage, dir),
        Command::ExportAll { dir } => export_all(&cli, &registry, &pipeline, dir.as_deref()),
        Command::Diff { .. } => unreachable!("handled before the pipeline is loaded"),
    }
}

/// `reproduce` and `run`: builds `targets` with the chosen executor and prints the outcomes.
fn build_targets(
    cli: &Cli,
    registry: &repro::engine::Registry,
    pipeline: &Pipeline,
    targets: &[&pipeline::Stage],
    command: &str,
    build: &BuildArgs,
) -> Result<ExitCode> {
    let mut engine = engine(cli, registry, pipeline, build.repair)?;
    engine.options.jobs = build.jobs;
    let record = match build.executor {
        Executor::Local => engine.run(targets, command)?,
        Executor::Slurm => slurm(cli, &engine, targets, command, build.repair, build.poll)?,
    };
    finish(&engine, record)
}

/// Builds `targets` as Slurm jobs running this binary with the same pipeline, profile,
/// overrides and store (see `repro::slurm`).
fn slurm(
    cli: &Cli,
    engine: &Engine,
    targets: &[&pipeline::Stage],
    command: &str,
    repair: bool,
    poll: f64,
) -> Result<RunRecord> {
    if repair {
        anyhow::bail!("--repair is not supported with --executor slurm; run `repro verify` and `repro reproduce --repair` locally against the shared store");
    }
    let absolute = |p: &Path| -> Result<PathBuf> {
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    let mut global_args = vec![
        "--profile".to_string(),
        cli.profile.clone(),
        "--store".into(),
        if is_remote(&cli.store) {
            cli.store.clone()
        } else {
            absolute(Path::new(&cli.store))?.display().to_string()
        },
        "--cache".into(),
        absolute(&cli.cache)?.display().to_string(),
        "--pipeline".into(),
        absolute(&cli.pipeline)?.display().to_string(),
    ];
    for set in &cli.sets {
        global_args.extend(["--set".to_string(), set.clone()]);
    }
    let job = repro::slurm::JobCommand {
        binary: std::env::current_exe()?,
        global_args,
        workdir: std::env::current_dir()?,
        poll: std::time::Duration::from_secs_f64(poll.max(0.05)),
    };
    repro::slurm::run(engine, targets, command, &job)
}

/// Prints the run's outcome table; exit 1 if any stage failed.
fn finish(engine: &Engine, record: RunRecord) -> Result<ExitCode> {
    for s in &record.stages {
        let outcome = format!("{:?}", s.outcome).to_lowercase();
        let note = s.message.as_deref().unwrap_or("");
        eprintln!(
            "  {:<16} {:<8} {:>8.2} s  {note}",
            s.name, outcome, s.seconds
        );
    }
    let report = engine.artifacts_dir().join("report").join("index.html");
    if record
        .stages
        .iter()
        .any(|s| s.kind == "report" && matches!(s.outcome, Outcome::Hit | Outcome::Ran))
    {
        eprintln!("report: {}", report.display());
    }
    Ok(if record.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The manifest of `stage`'s current key, or a message on stderr saying it is not built.
fn current_manifest(engine: &Engine, stage: &str) -> Result<Option<repro::engine::Manifest>> {
    match engine.current_outputs(stage)? {
        repro::engine::CurrentOutputs::Built(manifest) => Ok(Some(*manifest)),
        repro::engine::CurrentOutputs::NotBuilt { key, reasons } => {
            let profile = &engine.pipeline.profile;
            let key = key
                .as_deref()
                .map_or("its key waits on upstream stages".into(), |k| {
                    format!("key {k}")
                });
            eprintln!("error: stage {stage} is not built under profile {profile} ({key})");
            for reason in reasons {
                eprintln!("  {reason}");
            }
            eprintln!("`repro --profile {profile} run {stage}` builds it (with the same --set)");
            Ok(None)
        }
    }
}

fn show(
    cli: &Cli,
    registry: &repro::engine::Registry,
    pipeline: &Pipeline,
    stage: &str,
) -> Result<ExitCode> {
    pipeline.with_ancestors(stage)?;
    let engine = engine(cli, registry, pipeline, false)?;
    let Some(manifest) = current_manifest(&engine, stage)? else {
        return Ok(ExitCode::FAILURE);
    };
    println!(
        "{stage} (profile {}, built {} in {:.2} s)",
        pipeline.profile, manifest.started_utc, manifest.seconds
    );
    println!("key {}", manifest.key);
    // With a shared store the paths printed must exist: bring the objects into the cache.
    for (name, output) in &manifest.outputs {
        engine
            .store
            .fetch(&output.hash, &format!("output `{name}` of stage `{stage}`"))?;
    }
    engine
        .store
        .fetch(&manifest.log, &format!("log of stage `{stage}`"))?;
    for file in engine.output_files(&manifest) {
        println!(
            "  {:<24} {:>12} bytes  {}",
            file.name,
            file.bytes,
            file.path.display()
        );
    }
    println!(
        "  {:<24} {:>12}        {}",
        "(log)",
        "",
        engine.store.object_path(&manifest.log).display()
    );
    Ok(ExitCode::SUCCESS)
}

fn export(
    cli: &Cli,
    registry: &repro::engine::Registry,
    pipeline: &Pipeline,
    stage: &str,
    dir: &Path,
) -> Result<ExitCode> {
    pipeline.with_ancestors(stage)?;
    let engine = engine(cli, registry, pipeline, false)?;
    let Some(manifest) = current_manifest(&engine, stage)? else {
        return Ok(ExitCode::FAILURE);
    };
    for path in engine.export_outputs(&manifest, dir)? {
        println!("{}", path.display());
    }
    eprintln!(
        "exported {} output(s) of {stage} (key {}) to {}",
        manifest.outputs.len(),
        &manifest.key[..12],
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn export_all(
    cli: &Cli,
    registry: &repro::engine::Registry,
    pipeline: &Pipeline,
    dir: Option<&Path>,
) -> Result<ExitCode> {
    let engine = engine(cli, registry, pipeline, false)?;
    let dir = dir.map_or_else(
        || {
            local_store(cli)
                .parent()
                .unwrap_or(Path::new("."))
                .join("exports")
        },
        Path::to_path_buf,
    );
    let repro::engine::export::ExportedAll { exported, skipped } = engine.export_all(&dir)?;
    let files: usize = exported.iter().map(|(_, n)| n).sum();
    eprintln!(
        "exported {files} output(s) of {} stage(s) to {}",
        exported.len(),
        dir.display()
    );
    if !skipped.is_empty() {
        eprintln!(
            "not built under profile {} (skipped): {}",
            pipeline.profile,
            skipped.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where run records go: `runs/` beside the store (beside the cache, with a shared store).
fn runs_dir(cli: &Cli) -> PathBuf {
    local_store(cli)
        .parent()
        .unwrap_or(Path::new("."))
        .join("runs")
}

/// The store's directory: the store itself, or the cache in front of a shared store.
fn local_store(cli: &Cli) -> PathBuf {
    if is_remote(&cli.store) {
        cli.cache.clone()
    } else {
        PathBuf::from(&cli.store)
    }
}

/// Opens the store `--store` names (creating its directory if needed).
fn open_store(cli: &Cli) -> Result<Store> {
    let local = Store::open(&local_store(cli))?;
    Ok(if is_remote(&cli.store) {
        local.with_remote(Remote::open(&cli.store)?)
    } else {
        local
    })
}

/// `diff A B [--html[=PATH]]`.
fn diff(
    cli: &Cli,
    registry: &repro::engine::Registry,
    a: &str,
    b: &str,
    html: Option<&Option<PathBuf>>,
) -> Result<ExitCode> {
    // Reading only: a mistyped --store must not create an empty store.
    if !is_remote(&cli.store) && !Path::new(&cli.store).is_dir() {
        anyhow::bail!(
            "no store at {} (--store or REPRO_STORE names it)",
            cli.store
        );
    }
    let runs = runs_dir(cli);
    // Both arguments are checked before either side is loaded.
    let specs = [SideSpec::parse(a, &runs)?, SideSpec::parse(b, &runs)?];
    let store = open_store(cli)?;
    let mut sides = Vec::new();
    for spec in &specs {
        sides.push(match spec {
            SideSpec::Run(path) => Side::from_run_record(path, &store)?,
            SideSpec::Profile(name) => {
                let pipeline =
                    Pipeline::load(&cli.pipeline, name, &cli.sets, registry).map_err(|e| {
                        // The profile came from a diff argument, not from --profile.
                        if e.location == format!("--profile {name}") {
                            ConfigError {
                                location: format!("profile:{name}"),
                                ..e
                            }
                        } else {
                            e
                        }
                    })?;
                let engine = engine(cli, registry, &pipeline, false)?;
                Side::from_engine(&engine)?
            }
        });
    }
    let results = ResultsSource {
        stage: "report",
        output: "results.json",
    };
    let comparison = diff::compare(&sides[0], &sides[1], &store, results)?;
    print!("{}", comparison.text());
    if let Some(path) = html {
        let path = path.clone().unwrap_or_else(|| {
            local_store(cli)
                .parent()
                .unwrap_or(Path::new("."))
                .join("report")
                .join("diff.html")
        });
        let Some(file) = path.file_name() else {
            anyhow::bail!("--html={} does not name a file", path.display());
        };
        // A bare file name lies in "."; the rename's directory must be named to be synced.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs_err::create_dir_all(dir)?;
        let tmp = dir.join(format!(".diff-{}.html.tmp", std::process::id()));
        let page = diff::html::page(&comparison);
        atomic_write(&dir.join(file), page.as_bytes(), &tmp)?;
        eprintln!("diff page: {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(
    cli: &Cli,
    registry: &repro::engine::Registry,
    keep_runs: usize,
    grace_hours: f64,
) -> Result<ExitCode> {
    if !(grace_hours >= 0.0 && grace_hours.is_finite()) {
        anyhow::bail!("--grace-hours must be a number of hours >= 0, not {grace_hours}");
    }
    let store = open_store(cli)?;
    // Alone with the store: no build is between publishing an object and its manifest.
    let _alone = store.lock_exclusive()?;
    let mut keep = BTreeSet::new();
    for profile in pipeline::available_profiles(&cli.pipeline) {
        let pipeline = Pipeline::load(&cli.pipeline, &profile, &cli.sets, registry)?;
        let engine = engine(cli, registry, &pipeline, false)?;
        keep.extend(engine.current_keys()?);
    }
    let runs = run_record_paths(&runs_dir(cli));
    for path in runs.iter().rev().take(keep_runs) {
        let record = RunRecord::read(path)?;
        keep.extend(record.stages.into_iter().filter_map(|s| s.key));
    }
    let grace = std::time::Duration::from_secs_f64(grace_hours * 3600.0);
    let report = maintain::gc_with_grace(&store, &keep, grace)?;
    println!(
        "kept {} manifests; removed {} manifests, {} objects ({:.1} MB), {} scratch directories",
        keep.len(),
        report.manifests_removed,
        report.objects_removed,
        report.bytes_freed as f64 / 1e6,
        report.tmp_removed
    );
    if let (Some(remote), Some(r)) = (store.remote(), &report.remote) {
        println!(
            "{}: removed {} manifests, {} objects ({:.1} MB); kept {} unreachable objects \
             younger than {grace_hours} h",
            remote.url(),
            r.manifests_removed,
            r.objects_removed,
            r.bytes_freed as f64 / 1e6,
            r.young_kept
        );
    }
    Ok(ExitCode::SUCCESS)
}
