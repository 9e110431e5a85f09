//! Store maintenance: `verify` re-hashes every object and names the stage that owns each bad
//! one; `gc` deletes what no kept manifest reaches, plus scratch left by dead processes.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use super::store::Store;

/// One problem found by [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

/// Which `stage: output` names each object serves, from every manifest.
fn owners(store: &Store) -> Result<BTreeMap<String, Vec<String>>> {
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in store.manifests()? {
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

/// Re-hashes every object; also reports manifests naming objects that are gone.
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
    for (hash, owner) in &owners {
        if !present.contains(hash) {
            problems.push(Problem {
                object: hash.clone(),
                message: format!("object {hash} is missing; it is {}", owner.join("; ")),
            });
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
}

/// Keeps the manifests of `keep` and the objects they reach; deletes every other manifest and
/// object, and scratch whose owner is gone. Call it holding [`Store::lock_exclusive`]: an
/// object a running build has published is reachable only once its manifest is written.
pub fn gc(store: &Store, keep: &BTreeSet<String>) -> Result<GcReport> {
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
    Ok(report)
}
