//! A registry's storage in object storage - the registry's s3, gcs and azure drivers -
//! read through the `object_store` crate. Opening lists the bucket (or container) once:
//! the blobs in parallel over the two-hex-digit prefixes of `blobs/<alg>/`, so existence
//! and size come from the listing with no request per blob; then blobs are streamed with
//! GETs for re-hashing, and small objects (links, manifests) fetched whole. Throttling
//! (503 SlowDown) and dropped connections are retried with backoff by `object_store`;
//! every request and byte is counted, because object storage bills both. It only ever
//! lists, heads and gets: nothing is written.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::digest::Digest;
use crate::storage::BlobStat;
pub(crate) use crate::storage::object_spec::{ObjectSpec, Service};
use crate::summary::ObjectCounts;

pub(crate) struct ObjectStorage {
    spec: ObjectSpec,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    /// Blobs from the listing: size and last modification (ns).
    blobs: HashMap<Digest, (u64, i128)>,
    /// Every key below `repositories/`, as locs.
    repo_keys: BTreeSet<String>,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    /// Small objects fetched ahead by `prefetch`, each handed out once by `read_small`.
    prefetched: Mutex<HashMap<String, Bytes>>,
}

/// Concurrent LIST requests while opening.
const LIST_CONCURRENCY: usize = 16;
/// Concurrent GETs of small objects (links) in `prefetch`.
const READ_CONCURRENCY: usize = 32;

impl ObjectStorage {
    pub(crate) fn open(spec: &ObjectSpec) -> Result<ObjectStorage, String> {
        let store = spec.build().map_err(|e| {
            format!(
                "cannot use {}: {}",
                spec.describe(),
                first_line(&e.to_string())
            )
        })?;
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
            prefetched: Mutex::new(HashMap::new()),
        };
        o.list_all()?;
        Ok(o)
    }

    pub(crate) fn describe(&self) -> String {
        self.spec.describe()
    }

    pub(crate) fn counts(&self) -> ObjectCounts {
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
            tracing::debug!("listing {what} failed: {text}");
            let spec = &self.spec;
            let (place, word) = (spec.describe(), spec.service.bucket_word());
            if text.contains("NoSuchBucket")
                || text.contains("ContainerNotFound")
                || matches!(e, object_store::Error::NotFound { .. })
            {
                format!(
                    "{word} {} does not exist ({place}): check storage.{}.{} or --storage",
                    spec.bucket,
                    spec.service.driver(),
                    match spec.service {
                        Service::Azure => "container",
                        _ => "bucket",
                    }
                )
            } else if text.contains("token request") {
                format!(
                    "{place}: no access token could be had: {}",
                    spec.service.credentials_hint()
                )
            } else if text.contains("403")
                || text.contains("401")
                || text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("AuthenticationFailed")
            {
                format!(
                    "{place} refused the credentials: {}",
                    spec.service.credentials_hint()
                )
            } else if text.contains("HTTP error") {
                // object_store ends with the cause, after the request and its retries.
                let cause = text.rsplit_once(" - ").map_or("no answer", |(_, c)| c);
                format!(
                    "cannot reach {place}: {}, after retrying: check the endpoint and the network",
                    first_line(cause.trim_start_matches("HTTP error: "))
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

    pub(crate) fn stat_blob(&self, d: &Digest) -> BlobStat {
        match self.blobs.get(d) {
            Some((size, modified)) => BlobStat::Present {
                size: *size,
                modified: *modified,
            },
            None => BlobStat::Absent,
        }
    }

    /// HEAD of the blob now, for the re-check just before a purge.
    pub(crate) fn stat_blob_fresh(&self, d: &Digest) -> BlobStat {
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

    pub(crate) fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn io::Read + Send>> {
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

    pub(crate) fn is_linked(&self, repo: &str, d: &Digest) -> bool {
        let (alg, hex) = (d.algorithm().name(), d.hex());
        [
            format!("repositories/{repo}/_layers/{alg}/{hex}/link"),
            format!("repositories/{repo}/_manifests/revisions/{alg}/{hex}/link"),
        ]
        .iter()
        .any(|k| self.repo_keys.contains(k))
    }

    pub(crate) fn repositories(&self) -> (Vec<String>, Vec<String>) {
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

    pub(crate) fn blob_sizes(&self) -> Vec<(Digest, u64)> {
        let mut v: Vec<(Digest, u64)> = self.blobs.iter().map(|(d, (s, _))| (*d, *s)).collect();
        v.sort();
        v
    }

    pub(crate) fn links(&self, repo: &str, sub: &str) -> Vec<(String, String, String)> {
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

    pub(crate) fn tags(&self, repo: &str) -> Vec<String> {
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

    pub(crate) fn exists(&self, loc: &str) -> bool {
        // blobs/<alg>/<xx>/<hex>/data, looked up in the listing by digest
        let parts: Vec<&str> = loc.split('/').collect();
        match parts.as_slice() {
            ["blobs", alg, _, hex, "data"] => Digest::parse(format!("{alg}:{hex}").as_bytes())
                .is_some_and(|d| self.blobs.contains_key(&d)),
            _ => self.repo_keys.contains(loc),
        }
    }

    /// GETs the listed ones of `locs` (links, manifests; at most `max` bytes each),
    /// READ_CONCURRENCY at a time, and keeps them for `read_small` until the next call;
    /// what fails is left for `read_small` to fetch again and report. Reading them one
    /// by one would cost a round trip each.
    pub(crate) fn prefetch(&self, locs: &[String], max: u64) {
        let wanted: Vec<(String, ObjectPath)> = locs
            .iter()
            .filter(|l| self.exists(l))
            .map(|l| (l.clone(), self.key(l)))
            .collect();
        self.requests
            .fetch_add(wanted.len() as u64, Ordering::Relaxed);
        let fetched: Vec<(String, object_store::Result<Option<Bytes>>)> = self.runtime.block_on(
            futures::stream::iter(wanted.into_iter().map(|(loc, key)| {
                let store = self.store.clone();
                async move {
                    let got = async {
                        let r = store.get(&key).await?;
                        if r.meta.size > max {
                            return Ok(None);
                        }
                        r.bytes().await.map(Some)
                    }
                    .await;
                    (loc, got)
                }
            }))
            .buffer_unordered(READ_CONCURRENCY)
            .collect(),
        );
        let mut kept = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
        // What an earlier call kept and nobody read is dropped: memory stays one batch.
        kept.clear();
        for (loc, got) in fetched {
            if let Ok(Some(b)) = got {
                self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                kept.insert(loc, b);
            }
        }
    }

    pub(crate) fn read_small(&self, loc: &str, max: u64) -> io::Result<Vec<u8>> {
        if loc.starts_with("repositories/") && !self.repo_keys.contains(loc) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such object"));
        }
        let ahead = self
            .prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(loc);
        if let Some(b) = ahead {
            return Ok(b.to_vec());
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
