//! The shared store (issue 13): the local store's layout under a prefix of an S3-compatible
//! bucket, reached through the `object_store` crate, with the local directory store as its
//! read-through cache (see [`super::store::Store`], which is the one type the engine uses).
//!
//! ```text
//! s3://<bucket>/<prefix>/objects/<sha256>       content-addressed, verified when downloaded
//! s3://<bucket>/<prefix>/manifests/<key>.json   created once, with a conditional put
//! s3://<bucket>/<prefix>/refs/<stage>           the key last published for that stage name
//! ```
//!
//! Endpoint, region and credentials come from the standard AWS environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`); an `http://` endpoint (a server on this machine) is allowed as given.
//!
//! **What protects a manifest.** A build uploads every object first (content-addressed: two
//! machines building one key upload the same bytes under the same name, so a second upload
//! rewrites nothing that differs), then *creates* the manifest with a conditional put
//! (`If-None-Match: *`, object_store's `PutMode::Create`). Of two machines racing on one key,
//! exactly one create succeeds; the other is told the manifest exists, downloads it and adopts
//! it, so every reader of a key sees one manifest. Refs are plain puts (last writer wins): they
//! only serve `status` and `why`.
//!
//! Blocking API on a small tokio runtime of the store's own: the engine is synchronous (stages
//! on threads); only batches (prefetching manifests, `verify`) run requests concurrently.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

/// How many requests a batch keeps in flight.
const CONCURRENCY: usize = 16;

/// What [`Remote::create_manifest`] found.
pub enum Created {
    /// Ours is the manifest of this key.
    Created,
    /// Another build created it first: its bytes.
    Existing(Vec<u8>),
}

/// One object in the bucket, as listed.
pub struct Listed {
    pub hash: String,
    pub bytes: u64,
    /// Time since it was last written (a young object may belong to a build still running).
    pub age: Duration,
}

/// A handle on `s3://bucket/prefix`.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    /// What one listing of the bucket showed, taken on first need and extended with what this
    /// process publishes; a name it lacks is asked for directly before it counts as absent.
    listing: Mutex<Option<Listing>>,
}

struct Listing {
    manifests: HashSet<String>,
    objects: HashSet<String>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Whether `location` names the S3 backend rather than a directory.
pub fn is_remote(location: &str) -> bool {
    location.starts_with("s3://")
}

impl Remote {
    /// Connects to `s3://bucket[/prefix]` with the credentials of the environment. Nothing is
    /// requested yet: a wrong endpoint or credentials show on the first request, naming the URL.
    pub fn open(url: &str) -> Result<Remote> {
        Remote::open_with(url, &[])
    }

    /// [`Remote::open`] with settings that take precedence over the environment's, named as
    /// object_store's `AmazonS3ConfigKey`s (`aws_endpoint`, `aws_access_key_id`, ...).
    pub fn open_with(url: &str, config: &[(&str, &str)]) -> Result<Remote> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| anyhow!("store {url:?} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("store {url:?} names no bucket (s3://bucket/prefix)");
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let mut endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok();
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        for (key, value) in config {
            let key: AmazonS3ConfigKey = key
                .parse()
                .with_context(|| format!("unknown S3 setting {key:?}"))?;
            if key == AmazonS3ConfigKey::Endpoint {
                endpoint = Some(value.to_string());
            }
            builder = builder.with_config(key, *value);
        }
        // A plain-http endpoint is a server the user named on purpose (one on this machine).
        if let Some(endpoint) = &endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .with_context(|| format!("configuring the S3 client for {url}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("repro-s3")
            .enable_all()
            .build()
            .context("starting the S3 client's runtime")?;
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            store: Arc::new(store),
            prefix: ObjectPath::parse(prefix.trim_matches('/'))
                .with_context(|| format!("store {url:?}: bad prefix"))?,
            runtime,
            listing: Mutex::new(None),
        })
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, dir: &str, name: &str) -> ObjectPath {
        self.prefix.child(dir).child(name)
    }

    /// The URL of one object, for messages.
    pub fn object_url(&self, hash: &str) -> String {
        format!("{}/objects/{hash}", self.url)
    }

    pub fn manifest_url(&self, key: &str) -> String {
        format!("{}/manifests/{key}.json", self.url)
    }

    /// Downloads `dir/name`; `None` when it is not there.
    fn get(&self, dir: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(dir, name);
        let store = self.store.clone();
        let got = self.runtime.block_on(async move {
            match store.get(&path).await {
                Ok(result) => result.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.with_context(|| format!("downloading {}/{dir}/{name}", self.url))
    }

    fn exists(&self, dir: &str, name: &str) -> Result<bool> {
        let path = self.path(dir, name);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("asking for {}/{dir}/{name}", self.url)),
        }
    }

    fn put(
        &self,
        dir: &str,
        name: &str,
        bytes: Vec<u8>,
        mode: PutMode,
    ) -> object_store::Result<()> {
        let path = self.path(dir, name);
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        self.runtime
            .block_on(self.store.put_opts(&path, PutPayload::from(bytes), options))
            .map(|_| ())
    }

    fn delete(&self, dir: &str, name: &str) -> Result<()> {
        let path = self.path(dir, name);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {}/{dir}/{name}", self.url)),
        }
    }

    /// Every entry under `dir/`, as (name, size, age).
    fn list(&self, dir: &str) -> Result<Vec<(String, u64, Duration)>> {
        let prefix = self.prefix.child(dir);
        let listed: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .with_context(|| {
                format!(
                    "listing {}/{dir}/ (does the bucket exist, and may these credentials list it?)",
                    self.url
                )
            })?;
        let now = SystemTime::now();
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?.to_string();
                let written = SystemTime::from(meta.last_modified);
                let age = now.duration_since(written).unwrap_or_default();
                Some((name, meta.size, age))
            })
            .collect())
    }

    /// Runs `f` on the listing, taking it first if this process has none yet.
    fn with_listing<R>(&self, f: impl FnOnce(&mut Listing) -> R) -> Result<R> {
        let mut guard = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let manifests = self.list("manifests")?;
            let objects = self.list("objects")?;
            *guard = Some(Listing {
                manifests: manifests
                    .into_iter()
                    .filter_map(|(name, _, _)| name.strip_suffix(".json").map(str::to_string))
                    .collect(),
                objects: objects.into_iter().map(|(name, _, _)| name).collect(),
            });
        }
        Ok(f(guard.as_mut().expect("listed above")))
    }

    /// Whether the bucket holds object `hash` (from the listing, else asked directly).
    pub fn has_object(&self, hash: &str) -> Result<bool> {
        if self.with_listing(|l| l.objects.contains(hash))? {
            return Ok(true);
        }
        let there = self.exists("objects", hash)?;
        if there {
            self.with_listing(|l| l.objects.insert(hash.to_string()))?;
        }
        Ok(there)
    }

    /// Whether the bucket holds the manifest of `key`.
    pub fn has_manifest(&self, key: &str) -> Result<bool> {
        if self.with_listing(|l| l.manifests.contains(key))? {
            return Ok(true);
        }
        self.exists("manifests", &format!("{key}.json"))
    }

    /// Downloads object `hash` as it is (the caller verifies it); `None` if absent.
    pub fn get_object(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        self.get("objects", hash)
    }

    /// Uploads object `hash` (whose bytes the caller has verified). Overwriting is harmless:
    /// whoever else writes this name writes these bytes, or repairs a corrupt copy.
    pub fn put_object(&self, hash: &str, bytes: Vec<u8>) -> Result<()> {
        self.put("objects", hash, bytes, PutMode::Overwrite)
            .with_context(|| format!("uploading {}", self.object_url(hash)))?;
        self.with_listing(|l| l.objects.insert(hash.to_string()))?;
        Ok(())
    }

    pub fn delete_object(&self, hash: &str) -> Result<()> {
        self.delete("objects", hash)?;
        self.with_listing(|l| l.objects.remove(hash))?;
        Ok(())
    }

    /// The manifest of `key` as stored; `None` if absent.
    pub fn get_manifest(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get("manifests", &format!("{key}.json"))
    }

    /// Creates the manifest of `key` unless one exists (a conditional put): see the module
    /// docs. A store without conditional puts is an error naming it, not a silent overwrite.
    pub fn create_manifest(&self, key: &str, bytes: Vec<u8>) -> Result<Created> {
        let name = format!("{key}.json");
        match self.put("manifests", &name, bytes, PutMode::Create) {
            Ok(()) => {
                self.with_listing(|l| l.manifests.insert(key.to_string()))?;
                Ok(Created::Created)
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get_manifest(key)?.ok_or_else(|| {
                    anyhow!(
                        "{} exists (the conditional put was refused) but cannot be read",
                        self.manifest_url(key)
                    )
                })?;
                Ok(Created::Existing(existing))
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "creating {} with a conditional put (If-None-Match: *); the S3 server must \
                     support conditional writes",
                    self.manifest_url(key)
                )
            }),
        }
    }

    pub fn delete_manifest(&self, key: &str) -> Result<()> {
        self.delete("manifests", &format!("{key}.json"))?;
        self.with_listing(|l| l.manifests.remove(key))?;
        Ok(())
    }

    /// Points `refs/<stage>` at `key` (last writer wins).
    pub fn put_ref(&self, stage: &str, key: &str) -> Result<()> {
        self.put("refs", stage, key.as_bytes().to_vec(), PutMode::Overwrite)
            .with_context(|| format!("writing {}/refs/{stage}", self.url))
    }

    /// The key `refs/<stage>` names, if any.
    pub fn get_ref(&self, stage: &str) -> Result<Option<String>> {
        Ok(self
            .get("refs", stage)?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// The keys of every manifest in the bucket (a fresh listing).
    pub fn manifest_keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .list("manifests")?
            .into_iter()
            .filter_map(|(name, _, _)| name.strip_suffix(".json").map(str::to_string))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Every object in the bucket (a fresh listing), in name order.
    pub fn objects(&self) -> Result<Vec<Listed>> {
        let mut objects: Vec<Listed> = self
            .list("objects")?
            .into_iter()
            .map(|(hash, bytes, age)| Listed { hash, bytes, age })
            .collect();
        objects.sort_by(|a, b| a.hash.cmp(&b.hash));
        Ok(objects)
    }

    /// Downloads many entries of `dir` at once (up to [`CONCURRENCY`] in flight); absent ones
    /// are left out. For prefetching refs and manifests, and for `verify`.
    pub fn get_many(&self, dir: &str, names: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let store = self.store.clone();
        let requests = names.iter().map(|name| {
            let store = store.clone();
            let path = self.path(dir, name);
            let name = name.clone();
            async move {
                match store.get(&path).await {
                    Ok(result) => result.bytes().await.map(|b| Some((name, b.to_vec()))),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        });
        let got: Vec<Option<(String, Vec<u8>)>> = self
            .runtime
            .block_on(
                futures::stream::iter(requests)
                    .buffer_unordered(CONCURRENCY)
                    .try_collect(),
            )
            .with_context(|| format!("downloading from {}/{dir}/", self.url))?;
        Ok(got.into_iter().flatten().collect())
    }
}
