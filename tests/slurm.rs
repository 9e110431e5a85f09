//! `--executor slurm` against a real one-node Slurm cluster (Debian's `slurmctld`, `slurmd`
//! and `munge`), started by this test in a temporary directory on 127.0.0.1's host and stopped
//! when it ends. `.ci/run` installs the packages; where they are missing, or the test is not
//! root (the daemons run as root here), it is skipped with a message.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Sandbox;
use serde_json::Value;

/// A one-node cluster: munged, slurmctld and slurmd with a `slurm.conf` of its own. One at a
/// time: the tests share the machine's cores, and a second slurmd on one host would compete
/// for them.
struct Cluster {
    dir: tempfile::TempDir,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts the cluster, or says why it cannot (the test is then skipped).
    fn start() -> Result<Cluster, String> {
        Cluster::start_with("")
    }

    /// Starts the cluster with `more_nodes` (`slurm.conf` lines) declared beside this host.
    /// Jobs go only to this host (the partition holds it alone): the other nodes are there to
    /// be seen by `scontrol show nodes`, not to run anything (a NodeAddr on 127.0.0.0/8 would
    /// reach this host's slurmd under another name and leave its jobs running forever).
    fn start_with(more_nodes: &str) -> Result<Cluster, String> {
        for program in [
            "munged",
            "slurmctld",
            "slurmd",
            "sbatch",
            "scontrol",
            "scancel",
        ] {
            let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(program).exists());
            if !found {
                return Err(format!(
                    "{program} is not installed (Debian: slurm-wlm, munge)"
                ));
            }
        }
        if command_output("id", &["-u"]).as_deref() != Some("0") {
            return Err("the Slurm daemons of this test run as root, and this is not root".into());
        }
        let one_at_a_time = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| format!("no hostname: {e}"))?
            .trim()
            .to_string();
        // From here on, Drop stops whatever has started.
        let cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            _one_at_a_time: one_at_a_time,
        };
        let d = cluster.dir.path();
        for sub in ["munge", "spool", "state", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let key: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(d.join("munge/munge.key"), key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            d.join("munge/munge.key"),
            std::fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        std::fs::set_permissions(d.join("munge"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = d.join("munge/munge.sock");
        let status = Command::new("munged")
            .arg("--force")
            .arg(format!(
                "--key-file={}",
                d.join("munge/munge.key").display()
            ))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                d.join("munge/munged.pid").display()
            ))
            .arg(format!(
                "--log-file={}",
                d.join("munge/munged.log").display()
            ))
            .arg(format!("--seed-file={}", d.join("munge/seed").display()))
            .status()
            .map_err(|e| format!("munged: {e}"))?;
        if !status.success() {
            return Err(format!("munged exited with {status}"));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(2048, |kb| kb / 1024 / 2);
        let conf = format!(
            "ClusterName=repro-test\nSlurmctldHost={host}\nSlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             SchedulerType=sched/backfill\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nReturnToService=2\nMpiDefault=none\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n\
             {more_nodes}PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            sock = socket.display(),
            ctld = free_port(),
            slurmd = free_port(),
            d = d.display(),
        );
        std::fs::write(d.join("slurm.conf"), conf).unwrap();
        for daemon in ["slurmctld", "slurmd"] {
            let status = Command::new(daemon)
                .arg("-f")
                .arg(cluster.conf())
                .env("SLURM_CONF", cluster.conf())
                .status()
                .map_err(|e| format!("{daemon}: {e}"))?;
            if !status.success() {
                return Err(format!("{daemon} exited with {status}"));
            }
        }
        // Ready when the node is idle.
        let start = Instant::now();
        loop {
            let state = Command::new("sinfo")
                .args(["-h", "-o", "%t"])
                .env("SLURM_CONF", cluster.conf())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if state.lines().any(|l| l == "idle") {
                return Ok(cluster);
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "the test cluster did not come up in 60 s (node state {state:?}); logs in {}",
                    cluster.dir.path().join("log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// `repro` in `sandbox` with this cluster's `SLURM_CONF`.
    fn repro(&self, sandbox: &Sandbox, args: &[&str]) -> Output {
        sandbox.repro_with_env(args, &[("SLURM_CONF", &self.conf())])
    }
}

impl Drop for Cluster {
    /// Stops what `start` started: `scontrol shutdown` ends slurmctld and slurmd; munged by
    /// its pid file.
    fn drop(&mut self) {
        let _ = Command::new("scontrol")
            .arg("shutdown")
            .env("SLURM_CONF", self.conf())
            .status();
        let d = self.dir.path();
        for pid_file in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            if let Ok(pid) = std::fs::read_to_string(d.join(pid_file)) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

fn stages(record: &Value) -> Vec<Value> {
    record["stages"].as_array().unwrap().clone()
}

fn results(sandbox: &Sandbox) -> Value {
    serde_json::from_slice(&std::fs::read(sandbox.path("artifacts/report/results.json")).unwrap())
        .unwrap()
}

#[test]
fn smoke_through_slurm_jobs_gives_the_in_process_results() {
    let cluster = match Cluster::start() {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no Slurm test cluster: {why}");
            return;
        }
    };
    let (local, through_slurm) = (Sandbox::new(), Sandbox::new());
    let local_record = local.run(&["reproduce"]);

    let out = cluster.repro(
        &through_slurm,
        &["reproduce", "--executor", "slurm", "--poll", "0.2"],
    );
    assert!(out.status.success(), "reproduce --executor slurm failed");
    let record = through_slurm.last_record();
    let stages_run = stages(&record);
    assert_eq!(stages_run.len(), stages(&local_record).len());
    let mut job_ids = std::collections::BTreeSet::new();
    for stage in &stages_run {
        assert_eq!(stage["outcome"], "ran", "{stage}");
        let job = stage["job_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no job id: {stage}"));
        job_ids.insert(job.to_string());
        // Each stage's job built the key the in-process run built (the report's key holds
        // its upstreams' wall times, so it differs by design).
        let name = stage["name"].as_str().unwrap();
        if name != "report" {
            let local_key = stages(&local_record)
                .into_iter()
                .find(|s| s["name"] == name)
                .unwrap()["key"]
                .clone();
            assert_eq!(stage["key"], local_key, "{name}");
        }
    }
    assert_eq!(job_ids.len(), stages_run.len(), "one job per stage");
    assert_eq!(
        results(&local)["metrics"],
        results(&through_slurm)["metrics"]
    );

    // Nothing to build: nothing is submitted, every stage is a hit.
    let out = cluster.repro(
        &through_slurm,
        &["reproduce", "--executor", "slurm", "--poll", "0.2"],
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("submitted as job"));
    for stage in stages(&through_slurm.last_record()) {
        assert_eq!(stage["outcome"], "hit", "{stage}");
        assert!(stage.get("job_id").is_none());
    }
}

#[test]
fn a_failed_job_prints_its_log_tail_and_skips_its_dependants() {
    let cluster = match Cluster::start() {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no Slurm test cluster: {why}");
            return;
        }
    };
    let sandbox = Sandbox::new();
    // A wrong pinned hash passes validation and fails in the job, after the download.
    let wrong_hash = format!("mnist.member_sha256={}", "0".repeat(64));
    let out = cluster.repro(
        &sandbox,
        &[
            "run",
            "train_ce",
            "--set",
            &wrong_hash,
            "--executor",
            "slurm",
            "--poll",
            "0.2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--- tail of"), "no log tail printed");
    assert!(
        stderr.contains("SHA-256 mismatch"),
        "the tail names the cause"
    );
    let record = sandbox.last_record();
    for stage in stages(&record) {
        assert!(stage["job_id"].is_string(), "{stage}");
        let expected = if stage["name"] == "mnist" {
            "failed"
        } else {
            "skipped"
        };
        assert_eq!(stage["outcome"], expected, "{stage}");
    }
    // Nothing is left queued: the dependants were cancelled, not left pending.
    let queued = Command::new("squeue")
        .args(["-h", "-o", "%i"])
        .env("SLURM_CONF", cluster.conf())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&queued.stdout).trim(), "");
}

/// A second node, declared and never given a job (see [`Cluster::start_with`]).
const ANOTHER_NODE: &str =
    "NodeName=elsewhere NodeAddr=127.0.0.2 NodeHostName=elsewhere CPUs=1 State=DOWN\n";

/// Jobs on another node could not see a store on this machine's local disk: the executor
/// refuses before it submits anything, naming the store and the other node.
#[test]
fn a_local_store_on_a_cluster_with_other_nodes_is_refused() {
    let cluster = match Cluster::start_with(ANOTHER_NODE) {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no Slurm test cluster: {why}");
            return;
        }
    };
    let sandbox = Sandbox::new();
    let out = cluster.repro(
        &sandbox,
        &["reproduce", "--executor", "slurm", "--poll", "0.2"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is on a local file system"), "{stderr}");
    assert!(stderr.contains("elsewhere"), "{stderr}");
    assert!(stderr.contains("shared file system"), "{stderr}");
    assert!(
        !sandbox.path("artifacts/slurm").exists(),
        "nothing was submitted"
    );
}

/// A shared S3 store needs no shared file system: on the same two-node cluster that refuses a
/// local store, the jobs build into the bucket (each with a cache of its own on its node) and
/// the submitter sees their results there.
#[test]
fn an_s3_store_serves_a_cluster_with_other_nodes() {
    let cluster = match Cluster::start_with(ANOTHER_NODE) {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no Slurm test cluster: {why}");
            return;
        }
    };
    let server = match common::s3::S3Server::start() {
        Ok(server) => server,
        Err(why) => {
            eprintln!("skipped: no S3 server: {why}");
            return;
        }
    };
    let store = server.url("cluster");
    let sandbox = Sandbox::new();
    let conf = cluster.conf();
    let mut env = server.env();
    env.push(("SLURM_CONF", &conf));
    let out = sandbox.repro_with_env(
        &[
            "--store",
            &store,
            "run",
            "eval_ce",
            "--executor",
            "slurm",
            "--poll",
            "0.2",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let record = sandbox.last_record();
    for stage in stages(&record) {
        assert_eq!(stage["outcome"], "ran", "{stage}");
        assert!(stage["job_id"].is_string(), "{stage}");
    }
    // The jobs published into the bucket: a machine with an empty cache finds all hits.
    let fresh = Sandbox::new();
    let out = fresh.repro_with_env(&["--store", &store, "run", "eval_ce"], &server.env());
    assert!(out.status.success(), "{}", common::stderr(&out));
    for stage in stages(&fresh.last_record()) {
        assert_eq!(stage["outcome"], "hit", "{stage}");
    }
}
