//! The `gc` command: the registry's own garbage collection with the cache fixed and the
//! result verified, in one step. Before: verify storage (remembering which tags pull)
//! and audit the cache, reading it whole once. Then run the GC command as given, passing
//! its output through and parsing what it deleted. After: read again only the cache keys
//! of the deleted blobs (in the repositories the first read knew for them), purge exactly
//! those entries (with all of `purge`'s safety), or with the in-memory cache confirm the
//! live phantoms with `probe`'s client; then verify again and report every tag GC broke.
//! It writes nothing itself but the cache entries `purge` removes; the GC command is the
//! operator's.

use std::collections::{BTreeSet, HashMap};
use std::io::BufReader;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::audit::rehash::Policy;
use crate::audit::verify;
use crate::audit::{self, AuditOptions};
use crate::cache::index::CacheIndex;
use crate::cache::redis::{CacheConn, Expect};
use crate::cli::GcArgs;
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::output::report::{self, Options, Report};
use crate::registry::client::{Answer, ClientOptions, RegistryClient};
use crate::registry::gc_log::GcLog;
use crate::repair;
use crate::settings::{self, CacheSource, ReportSettings, Source, Want};
use crate::storage::{BlobStat, Storage};
use crate::summary::{GcCounts, Summary};

/// Lines of the GC's output kept in the report (all of it is passed through).
const OUTPUT_TAIL: usize = 20;

/// Runs `command`, passing its output through to stderr line by line (stdout stays
/// the report's) and parsing it. Returns the exit status, the log and the last lines.
fn run_gc(command: &[String]) -> Result<(i32, GcLog, Vec<String>), String> {
    let (program, args) = command
        .split_first()
        .ok_or("no GC command given after --")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the GC command {program}: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || pass_lines(out, "stdout", &tx)));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || pass_lines(err, "stderr", &tx)));
    }
    drop(tx);
    let mut log = GcLog::default();
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in rx {
        eprintln!("{line}");
        log.add_line(&line);
        if tail.len() == OUTPUT_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the GC command: {e}"))?;
    Ok((status.code().unwrap_or(-1), log, tail.into_iter().collect()))
}

/// Sends each line of the GC command's `stream` on; a line longer than
/// `files::MAX_GC_LOG_LINE` is cut there, so an endless line cannot exhaust memory.
fn pass_lines(stream: impl std::io::Read, name: &str, tx: &std::sync::mpsc::Sender<String>) {
    use crate::files::{Line, Lines, MAX_GC_LOG_LINE};
    let mut lines = Lines::new(
        BufReader::new(stream),
        "the GC command's",
        name,
        u64::MAX,
        MAX_GC_LOG_LINE,
    );
    while let Ok(Some(line)) = lines.next_line_lenient() {
        let text = match line {
            Line::Whole(l) => String::from_utf8_lossy(l).into_owned(),
            Line::Cut(l) => format!(
                "{}... (line cut at {MAX_GC_LOG_LINE} bytes)",
                String::from_utf8_lossy(l)
            ),
        };
        if tx.send(text).is_err() {
            return;
        }
    }
}

/// A repository and one of its tags.
type Tag = (String, String);

/// Every tag, and the tags that can be pulled: those without an error finding.
fn pullable_tags(storage: &Storage, findings: &[Finding]) -> (BTreeSet<Tag>, HashMap<Tag, String>) {
    let (repos, _) = storage.repositories();
    let mut broken: HashMap<(String, String), String> = HashMap::new();
    for f in findings {
        if let (Some(repo), Some(tag), Severity::Error) = (&f.repository, &f.tag, f.severity) {
            broken
                .entry((repo.clone(), tag.clone()))
                .or_insert_with(|| f.detail.clone());
        }
    }
    let mut ok = BTreeSet::new();
    for repo in repos {
        for tag in storage.tags(&repo) {
            let link = storage.tag_link(&repo, &tag);
            let key = (repo.clone(), tag);
            if storage.exists(&link) && !broken.contains_key(&key) {
                ok.insert(key);
            }
        }
    }
    (ok, broken)
}

pub(crate) fn run(args: &GcArgs) -> Result<u8, String> {
    let started = SystemTime::now();
    let clock = Instant::now();
    let report_settings = ReportSettings::from_args(&args.report)?;
    if let Some(journal) = &args.journal {
        crate::files::check_output("--journal", journal)?;
    }
    // Redis when the flags or the config say so; otherwise the in-memory cache.
    let source = match Source::resolve(&args.source, None, Want::Redis) {
        Ok(s) => s,
        Err(redis_err) => match Source::resolve(&args.source, None, Want::Nothing) {
            Ok(s) if args.source.redis.is_none() => s,
            _ => return Err(redis_err),
        },
    };
    let jobs = settings::jobs(args.jobs, &source.storage)?;
    let storage = Storage::open(&source.storage)?;
    let quick = AuditOptions {
        hashing: Policy::simple(jobs, true),
        verify_storage: false,
        shard: crate::shard::Shard::ALL,
        io_threads: crate::audit::verify::DEFAULT_IO_THREADS,
    };

    // 1. Before.
    let (before_storage, _) = verify::verify(&storage);
    let (pullable_before, _) = pullable_tags(&storage, &before_storage);
    let sizes: HashMap<Digest, u64> = storage.blob_sizes().into_iter().collect();
    // The one full read of the cache; what it knew of each digest's repositories is
    // kept, so that after the GC only the keys of the deleted digests are read again.
    let mut cache_repos = CacheRepos::default();
    let cache_before = match &source.cache {
        CacheSource::Redis(_) => {
            let (index, _, _) = super::read_cache(&source, args.source.scan_count, quick)?;
            cache_repos = CacheRepos::of(&index);
            Some(audit::run(&storage, index, quick)?)
        }
        _ => None,
    };

    // With --restart-command: the registry answers, and where each blob is linked.
    let restart = crate::commands::restart::Plan::prepare(args, &source.cache, &storage)?;

    // 2. The GC, as given.
    let mut command = args.command.clone();
    if args.dry_run {
        command.push("--dry-run".into());
    }
    let (status, log, tail) = run_gc(&command)?;
    if status != 0 {
        let last = tail
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .cloned()
            .unwrap_or_default();
        return Err(format!(
            "the GC command failed (exit status {status}): {last}; the cache was not touched"
        ));
    }
    // Storage as the GC left it (object storage answers from a listing made at open).
    let storage = Storage::open(&source.storage)?;
    let deleted: BTreeSet<Digest> = log
        .blobs
        .iter()
        .filter(|d| args.dry_run || storage.stat_blob(d) == BlobStat::Absent)
        .copied()
        .collect();
    let mut counts = GcCounts {
        command: command.clone(),
        dry_run: args.dry_run,
        exit_status: status,
        blobs_deleted: deleted.len() as u64,
        bytes_freed: deleted.iter().filter_map(|d| sizes.get(d)).sum(),
        manifests_deleted: log.manifests.len() as u64,
        layer_links_deleted: log.layer_links.len() as u64,
        tags_pullable_before: pullable_before.len() as u64,
        output_tail: tail,
        ..GcCounts::default()
    };

    // 3. After: the cache entries of what was deleted.
    let mut findings: Vec<Finding> = Vec::new();
    let mut notes = Vec::new();
    if let Some(before) = &cache_before {
        let live = before.findings.iter().filter(|f| f.live).count();
        if live > 0 {
            notes.push(format!(
                "{live} live wrong cache entries were already there before this GC; `registry-audit purge` removes them"
            ));
        }
    }
    match &source.cache {
        CacheSource::Redis(target) if args.dry_run => {
            let mut conn = target.connect_cache()?;
            let index = cache_repos.read(&mut conn, &deleted, Expect::Present)?;
            counts.cache_entries_purged = count_entries(&index, &deleted);
            notes.push(format!(
                "dry run: the GC would delete {} blobs; {} cache entries name them and would be purged",
                deleted.len(),
                counts.cache_entries_purged
            ));
        }
        CacheSource::Redis(target) => {
            let mut conn = target.connect_cache()?;
            let index = cache_repos.read(&mut conn, &deleted, Expect::Present)?;
            let audit = audit::run(&storage, index, quick)?;
            let ours: Vec<Finding> = audit
                .findings
                .iter()
                .filter(|f| {
                    f.digest.is_some_and(|d| deleted.contains(&d)) && repair::purges(f.kind, false)
                })
                .cloned()
                .collect();
            let plan = repair::build_plan(
                conn.router(),
                &storage,
                &ours,
                false,
                super::source_info(&source),
                crate::timestamp::rfc3339(started),
            )?;
            if !plan.groups.is_empty() {
                let journal = args
                    .journal
                    .clone()
                    .unwrap_or_else(|| repair::default_journal(started));
                let summary = repair::apply(
                    &mut conn,
                    &storage,
                    &plan,
                    &journal,
                    crate::timestamp::rfc3339(started),
                    |_| {},
                )?;
                if let Some(failure) = summary.failure {
                    return Err(failure);
                }
                counts.cache_entries_purged = summary.entries_removed;
                counts.journal = Some(summary.journal);
            }
            // Every phantom of a deleted blob left now is an error (read again only
            // when something was purged: otherwise nothing changed since the read).
            let after = if plan.groups.is_empty() {
                audit
            } else {
                let index = cache_repos.read(&mut conn, &deleted, Expect::Gone)?;
                audit::run(&storage, index, quick)?
            };
            for mut f in after.findings {
                if f.digest.is_some_and(|d| deleted.contains(&d))
                    && matches!(
                        f.kind,
                        Kind::PhantomBlobDescriptor | Kind::PhantomRepositoryBlob
                    )
                {
                    f.severity = Severity::Error;
                    findings.push(f);
                }
            }
        }
        _ if args.dry_run => {}
        _ if restart.is_some() => {
            let outcome = crate::commands::restart::after_gc(restart.as_ref(), &deleted)?;
            counts.restart_needed = !outcome.findings.is_empty();
            counts.restart = Some(outcome.counts);
            findings.extend(outcome.findings);
            notes.extend(outcome.notes);
        }
        _ => {
            counts.restart_needed = !deleted.is_empty();
            if let Some(url) = &args.registry_url {
                let client = RegistryClient::new(
                    url,
                    &ClientOptions {
                        timeout: Duration::from_secs(10),
                        ca_cert: None,
                        insecure: false,
                        credentials: None,
                    },
                )?;
                let (repos, _) = storage.repositories();
                let candidates: Vec<(String, Digest)> = deleted
                    .iter()
                    .flat_map(|d| repos.iter().map(move |r| (r.clone(), *d)))
                    .collect();
                let answers = crate::audit::rehash::parallel_map(&candidates, 8, |(r, d)| {
                    client.head_blob(r, &d.to_string())
                })?;
                for ((repo, d), a) in candidates.iter().zip(answers) {
                    if let Answer::Exists(status) = a {
                        findings.push(Finding::answer(
                            Kind::LivePhantom,
                            Severity::Error,
                            true,
                            *d,
                            repo,
                            format!("HEAD /v2/{repo}/blobs/{d} answered {status} after GC deleted the blob: restart the registry to clear its in-memory cache"),
                        ));
                    }
                }
                counts.restart_needed = findings.iter().any(|f| f.kind == Kind::LivePhantom);
            }
            if counts.restart_needed {
                notes.push("the registry's in-memory cache still names deleted blobs: restart the registry to clear it".into());
            }
        }
    }

    // 4. Verify again: tags GC broke are errors; other storage findings are warnings.
    let (after_storage, storage_counts) = verify::verify(&storage);
    let (pullable_after, broken_now) = pullable_tags(&storage, &after_storage);
    for (repo, tag) in pullable_before.difference(&pullable_after) {
        counts.tags_broken += 1;
        let why = broken_now
            .get(&(repo.clone(), tag.clone()))
            .cloned()
            .unwrap_or_else(|| "the tag is gone".into());
        let mut f = Finding::storage(
            Kind::TagBrokenByGc,
            Severity::Error,
            None,
            Some(repo.clone()),
            storage.relative(&storage.tag_link(repo, tag)),
            format!("{repo}:{tag} could be pulled before the GC and cannot now: {why}"),
        );
        f.tag = Some(tag.clone());
        findings.push(f);
    }
    let complete = verify::all_read(&before_storage) && verify::all_read(&after_storage);
    let mut after_storage = after_storage;
    verify::as_context(&mut after_storage);
    findings.extend(after_storage);
    finding::sort(&mut findings);
    let mut summary = Summary {
        storage: Some(storage_counts),
        gc: Some(counts.clone()),
        ..Summary::default()
    };
    summary.tally(&findings);
    let mut verdict = report::verdict(&summary, &findings, complete);
    let freed = format!(
        "GC {} {} blobs ({}), {} manifests; {} cache entries {}.",
        if args.dry_run { "would free" } else { "freed" },
        counts.blobs_deleted,
        report::human_bytes(counts.bytes_freed),
        counts.manifests_deleted,
        counts.cache_entries_purged,
        if args.dry_run {
            "would be purged"
        } else {
            "purged"
        }
    );
    verdict = if findings.is_empty() && complete {
        format!("{freed} Every tag that pulled before still pulls; no phantom is left.")
    } else {
        format!("{freed} {verdict}")
    };
    let code = report::exit_code(&findings, report_settings.fail_on);
    let mut report = Report::new(
        "gc",
        started,
        clock,
        super::source_info(&source),
        Options::new(true, report_settings.fail_on),
        summary,
        findings,
        verdict,
    );
    report.notes = notes;
    report.complete = complete;
    report.write(report_settings.format, report_settings.output.as_deref())?;
    crate::commands::pushgateway::push_report(&report_settings.push, &report)?;
    Ok(code)
}

/// What the full read of the cache knew of each digest: the repositories with any entry
/// for it (a set membership or a per-repository hash), by id.
#[derive(Default)]
struct CacheRepos {
    names: Vec<String>,
    by_digest: HashMap<Digest, Vec<u32>>,
}

impl CacheRepos {
    fn of(index: &CacheIndex) -> CacheRepos {
        CacheRepos {
            names: index.repo_names().to_vec(),
            by_digest: index
                .digests()
                .filter(|(_, e)| !e.repos.is_empty())
                .map(|(d, e)| (d, e.repos.iter().map(|r| r.repo).collect()))
                .collect(),
        }
    }

    /// Reads the cache keys of `digests` only: each global descriptor, and the set
    /// membership and per-repository hash in every repository the full read knew for it.
    fn read(
        &self,
        conn: &mut CacheConn,
        digests: &BTreeSet<Digest>,
        expect: Expect,
    ) -> Result<CacheIndex, String> {
        let wanted: Vec<(Digest, Vec<String>)> = digests
            .iter()
            .map(|d| {
                let repos = self.by_digest.get(d).map_or_else(Vec::new, |ids| {
                    ids.iter()
                        .map(|&i| self.names[i as usize].clone())
                        .collect()
                });
                (*d, repos)
            })
            .collect();
        let mut index = CacheIndex::new();
        crate::cache::redis::read_digests(conn, &mut index, &wanted, expect)?;
        Ok(index)
    }
}

/// Cache entries naming any of `digests`: global descriptors, set memberships and
/// repository hashes (for --dry-run).
fn count_entries(index: &CacheIndex, digests: &BTreeSet<Digest>) -> u64 {
    digests
        .iter()
        .filter_map(|d| index.entry(d))
        .map(|e| {
            u64::from(e.global.is_some())
                + e.repos
                    .iter()
                    .map(|r| {
                        u64::from(r.member)
                            + u64::from(r.hash != crate::cache::index::RepoHash::Absent)
                    })
                    .sum::<u64>()
        })
        .sum()
}
