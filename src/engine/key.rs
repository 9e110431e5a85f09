//! Stage keys: the SHA-256 of everything that can change a stage's output bytes.
//!
//! A key covers the key-schema version, the stage kind and its code fingerprint, the canonical
//! parameters, the *content* hashes of every upstream output the stage reads (declared order),
//! the content hashes of the repository files it reads, and the execution facts (device, dtype,
//! seed). Because upstream *content* (not upstream keys) goes in, a rerun that reproduces the
//! same bytes stops the cascade ("early cutoff"). The same fields are stored in clear in the
//! manifest so that `why` can say which one changed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::params::{encode_bytes, encode_table, Params};

/// Bump when the meaning or encoding of any key field changes: every key changes with it.
pub const KEY_SCHEMA_VERSION: u32 = 1;

/// One hashed input of a key: an upstream output (`stage/output`) or a repository file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashedInput {
    pub name: String,
    /// Hex SHA-256 of the content, or `"absent"` for an optional input that was not produced.
    pub hash: String,
}

/// Execution facts that can change bytes. Thread count is deliberately absent: CPU kernels
/// must give the same bytes for any thread count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFacts {
    pub device: String,
    pub dtype: String,
    pub seed: u64,
}

/// Every field that goes into a stage key, kept in clear in the stage's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyFields {
    pub key_schema: u32,
    pub kind: String,
    pub code_fingerprint: String,
    pub params: Params,
    pub inputs: Vec<HashedInput>,
    pub files: Vec<HashedInput>,
    /// Hashes of upstream *manifests*, only for stages that print their upstreams' provenance
    /// (the report): such a stage's output depends on more than upstream content.
    pub upstream_manifests: Vec<HashedInput>,
    pub exec: ExecFacts,
}

impl KeyFields {
    /// The stage key: hex SHA-256 of the canonical, length-prefixed encoding of every field.
    pub fn key(&self) -> String {
        let mut enc = Vec::new();
        enc.extend_from_slice(b"repro-stage-key");
        enc.extend_from_slice(&self.key_schema.to_le_bytes());
        encode_bytes(self.kind.as_bytes(), &mut enc);
        encode_bytes(self.code_fingerprint.as_bytes(), &mut enc);
        encode_table(&self.params, &mut enc);
        for list in [&self.inputs, &self.files, &self.upstream_manifests] {
            enc.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for input in list {
                encode_bytes(input.name.as_bytes(), &mut enc);
                encode_bytes(input.hash.as_bytes(), &mut enc);
            }
        }
        encode_bytes(self.exec.device.as_bytes(), &mut enc);
        encode_bytes(self.exec.dtype.as_bytes(), &mut enc);
        enc.extend_from_slice(&self.exec.seed.to_le_bytes());
        hex::encode(Sha256::digest(&enc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::params::Param;

    fn fields() -> KeyFields {
        KeyFields {
            key_schema: KEY_SCHEMA_VERSION,
            kind: "toy".into(),
            code_fingerprint: "abc".into(),
            params: Params::from([("lr".into(), Param::Float(0.001))]),
            inputs: vec![HashedInput {
                name: "up/out".into(),
                hash: "00".into(),
            }],
            files: vec![],
            upstream_manifests: vec![],
            exec: ExecFacts {
                device: "cpu".into(),
                dtype: "f32".into(),
                seed: 0,
            },
        }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = fields().key();
        let mut f = fields();
        f.code_fingerprint = "abd".into();
        assert_ne!(f.key(), base);
        let mut f = fields();
        f.params.insert("lr".into(), Param::Float(0.002));
        assert_ne!(f.key(), base);
        let mut f = fields();
        f.inputs[0].hash = "01".into();
        assert_ne!(f.key(), base);
        let mut f = fields();
        f.exec.seed = 1;
        assert_ne!(f.key(), base);
        let mut f = fields();
        f.exec.device = "cuda".into();
        assert_ne!(f.key(), base);
        // An input moved from one list to another is a different key, not the same bytes.
        let mut f = fields();
        f.files = std::mem::take(&mut f.inputs);
        assert_ne!(f.key(), base);
    }

    #[test]
    fn key_survives_a_trip_through_the_manifest_json() {
        let f = fields();
        let back: KeyFields = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back.key(), f.key());
    }
}
