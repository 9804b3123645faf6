//! The commands, one module each: `check`, `purge`, `restore`, `probe`, `export-cache`
//! (`export`), `gc`, `merge`, `completions` and `man` (`completions`). Each wires the layers below in order - settings,
//! readers, the audit, repair, output - and decides its exit status. A command never
//! calls another command; what several share lives in this module or a helper
//! module here (`live_probe`, `pushgateway`; `restart` is `gc`'s).

pub(crate) mod check;
pub(crate) mod completions;
pub(crate) mod export;
pub(crate) mod gc;
pub(crate) mod live_probe;
pub(crate) mod merge;
pub(crate) mod probe;
pub(crate) mod purge;
pub(crate) mod pushgateway;
pub(crate) mod restart;
pub(crate) mod restore;

use crate::audit::{self, AuditOptions};
use crate::cache::dump as cache_dump;
use crate::cache::index::CacheIndex;
use crate::cache::redis as redis_cache;
use crate::progress;
use crate::settings::{CacheSource, Source};
use crate::storage::Storage;
use crate::summary::SourceInfo;

/// Reads the whole cache and audits it; shared by `check` and `purge`.
pub(crate) fn audit_source(
    source: &Source,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(Storage, audit::Audit), String> {
    let storage = Storage::open(&source.storage)?;
    audit_with(&storage, source, scan_count, opts).map(|(a, _)| (storage, a))
}

/// Reads the whole cache and audits it against an opened storage; the notes say what
/// the operator should know about the scan itself.
pub(crate) fn audit_with(
    storage: &Storage,
    source: &Source,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(audit::Audit, Vec<String>), String> {
    // Redis is connected to first, so an unreachable one exits at once; then storage is
    // walked while the cache is read.
    let conn = match &source.cache {
        CacheSource::Redis(target) => Some(target.connect_cache()?),
        _ => None,
    };
    let (mut audit, (notes, dump_incomplete)) = audit::run_reading(storage, opts, || {
        read_cache_with(source, conn, scan_count, opts)
            .map(|(index, notes, dump)| (index, (notes, dump)))
    })?;
    // What the dump held is audited; that it may not be the whole cache is said.
    audit.incomplete.extend(dump_incomplete);
    Ok((audit, notes))
}

/// Reads the whole cache (this run's shard of it) into an index: the notes about the
/// scan, and why a dump may not be the whole cache.
pub(crate) fn read_cache(
    source: &Source,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(CacheIndex, Vec<String>, Option<String>), String> {
    read_cache_with(source, None, scan_count, opts)
}

/// [`read_cache`] through a Redis connection already open (`None`: opened here).
fn read_cache_with(
    source: &Source,
    conn: Option<redis_cache::CacheConn>,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(CacheIndex, Vec<String>, Option<String>), String> {
    let mut notes = Vec::new();
    let mut dump_incomplete = None;
    let mut index = CacheIndex::for_shard(opts.shard);
    let keys = progress::counter("cache keys read");
    match &source.cache {
        CacheSource::Redis(target) => {
            let mut conn = match conn {
                Some(c) => c,
                None => target.connect_cache()?,
            };
            let reread = redis_cache::scan(&mut conn, &mut index, scan_count, &keys)?;
            if reread > 0 {
                notes.push(format!(
                    "the Redis Cluster resharded during the scan: {reread} slots were read again, so no key was missed"
                ));
            }
        }
        CacheSource::Dump(path) => {
            dump_incomplete = cache_dump::read(path, &mut index)?.incomplete;
        }
        // Its entries are asked about after the storage walk (`live_probe`).
        CacheSource::Registry(_) | CacheSource::None => {}
    }
    keys.finish();
    index.finish();
    tracing::info!(
        keys = index.counts.keys,
        digests = index.digest_count(),
        "cache read; checking storage"
    );
    Ok((index, notes, dump_incomplete))
}

pub(crate) fn source_info(source: &Source) -> SourceInfo {
    let (cache, redis, cache_dump) = match &source.cache {
        CacheSource::Redis(t) => ("redis", Some(t.display()), None),
        CacheSource::Dump(p) => ("dump", None, Some(p.display().to_string())),
        CacheSource::Registry(_) => ("inmemory", None, None),
        CacheSource::None => ("none", None, None),
    };
    let registry_url = match &source.cache {
        CacheSource::Registry(t) => Some(t.endpoint.describe()),
        _ => None,
    };
    SourceInfo {
        storage_root: source.storage.describe(),
        cache: cache.into(),
        redis,
        cache_dump,
        registry_url,
        config: source.config.as_ref().map(|p| p.display().to_string()),
    }
}
