//! The `probe` command: live phantoms in a running registry, read-only. Candidates are
//! (repository, digest) pairs whose blob storage no longer has - from links GC left
//! behind and from a GC log - and each is asked with HEAD of the blob: a registry that
//! answers 200 serves the blob from its cache. It works whatever the cache is (the
//! in-memory one included), reads storage only, and changes nothing anywhere. The
//! shared step (candidates, HEAD each, findings) is `live_probe`'s.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::audit::verify;
use crate::cli::ProbeArgs;
use crate::commands::live_probe;
use crate::digest::Digest;
use crate::finding::{self, Finding};
use crate::output::report::{self, Options, Report};
use crate::registry::client::ClientOptions;
use crate::registry::endpoint::{self, Endpoint};
use crate::settings::{ReportSettings, Source, Want};
use crate::storage::{BlobStat, Storage};
use crate::summary::ProbeCounts;
use crate::summary::Summary;

pub(crate) fn run(args: &ProbeArgs) -> Result<u8, String> {
    let started = SystemTime::now();
    let clock = Instant::now();
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let source = Source::resolve(&args.source_args(), None, Want::Nothing)?;
    let report_settings = ReportSettings::from_args(&args.report)?;
    let endpoint = Endpoint::parse(&args.registry_url)?;
    let access = &args.access;
    let credentials = endpoint::credentials(
        access.username.as_deref(),
        access.docker_config.as_deref(),
        std::slice::from_ref(&args.registry_url),
    )?;
    let client = endpoint.client(&ClientOptions {
        timeout: Duration::from_secs(args.timeout.max(1)),
        ca_cert: access.ca_cert.clone(),
        insecure: access.insecure,
        credentials,
    })?;
    client.check_reachable()?;
    let storage = Storage::open(&source.storage)?;

    // Storage verification: its findings are warnings here, and give the candidates.
    let (mut storage_findings, storage_counts) = verify::verify(&storage);
    let complete = verify::all_read(&storage_findings);
    verify::as_context(&mut storage_findings);
    let (repos, _) = storage.repositories();
    let mut counts = ProbeCounts::default();
    let candidates = candidates(&storage, &storage_findings, &repos, args, &mut counts)?;

    let mut findings = storage_findings;
    findings.extend(live_probe::head_each(
        &client,
        &candidates,
        args.concurrency,
        &mut counts,
    )?);
    finding::sort(&mut findings);
    let mut summary = Summary {
        storage: Some(storage_counts),
        probe: Some(counts),
        ..Summary::default()
    };
    summary.tally(&findings);
    let mut verdict = report::verdict(&summary, &findings, complete);
    if findings.is_empty() && complete {
        verdict = format!(
            "OK: the registry answered 404 for all {} blobs storage no longer has.",
            counts.probed
        );
    }
    if counts.gc_log_digests_untried > 0 {
        verdict.push_str(&format!(
            " {} digests from the GC log are linked in no repository and were not tried: pass --all-repositories.",
            counts.gc_log_digests_untried
        ));
    }
    let code = report::exit_code(&findings, report_settings.fail_on);
    let mut info = super::source_info(&source);
    info.cache = "registry".into();
    info.registry_url = Some(endpoint.describe());
    let mut report = Report::new(
        "probe",
        started,
        clock,
        info,
        Options::new(true, report_settings.fail_on),
        summary,
        findings,
        verdict,
    );
    report.complete = complete;
    report.write(report_settings.format, report_settings.output.as_deref())?;
    crate::commands::pushgateway::push_report(&report_settings.push, &report)?;
    Ok(code)
}

/// (repository, digest) pairs to ask about, sorted: blobs absent from storage that a
/// repository links (dangling links), plus the GC log's deleted blobs.
fn candidates(
    storage: &Storage,
    storage_findings: &[Finding],
    repos: &[String],
    args: &ProbeArgs,
    counts: &mut ProbeCounts,
) -> Result<Vec<(String, Digest)>, String> {
    let linked = live_probe::dangling_links(storage_findings);
    let mut digests: BTreeSet<Digest> = linked.keys().copied().collect();
    if let Some(log) = &args.gc_log {
        for d in gc_log_digests(log)? {
            counts.gc_log_digests += 1;
            if storage.stat_blob(&d) != BlobStat::Absent {
                continue; // not deleted after all (a dry run, or pushed again)
            }
            if !linked.contains_key(&d) && !args.all_repositories {
                counts.gc_log_digests_untried += 1;
                continue;
            }
            digests.insert(d);
        }
    }
    let mut out = Vec::new();
    for d in digests {
        if args.all_repositories {
            out.extend(repos.iter().map(|r| (r.clone(), d)));
        } else if let Some(rs) = linked.get(&d) {
            out.extend(rs.iter().map(|r| (r.clone(), d)));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The digests of "blob eligible for deletion" lines of `registry garbage-collect`.
/// Read a line at a time, within `files::MAX_GC_LOG_BYTES` and `files::MAX_GC_LOG_LINE`.
pub(crate) fn gc_log_digests(path: &Path) -> Result<Vec<Digest>, String> {
    use crate::files;
    let mut lines = files::Lines::open(
        "--gc-log",
        path,
        files::MAX_GC_LOG_BYTES,
        files::MAX_GC_LOG_LINE,
    )?;
    let mut log = crate::registry::gc_log::GcLog::default();
    while let Some(line) = lines.next_line()? {
        log.add_line(&String::from_utf8_lossy(line));
    }
    Ok(log.blobs.into_iter().collect())
}
