//! The `check` command: open storage, read the cache (Redis or a dump), audit it, verify
//! storage, and write the report. It wires the modules together in order and decides
//! the exit status; it changes nothing anywhere.

use std::time::{Instant, SystemTime};

use crate::audit::{self, AuditOptions};
use crate::cache_dump;
use crate::cache_index::CacheIndex;
use crate::redis_cache;
use crate::report::{self, Options, Report, SourceInfo, Tool};
use crate::settings::{CacheSource, CheckSettings, Source};
use crate::storage::Storage;

/// Reads the whole cache and audits it; shared by `check`, `purge` and `probe`.
pub fn audit_source(
    source: &Source,
    scan_count: usize,
    opts: AuditOptions,
) -> Result<(Storage, audit::Audit), String> {
    let storage = Storage::open(&source.root).map_err(|e| e.to_string())?;
    let mut index = CacheIndex::new();
    match &source.cache {
        CacheSource::Redis(target) => {
            let mut conn = target.connect()?;
            redis_cache::scan(&mut conn, &mut index, scan_count)?;
        }
        CacheSource::Dump(path) => cache_dump::read(path, &mut index)?,
        CacheSource::None => {}
    }
    tracing::info!(
        keys = index.counts.keys,
        digests = index.digest_count(),
        "cache read; checking storage"
    );
    let audit = audit::run(&storage, index, opts)?;
    Ok((storage, audit))
}

pub fn source_info(source: &Source) -> SourceInfo {
    let (cache, redis, cache_dump) = match &source.cache {
        CacheSource::Redis(t) => ("redis", Some(t.display()), None),
        CacheSource::Dump(p) => ("dump", None, Some(p.display().to_string())),
        CacheSource::None => ("none", None, None),
    };
    SourceInfo {
        storage_root: source.root.display().to_string(),
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
    let opts = AuditOptions {
        jobs: settings.jobs,
        quick: settings.quick,
        verify_storage: settings.verify_storage,
    };
    let (_, audit) = audit_source(&settings.source, settings.scan_count, opts)?;
    let verdict = report::verdict(&audit.summary, &audit.findings);
    let code = report::exit_code(&audit.findings, settings.report.fail_on);
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        tool: Tool::this(),
        command: "check",
        started_at: report::rfc3339(started_at),
        duration_ms: clock.elapsed().as_millis() as u64,
        source: source_info(&settings.source),
        options: Options {
            quick: settings.quick,
            fail_on: report::fail_on_name(settings.report.fail_on),
        },
        summary: audit.summary,
        findings: audit.findings,
        verdict,
    };
    let text = report::render(&report, settings.report.format);
    report::write_output(&text, settings.report.output.as_deref())?;
    Ok(code)
}
