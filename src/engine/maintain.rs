//! Store maintenance: `verify` re-hashes every object and names the stage that owns each bad
//! one; `gc` deletes what no kept manifest reaches, plus scratch left by dead processes.
//!
//! With a shared store both also work on the bucket: `verify` downloads and re-hashes every
//! object there (the cache need not hold every object, so only the bucket can miss one), and
//! `gc` deletes the bucket's manifests outside the kept keys and the objects no kept manifest
//! reaches, except objects younger than [`REMOTE_GRACE`]: the store lock cannot see builds on
//! other machines, and such a build uploads its objects before it creates its manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};

use super::remote::Remote;
use super::store::{sha256_hex, Manifest, Store};

/// How old an unreachable object in the shared store must be before `gc` deletes it (by
/// default; `repro gc --grace-hours`): far longer than a stage takes between uploading its
/// first object and creating its manifest (both happen as it publishes).
pub const REMOTE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How many objects `verify` downloads at once.
const VERIFY_BATCH: usize = 32;

/// One problem found by [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

/// Which `stage: output` names each object serves, from every manifest.
fn owners(store: &Store) -> Result<BTreeMap<String, Vec<String>>> {
    owners_of(&store.manifests()?)
}

fn owners_of(manifests: &[Manifest]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in manifests {
        for (name, output) in &m.outputs {
            owners.entry(output.hash.clone()).or_default().push(format!(
                "output `{name}` of stage `{}` (key {})",
                m.stage,
                &m.key[..12]
            ));
        }
        owners.entry(m.log.clone()).or_default().push(format!(
            "log of stage `{}` (key {})",
            m.stage,
            &m.key[..12]
        ));
    }
    Ok(owners)
}

/// Every manifest in the shared store, downloaded (malformed ones are errors naming them).
fn remote_manifests(remote: &Remote) -> Result<Vec<Manifest>> {
    let names: Vec<String> = remote
        .manifest_keys()?
        .into_iter()
        .map(|k| format!("{k}.json"))
        .collect();
    let mut manifests = Vec::new();
    for (name, json) in remote.get_many("manifests", &names)? {
        let key = name.trim_end_matches(".json");
        manifests.push(
            serde_json::from_slice(&json)
                .with_context(|| format!("manifest {} is malformed", remote.manifest_url(key)))?,
        );
    }
    Ok(manifests)
}

/// [`verify`] for the shared store: every object there downloaded and re-hashed, and every
/// object its manifests name present.
fn verify_remote(remote: &Remote) -> Result<Vec<Problem>> {
    let owners = owners_of(&remote_manifests(remote)?)?;
    let present: Vec<String> = remote.objects()?.into_iter().map(|o| o.hash).collect();
    let mut problems = Vec::new();
    for batch in present.chunks(VERIFY_BATCH) {
        for (hash, bytes) in remote.get_many("objects", batch)? {
            let actual = sha256_hex(&bytes);
            if actual != hash {
                let owner = owners
                    .get(&hash)
                    .map_or("no stage".to_string(), |o| o.join("; "));
                problems.push(Problem {
                    message: format!(
                        "object {} is corrupt (content hashes to {actual}); it is {owner}",
                        remote.object_url(&hash)
                    ),
                    object: hash,
                });
            }
        }
    }
    let present: BTreeSet<String> = present.into_iter().collect();
    for (hash, owner) in &owners {
        if !present.contains(hash) {
            problems.push(Problem {
                object: hash.clone(),
                message: format!(
                    "object {} is missing; it is {}",
                    remote.object_url(hash),
                    owner.join("; ")
                ),
            });
        }
    }
    Ok(problems)
}

/// Re-hashes every object; also reports manifests naming objects that are gone. With a shared
/// store: the cache's objects, then every object in the bucket.
pub fn verify(store: &Store) -> Result<Vec<Problem>> {
    let owners = owners(store)?;
    let present: BTreeSet<String> = store.objects()?.into_iter().collect();
    let mut problems = Vec::new();
    for hash in &present {
        if let Some(actual) = store.check_object(hash)? {
            let owner = owners
                .get(hash)
                .map_or("no stage".to_string(), |o| o.join("; "));
            problems.push(Problem {
                object: hash.clone(),
                message: format!(
                    "object {hash} is corrupt (content hashes to {actual}); it is {owner}"
                ),
            });
        }
    }
    match store.remote() {
        // A cache need not hold every object; the bucket must.
        Some(remote) => problems.extend(verify_remote(remote)?),
        None => {
            for (hash, owner) in &owners {
                if !present.contains(hash) {
                    problems.push(Problem {
                        object: hash.clone(),
                        message: format!("object {hash} is missing; it is {}", owner.join("; ")),
                    });
                }
            }
        }
    }
    Ok(problems)
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub manifests_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    pub tmp_removed: usize,
    /// In the shared store, if any.
    pub remote: Option<RemoteGcReport>,
}

#[derive(Debug, Default)]
pub struct RemoteGcReport {
    pub manifests_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    /// Unreachable objects younger than [`REMOTE_GRACE`], kept.
    pub young_kept: usize,
}

/// [`gc`] for the shared store.
fn gc_remote(
    store: &Store,
    remote: &Remote,
    keep: &BTreeSet<String>,
    grace: Duration,
) -> Result<RemoteGcReport> {
    let mut report = RemoteGcReport::default();
    let mut reachable = BTreeSet::new();
    for key in remote.manifest_keys()? {
        if keep.contains(&key) {
            if let Some(m) = store.read_manifest(&key)? {
                reachable.extend(m.outputs.values().map(|o| o.hash.clone()));
                reachable.insert(m.log.clone());
            }
        } else {
            remote.delete_manifest(&key)?;
            report.manifests_removed += 1;
        }
    }
    for object in remote.objects()? {
        if reachable.contains(&object.hash) {
            continue;
        }
        if object.age < grace {
            report.young_kept += 1;
            continue;
        }
        remote.delete_object(&object.hash)?;
        report.objects_removed += 1;
        report.bytes_freed += object.bytes;
    }
    Ok(report)
}

/// Keeps the manifests of `keep` and the objects they reach; deletes every other manifest and
/// object, and scratch whose owner is gone. Call it holding [`Store::lock_exclusive`]: an
/// object a running build has published is reachable only once its manifest is written.
pub fn gc(store: &Store, keep: &BTreeSet<String>) -> Result<GcReport> {
    gc_with_grace(store, keep, REMOTE_GRACE)
}

/// [`gc`], deleting unreachable objects from the shared store once they are `grace` old.
pub fn gc_with_grace(store: &Store, keep: &BTreeSet<String>, grace: Duration) -> Result<GcReport> {
    let mut report = GcReport::default();
    let mut reachable = BTreeSet::new();
    for m in store.manifests()? {
        if keep.contains(&m.key) {
            reachable.extend(m.outputs.values().map(|o| o.hash.clone()));
            reachable.insert(m.log.clone());
        } else {
            store.remove_manifest(&m.key)?;
            report.manifests_removed += 1;
        }
    }
    for hash in store.objects()? {
        if !reachable.contains(&hash) {
            report.bytes_freed += fs_err::metadata(store.object_path(&hash)).map_or(0, |m| m.len());
            store.remove_object(&hash)?;
            report.objects_removed += 1;
        }
    }
    report.tmp_removed = store.clean_tmp()?;
    if let Some(remote) = store.remote() {
        report.remote = Some(gc_remote(store, remote, keep, grace)?);
    }
    Ok(report)
}
