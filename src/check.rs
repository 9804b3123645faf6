//! The `check` command: take the run lock, open storage, read the cache (Redis or a
//! dump), audit it, verify storage, and write the report. It wires the modules together
//! in order and decides the exit status; it changes nothing but its own state, lock and
//! report files.

use std::time::{Instant, SystemTime};

use crate::audit::{self, AuditOptions};
use crate::cache_dump;
use crate::cache_index::CacheIndex;
use crate::lock::Lock;
use crate::progress;
use crate::redis_cache;
use crate::rehash::Policy;
use crate::report::{self, Options, Report, SourceInfo};
use crate::settings::{CacheSource, CheckSettings, Source};
use crate::state::State;
use crate::storage::Storage;

/// Reads the whole cache and audits it; shared by `check` and `purge`.
pub fn audit_source(
    source: &Source,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(Storage, audit::Audit), String> {
    let storage = Storage::open(&source.storage)?;
    audit_with(&storage, source, scan_count, opts).map(|(a, _)| (storage, a))
}

/// Reads the whole cache and audits it against an opened storage; the notes say what
/// the operator should know about the scan itself.
pub fn audit_with(
    storage: &Storage,
    source: &Source,
    scan_count: usize,
    opts: AuditOptions<'_>,
) -> Result<(audit::Audit, Vec<String>), String> {
    let mut notes = Vec::new();
    let mut index = CacheIndex::for_shard(opts.shard);
    let keys = progress::counter("cache keys read");
    match &source.cache {
        CacheSource::Redis(target) => {
            let mut conn = target.connect_cache()?;
            let reread = redis_cache::scan(&mut conn, &mut index, scan_count, &keys)?;
            if reread > 0 {
                notes.push(format!(
                    "the Redis Cluster resharded during the scan: {reread} slots were read again, so no key was missed"
                ));
            }
        }
        CacheSource::Dump(path) => cache_dump::read(path, &mut index)?,
        CacheSource::None => {}
    }
    keys.finish();
    tracing::info!(
        keys = index.counts.keys,
        digests = index.digest_count(),
        "cache read; checking storage"
    );
    audit::run(storage, index, opts).map(|a| (a, notes))
}

pub fn source_info(source: &Source) -> SourceInfo {
    let (cache, redis, cache_dump) = match &source.cache {
        CacheSource::Redis(t) => ("redis", Some(t.display()), None),
        CacheSource::Dump(p) => ("dump", None, Some(p.display().to_string())),
        CacheSource::None => ("none", None, None),
    };
    SourceInfo {
        storage_root: source.storage.describe(),
        cache: cache.into(),
        redis,
        cache_dump,
        registry_url: None,
        config: source.config.as_ref().map(|p| p.display().to_string()),
    }
}

pub fn run(settings: &CheckSettings) -> Result<u8, String> {
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let _lock = settings.lock.as_deref().map(Lock::acquire).transpose()?;
    let storage = Storage::open(&settings.source.storage)?;
    let mut notes = Vec::new();
    let state = settings.state.as_deref().map(|path| {
        let (state, warning) = State::load(path, &storage.describe());
        if let Some(w) = warning {
            tracing::warn!("{w}");
            notes.push(w);
        }
        state
    });
    let opts = AuditOptions {
        hashing: Policy {
            jobs: settings.jobs,
            quick: settings.quick,
            sample: settings.sample,
            deadline: settings.max_duration.map(|d| clock + d),
            state: state.as_ref(),
            reverify_after: settings.reverify_after,
        },
        verify_storage: settings.verify_storage,
        shard: settings.shard.unwrap_or(crate::shard::Shard::ALL),
    };
    let (audit, scan_notes) = audit_with(&storage, &settings.source, settings.scan_count, opts)?;
    notes.extend(scan_notes);
    if let Some(state) = &state {
        state.save()?;
    }
    let complete = audit.summary.hashing.blobs_not_reached == 0 && audit.incomplete.is_empty();
    notes.extend(audit.incomplete.iter().cloned());
    if audit.summary.hashing.blobs_not_reached > 0 {
        notes.push(format!(
            "--max-duration reached: {} blobs were not re-hashed this run",
            audit.summary.hashing.blobs_not_reached
        ));
    }
    let verdict = report::verdict(&audit.summary, &audit.findings, complete);
    let mut code = report::exit_code(&audit.findings, settings.report.fail_on);
    if !audit.incomplete.is_empty() {
        code = code.max(1);
    }
    let mut report = Report::new(
        "check",
        started_at,
        clock,
        source_info(&settings.source),
        Options {
            verify_storage: settings.verify_storage,
            sample: settings.sample_spec.clone(),
            ..Options::new(settings.quick, settings.report.fail_on)
        },
        audit.summary,
        audit.findings,
        verdict,
    );
    report.complete = complete;
    report.notes = notes;
    report.shard = settings.shard.map(|s| s.to_string());
    report.write(settings.report.format, settings.report.output.as_deref())?;
    crate::pushgateway::push_report(&settings.report.push, &report)?;
    Ok(code)
}
