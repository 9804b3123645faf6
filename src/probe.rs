//! The `probe` command: live phantoms in a running registry, read-only. Candidates are
//! (repository, digest) pairs whose blob storage no longer has - from links GC left
//! behind and from a GC log - and each is asked with HEAD of the blob: a registry that
//! answers 200 serves the blob from its cache. It works whatever the cache is (the
//! in-memory one included), reads storage only, and changes nothing anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::audit::Summary;
use crate::cli::{ProbeArgs, SourceArgs};
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::registry_client::{self, Answer, ClientOptions, Credentials, RegistryClient};
use crate::rehash;
use crate::report::{self, Options, Report};
use crate::settings::{ReportSettings, Source, Want};
use crate::storage::{BlobStat, Storage};
use crate::verify;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProbeCounts {
    /// (repository, digest) pairs asked.
    pub probed: u64,
    pub live_phantoms: u64,
    pub answered_unknown: u64,
    pub failed: u64,
    /// Digests the GC log names.
    pub gc_log_digests: u64,
    /// Of those, digests linked in no repository and so not tried (see --all-repositories).
    pub gc_log_digests_untried: u64,
}

pub fn run(args: &ProbeArgs) -> Result<u8, String> {
    let started = SystemTime::now();
    let clock = Instant::now();
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let source = Source::resolve(
        &SourceArgs {
            config: args.config.clone(),
            root: args.root.clone(),
            storage: None,
            storage_endpoint: None,
            s3_region: None,
            redis: None,
            scan_count: 1000,
            redis_cluster: false,
        },
        None,
        Want::Nothing,
    )?;
    let report_settings = ReportSettings::from_args(&args.report);
    let credentials = credentials(args)?;
    let client = RegistryClient::new(
        &args.registry_url,
        &ClientOptions {
            timeout: Duration::from_secs(args.timeout.max(1)),
            ca_cert: args.ca_cert.clone(),
            insecure: args.insecure,
            credentials,
        },
    )?;
    client.check_reachable()?;
    let storage = Storage::open(&source.storage)?;

    // Storage verification: its findings are warnings here, and give the candidates.
    let (mut storage_findings, storage_counts) = verify::verify(&storage);
    // What could not be read stays an error: the run is incomplete.
    let complete = !storage_findings
        .iter()
        .any(|f| f.kind == Kind::UnreadableStorage);
    for f in storage_findings
        .iter_mut()
        .filter(|f| f.kind != Kind::UnreadableStorage)
    {
        f.severity = Severity::Warning;
    }
    let (repos, _) = storage.repositories();
    let mut counts = ProbeCounts::default();
    let candidates = candidates(&storage, &storage_findings, &repos, args, &mut counts)?;

    let answers = rehash::parallel_map(&candidates, args.concurrency, |(repo, d)| {
        client.head_blob(repo, &d.to_string())
    })?;
    let mut findings = storage_findings;
    for ((repo, d), answer) in candidates.iter().zip(answers) {
        counts.probed += 1;
        match answer {
            Answer::Exists(status) => {
                counts.live_phantoms += 1;
                findings.push(Finding::answer(
                    Kind::LivePhantom,
                    Severity::Error,
                    true,
                    *d,
                    repo,
                    format!(
                        "HEAD /v2/{repo}/blobs/{d} answered {status} although storage has no such blob: the registry serves it from its cache"
                    ),
                ));
            }
            Answer::Unknown => counts.answered_unknown += 1,
            Answer::Denied(status) => {
                return Err(format!(
                    "the registry at {} refused access ({status}) to {repo}: give credentials with --username and --password-stdin, or --docker-config",
                    args.registry_url
                ));
            }
            Answer::Failed(why) => {
                counts.failed += 1;
                findings.push(Finding::answer(
                    Kind::ProbeFailed,
                    Severity::Warning,
                    false,
                    *d,
                    repo,
                    format!("HEAD /v2/{repo}/blobs/{d}: {why}"),
                ));
            }
        }
    }
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
    let mut info = crate::check::source_info(&source);
    info.cache = "registry".into();
    info.registry_url = Some(args.registry_url.trim_end_matches('/').to_string());
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
    crate::pushgateway::push_report(&report_settings.push, &report)?;
    Ok(code)
}

/// Credentials from the flags (password from stdin) or the Docker config, if any.
fn credentials(args: &ProbeArgs) -> Result<Option<Credentials>, String> {
    if let Some(user) = &args.username {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        let password = line.trim_end_matches(['\r', '\n']).to_string();
        if password.is_empty() {
            return Err("--password-stdin: stdin held no password".into());
        }
        return Ok(Some(Credentials {
            username: user.clone(),
            password,
        }));
    }
    let path = match &args.docker_config {
        Some(p) => p.clone(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(None),
            },
        },
    };
    registry_client::docker_config_credentials(&path, &args.registry_url)
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
    let mut linked: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
    for f in storage_findings {
        if matches!(
            f.kind,
            Kind::DanglingLayerLink | Kind::DanglingManifestRevision
        ) && let (Some(d), Some(r)) = (f.digest, &f.repository)
        {
            linked.entry(d).or_default().insert(r.clone());
        }
    }
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
pub fn gc_log_digests(path: &Path) -> Result<Vec<Digest>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --gc-log {}: {e}", path.display()))?;
    Ok(crate::gc::GcLog::parse(&text).blobs.into_iter().collect())
}
