//! The Slurm executor (`repro reproduce --executor slurm`): every stage that is not a cache hit
//! becomes one `sbatch` job running this same binary on that one stage (`repro run-stage`),
//! chained to its upstream stages' jobs with `--dependency=afterok:`. The jobs publish into
//! the shared store; this process submits, watches, and writes the run record.
//!
//! Why jobs are not all given their key up front: a stage's key holds its upstreams' *content*
//! hashes, known only once they are built. A stage whose upstreams are all built now gets
//! `--key`, and its job refuses to build under any other (a node whose code or device gives a
//! different key fails loudly instead of publishing elsewhere); the others compute their key
//! when they start, from what their dependencies' jobs published.
//!
//! ```text
//! <artifacts>/slurm/<run stamp>/<stage>.sh     the job script (one `exec repro run-stage`)
//! <artifacts>/slurm/<run stamp>/<stage>.out    the job's stdout and stderr
//! <artifacts>/slurm/<run stamp>/<stage>/       the job's own run record
//! ```
//!
//! Only `sbatch`, `scontrol` and `scancel` are used (no `sacct`: clusters without accounting
//! storage are common); a job Slurm has already forgotten is judged by the run record it left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use fs_err as fs;

use crate::engine::pipeline::Resources;
use crate::engine::{Engine, Outcome, RunRecord, Stage, StageRecord};

/// Job ids this process submitted and has not seen end, for [`cancel_submitted`].
static SUBMITTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// `scancel`s every job this process submitted that has not ended (Ctrl-C, SIGTERM, or a
/// submission that failed half-way). Returns the ids it cancelled.
pub fn cancel_submitted() -> Vec<String> {
    let ids = std::mem::take(&mut *SUBMITTED.lock().unwrap_or_else(|e| e.into_inner()));
    if !ids.is_empty() {
        let _ = Command::new("scancel").args(&ids).status();
    }
    ids
}

/// How the jobs run the binary: the arguments that select the same pipeline, profile,
/// overrides and store in the job as here.
pub struct JobCommand {
    /// This binary (the jobs run the same file: it must be on the shared filesystem too).
    pub binary: PathBuf,
    /// `--profile`, `--store`, `--pipeline`, `--set` as given here (paths absolute).
    pub global_args: Vec<String>,
    /// The directory the jobs start in (the pipeline's repository).
    pub workdir: PathBuf,
    /// How often to ask Slurm about the jobs.
    pub poll: Duration,
}

/// One submitted stage while it is watched.
struct Submitted {
    stage: usize,
    job_id: String,
    log: PathBuf,
    runs_dir: PathBuf,
    last_state: String,
    ended: Option<StageRecord>,
}

/// Builds `targets` (in pipeline order, ancestors included) as Slurm jobs; see the module doc.
pub fn run(
    engine: &Engine,
    targets: &[&Stage],
    command: &str,
    job: &JobCommand,
) -> Result<RunRecord> {
    // A shared S3 store is shared by construction; a directory must be on a shared file system.
    if engine.store.remote().is_none() {
        check_shared_store(engine.store.root())?;
    }
    let started_utc = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let dir = engine
        .artifacts_dir()
        .join("slurm")
        .join(started_utc.replace([':', '-'], ""));
    fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize().context("resolving the job directory")?;

    let current: HashMap<String, (bool, Option<String>)> = engine
        .current()?
        .into_iter()
        .map(|c| {
            let fresh = c.status.state == crate::engine::State::Fresh;
            (c.status.name, (fresh, c.status.key))
        })
        .collect();
    let mut records: Vec<Option<StageRecord>> = vec![None; targets.len()];
    let mut submitted: Vec<Submitted> = Vec::new();
    let mut job_of: HashMap<&str, String> = HashMap::new();
    for (i, stage) in targets.iter().enumerate() {
        let (fresh, key) = current.get(&stage.name).cloned().unwrap_or((false, None));
        if fresh {
            records[i] = Some(record(stage, key, Outcome::Hit, 0.0, None, None));
            continue;
        }
        let after: Vec<&str> = stage
            .inputs
            .iter()
            .filter_map(|input| job_of.get(input.stage.as_str()).map(String::as_str))
            .collect();
        let runs_dir = dir.join(&stage.name);
        let log = dir.join(format!("{}.out", stage.name));
        let script = dir.join(format!("{}.sh", stage.name));
        fs::write(&script, job_script(job, stage, key.as_deref(), &runs_dir))?;
        let job_id = match submit(stage, &script, &log, &job.workdir, &after) {
            Ok(id) => id,
            Err(e) => {
                let cancelled = cancel_submitted();
                return Err(e.context(format!(
                    "submitting stage {}; cancelled the {} job(s) already submitted",
                    stage.name,
                    cancelled.len()
                )));
            }
        };
        eprintln!("{}: submitted as job {job_id}", stage.name);
        job_of.insert(&stage.name, job_id.clone());
        submitted.push(Submitted {
            stage: i,
            job_id,
            log,
            runs_dir,
            last_state: String::new(),
            ended: None,
        });
    }

    watch(targets, &mut submitted, job.poll)?;
    for s in submitted {
        records[s.stage] = s.ended;
    }
    let record = RunRecord {
        profile: engine.pipeline.profile.clone(),
        command: command.to_string(),
        started_utc,
        stages: records
            .into_iter()
            .map(|r| r.expect("every stage is a hit or a watched job"))
            .collect(),
    };
    engine.create_run_record(&record)?;
    Ok(record)
}

fn record(
    stage: &Stage,
    key: Option<String>,
    outcome: Outcome,
    seconds: f64,
    message: Option<String>,
    job_id: Option<String>,
) -> StageRecord {
    StageRecord {
        job_id,
        ..StageRecord::new(stage, key, outcome, seconds, message)
    }
}

/// Single-quotes `arg` for `sh`.
fn quoted(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn job_script(job: &JobCommand, stage: &Stage, key: Option<&str>, runs_dir: &Path) -> String {
    let mut args: Vec<String> = vec![job.binary.display().to_string()];
    args.extend(job.global_args.iter().cloned());
    args.extend(["run-stage".into(), stage.name.clone()]);
    args.extend(["--runs-dir".into(), runs_dir.display().to_string()]);
    if let Some(key) = key {
        args.extend(["--key".into(), key.to_string()]);
    }
    let line: Vec<String> = args.iter().map(|a| quoted(a)).collect();
    // The kernels' work splits do not depend on the thread count, so sizing the pool to the
    // job's allocation changes no bytes.
    let threads = if stage.resources.cpus.is_some() {
        "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n"
    } else {
        ""
    };
    format!(
        "#!/bin/sh\n# repro: stage {} ({}), written by `repro reproduce --executor slurm`\n{threads}exec {}\n",
        stage.name,
        stage.kind,
        line.join(" ")
    )
}

/// `sbatch` arguments for a stage's resources.
fn resource_args(resources: &Resources) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(cpus) = resources.cpus {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(mem) = &resources.mem {
        args.push(format!("--mem={mem}"));
    }
    if let Some(gpus) = resources.gpus {
        args.push(format!("--gpus={gpus}"));
    }
    if let Some(time) = &resources.time {
        args.push(format!("--time={time}"));
    }
    args
}

fn submit(
    stage: &Stage,
    script: &Path,
    log: &Path,
    workdir: &Path,
    after: &[&str],
) -> Result<String> {
    let mut sbatch = Command::new("sbatch");
    sbatch
        .arg("--parsable")
        .arg(format!("--job-name=repro-{}", stage.name))
        .arg(format!("--output={}", log.display()))
        .arg(format!("--chdir={}", workdir.display()))
        .args(resource_args(&stage.resources));
    if !after.is_empty() {
        // A failed upstream job can never satisfy `afterok`: have Slurm cancel the dependant
        // rather than leave it pending for ever.
        sbatch
            .arg(format!("--dependency=afterok:{}", after.join(":")))
            .arg("--kill-on-invalid-dep=yes");
    }
    let out = sbatch
        .arg(script)
        .output()
        .context("running sbatch (is Slurm installed and SLURM_CONF set?)")?;
    if !out.status.success() {
        bail!(
            "sbatch exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable` prints `id` or `id;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed no job id: {text:?}");
    }
    SUBMITTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(id.clone());
    Ok(id)
}

/// A job's state and reason as `scontrol show job -o` prints them; `None` once Slurm has
/// forgotten the job (after `MinJobAge`).
fn job_state(job_id: &str) -> Result<Option<(String, String)>> {
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", job_id])
        .output()
        .context("running scontrol")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Invalid job id") {
            return Ok(None);
        }
        bail!("scontrol show job {job_id}: {}", err.trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or("")
            .to_string()
    };
    Ok(Some((field("JobState="), field("Reason="))))
}

const ENDED: [&str; 10] = [
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
];

/// Polls every job until all have ended, printing each change of state.
fn watch(targets: &[&Stage], jobs: &mut [Submitted], poll: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut waiting = 0;
        for job in jobs.iter_mut().filter(|j| j.ended.is_none()) {
            let stage = targets[job.stage];
            let state = job_state(&job.job_id)?;
            let (slurm_state, reason) = state.clone().unwrap_or_default();
            let shown = match slurm_state.as_str() {
                "PENDING" | "CONFIGURING" | "REQUEUED" => "queued",
                "RUNNING" | "COMPLETING" => "running",
                _ => "",
            };
            if !shown.is_empty() && shown != job.last_state {
                eprintln!("{}: {shown} (job {})", stage.name, job.job_id);
                job.last_state = shown.to_string();
            }
            if slurm_state == "PENDING" && reason == "DependencyNeverSatisfied" {
                // A cluster that does not honour --kill-on-invalid-dep leaves it pending.
                let _ = Command::new("scancel").arg(&job.job_id).status();
            }
            if state.is_none() || ENDED.contains(&slurm_state.as_str()) {
                let ended = ended(stage, job, &slurm_state, &reason)?;
                let outcome = format!("{:?}", ended.outcome).to_lowercase();
                eprintln!(
                    "{}: {outcome} (job {}{})",
                    stage.name,
                    job.job_id,
                    if slurm_state.is_empty() {
                        String::new()
                    } else {
                        format!(", {slurm_state}")
                    }
                );
                if ended.outcome == Outcome::Failed {
                    eprintln!("--- tail of {} ---", job.log.display());
                    eprintln!("{}", log_tail(&job.log, 20));
                    eprintln!("---");
                }
                SUBMITTED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|id| *id != job.job_id);
                job.ended = Some(ended);
            } else {
                waiting += 1;
            }
        }
        if waiting == 0 {
            if jobs.is_empty() {
                tracing::info!("every stage is a hit: nothing submitted");
                return Ok(());
            }
            tracing::info!(
                "all {} job(s) ended after {:.1} s",
                jobs.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

/// The last `lines` lines of a job's log (empty when it never ran).
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How an ended job went: the stage's line in the run record the job wrote, or, where it
/// wrote none, what Slurm says (a job cancelled before it started is `skipped`).
fn ended(stage: &Stage, job: &Submitted, slurm_state: &str, reason: &str) -> Result<StageRecord> {
    let from_job = crate::engine::run_record_paths(&job.runs_dir)
        .last()
        .map(|p| RunRecord::read(p))
        .transpose()?
        .and_then(|r| r.stages.into_iter().find(|s| s.name == stage.name));
    let job_id = Some(job.job_id.clone());
    Ok(match from_job {
        Some(mut line) => {
            line.job_id = job_id;
            if slurm_state != "COMPLETED"
                && !slurm_state.is_empty()
                && matches!(line.outcome, Outcome::Ran | Outcome::Hit)
            {
                // It built, but the job then failed (a time limit while exiting, say): the
                // store holds the result, so the stage stands; say what Slurm reported.
                line.message = Some(format!("built, but Slurm reports the job {slurm_state}"));
            }
            line
        }
        None if slurm_state == "CANCELLED" && reason.contains("Dependency") => record(
            stage,
            None,
            Outcome::Skipped,
            0.0,
            Some("an upstream stage's job failed".into()),
            job_id,
        ),
        None => record(
            stage,
            None,
            Outcome::Failed,
            0.0,
            Some(format!(
                "job {} ended {} ({reason}) without a run record; see {}",
                job.job_id,
                if slurm_state.is_empty() {
                    "and was forgotten by Slurm"
                } else {
                    slurm_state
                },
                job.log.display()
            )),
            job_id,
        ),
    })
}

/// File systems several machines mount at once (`stat -f -c %T` names).
const SHARED_FILESYSTEMS: [&str; 14] = [
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "cifs",
    "smb2",
    "smb3",
    "ceph",
    "beegfs",
    "glusterfs",
    "panfs",
    "wekafs",
    "9p",
    "afs",
];

/// Jobs on other nodes must see the store: it must be on a network file system, or every
/// node of the cluster must be this machine.
fn check_shared_store(store: &Path) -> Result<()> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(store)
        .output()
        .context("running stat -f on the store")?;
    let fs_type = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if SHARED_FILESYSTEMS.contains(&fs_type.as_str()) || fs_type.starts_with("fuse") {
        return Ok(());
    }
    let this_host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let out = Command::new("scontrol")
        .args(["show", "nodes", "-o"])
        .output()
        .context("running scontrol show nodes (is Slurm installed and SLURM_CONF set?)")?;
    if !out.status.success() {
        bail!(
            "scontrol show nodes: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let hosts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("NodeHostName="))
                .map(str::to_string)
        })
        .collect();
    let elsewhere: Vec<&String> = hosts.iter().filter(|h| **h != this_host).collect();
    if hosts.is_empty() || !elsewhere.is_empty() {
        bail!(
            "store {} is on a local file system ({fs_type}) and the cluster has nodes other than \
             this machine ({}): jobs there could not read or publish it. Put the store on a \
             shared file system (--store /shared/path, or REPRO_STORE)",
            store.display(),
            if hosts.is_empty() {
                "scontrol listed none".to_string()
            } else {
                elsewhere
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_script_quotes_every_argument_for_sh() {
        assert_eq!(quoted("a b"), "'a b'");
        assert_eq!(quoted("it's"), r"'it'\''s'");
    }

    #[test]
    fn resources_become_sbatch_options() {
        let r = Resources {
            cpus: Some(2),
            mem: Some("4G".into()),
            gpus: None,
            time: Some("01:00:00".into()),
        };
        assert_eq!(
            resource_args(&r),
            ["--cpus-per-task=2", "--mem=4G", "--time=01:00:00"]
        );
        assert!(resource_args(&Resources::default()).is_empty());
    }
}
