//! The content-addressed store: immutable objects named by their SHA-256, one manifest per
//! stage key, a ref per stage name (its last manifest, for `why`), advisory locks and scratch.
//!
//! ```text
//! <store>/objects/<sha256>        content-addressed, immutable, verified when read
//! <store>/manifests/<key>.json    outputs -> object hashes, log, timings, every key field
//! <store>/refs/<stage>            the key of the last manifest published for that stage name
//! <store>/locks/<key>.lock        one advisory lock per key
//! <store>/store.lock              builds hold it shared, `gc` exclusively
//! <store>/tmp/                    staging, checkpoints; never visible as a result
//! ```
//!
//! Publishing is crash-safe: write under `tmp/`, fsync, rename into place, fsync the directory,
//! and the manifest goes last, so a manifest never names an object that is not fully there.
//! Between an object's publication and its manifest the object is referenced by nothing, so
//! `gc` must not run then: builds hold `store.lock` shared for their whole run, and `gc` takes
//! it exclusively (as Bazel's disk cache does). Every filesystem error names its path.
//!
//! **With a shared store** (`--store s3://bucket/prefix`, [`super::remote`]) this directory is
//! its read-through cache: a manifest or object missing here is downloaded (objects verified
//! against their name before they enter the cache), and publishing uploads the objects, then
//! creates the manifest remotely with a conditional put before writing it here. A key that is
//! complete here but not in the bucket (built before the bucket was named) is uploaded when a
//! run meets it. Locks and scratch stay local.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fs_err as fs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::key::KeyFields;
use super::remote::{Created, Remote};

/// One output of a stage, as recorded in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    pub hash: String,
    pub bytes: u64,
}

/// What a successful stage run left behind, with every key field in clear.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub key: String,
    pub key_fields: KeyFields,
    pub outputs: BTreeMap<String, OutputRef>,
    /// Object hash of the stage's log.
    pub log: String,
    /// Small numbers the stage chose to surface (also in its outputs where the report needs them).
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub started_utc: String,
    pub seconds: f64,
    pub threads: usize,
}

/// An object whose bytes no longer match its name.
#[derive(Debug, thiserror::Error)]
#[error("object {hash} ({owner}) is corrupt: its content hashes to {actual}; run `repro verify`, or rerun with --repair to rebuild it")]
pub struct CorruptObject {
    pub hash: String,
    pub owner: String,
    pub actual: String,
}

/// Handle on a store directory, and on the shared store it caches, if any.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    remote: Option<Arc<Remote>>,
}

/// The state of one object's copy in the shared store, for `--repair`.
pub enum RemoteCopy {
    /// No shared store, or the object is not in it.
    Absent,
    Intact,
    /// Its content hashes to this instead.
    Corrupt(String),
}

/// Holds one key's advisory lock until dropped.
pub struct KeyLock {
    _file: File,
}

/// Holds the store-wide lock (shared for builds, exclusive for `gc`) until dropped.
pub struct StoreLock {
    _file: File,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (and creates, if needed) a store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["objects", "manifests", "refs", "locks", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating store directory {}", dir.display()))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            remote: None,
        })
    }

    /// Puts this directory in front of a shared store, as its read-through cache.
    pub fn with_remote(mut self, remote: Remote) -> Store {
        self.remote = Some(Arc::new(remote));
        self
    }

    /// The shared store behind this cache, if any.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    /// Where results live, for messages: the bucket URL, or this directory.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(remote) => format!("{} (cache {})", remote.url(), self.root.display()),
            None => self.root.display().to_string(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, hash: &str) -> PathBuf {
        self.root.join("objects").join(hash)
    }

    fn manifest_path(&self, key: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{key}.json"))
    }

    /// Whether the object is in this directory (the cache, with a shared store).
    pub fn has_object(&self, hash: &str) -> bool {
        self.object_path(hash).is_file()
    }

    /// Whether the object can be had: here, or in the shared store.
    pub fn object_available(&self, hash: &str) -> Result<bool> {
        if self.has_object(hash) {
            return Ok(true);
        }
        match &self.remote {
            Some(remote) => remote.has_object(hash),
            None => Ok(false),
        }
    }

    /// The object's path in this directory, downloading it from the shared store first if it
    /// is only there (verified against its name: a corrupt download is a [`CorruptObject`]
    /// naming its URL and never enters the cache). `owner` says whose output it is.
    pub fn fetch(&self, hash: &str, owner: &str) -> Result<PathBuf> {
        let path = self.object_path(hash);
        if path.is_file() {
            return Ok(path);
        }
        let Some(remote) = &self.remote else {
            bail!("object {} ({owner}) is missing", path.display());
        };
        let bytes = remote.get_object(hash)?.ok_or_else(|| {
            anyhow::anyhow!("object {} ({owner}) is missing", remote.object_url(hash))
        })?;
        let actual = sha256_hex(&bytes);
        if actual != hash {
            return Err(CorruptObject {
                hash: hash.into(),
                owner: format!("{owner}, at {}", remote.object_url(hash)),
                actual,
            }
            .into());
        }
        let staged = self.unique_tmp_path("download");
        write_synced(&staged, &bytes)?;
        fs::rename(&staged, &path).with_context(|| format!("caching {}", path.display()))?;
        Ok(path)
    }

    /// Re-hashes the shared store's copy of an object (a download), for `--repair`.
    pub fn check_remote_object(&self, hash: &str) -> Result<RemoteCopy> {
        let Some(remote) = &self.remote else {
            return Ok(RemoteCopy::Absent);
        };
        Ok(match remote.get_object(hash)? {
            None => RemoteCopy::Absent,
            Some(bytes) => {
                let actual = sha256_hex(&bytes);
                if actual == hash {
                    RemoteCopy::Intact
                } else {
                    RemoteCopy::Corrupt(actual)
                }
            }
        })
    }

    /// Uploads this directory's (intact) copy of an object to the shared store.
    pub fn upload_object(&self, hash: &str) -> Result<()> {
        if let Some(remote) = &self.remote {
            let bytes = self.read_verified(hash, "an object to upload")?;
            remote.put_object(hash, bytes)?;
        }
        Ok(())
    }

    /// Deletes the shared store's copy of an object (a corrupt one, under `--repair`).
    pub fn remove_remote_object(&self, hash: &str) -> Result<()> {
        match &self.remote {
            Some(remote) => remote.delete_object(hash),
            None => Ok(()),
        }
    }

    /// A fresh, empty directory under `tmp/` for one attempt at building `key`.
    pub fn staging_dir(&self, key: &str) -> Result<PathBuf> {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("stage-{key}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Where a long stage keeps its checkpoints for `key`; it survives crashes, not success.
    pub fn checkpoint_dir(&self, key: &str) -> PathBuf {
        self.root.join("tmp").join("checkpoints").join(key)
    }

    /// Reads an object and checks its bytes against its name. `owner` says whose output it is.
    pub fn read_verified(&self, hash: &str, owner: &str) -> Result<Vec<u8>> {
        let path = self.fetch(hash, owner)?;
        let bytes = fs::read(&path)
            .with_context(|| format!("reading object {} ({owner})", path.display()))?;
        let actual = sha256_hex(&bytes);
        if actual != hash {
            return Err(CorruptObject {
                hash: hash.into(),
                owner: owner.into(),
                actual,
            }
            .into());
        }
        Ok(bytes)
    }

    /// Re-hashes one object; `Ok(None)` when it is intact, `Ok(Some(actual))` when corrupt.
    pub fn check_object(&self, hash: &str) -> Result<Option<String>> {
        let path = self.object_path(hash);
        let actual =
            hash_file(&path).with_context(|| format!("reading object {}", path.display()))?;
        Ok((actual != hash).then_some(actual))
    }

    /// Moves a finished file into the store under its content hash (crash-safe), and uploads
    /// it to the shared store unless it is there already.
    pub fn publish_file(&self, staged: &Path) -> Result<OutputRef> {
        let file = File::open(staged).with_context(|| format!("opening {}", staged.display()))?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        let hash = hash_file(staged)?;
        let dest = self.object_path(&hash);
        if dest.is_file() {
            fs::remove_file(staged)?;
        } else {
            fs::rename(staged, &dest).with_context(|| format!("publishing {}", dest.display()))?;
        }
        if let Some(remote) = &self.remote {
            if !remote.has_object(&hash)? {
                self.upload_object(&hash)?;
            }
        }
        Ok(OutputRef { hash, bytes })
    }

    /// Stores bytes as an object (used for logs).
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<OutputRef> {
        let staged = self.unique_tmp_path("object");
        write_synced(&staged, bytes)?;
        self.publish_file(&staged)
    }

    /// Makes the object directory's entries durable; call once after a batch of publishes.
    pub fn sync_objects(&self) -> Result<()> {
        sync_dir(&self.root.join("objects"))
    }

    /// Publishes a manifest; call only after its objects are published and synced. With a
    /// shared store the manifest is created there first, conditionally: where another build
    /// created this key's manifest first, that one is adopted (and returned) so that every
    /// reader of the key sees one manifest. Returns the manifest that stands.
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<Manifest> {
        let json = serde_json::to_vec_pretty(manifest)?;
        let (manifest, json) = match &self.remote {
            None => (manifest.clone(), json),
            Some(remote) => match remote.create_manifest(&manifest.key, json.clone())? {
                Created::Created => (manifest.clone(), json),
                Created::Existing(theirs) => {
                    let adopted = parse_remote_manifest(remote, &manifest.key, &theirs)?;
                    if adopted.outputs != manifest.outputs {
                        tracing::warn!(
                            "{}: another build published key {} first, with other bytes; its \
                             outputs stand (this stage is not bitwise reproducible here)",
                            manifest.stage,
                            manifest.key
                        );
                    }
                    (adopted, theirs)
                }
            },
        };
        if let Some(remote) = &self.remote {
            remote.put_ref(&manifest.stage, &manifest.key)?;
        }
        self.cache_manifest(&manifest, &json)?;
        Ok(manifest)
    }

    /// Writes a manifest (as `json`) and its stage's ref into this directory.
    fn cache_manifest(&self, manifest: &Manifest, json: &[u8]) -> Result<()> {
        atomic_write(
            &self.manifest_path(&manifest.key),
            json,
            &self.unique_tmp_path("manifest"),
        )?;
        let ref_path = self.root.join("refs").join(&manifest.stage);
        atomic_write(
            &ref_path,
            manifest.key.as_bytes(),
            &self.unique_tmp_path("ref"),
        )
    }

    /// Makes sure the shared store holds a manifest that is complete in this directory (built
    /// before the bucket was named, or lost there): uploads the objects it lacks, then creates
    /// the manifest. Returns the manifest that stands there.
    pub fn push(&self, manifest: &Manifest) -> Result<Manifest> {
        let Some(remote) = &self.remote else {
            return Ok(manifest.clone());
        };
        if remote.has_manifest(&manifest.key)? {
            return Ok(manifest.clone());
        }
        let hashes = manifest.outputs.values().map(|o| o.hash.as_str());
        for hash in hashes.chain([manifest.log.as_str()]) {
            if !remote.has_object(hash)? {
                self.upload_object(hash)?;
            }
        }
        self.write_manifest(manifest)
    }

    /// Downloads the manifests that `refs/<stage>` names in the shared store for these stages,
    /// all at once, into this directory (a run then finds them here instead of asking for each
    /// in turn). A no-op without a shared store.
    pub fn prefetch_manifests(&self, stages: &[String]) -> Result<()> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let keys: Vec<String> = remote
            .get_many("refs", stages)?
            .into_iter()
            .map(|(_, key)| String::from_utf8_lossy(&key).trim().to_string())
            .filter(|key| !key.is_empty() && !self.manifest_path(key).is_file())
            .collect();
        let names: Vec<String> = keys.iter().map(|k| format!("{k}.json")).collect();
        for (name, json) in remote.get_many("manifests", &names)? {
            let key = name.trim_end_matches(".json");
            parse_remote_manifest(remote, key, &json)?;
            atomic_write(
                &self.manifest_path(key),
                &json,
                &self.unique_tmp_path("manifest"),
            )?;
        }
        Ok(())
    }

    /// The manifest for `key`, if one was published. A manifest that does not parse is an error
    /// naming its file (it was written atomically, so this means outside damage).
    pub fn read_manifest(&self, key: &str) -> Result<Option<Manifest>> {
        let path = self.manifest_path(key);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("manifest {} is malformed", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.download_manifest(key),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The shared store's manifest of `key`, cached here; `None` without one or if absent.
    fn download_manifest(&self, key: &str) -> Result<Option<Manifest>> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let Some(json) = remote.get_manifest(key)? else {
            return Ok(None);
        };
        let manifest = parse_remote_manifest(remote, key, &json)?;
        atomic_write(
            &self.manifest_path(key),
            &json,
            &self.unique_tmp_path("manifest"),
        )?;
        Ok(Some(manifest))
    }

    /// The manifest this stage name last published, if any (for `why` and `status`): this
    /// directory's ref, else the shared store's.
    pub fn last_manifest(&self, stage: &str) -> Result<Option<Manifest>> {
        match fs::read_to_string(self.root.join("refs").join(stage)) {
            Ok(key) => self.read_manifest(key.trim()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match &self.remote {
                Some(remote) => match remote.get_ref(stage)? {
                    Some(key) => self.read_manifest(&key),
                    None => Ok(None),
                },
                None => Ok(None),
            },
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_manifest(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.manifest_path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn remove_object(&self, hash: &str) -> Result<()> {
        match fs::remove_file(self.object_path(hash)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every published manifest (unparseable ones are errors naming the file).
    pub fn manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for key in list_names(&self.root.join("manifests"))? {
            if let Some(key) = key.strip_suffix(".json") {
                out.extend(self.read_manifest(key)?);
            }
        }
        Ok(out)
    }

    /// Every object hash in the store.
    pub fn objects(&self) -> Result<Vec<String>> {
        list_names(&self.root.join("objects"))
    }

    /// Takes the advisory lock for `key`, waiting for another process that holds it.
    /// Returns whether we had to wait (then the other process has probably built it).
    pub fn lock(&self, key: &str) -> Result<(KeyLock, bool)> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let file = open_lock_file(&path)?;
        let waited = match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => {
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
                true
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        };
        Ok((KeyLock { _file: file }, waited))
    }

    /// Takes `store.lock`, shared or exclusive, waiting (with a message) while the other kind
    /// holds it.
    fn lock_store(&self, exclusive: bool) -> Result<StoreLock> {
        let path = self.root.join("store.lock");
        let file = open_lock_file(&path)?;
        let tried = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match tried {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                if exclusive {
                    tracing::info!(
                        "waiting for the builds using {} to finish",
                        self.root.display()
                    );
                    file.lock()
                } else {
                    tracing::info!("waiting for `gc` to finish with {}", self.root.display());
                    file.lock_shared()
                }
                .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        Ok(StoreLock { _file: file })
    }

    /// Marks the store as in use by a build (many at once); waits while `gc` runs.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock_store(false)
    }

    /// Takes the store alone (for `gc`): waits until no build uses it.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock_store(true)
    }

    /// Removes scratch whose process is gone: staging directories and half-written files under
    /// `tmp/` are named `<what>-[<key>-]<pid>-<n>`; an entry of a live process stays, and so do
    /// checkpoints (a later build of their key resumes from them). Call it holding
    /// [`Store::lock_exclusive`].
    pub fn clean_tmp(&self) -> Result<usize> {
        let mut removed = 0;
        for name in list_names(&self.root.join("tmp"))? {
            if name == "checkpoints" {
                continue;
            }
            if owner_pid(&name).is_some_and(process_is_alive) {
                continue;
            }
            let path = self.root.join("tmp").join(&name);
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            removed += 1;
        }
        Ok(removed)
    }

    pub fn unique_tmp_path(&self, what: &str) -> PathBuf {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }
}

/// A manifest downloaded as `manifests/<key>.json`: it must parse and name that key (damage in
/// the bucket is an error naming the URL, never a cached manifest).
fn parse_remote_manifest(remote: &Remote, key: &str, json: &[u8]) -> Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(json)
        .with_context(|| format!("manifest {} is malformed", remote.manifest_url(key)))?;
    if manifest.key != key {
        bail!(
            "manifest {} names key {}, not its own",
            remote.manifest_url(key),
            manifest.key
        );
    }
    Ok(manifest)
}

/// Opens (creating) a file that is only ever locked, never written.
fn open_lock_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock {}", path.display()))
}

/// The process that made a `tmp/` entry, from its name `<what>-[<key>-]<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplit('-');
    let _n = parts.next()?;
    parts.next()?.parse().ok()
}

/// Whether process `pid` exists. Where `/proc` is missing every process counts as alive, so
/// nothing is deleted that might be in use.
fn process_is_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes `bytes` to `path` and fsyncs the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Replaces `dest` atomically: write `tmp`, fsync, rename, fsync the directory.
/// `tmp` must be on the same filesystem as `dest`.
pub fn atomic_write(dest: &Path, bytes: &[u8], tmp: &Path) -> Result<()> {
    write_synced(tmp, bytes)?;
    fs::rename(tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory so that renames into it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn list_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Checks that an output name is a plain relative path (subdirectories allowed, no `..`).
pub fn check_output_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let ok = !name.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !ok {
        bail!("output name {name:?} must be a relative path without `..`");
    }
    Ok(())
}
