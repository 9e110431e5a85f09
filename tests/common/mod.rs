//! What the end-to-end tests (cli, show/export, PyTorch interop) share: a scratch copy of the
//! repository's `pipeline/` and `paper/` with its own store, and the `repro` binary run in it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        copy_dir(&repo.join("pipeline"), &dir.path().join("pipeline"));
        copy_dir(&repo.join("paper"), &dir.path().join("paper"));
        Sandbox { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `repro` with the `smoke` profile unless the arguments name one.
    pub fn repro(&self, args: &[&str]) -> Output {
        self.repro_with_env(args, &[])
    }

    /// [`Sandbox::repro`] with `env` added to the process's environment.
    pub fn repro_with_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut full: Vec<&str> = Vec::new();
        if !args.contains(&"--profile") {
            full.extend(["--profile", "smoke"]);
        }
        full.extend(args);
        let out = Command::new(env!("CARGO_BIN_EXE_repro"))
            .args(&full)
            .current_dir(self.dir.path())
            .env_remove("REPRO_STORE")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        eprintln!(
            "$ repro {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `repro` and requires success; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.repro(args);
        assert!(out.status.success(), "repro {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and returns the newest run record.
    pub fn run(&self, args: &[&str]) -> serde_json::Value {
        let out = self.repro(args);
        assert!(out.status.success(), "repro {args:?} failed");
        self.last_record()
    }

    /// The newest run record under `artifacts/runs/`.
    pub fn last_record(&self) -> serde_json::Value {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(self.path("artifacts/runs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        runs.sort();
        serde_json::from_slice(&std::fs::read(runs.last().unwrap()).unwrap()).unwrap()
    }

    /// The manifest the store's ref for `stage` names (its last build).
    pub fn last_manifest(&self, stage: &str) -> serde_json::Value {
        let key =
            std::fs::read_to_string(self.path(&format!("artifacts/store/refs/{stage}"))).unwrap();
        serde_json::from_slice(
            &std::fs::read(self.path(&format!("artifacts/store/manifests/{key}.json"))).unwrap(),
        )
        .unwrap()
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
pub mod device;
pub mod s3;
