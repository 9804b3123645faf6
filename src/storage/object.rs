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
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::storage::BlobStat;

/// Which service holds the blobs: the registry's storage driver of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Service {
    #[default]
    S3,
    Gcs,
    Azure,
}

impl Service {
    /// The driver's name in config.yml.
    pub fn driver(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Gcs => "gcs",
            Service::Azure => "azure",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Gcs => "gs",
            Service::Azure => "azure",
        }
    }

    /// What to check when the service refuses the credentials.
    fn credentials_hint(self) -> &'static str {
        match self {
            Service::S3 => {
                "check the s3 driver's accesskey and secretkey, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            }
            Service::Gcs => {
                "check the gcs driver's keyfile or credentials, or GOOGLE_APPLICATION_CREDENTIALS"
            }
            Service::Azure => {
                "check the azure driver's accountname and accountkey, or AZURE_STORAGE_ACCOUNT_KEY"
            }
        }
    }

    fn bucket_word(self) -> &'static str {
        match self {
            Service::Azure => "container",
            _ => "bucket",
        }
    }
}

/// How to reach the bucket (an Azure container); secrets never leave this struct except
/// to the service.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ObjectSpec {
    pub service: Service,
    /// The bucket, or for Azure the container.
    pub bucket: String,
    /// The driver's `rootdirectory` in the bucket, without leading or trailing `/`.
    pub prefix: String,
    /// A server other than the service's own: the s3 driver's `regionendpoint`, the azure
    /// driver's `serviceurl` (or the one its `realm` gives).
    pub endpoint: Option<String>,
    /// S3: the bucket's region.
    pub region: Option<String>,
    /// S3: path-style requests (`forcepathstyle`, the default with an endpoint).
    pub path_style: bool,
    /// Azure: the storage account (`accountname`).
    pub account: Option<String>,
    /// S3: `accesskey`.
    pub access_key: Option<String>,
    /// S3: `secretkey`; Azure: `accountkey`.
    pub secret_key: Option<String>,
    /// GCS: the service-account key file (`keyfile`).
    pub keyfile: Option<PathBuf>,
    /// GCS: the service-account key given inline (`credentials`), as JSON.
    pub key_json: Option<String>,
    /// Azure: an application's client secret (`credentials.type: client_secret`).
    pub client: Option<AzureClient>,
}

/// An Azure application's credentials; the secret goes only to Azure's token service.
#[derive(Clone, PartialEq, Eq)]
pub struct AzureClient {
    pub id: String,
    pub tenant: String,
    pub secret: String,
}

impl std::fmt::Debug for ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ObjectSpec {
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `azure://account/container/prefix`
    /// (and the endpoint), for reports.
    pub fn describe(&self) -> String {
        let mut s = format!("{}://", self.service.scheme());
        if self.service == Service::Azure {
            s.push_str(self.account.as_deref().unwrap_or("-"));
            s.push('/');
        }
        s.push_str(&self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(" at ");
            s.push_str(&without_secrets(e));
        }
        s
    }

    /// Parses `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or
    /// `azure://account/container[/prefix]`, and the ` at <endpoint>` that `describe` adds.
    pub fn from_url(text: &str) -> Result<ObjectSpec, String> {
        let (url, endpoint) = match text.split_once(" at ") {
            Some((u, e)) => (u, Some(e.trim().to_string())),
            None => (text, None),
        };
        let usage = || {
            format!(
                "--storage {url}: use s3://bucket/prefix, gs://bucket/prefix or azure://account/container/prefix"
            )
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(usage)?;
        let service = match scheme {
            "s3" => Service::S3,
            "gs" | "gcs" => Service::Gcs,
            "azure" | "az" => Service::Azure,
            _ => return Err(usage()),
        };
        let mut parts = rest.splitn(if service == Service::Azure { 3 } else { 2 }, '/');
        let account = match service {
            Service::Azure => Some(
                parts
                    .next()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| format!("--storage {url}: no storage account"))?
                    .to_string(),
            ),
            _ => None,
        };
        let bucket = parts.next().unwrap_or_default();
        if bucket.is_empty() {
            return Err(format!("--storage {url}: no {}", service.bucket_word()));
        }
        Ok(ObjectSpec {
            service,
            bucket: bucket.to_string(),
            prefix: parts
                .next()
                .unwrap_or_default()
                .trim_matches('/')
                .to_string(),
            path_style: service == Service::S3 && endpoint.is_some(),
            endpoint,
            account,
            ..ObjectSpec::default()
        })
    }

    fn retry() -> RetryConfig {
        RetryConfig {
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
            ..RetryConfig::default()
        }
    }

    /// The client for this spec: the given settings over the service's usual
    /// environment credentials.
    fn build(&self) -> object_store::Result<Arc<dyn ObjectStore>> {
        let http = self
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        Ok(match self.service {
            Service::S3 => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&self.bucket)
                    .with_retry(Self::retry());
                if let Some(r) = &self.region {
                    b = b.with_region(r);
                }
                if let Some(e) = &self.endpoint {
                    b = b
                        .with_endpoint(e)
                        .with_allow_http(http)
                        .with_virtual_hosted_style_request(!self.path_style);
                }
                if let (Some(a), Some(s)) = (&self.access_key, &self.secret_key) {
                    b = b.with_access_key_id(a).with_secret_access_key(s);
                }
                Arc::new(b.build()?)
            }
            Service::Gcs => {
                // The default server is https; only a key file's own `gcs_base_url`
                // (a test server) can name an http one.
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&self.bucket)
                    .with_client_options(ClientOptions::new().with_allow_http(true))
                    .with_retry(Self::retry());
                if let Some(k) = &self.keyfile {
                    b = b.with_service_account_path(k.display().to_string());
                } else if let Some(j) = &self.key_json {
                    b = b.with_service_account_key(j);
                }
                Arc::new(b.build()?)
            }
            Service::Azure => {
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&self.bucket)
                    .with_retry(Self::retry());
                if let Some(a) = &self.account {
                    b = b.with_account(a);
                }
                if let Some(k) = &self.secret_key {
                    b = b.with_access_key(k);
                }
                if let Some(c) = &self.client {
                    b = b.with_client_secret_authorization(&c.id, &c.secret, &c.tenant);
                }
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone()).with_allow_http(http);
                }
                Arc::new(b.build()?)
            }
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
    pub fn open(spec: &ObjectSpec) -> Result<ObjectStorage, String> {
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

    /// GETs the listed ones of `locs` (links, manifests; at most `max` bytes each),
    /// READ_CONCURRENCY at a time, and keeps them for `read_small` until the next call;
    /// what fails is left for `read_small` to fetch again and report. Reading them one
    /// by one would cost a round trip each.
    pub fn prefetch(&self, locs: &[String], max: u64) {
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

    pub fn read_small(&self, loc: &str, max: u64) -> io::Result<Vec<u8>> {
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

/// An endpoint URL without what may carry a secret: a query (an Azure SAS token) and
/// user information.
fn without_secrets(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("error").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_storage_urls_and_hides_the_secret() {
        let s = ObjectSpec::from_url("s3://bucket/reg/root/").expect("url");
        assert_eq!(
            (s.service, s.bucket.as_str(), s.prefix.as_str()),
            (Service::S3, "bucket", "reg/root")
        );
        let s = ObjectSpec {
            secret_key: Some("hunter2".into()),
            key_json: Some("{\"private_key\": \"hunter3\"}".into()),
            ..s
        };
        assert!(!format!("{s:?}").contains("hunter"));
        let g = ObjectSpec::from_url("gs://b").expect("gs");
        assert_eq!(
            (g.service, g.bucket.as_str(), g.prefix.as_str()),
            (Service::Gcs, "b", "")
        );
        let a = ObjectSpec::from_url("azure://acct/regs/one/two at http://127.0.0.1:1/acct")
            .expect("azure");
        assert_eq!(
            (a.account.as_deref(), a.bucket.as_str(), a.prefix.as_str()),
            (Some("acct"), "regs", "one/two")
        );
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:1/acct"));
        // What describe prints, from_url reads back.
        for spec in [s, g, a] {
            let again = ObjectSpec::from_url(&spec.describe()).expect("round trip");
            assert_eq!(
                (
                    again.service,
                    again.bucket,
                    again.prefix,
                    again.account,
                    again.endpoint
                ),
                (
                    spec.service,
                    spec.bucket,
                    spec.prefix,
                    spec.account,
                    spec.endpoint
                )
            );
        }
        let sas = ObjectSpec {
            endpoint: Some("https://u:pw@acct.blob.core.windows.net/?sv=1&sig=SECRET".into()),
            ..ObjectSpec::from_url("azure://acct/c").expect("azure")
        };
        assert_eq!(
            sas.describe(),
            "azure://acct/c at https://acct.blob.core.windows.net/"
        );
        for bad in ["http://x", "s3:///x", "azure://acct", "azure:///c", "gs://"] {
            assert!(ObjectSpec::from_url(bad).is_err(), "{bad}");
        }
    }
}
