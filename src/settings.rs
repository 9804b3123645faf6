//! Validated settings: the command line and the registry's config merged once, with
//! every path, URL and count checked, so the rest of the program never sees a raw flag.
//! Flags win over the config file, the file's `REGISTRY_*` overrides win over the file.
//! It opens no connection and reads no storage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use crate::cli::{CheckArgs, FailOn, Format, ReportArgs, SourceArgs};
use crate::config::{self, RedisConfig};
use crate::object_storage::{ObjectSpec, Service};
use crate::redis_cache::RedisTarget;
use crate::report::SourceInfo;
use crate::storage::StorageSpec;

/// Where the storage and the cache are.
#[derive(Debug, Clone)]
pub struct Source {
    pub storage: crate::storage::StorageSpec,
    pub cache: CacheSource,
    /// The config file the values came from, if any.
    pub config: Option<PathBuf>,
}

/// Where the cache entries to audit come from.
#[derive(Debug, Clone)]
pub enum CacheSource {
    Redis(Box<RedisTarget>),
    /// A dump written by `export-cache` (or anything that writes the format).
    Dump(PathBuf),
    /// Storage verification only.
    None,
}

/// Which cache a command wants.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    Redis,
    Dump(&'a Path),
    Nothing,
}

impl Source {
    /// The Redis target, for commands that need one.
    pub fn redis(&self) -> Result<&RedisTarget, String> {
        match &self.cache {
            CacheSource::Redis(r) => Ok(r),
            _ => Err("this command needs Redis: pass --redis URL or --config".into()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReportSettings {
    pub format: Format,
    pub output: Option<PathBuf>,
    pub fail_on: FailOn,
    /// `--push-gateway`, checked by `pushgateway::preflight` before the run.
    pub push: crate::cli::PushArgs,
}

#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub source: Source,
    pub report: ReportSettings,
    pub jobs: usize,
    pub quick: bool,
    pub scan_count: usize,
    pub verify_storage: bool,
    pub state: Option<PathBuf>,
    pub reverify_after: std::time::Duration,
    pub sample: Option<crate::rehash::Sample>,
    /// `--sample` as given, for the report.
    pub sample_spec: Option<String>,
    pub max_duration: Option<std::time::Duration>,
    pub lock: Option<PathBuf>,
    /// `--shard`, when given (`1/1` included: it still makes a shard report).
    pub shard: Option<crate::shard::Shard>,
}

impl CheckSettings {
    pub fn from_args(args: &CheckArgs) -> Result<CheckSettings, String> {
        let want = match (&args.cache_dump, args.storage_only) {
            (Some(_), true) => {
                return Err("--cache-dump and --storage-only exclude each other".into());
            }
            (Some(p), false) => Want::Dump(p),
            (None, true) => Want::Nothing,
            (None, false) => Want::Redis,
        };
        if args.storage_only && args.skip_storage {
            return Err("--storage-only and --skip-storage exclude each other".into());
        }
        let lock = args.lock.clone().or_else(|| {
            args.state
                .as_ref()
                .map(|s| PathBuf::from(format!("{}.lock", s.display())))
        });
        let source = Source::resolve(&args.source, None, want)?;
        Ok(CheckSettings {
            verify_storage: !args.skip_storage,
            state: args.state.clone(),
            reverify_after: crate::state::parse_duration(&args.reverify_after)
                .map_err(|e| format!("--reverify-after: {e}"))?,
            sample_spec: args.sample.clone(),
            sample: args
                .sample
                .as_deref()
                .map(crate::rehash::Sample::parse)
                .transpose()?,
            max_duration: args
                .max_duration
                .as_deref()
                .map(crate::state::parse_duration)
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
            report: ReportSettings::from_args(&args.report),
            jobs: jobs(args.jobs, &source.storage)?,
            source,
            quick: args.quick,
            scan_count: scan_count(&args.source)?,
        })
    }
}

/// `--jobs`, defaulting to every core.
pub fn jobs(flag: Option<usize>, storage: &StorageSpec) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match (flag, storage) {
        (Some(0), _) => Err("--jobs must be at least 1".into()),
        (Some(n), _) => Ok(n),
        (None, StorageSpec::Fs(_)) => Ok(cores),
        // Each GET mostly waits on the network: more streams than cores keep it busy.
        (None, StorageSpec::Object(_)) => Ok(cores.max(OBJECT_STORAGE_JOBS)),
    }
}

/// Blobs streamed at once from object storage when --jobs is not given.
pub const OBJECT_STORAGE_JOBS: usize = 16;

/// `--format`, defaulting to a table on a terminal and JSON otherwise.
pub fn default_format(flag: Option<Format>, output: Option<&Path>) -> Format {
    flag.unwrap_or_else(|| {
        if output.is_none() && std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        }
    })
}

pub fn scan_count(args: &SourceArgs) -> Result<usize, String> {
    match args.scan_count {
        0 => Err("--scan-count must be at least 1".into()),
        n => Ok(n),
    }
}

impl ReportSettings {
    pub fn from_args(args: &ReportArgs) -> ReportSettings {
        ReportSettings {
            format: default_format(args.format, args.output.as_deref()),
            output: args.output.clone(),
            fail_on: args.fail_on,
            push: args.push.clone(),
        }
    }
}

impl Source {
    pub fn from_args(args: &SourceArgs) -> Result<Source, String> {
        Source::resolve(args, None, Want::Redis)
    }

    /// Like `from_args`, with `recorded` (the source a plan or journal was made against)
    /// filling in what the flags leave out.
    pub fn resolve(
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
        let cache = match want {
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
        })
    }
}

/// The Redis to use: `--redis`, else the config's, else the recorded URL when it needs
/// no password (a recorded URL never holds one).
pub fn redis_target(
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
                    "the registry's blob descriptor cache is {what}, not redis: an in-memory cache lives inside the registry process; audit it with `registry-audit probe --registry-url URL`, a dump with `check --cache-dump FILE`, or storage alone with `check --storage-only`"
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
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
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
