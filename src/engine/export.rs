//! A stage's outputs without digging in the store: `show` (which objects a stage's *current*
//! key published, with their paths and sizes) and `export` / `export-all` (copy them out under
//! their output names; `export-all` writes `<dir>/<stage>/`, where the report links).
//!
//! "Current" means the key the stage has now, under the active profile and `--set`: the same
//! resolution as `status`. A manifest published for an older key is never shown as if it were
//! the stage's result.
//!
//! Exporting hard-links each object where the file system allows it (no copy, no extra space)
//! and copies otherwise. A hard link shares the store's bytes, so the file is made read-only
//! (objects are immutable anyway). Each file is written under a temporary name in the target
//! directory and renamed into place, so a crash never leaves a half-written output behind.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::run::{Engine, State};
use super::store::{sync_dir, write_synced, Manifest};

/// What the store holds for a stage's current key.
#[derive(Clone, Debug)]
pub enum CurrentOutputs {
    /// Built: its manifest (outputs → object hashes and sizes).
    Built(Box<Manifest>),
    /// Not built under the current key (`key` is `None` when an upstream stage is not built
    /// either, so the key cannot be computed yet), and why.
    NotBuilt {
        key: Option<String>,
        reasons: Vec<String>,
    },
}

/// What `export-all` did.
#[derive(Clone, Debug, Default)]
pub struct ExportedAll {
    /// Stages exported, with the number of files each.
    pub exported: Vec<(String, usize)>,
    /// Stages not built under their current key (nothing exported).
    pub skipped: Vec<String>,
}

/// One output as `show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFile {
    /// The output name (a relative path, e.g. `weights.safetensors`).
    pub name: String,
    /// The object in the store.
    pub path: PathBuf,
    pub bytes: u64,
}

impl Engine<'_> {
    /// The stage's outputs under its current key (validate `name` first).
    pub fn current_outputs(&self, name: &str) -> Result<CurrentOutputs> {
        let row = self
            .status()?
            .into_iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no stage named {name}"))?;
        if row.state == State::Fresh {
            let key = row.key.as_deref().expect("a fresh stage has a key");
            if let Some(manifest) = self.store.read_manifest(key)? {
                return Ok(CurrentOutputs::Built(Box::new(manifest)));
            }
        }
        Ok(CurrentOutputs::NotBuilt {
            key: row.key,
            reasons: row.reasons,
        })
    }

    /// Exports every stage built under its current key into `dir/<stage>/` (what the report's
    /// provenance blocks link to).
    pub fn export_all(&self, dir: &Path) -> Result<ExportedAll> {
        let mut all = ExportedAll::default();
        for row in self.status()? {
            let manifest = match (&row.state, &row.key) {
                (State::Fresh, Some(key)) => self.store.read_manifest(key)?,
                _ => None,
            };
            match manifest {
                Some(manifest) => {
                    let files = self.export_outputs(&manifest, &dir.join(&row.name))?;
                    all.exported.push((row.name, files.len()));
                }
                None => all.skipped.push(row.name),
            }
        }
        Ok(all)
    }

    /// The files of a manifest's outputs, in name order.
    pub fn output_files(&self, manifest: &Manifest) -> Vec<OutputFile> {
        manifest
            .outputs
            .iter()
            .map(|(name, output)| OutputFile {
                name: name.clone(),
                path: self.store.object_path(&output.hash),
                bytes: output.bytes,
            })
            .collect()
    }

    /// Copies a manifest's outputs into `dir` (created if needed) under their output names;
    /// returns the files written. Each object is checked against its hash first: a corrupt
    /// object is an error naming it, and nothing of it is exported.
    pub fn export_outputs(&self, manifest: &Manifest, dir: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut written = Vec::new();
        for file in self.output_files(manifest) {
            let hash = &manifest.outputs[&file.name].hash;
            // With a shared store the object may have to come down first (verified).
            self.store.fetch(
                hash,
                &format!("output `{}` of stage `{}`", file.name, manifest.stage),
            )?;
            if let Some(actual) = self.store.check_object(hash)? {
                bail!(
                    "object {hash} ({}/{}) is corrupt: its content hashes to {actual}; \
                     `repro --profile {} run {} --repair` rebuilds it",
                    manifest.stage,
                    file.name,
                    self.pipeline.profile,
                    manifest.stage
                );
            }
            let dest = dir.join(&file.name);
            let parent = dest.parent().expect("joined path has a parent");
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            place(&file.path, &dest)
                .with_context(|| format!("exporting {} to {}", file.name, dest.display()))?;
            written.push(dest);
        }
        Ok(written)
    }
}

/// Puts `object` at `dest`: a hard link where possible (made read-only: it shares the store's
/// bytes), a synced copy otherwise; through a temporary name and a rename either way.
fn place(object: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("a destination has a parent");
    let name = dest.file_name().expect("a destination has a name");
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let linked = fs::hard_link(object, &tmp).is_ok();
    if linked {
        let mut permissions = fs::metadata(&tmp)?.permissions();
        permissions.set_readonly(true);
        fs::set_permissions(&tmp, permissions)?;
    } else {
        let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        if let Err(e) = write_synced(&tmp, &bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    if let Err(e) = fs::rename(&tmp, dest) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming into {}", dest.display()));
    }
    // Renaming a link onto another link of the same object (an export repeated) does nothing
    // and leaves the temporary name behind.
    let _ = fs::remove_file(&tmp);
    sync_dir(parent)
}
