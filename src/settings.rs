//! Validated settings: the command line and the registry's config merged once, with
//! every path, URL and count checked, so the rest of the program never sees a raw flag.
//! Flags win over the config file, the file's `REGISTRY_*` overrides win over the file.
//! It opens no connection and reads no storage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use crate::cache::redis::RedisTarget;
use crate::cli::{CheckArgs, FailOn, Format, RegistryAccessArgs, ReportArgs, SourceArgs};
use crate::registry::endpoint::{self, Endpoint, ProbeTarget};
use crate::registry_config::{self as config, RedisConfig};
use crate::storage::StorageSpec;
use crate::storage::object::{ObjectSpec, Service};
use crate::summary::SourceInfo;

/// Where the storage and the cache are.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub storage: crate::storage::StorageSpec,
    pub cache: CacheSource,
    /// The config file the values came from, if any.
    pub config: Option<PathBuf>,
    /// What the operator should know about how the source was read (for the report).
    pub notes: Vec<String>,
}

/// Where the cache entries to audit come from.
#[derive(Debug, Clone)]
pub(crate) enum CacheSource {
    Redis(Box<RedisTarget>),
    /// A dump written by `export-cache` (or anything that writes the format).
    Dump(PathBuf),
    /// The registry's in-memory cache, asked through the running registry (HEAD only).
    Registry(Box<ProbeTarget>),
    /// Storage verification only.
    None,
}

/// Which cache a command wants.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want<'a> {
    Redis,
    Dump(&'a Path),
    Nothing,
    /// `check`: the cache the config names - Redis, the in-memory cache of the running
    /// registry (`--registry-url`, else the config's `http:`), or none - unless flags say.
    Check {
        registry_url: Option<&'a str>,
        access: &'a RegistryAccessArgs,
    },
}

impl Source {
    /// The Redis target, for commands that need one.
    pub(crate) fn redis(&self) -> Result<&RedisTarget, String> {
        match &self.cache {
            CacheSource::Redis(r) => Ok(r),
            _ => Err("this command needs Redis: pass --redis URL or --config".into()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ReportSettings {
    pub format: Format,
    pub output: Option<PathBuf>,
    pub fail_on: FailOn,
    /// `--push-gateway`, checked by `pushgateway::preflight` before the run.
    pub push: crate::cli::PushArgs,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckSettings {
    pub source: Source,
    pub report: ReportSettings,
    pub jobs: usize,
    /// `--io-threads`, or the default.
    pub io_threads: usize,
    pub quick: bool,
    pub scan_count: usize,
    pub verify_storage: bool,
    pub state: Option<PathBuf>,
    pub reverify_after: std::time::Duration,
    pub sample: Option<crate::audit::rehash::Sample>,
    /// `--sample` as given, for the report.
    pub sample_spec: Option<String>,
    pub max_duration: Option<std::time::Duration>,
    pub lock: Option<PathBuf>,
    /// `--shard`, when given (`1/1` included: it still makes a shard report).
    pub shard: Option<crate::shard::Shard>,
    /// What the report should say about the settings (a capped --jobs).
    pub notes: Vec<String>,
}

impl CheckSettings {
    pub(crate) fn from_args(args: &CheckArgs) -> Result<CheckSettings, String> {
        let want = match (&args.cache_dump, args.storage_only) {
            (Some(_), true) => {
                return Err("--cache-dump and --storage-only exclude each other".into());
            }
            (Some(p), false) => Want::Dump(p),
            (None, true) => Want::Nothing,
            (None, false) => Want::Check {
                registry_url: args.registry_url.as_deref(),
                access: &args.registry,
            },
        };
        if args.storage_only && args.skip_storage {
            return Err("--storage-only and --skip-storage exclude each other".into());
        }
        let lock = args.lock.clone().or_else(|| {
            args.state
                .as_ref()
                .map(|s| PathBuf::from(format!("{}.lock", s.display())))
        });
        // Outputs that would destroy a special file are refused before any work, and so
        // is a state too large to read.
        if let Some(p) = &args.state {
            let limit = crate::files::MAX_STATE_BYTES;
            crate::files::check_output("--state", p).map_err(|e| {
                format!(
                    "{e} (the limit is a regular file of at most {})",
                    crate::files::limit_text(limit)
                )
            })?;
            match crate::files::open("state", p, limit) {
                Err(e) if !e.is_io() => return Err(e.to_string()),
                _ => {}
            }
        }
        if let Some(p) = &lock {
            crate::files::check_output("--lock", p)?;
        }
        let report = ReportSettings::from_args(&args.report)?;
        let source = Source::resolve(&args.source, None, want)?;
        if args.skip_storage && matches!(source.cache, CacheSource::Registry(_)) {
            return Err("--skip-storage: an in-memory cache is probed for the blobs the storage walk finds gone; drop --skip-storage".into());
        }
        if let Some(dump) = &args.cache_dump {
            // Refused now if it is not a regular file within the limit, before any work.
            crate::files::open("cache dump", dump, crate::files::MAX_DUMP_BYTES)?;
        }
        let (jobs, jobs_note) = jobs_with_note(args.jobs, &source.storage)?;
        if let Some(note) = &jobs_note {
            tracing::warn!("{note}");
        }
        Ok(CheckSettings {
            notes: jobs_note.into_iter().collect(),
            verify_storage: !args.skip_storage,
            state: args.state.clone(),
            reverify_after: crate::timestamp::parse_duration(&args.reverify_after)
                .map_err(|e| format!("--reverify-after: {e}"))?,
            sample_spec: args.sample.clone(),
            sample: args
                .sample
                .as_deref()
                .map(crate::audit::rehash::Sample::parse)
                .transpose()?,
            max_duration: args
                .max_duration
                .as_deref()
                .map(crate::timestamp::parse_duration)
                .transpose()
                .map_err(|e| format!("--max-duration: {e}"))?,
            lock,
            shard: match args.shard.as_deref() {
                None => None,
                Some(spec) => Some(match spec.strip_prefix("auto/") {
                    Some(n) => {
                        let n: u64 = n
                            .parse()
                            .map_err(|_| format!("--shard '{spec}': use auto/N"))?;
                        let index = std::env::var("JOB_COMPLETION_INDEX")
                            .map_err(|_| format!("--shard {spec} needs JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)"))?;
                        crate::shard::Shard::from_index(&index, n)?
                    }
                    None => crate::shard::Shard::parse(spec)?,
                }),
            },
            report,
            jobs,
            io_threads: args
                .io_threads
                .map_or(crate::audit::verify::DEFAULT_IO_THREADS, usize::from),
            source,
            quick: args.quick,
            scan_count: scan_count(&args.source)?,
        })
    }
}

/// `--jobs`, defaulting to every core; more than [`max_jobs`] is capped there, with a
/// warning on stderr (see [`jobs_with_note`] for the note a report carries).
pub(crate) fn jobs(flag: Option<usize>, storage: &StorageSpec) -> Result<usize, String> {
    let (n, note) = jobs_with_note(flag, storage)?;
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(n)
}

/// `--jobs` and, when it was capped, the note that says so.
pub(crate) fn jobs_with_note(
    flag: Option<usize>,
    storage: &StorageSpec,
) -> Result<(usize, Option<String>), String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = max_jobs(cores, storage);
    match (flag, storage) {
        (Some(0), _) => Err("--jobs must be at least 1".into()),
        (Some(n), _) if n > max => Ok((
            max,
            Some(format!(
                "--jobs {n} is more than the limit of {max} ({}); using {max}",
                match storage {
                    StorageSpec::Fs(_) =>
                        format!("{JOBS_PER_CORE} per core on a filesystem, {cores} cores"),
                    StorageSpec::Object(_) => "on object storage".to_string(),
                }
            )),
        )),
        (Some(n), _) => Ok((n, None)),
        (None, StorageSpec::Fs(_)) => Ok((cores, None)),
        // Each GET mostly waits on the network: more streams than cores keep it busy.
        (None, StorageSpec::Object(_)) => Ok((cores.max(OBJECT_STORAGE_JOBS), None)),
    }
}

/// Blobs streamed at once from object storage when --jobs is not given.
pub(crate) const OBJECT_STORAGE_JOBS: usize = 16;
/// The most hashing threads per core on a filesystem: past a few per core, threads only
/// compete for the disk and memory.
pub(crate) const JOBS_PER_CORE: usize = 4;
/// The most blobs streamed at once from object storage (each holds a connection).
pub(crate) const MAX_OBJECT_STORAGE_JOBS: usize = 256;

/// The most `--jobs` allowed: [`JOBS_PER_CORE`] per core on a filesystem,
/// [`MAX_OBJECT_STORAGE_JOBS`] on object storage.
pub(crate) fn max_jobs(cores: usize, storage: &StorageSpec) -> usize {
    match storage {
        StorageSpec::Fs(_) => cores.saturating_mul(JOBS_PER_CORE).max(1),
        StorageSpec::Object(_) => MAX_OBJECT_STORAGE_JOBS.max(cores),
    }
}

/// `--format`, defaulting to a table on a terminal and JSON otherwise.
pub(crate) fn default_format(flag: Option<Format>, output: Option<&Path>) -> Format {
    flag.unwrap_or_else(|| {
        if output.is_none() && std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        }
    })
}

pub(crate) fn scan_count(args: &SourceArgs) -> Result<usize, String> {
    match args.scan_count {
        0 => Err("--scan-count must be at least 1".into()),
        n => Ok(n),
    }
}

impl ReportSettings {
    /// Refuses an `--output` that is not absent or a regular file (`-` is stdout).
    pub(crate) fn from_args(args: &ReportArgs) -> Result<ReportSettings, String> {
        let output = output_path("--output", args.output.as_deref())?;
        Ok(ReportSettings {
            format: default_format(args.format, output.as_deref()),
            output,
            fail_on: args.fail_on,
            push: args.push.clone(),
        })
    }
}

/// A report's output file, checked: `-` means stdout (None); anything else must be
/// absent or a regular file.
pub(crate) fn output_path(flag: &str, path: Option<&Path>) -> Result<Option<PathBuf>, String> {
    match path {
        None => Ok(None),
        Some(p) if crate::files::is_stdout(p) => Ok(None),
        Some(p) => {
            crate::files::check_output(flag, p)?;
            Ok(Some(p.to_path_buf()))
        }
    }
}

impl Source {
    pub(crate) fn from_args(args: &SourceArgs) -> Result<Source, String> {
        Source::resolve(args, None, Want::Redis)
    }

    /// Like `from_args`, with `recorded` (the source a plan or journal was made against)
    /// filling in what the flags leave out.
    pub(crate) fn resolve(
        args: &SourceArgs,
        recorded: Option<&SourceInfo>,
        want: Want<'_>,
    ) -> Result<Source, String> {
        let config_path = args
            .config
            .clone()
            .or_else(|| recorded.and_then(|r| r.config.as_ref()).map(PathBuf::from));
        let file = match &config_path {
            Some(path) => Some(config::load(path, std::env::vars())?),
            None => None,
        };
        let storage = match (&args.root, &args.storage, &file, recorded) {
            (Some(r), _, _, _) => StorageSpec::Fs(r.clone()),
            (None, Some(url), _, _) => {
                let mut spec = ObjectSpec::from_url(url)?;
                if let Some(e) = &args.storage_endpoint {
                    if spec.service == Service::Gcs {
                        return Err("--storage-endpoint does not apply to gs://: a GCS key file names its own server (gcs_base_url)".into());
                    }
                    spec.endpoint = Some(e.clone());
                    spec.path_style = spec.service == Service::S3;
                }
                if let Some(r) = &args.s3_region {
                    spec.region = Some(r.clone());
                }
                StorageSpec::Object(Box::new(spec))
            }
            (None, None, Some(c), _) => match c.driver.as_deref() {
                None | Some("filesystem") => StorageSpec::Fs(c.root.clone()),
                Some("s3" | "gcs" | "azure") => StorageSpec::Object(Box::new(
                    c.objects
                        .clone()
                        .ok_or("the config's storage section has no driver settings")?,
                )),
                Some(driver) => {
                    return Err(format!(
                        "the registry stores blobs with the '{driver}' driver; registry-audit reads the filesystem, s3, gcs and azure drivers"
                    ));
                }
            },
            (None, None, None, Some(r)) => {
                if r.storage_root.contains("://") {
                    StorageSpec::Object(Box::new(ObjectSpec::from_url(&r.storage_root)?))
                } else {
                    StorageSpec::Fs(PathBuf::from(&r.storage_root))
                }
            }
            (None, None, None, None) => {
                return Err(
                    "say where storage is: --root DIR, --storage URL (s3://, gs://, azure://), or --config the registry's config.yml".into(),
                );
            }
        };
        let mut notes = Vec::new();
        let cache = match want {
            Want::Check {
                registry_url,
                access,
            } => check_cache(args, file.as_ref(), registry_url, access, &mut notes)?,
            Want::Redis => {
                let mut target = redis_target(args.redis.as_deref(), file.as_ref(), recorded)?;
                target.expect_cluster |= args.redis_cluster;
                CacheSource::Redis(Box::new(target))
            }
            Want::Dump(path) => CacheSource::Dump(path.to_path_buf()),
            Want::Nothing => CacheSource::None,
        };
        Ok(Source {
            storage,
            cache,
            config: config_path,
            notes,
        })
    }
}

/// The cache `check` audits: Redis when `--redis` says so or the config's cache is
/// redis; the running registry when `--registry-url` says so or the config's cache is
/// inmemory (at the address its `http:` section gives); none when the config enables no
/// cache the registry knows (a note says so: the registry then caches nothing).
fn check_cache(
    args: &SourceArgs,
    file: Option<&config::RegistryConfig>,
    registry_url: Option<&str>,
    access: &RegistryAccessArgs,
    notes: &mut Vec<String>,
) -> Result<CacheSource, String> {
    let redis = |file| {
        let mut target = redis_target(args.redis.as_deref(), file, None)?;
        target.expect_cluster |= args.redis_cluster;
        Ok::<_, String>(CacheSource::Redis(Box::new(target)))
    };
    if args.redis.is_some() {
        return redis(file);
    }
    let kind = file.and_then(|c| c.cache.as_deref());
    let key = file.map_or("blobdescriptor", |c| c.cache_key);
    let external = file.and_then(|c| c.http.host.clone());
    if let Some(url) = registry_url {
        if kind == Some("redis") {
            return Err(format!(
                "the config's cache (storage.cache.{key}) is redis, which check audits directly: drop --registry-url (or use `registry-audit probe`)"
            ));
        }
        return probe_target(Endpoint::parse(url)?, access, external);
    }
    let Some(c) = file else {
        return Err(
            "say where the cache is: --redis URL, --registry-url URL (an in-memory cache), or --config the registry's config.yml".into(),
        );
    };
    match kind {
        Some("redis") => redis(file),
        Some("inmemory") => {
            let endpoint = Endpoint::from_config(&c.http)
                .map_err(|e| format!("the registry's cache is inmemory, but {e}"))?;
            probe_target(endpoint, access, external)
        }
        other => {
            notes.push(match other {
                None => "the registry's config enables no blob descriptor cache (storage.cache.blobdescriptor and layerinfo are unset or empty), so the registry caches no descriptor that could go stale: storage was verified alone".into(),
                Some(k) => format!(
                    "the registry does not know the cache kind '{}' of storage.cache.{key} (it knows redis and inmemory) and caches nothing: storage was verified alone",
                    k.escape_debug()
                ),
            });
            Ok(CacheSource::None)
        }
    }
}

/// The running registry at `endpoint`, with the access flags; credentials from a Docker
/// config are looked up for its address, then for the config's external `http.host`.
fn probe_target(
    endpoint: Endpoint,
    access: &RegistryAccessArgs,
    external: Option<String>,
) -> Result<CacheSource, String> {
    let mut urls = vec![endpoint.describe()];
    urls.extend(external);
    let credentials = endpoint::credentials(
        access.username.as_deref(),
        access.docker_config.as_deref(),
        &urls,
    )?;
    Ok(CacheSource::Registry(Box::new(ProbeTarget {
        endpoint,
        options: crate::registry::client::ClientOptions {
            timeout: endpoint::CHECK_TIMEOUT,
            ca_cert: access.ca_cert.clone(),
            insecure: access.insecure,
            credentials,
        },
        concurrency: endpoint::CHECK_CONCURRENCY,
    })))
}

/// The Redis to use: `--redis`, else the config's, else the recorded URL when it needs
/// no password (a recorded URL never holds one).
pub(crate) fn redis_target(
    url: Option<&str>,
    file: Option<&config::RegistryConfig>,
    recorded: Option<&SourceInfo>,
) -> Result<RedisTarget, String> {
    if let Some(url) = url {
        return RedisTarget::from_url(url);
    }
    if let Some(c) = file {
        let kind = c.cache.as_deref().unwrap_or("");
        return match (kind, &c.redis) {
            ("redis", Some(r)) => target_from_config(r),
            ("redis", None) => Err(
                "the config's cache is redis but it has no redis: section; pass --redis URL".into(),
            ),
            _ => {
                let what = if kind.is_empty() {
                    "not configured"
                } else {
                    kind
                };
                Err(format!(
                    "the registry's blob descriptor cache is {what}, not redis: an in-memory cache lives inside the registry process, where only a restart clears it; `registry-audit check --config` finds its live phantoms through the running registry"
                ))
            }
        };
    }
    match recorded {
        Some(SourceInfo {
            redis: Some(url), ..
        }) if url.contains("***") => Err(format!(
            "{url} needs a password, which plans and journals never hold: pass --redis URL or --config"
        )),
        Some(SourceInfo {
            redis: Some(url), ..
        }) => RedisTarget::from_url(url),
        _ => {
            Err("say where the cache is: --redis URL or --config the registry's config.yml".into())
        }
    }
}

fn target_from_config(r: &RedisConfig) -> Result<RedisTarget, String> {
    // Several addresses are the seeds of a cluster: any one finds the rest.
    let addr = r
        .addrs
        .first()
        .ok_or("the config's redis: section has no addr (or addrs)")?;
    let (host, port) = split_host_port(addr)?;
    let tcp = if r.tls.is_some() {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    };
    let mut redis = RedisConnectionInfo::default().set_db(r.db);
    if let Some(u) = &r.username {
        redis = redis.set_username(u);
    }
    if let Some(p) = &r.password {
        redis = redis.set_password(p);
    }
    let info: ConnectionInfo = "redis://127.0.0.1:6379"
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .set_addr(tcp)
        .set_redis_settings(redis);
    let tls = match &r.tls {
        None => None,
        Some(t) => {
            let client_tls = match (&t.certificate, &t.key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read_pem(c)?,
                    client_key: read_pem(k)?,
                }),
                (None, None) => None,
                _ => return Err("redis.tls needs both certificate and key, or neither".into()),
            };
            let mut roots = Vec::new();
            for ca in &t.root_cas {
                roots.extend(read_pem(ca)?);
                roots.push(b'\n');
            }
            Some(redis::TlsCertificates {
                client_tls,
                root_cert: (!roots.is_empty()).then_some(roots),
            })
        }
    };
    Ok(RedisTarget {
        info,
        tls,
        expect_cluster: r.addrs.len() > 1,
    })
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    Ok(crate::files::read(
        "Redis TLS file",
        path,
        crate::files::MAX_PEM_BYTES,
    )?)
}

/// `host:port`, `[v6]:port` or a bare host (port 6379).
fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let bad = || format!("redis address '{addr}' is not host:port");
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 6379,
            None => return Err(bad()),
        };
        return Ok((host.to_string(), port));
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.to_string(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None if !addr.is_empty() => Ok((addr.to_string(), 6379)),
        None => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_addresses() {
        assert_eq!(split_host_port("h:1").expect("ok"), ("h".into(), 1));
        assert_eq!(split_host_port("h").expect("ok"), ("h".into(), 6379));
        assert_eq!(split_host_port("[::1]:7").expect("ok"), ("::1".into(), 7));
        assert!(split_host_port("h:x").is_err());
        assert!(split_host_port(":1").is_err());
    }

    #[test]
    fn config_target_keeps_the_password_out_of_display() {
        let t = target_from_config(&RedisConfig {
            addrs: vec!["10.0.0.5:6379".into()],
            password: Some("hunter2".into()),
            db: 2,
            ..RedisConfig::default()
        })
        .expect("target");
        assert_eq!(t.display(), "redis://:***@10.0.0.5:6379/2");
        assert_eq!(t.info.redis_settings().password(), Some("hunter2"));
    }

    fn storage_args(url: &str, endpoint: Option<&str>) -> SourceArgs {
        SourceArgs {
            config: None,
            root: None,
            storage: Some(url.into()),
            storage_endpoint: endpoint.map(str::to_string),
            s3_region: None,
            redis: None,
            scan_count: 1000,
            redis_cluster: false,
        }
    }

    #[test]
    fn storage_urls_and_their_endpoints() {
        let s = Source::resolve(
            &storage_args("azure://acct/regs/p", Some("http://127.0.0.1:1/acct")),
            None,
            Want::Nothing,
        )
        .expect("azure");
        assert_eq!(
            s.storage.describe(),
            "azure://acct/regs/p at http://127.0.0.1:1/acct"
        );
        // Object storage streams at least 16 blobs at once; a filesystem one per core.
        assert!(jobs(None, &s.storage).expect("jobs") >= OBJECT_STORAGE_JOBS);
        assert_eq!(jobs(Some(3), &s.storage), Ok(3));
        assert!(jobs(Some(0), &s.storage).is_err());
        let err = Source::resolve(
            &storage_args("gs://b", Some("http://x")),
            None,
            Want::Nothing,
        )
        .expect_err("gs with an endpoint");
        assert!(err.contains("gcs_base_url"), "{err}");
    }
}
