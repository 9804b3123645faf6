//! The `check` command: take the run lock, open storage, read the cache (Redis or a
//! dump), audit it, verify storage - and with an in-memory cache ask the running registry
//! about every blob storage lost (`live_probe`) - and write the report. It wires the
//! modules together in order and decides the exit status; it changes nothing but its own
//! state, lock and report files.

use std::time::{Instant, SystemTime};

use crate::audit::AuditOptions;
use crate::audit::rehash::Policy;
use crate::audit::state::State;
use crate::commands::live_probe;
use crate::lock::Lock;
use crate::output::report::{self, Options, Report};
use crate::settings::{CacheSource, CheckSettings};
use crate::storage::Storage;

pub(crate) fn run(settings: &CheckSettings) -> Result<u8, String> {
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let _lock = settings.lock.as_deref().map(Lock::acquire).transpose()?;
    let storage = Storage::open(&settings.source.storage)?;
    // The running registry's client, made (its flags checked) before the storage walk.
    let registry = match &settings.source.cache {
        CacheSource::Registry(t) => Some((t.endpoint.client(&t.options)?, t.concurrency)),
        _ => None,
    };
    let mut notes = settings.notes.clone();
    notes.extend(settings.source.notes.iter().cloned());
    let state = match settings.state.as_deref() {
        Some(path) => {
            let (state, warning) = State::load(path, &storage.describe())?;
            if let Some(w) = warning {
                tracing::warn!("{w}");
                notes.push(w);
            }
            Some(state)
        }
        None => None,
    };
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
        io_threads: settings.io_threads,
    };
    let (mut audit, scan_notes) =
        super::audit_with(&storage, &settings.source, settings.scan_count, opts)?;
    notes.extend(scan_notes);
    let probed = registry
        .as_ref()
        .map(|(client, concurrency)| live_probe::probe_audit(client, *concurrency, &mut audit));
    if probed.is_some() {
        notes.push(live_probe::GLOBAL_DESCRIPTORS_NOTE.to_string());
    }
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
    let verdict = match (&registry, probed) {
        (Some((client, _)), Some(asked)) => {
            live_probe::verdict(&audit, &client.describe(), asked, complete)
        }
        _ => report::verdict(&audit.summary, &audit.findings, complete),
    };
    let mut code = report::exit_code(&audit.findings, settings.report.fail_on);
    if !audit.incomplete.is_empty() {
        code = code.max(1);
    }
    let mut report = Report::new(
        "check",
        started_at,
        clock,
        super::source_info(&settings.source),
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
    crate::commands::pushgateway::push_report(&settings.report.push, &report)?;
    Ok(code)
}
