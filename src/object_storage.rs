//! A registry's storage in S3 or an S3-compatible store (the registry's s3 driver),
//! read through the `object_store` crate. Opening lists the bucket once - the blobs in
//! parallel over the two-hex-digit prefixes of `blobs/<alg>/`, so existence and size
//! come from the listing with no request per blob - then blobs are streamed with GETs
//! for re-hashing, and small objects (links, manifests) fetched whole. Throttling
//! (503 SlowDown) and dropped connections are retried with backoff by `object_store`;
//! every request and byte is counted, because object storage bills both. It only ever
//! lists, heads and gets: nothing is written.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::storage::BlobStat;

/// How to reach the bucket; the secret key never leaves this struct except to S3.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Spec {
    pub bucket: String,
    /// The registry's `rootdirectory` in the bucket, without leading or trailing `/`.
    pub prefix: String,
    pub region: Option<String>,
    /// `regionendpoint`: an S3-compatible server.
    pub endpoint: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Path-style requests (`forcepathstyle`, the default with an endpoint).
    pub path_style: bool,
}

impl std::fmt::Debug for S3Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl S3Spec {
    /// `s3://bucket/prefix` (and the endpoint), for reports.
    pub fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" at {e}"));
        }
        s
    }

    /// Parses `s3://bucket[/prefix]`.
    pub fn from_url(url: &str) -> Result<S3Spec, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("--storage {url}: use s3://bucket/prefix"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("--storage {url}: no bucket"));
        }
        Ok(S3Spec {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..S3Spec::default()
        })
    }
}

/// What reading object storage cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectCounts {
    pub requests: u64,
    pub bytes: u64,
}

impl ObjectCounts {
    pub fn add(&mut self, o: &ObjectCounts) {
        self.requests += o.requests;
        self.bytes += o.bytes;
    }
}

pub struct ObjectStorage {
    spec: S3Spec,
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    /// Blobs from the listing: size and last modification (ns).
    blobs: HashMap<Digest, (u64, i128)>,
    /// Every key below `repositories/`, as locs.
    repo_keys: BTreeSet<String>,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

/// Concurrent LIST requests while opening.
const LIST_CONCURRENCY: usize = 16;

impl ObjectStorage {
    pub fn open(spec: &S3Spec) -> Result<ObjectStorage, String> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&spec.bucket)
            .with_retry(RetryConfig {
                max_retries: 8,
                retry_timeout: Duration::from_secs(120),
                ..RetryConfig::default()
            });
        if let Some(r) = &spec.region {
            builder = builder.with_region(r);
        }
        if let Some(e) = &spec.endpoint {
            builder = builder
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(!spec.path_style);
        }
        if let (Some(a), Some(s)) = (&spec.access_key, &spec.secret_key) {
            builder = builder.with_access_key_id(a).with_secret_access_key(s);
        }
        let store = Arc::new(builder.build().map_err(|e| {
            format!(
                "cannot use {}: {}",
                spec.describe(),
                first_line(&e.to_string())
            )
        })?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the I/O runtime: {e}"))?;
        let mut o = ObjectStorage {
            spec: spec.clone(),
            store,
            runtime,
            blobs: HashMap::new(),
            repo_keys: BTreeSet::new(),
            requests: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
        };
        o.list_all()?;
        Ok(o)
    }

    pub fn describe(&self) -> String {
        self.spec.describe()
    }

    pub fn counts(&self) -> ObjectCounts {
        ObjectCounts {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// The object key of a loc.
    fn key(&self, loc: &str) -> ObjectPath {
        if self.spec.prefix.is_empty() {
            ObjectPath::from(format!("docker/registry/v2/{loc}"))
        } else {
            ObjectPath::from(format!("{}/docker/registry/v2/{loc}", self.spec.prefix))
        }
    }

    /// The loc of an object key (None outside the registry's tree).
    fn loc_of(&self, key: &ObjectPath) -> Option<String> {
        let base = self.key("");
        key.as_ref()
            .strip_prefix(base.as_ref())
            .map(|s| s.trim_start_matches('/').to_string())
    }

    fn list_all(&mut self) -> Result<(), String> {
        let store = self.store.clone();
        let requests = self.requests.clone();
        let fail = |e: object_store::Error, what: &str| {
            let text = e.to_string();
            let (bucket, place) = (&self.spec.bucket, self.spec.describe());
            if text.contains("NoSuchBucket") || matches!(e, object_store::Error::NotFound { .. }) {
                format!(
                    "bucket {bucket} does not exist ({place}): check storage.s3.bucket or --storage"
                )
            } else if text.contains("403")
                || text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
            {
                format!(
                    "{place} refused the credentials (403 Forbidden): check the s3 driver's accesskey and secretkey, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                )
            } else {
                let line = first_line(&text);
                format!(
                    "cannot list {what} in {place}: {}",
                    line.chars().take(200).collect::<String>()
                )
            }
        };
        // Which algorithms have blobs, then their 256 prefixes, listed concurrently.
        let blobs_dir = self.key("blobs");
        requests.fetch_add(1, Ordering::Relaxed);
        let top = self
            .runtime
            .block_on(store.list_with_delimiter(Some(&blobs_dir)))
            .map_err(|e| fail(e, "blobs"))?;
        let mut prefixes = Vec::new();
        for alg in top.common_prefixes {
            for b in 0..=255u8 {
                prefixes.push(ObjectPath::from(format!("{}/{b:02x}", alg.as_ref())));
            }
        }
        let listed: Vec<Vec<object_store::ObjectMeta>> = self
            .runtime
            .block_on(
                futures::stream::iter(prefixes.into_iter().map(|p| {
                    let store = store.clone();
                    let requests = requests.clone();
                    async move {
                        requests.fetch_add(1, Ordering::Relaxed);
                        store.list(Some(&p)).try_collect::<Vec<_>>().await
                    }
                }))
                .buffer_unordered(LIST_CONCURRENCY)
                .try_collect::<Vec<_>>(),
            )
            .map_err(|e| fail(e, "blobs"))?;
        for meta in listed.into_iter().flatten() {
            let Some(loc) = self.loc_of(&meta.location) else {
                continue;
            };
            // blobs/<alg>/<xx>/<hex>/data
            let parts: Vec<&str> = loc.split('/').collect();
            if let [_, alg, _, hex, "data"] = parts.as_slice()
                && let Some(d) = Digest::parse(format!("{alg}:{hex}").as_bytes())
            {
                let modified = meta
                    .last_modified
                    .timestamp_nanos_opt()
                    .map_or(0, i128::from);
                self.blobs.insert(d, (meta.size, modified));
            }
        }
        let repos_dir = self.key("repositories");
        requests.fetch_add(1, Ordering::Relaxed);
        let keys: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(store.list(Some(&repos_dir)).try_collect())
            .map_err(|e| fail(e, "repositories"))?;
        for meta in keys {
            if let Some(loc) = self.loc_of(&meta.location) {
                self.repo_keys.insert(loc);
            }
        }
        Ok(())
    }

    pub fn stat_blob(&self, d: &Digest) -> BlobStat {
        match self.blobs.get(d) {
            Some((size, modified)) => BlobStat::Present {
                size: *size,
                modified: *modified,
            },
            None => BlobStat::Absent,
        }
    }

    /// HEAD of the blob now, for the re-check just before a purge.
    pub fn stat_blob_fresh(&self, d: &Digest) -> BlobStat {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let key = self.key(&crate::storage::blob_loc(d));
        match self.runtime.block_on(self.store.head(&key)) {
            Ok(meta) => BlobStat::Present {
                size: meta.size,
                modified: meta
                    .last_modified
                    .timestamp_nanos_opt()
                    .map_or(0, i128::from),
            },
            Err(object_store::Error::NotFound { .. }) => BlobStat::Absent,
            Err(e) => BlobStat::Unreadable {
                reason: first_line(&e.to_string()),
            },
        }
    }

    pub fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn io::Read + Send>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let key = self.key(&crate::storage::blob_loc(d));
        let result = self.runtime.block_on(self.store.get(&key)).map_err(to_io)?;
        Ok(Box::new(StreamReader {
            handle: self.runtime.handle().clone(),
            stream: result.into_stream(),
            chunk: Bytes::new(),
            bytes: self.bytes.clone(),
        }))
    }

    pub fn is_linked(&self, repo: &str, d: &Digest) -> bool {
        let (alg, hex) = (d.algorithm().name(), d.hex());
        [
            format!("repositories/{repo}/_layers/{alg}/{hex}/link"),
            format!("repositories/{repo}/_manifests/revisions/{alg}/{hex}/link"),
        ]
        .iter()
        .any(|k| self.repo_keys.contains(k))
    }

    pub fn repositories(&self) -> (Vec<String>, Vec<String>) {
        let mut names = BTreeSet::new();
        for loc in &self.repo_keys {
            let rest = loc.trim_start_matches("repositories/");
            for marker in ["/_layers/", "/_manifests/", "/_uploads/"] {
                if let Some(at) = rest.find(marker) {
                    names.insert(rest[..at].to_string());
                    break;
                }
            }
        }
        let (good, bad): (Vec<String>, Vec<String>) = names
            .into_iter()
            .partition(|n| crate::repo_name::is_valid(n));
        (good, bad)
    }

    pub fn blob_sizes(&self) -> Vec<(Digest, u64)> {
        let mut v: Vec<(Digest, u64)> = self.blobs.iter().map(|(d, (s, _))| (*d, *s)).collect();
        v.sort();
        v
    }

    pub fn links(&self, repo: &str, sub: &str) -> Vec<(String, String, String)> {
        let base = format!("repositories/{repo}/{sub}/");
        self.repo_keys
            .range(base.clone()..)
            .take_while(|k| k.starts_with(&base))
            .filter_map(|k| {
                let parts: Vec<&str> = k[base.len()..].split('/').collect();
                match parts.as_slice() {
                    [alg, hex, "link"] => Some((k.clone(), alg.to_string(), hex.to_string())),
                    _ => None,
                }
            })
            .collect()
    }

    pub fn tags(&self, repo: &str) -> Vec<String> {
        let base = format!("repositories/{repo}/_manifests/tags/");
        let mut tags: Vec<String> = self
            .repo_keys
            .range(base.clone()..)
            .take_while(|k| k.starts_with(&base))
            .filter_map(|k| k[base.len()..].split('/').next().map(str::to_string))
            .collect();
        tags.dedup();
        tags
    }

    pub fn exists(&self, loc: &str) -> bool {
        // blobs/<alg>/<xx>/<hex>/data, looked up in the listing by digest
        let parts: Vec<&str> = loc.split('/').collect();
        match parts.as_slice() {
            ["blobs", alg, _, hex, "data"] => Digest::parse(format!("{alg}:{hex}").as_bytes())
                .is_some_and(|d| self.blobs.contains_key(&d)),
            _ => self.repo_keys.contains(loc),
        }
    }

    pub fn read_small(&self, loc: &str, max: u64) -> io::Result<Vec<u8>> {
        if loc.starts_with("repositories/") && !self.repo_keys.contains(loc) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such object"));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let key = self.key(loc);
        let bytes = self
            .runtime
            .block_on(async {
                let r = self.store.get(&key).await?;
                if r.meta.size > max {
                    return Ok(None);
                }
                r.bytes().await.map(Some)
            })
            .map_err(to_io)?
            .ok_or_else(|| io::Error::other(format!("larger than {max} bytes")))?;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes.to_vec())
    }
}

/// A GET's body as a `Read`, pulled chunk by chunk on the runtime.
struct StreamReader {
    handle: tokio::runtime::Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
    bytes: Arc<AtomicU64>,
}

impl io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => {
                    self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    self.chunk = b;
                }
                Some(Err(e)) => return Err(to_io(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

fn to_io(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            io::Error::new(io::ErrorKind::NotFound, "no such object")
        }
        other => io::Error::other(first_line(&other.to_string())),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("error").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls_and_hides_the_secret() {
        let s = S3Spec::from_url("s3://bucket/reg/root/").expect("url");
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_str()),
            ("bucket", "reg/root")
        );
        let s = S3Spec {
            secret_key: Some("hunter2".into()),
            ..s
        };
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(S3Spec::from_url("http://x").is_err());
        assert!(S3Spec::from_url("s3:///x").is_err());
    }
}
