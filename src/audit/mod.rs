//! The audit: every entry of a `CacheIndex` judged against what storage holds, plus
//! (when asked) the storage verification of `verify`, producing findings and a summary.
//! It decides kinds, severities and `live` of cache findings; blob checks come from
//! `rehash` (the parallel part), link checks from `storage`. It never writes anything,
//! and never reads Redis itself.

pub(crate) mod rehash;
pub(crate) mod state;
pub(crate) mod verify;

use std::collections::HashSet;

use self::rehash::{BlobCheck, Content, Policy};
use crate::cache::index::{
    self as cache_index, CacheIndex, DigestEntry, GlobalEntry, RepoEntry, RepoHash,
};
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::shard::Shard;
use crate::storage::Storage;
use crate::summary::Summary;

#[derive(Clone, Copy)]
pub(crate) struct AuditOptions<'a> {
    /// What to re-hash.
    pub hashing: Policy<'a>,
    /// Also walk repositories, links, tags and manifests (`verify`).
    pub verify_storage: bool,
    /// The slice of the work this run does (the index is already built for it).
    pub shard: Shard,
}

#[derive(Debug, Clone)]
pub(crate) struct Audit {
    pub findings: Vec<Finding>,
    pub summary: Summary,
    /// Why the run did not read everything it should have (a directory that could not
    /// be listed, a cache dump without its trailer, ...). A run with any is reported
    /// `complete: false` and exits at least 1: what was not read is never called sound.
    pub incomplete: Vec<String>,
}

/// Audits every entry of `index` against `storage`.
pub(crate) fn run(
    storage: &Storage,
    index: CacheIndex,
    opts: AuditOptions<'_>,
) -> Result<Audit, String> {
    let mut digests: Vec<Digest> = index.digests().map(|(d, _)| *d).collect();
    digests.sort_unstable();
    let (checks, hash_counts) = rehash::verify(storage, &digests, opts.hashing)?;

    // Links of the repositories that list a present blob, checked in parallel.
    let link_checks: Vec<(u32, Digest)> = digests
        .iter()
        .zip(&checks)
        .filter(|(_, c)| matches!(c, BlobCheck::Present { .. }))
        .filter_map(|(d, _)| index.entry(d).map(|e| (d, e)))
        .flat_map(|(d, e)| e.repos.iter().filter(|r| r.member).map(|r| (r.repo, *d)))
        .collect();
    let linked = rehash::parallel_map(&link_checks, opts.hashing.jobs, |(repo, d)| {
        storage.is_linked(index.repo_name(*repo), d)
    })?;
    let unlinked: HashSet<(u32, Digest)> = link_checks
        .into_iter()
        .zip(linked)
        .filter_map(|(pair, linked)| (!linked).then_some(pair))
        .collect();

    let mut findings = Vec::new();
    let mut absent = 0;
    for (d, check) in digests.iter().zip(&checks) {
        let Some(entry) = index.entry(d) else {
            continue;
        };
        if *check == BlobCheck::Absent {
            absent += 1;
        }
        judge(&index, &unlinked, d, entry, check, &mut findings);
    }

    let counts = index.counts;
    findings.extend(index.into_malformed());
    let storage_counts = if opts.verify_storage {
        let (more, c) = verify::verify_shard(storage, opts.shard);
        findings.extend(more);
        Some(c)
    } else {
        None
    };
    findings.extend(verify::unread_findings(storage));
    finding::sort(&mut findings);
    findings.dedup();
    let unread = findings
        .iter()
        .filter(|f| f.kind == Kind::UnreadableStorage)
        .count();
    let mut incomplete = Vec::new();
    if unread > 0 {
        incomplete.push(format!(
            "{unread} {} of storage could not be read (see the unreadable-storage findings): what is below {} was not checked",
            if unread == 1 { "place" } else { "places" },
            if unread == 1 { "it" } else { "them" },
        ));
    }

    let mut summary = Summary {
        keys_scanned: counts.keys,
        set_members_scanned: counts.set_members,
        foreign_keys_skipped: counts.foreign_keys,
        blobs_checked: digests.len() as u64,
        blobs_absent: absent,
        bytes_hashed: hash_counts.bytes_hashed,
        hashing: hash_counts,
        storage: storage_counts,
        object_storage: storage.object_counts(),
        ..Summary::default()
    };
    summary.tally(&findings);
    Ok(Audit {
        findings,
        summary,
        incomplete,
    })
}

fn severity_by_live(live: bool) -> Severity {
    if live {
        Severity::Error
    } else {
        Severity::Warning
    }
}

/// Findings for one digest's entries.
fn judge(
    index: &CacheIndex,
    unlinked: &HashSet<(u32, Digest)>,
    d: &Digest,
    entry: &DigestEntry,
    check: &BlobCheck,
    out: &mut Vec<Finding>,
) {
    let global_live = entry.global_live();
    let global = entry
        .global
        .filter(|g| matches!(g, GlobalEntry::Hash { .. }));
    let finding = |kind, severity, live, repository: Option<&str>, key: String, detail: String| {
        Finding::cache(
            kind,
            severity,
            live,
            Some(*d),
            repository.map(str::to_string),
            key,
            detail,
        )
    };
    match check {
        BlobCheck::Absent => {
            if let Some(g) = global {
                let detail = if global_live {
                    "blob data is absent from storage, yet the registry serves this descriptor: clients are told the blob exists".to_string()
                } else {
                    format!(
                        "blob data is absent from storage; inert ({})",
                        global_inert_reason(&g)
                    )
                };
                out.push(finding(
                    Kind::PhantomBlobDescriptor,
                    severity_by_live(global_live),
                    global_live,
                    None,
                    cache_index::global_key(d),
                    detail,
                ));
            }
            for r in &entry.repos {
                let repo = index.repo_name(r.repo);
                let Some(key) = repo_entry_key(repo, d, r) else {
                    continue;
                };
                let live = entry.repo_live(r);
                let detail = if live {
                    format!(
                        "blob data is absent from storage, yet {repo} answers that the blob exists"
                    )
                } else {
                    format!(
                        "blob data is absent from storage; inert ({})",
                        repo_inert_reason(entry, r)
                    )
                };
                out.push(finding(
                    Kind::PhantomRepositoryBlob,
                    severity_by_live(live),
                    live,
                    Some(repo),
                    key,
                    detail,
                ));
            }
        }
        BlobCheck::Unreadable { reason } => {
            let key = primary_key(index, d, entry);
            out.push(finding(
                Kind::UnreadableBlob,
                Severity::Error,
                global_live,
                None,
                key,
                format!("blob cannot be read: {reason}"),
            ));
        }
        BlobCheck::Present { size, content } => {
            if let Some(cached) = global.and_then(|g| g.cached_size())
                && cached != *size as i64
            {
                out.push(finding(
                    Kind::SizeMismatch,
                    severity_by_live(global_live),
                    global_live,
                    None,
                    cache_index::global_key(d),
                    format!("cached size {cached} but storage holds {size} bytes"),
                ));
            }
            if let Content::Mismatch { actual } = content {
                out.push(finding(
                    Kind::DigestMismatch,
                    Severity::Error,
                    global_live,
                    None,
                    primary_key(index, d, entry),
                    format!(
                        "stored content hashes to {actual}: the blob is corrupt; restore it from a backup or delete it and push the image again"
                    ),
                ));
            }
            for r in &entry.repos {
                let repo = index.repo_name(r.repo);
                if r.member {
                    if unlinked.contains(&(r.repo, *d)) {
                        let live = entry.repo_live(r);
                        out.push(finding(
                            Kind::UnlinkedRepositoryBlob,
                            Severity::Warning,
                            live,
                            Some(repo),
                            cache_index::repo_set_key(repo),
                            format!(
                                "blob exists but {repo} has no _layers or _manifests/revisions link to it{}",
                                if live { "; the registry serves it in this repository" } else { "" }
                            ),
                        ));
                    }
                } else if matches!(r.hash, RepoHash::WithMediatype | RepoHash::WithoutMediatype) {
                    out.push(finding(
                        Kind::OrphanRepositoryDescriptor,
                        Severity::Warning,
                        false,
                        Some(repo),
                        cache_index::repo_hash_key(repo, d),
                        format!(
                            "per-repository descriptor without the digest in {}",
                            cache_index::repo_set_key(repo)
                        ),
                    ));
                }
            }
        }
    }
}

/// The key a repository entry is reported under: the set when the digest is a member
/// (membership is what makes the registry answer), else the per-repository hash.
fn repo_entry_key(repo: &str, d: &Digest, r: &RepoEntry) -> Option<String> {
    if r.member {
        Some(cache_index::repo_set_key(repo))
    } else if matches!(r.hash, RepoHash::WithMediatype | RepoHash::WithoutMediatype) {
        Some(cache_index::repo_hash_key(repo, d))
    } else {
        None
    }
}

/// The key a finding about the blob itself is reported under.
fn primary_key(index: &CacheIndex, d: &Digest, entry: &DigestEntry) -> String {
    if entry.global.is_some() {
        return cache_index::global_key(d);
    }
    entry
        .repos
        .iter()
        .filter_map(|r| repo_entry_key(index.repo_name(r.repo), d, r))
        .min()
        .unwrap_or_else(|| cache_index::global_key(d))
}

fn global_inert_reason(g: &GlobalEntry) -> &'static str {
    match g {
        GlobalEntry::Hash {
            has_digest: false, ..
        } => "no digest field, so the registry misses",
        GlobalEntry::Hash { .. } => "no usable size field, so the registry misses",
        GlobalEntry::WrongType => "not a hash",
    }
}

fn repo_inert_reason(entry: &DigestEntry, r: &RepoEntry) -> &'static str {
    if !r.member {
        "the digest is not in the repository set"
    } else if !entry.global_live() {
        "the global descriptor is missing or unusable"
    } else {
        "the repository hash has no mediatype field"
    }
}
