//! The audit: every entry of a `CacheIndex` judged against what storage holds, plus
//! (when asked) the storage verification of `verify`, producing findings and a summary.
//! It decides kinds, severities and `live` of cache findings; blob checks come from
//! `rehash` (the parallel hashing), links and blob stats from the one storage walk of
//! `verify` (parallel on a pool of I/O threads), which `run_reading` runs on its own
//! thread while the cache is read. It never writes anything, and never reads Redis
//! itself.

#[cfg(test)]
mod random_registries;
pub(crate) mod rehash;
pub(crate) mod state;
pub(crate) mod verify;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use self::rehash::{BlobCheck, Content, DigestList, Policy};
use crate::cache::index::{
    self as cache_index, CacheIndex, DigestEntry, GlobalEntry, RepoEntry, RepoHash,
};
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::shard::Shard;
use crate::storage::blobs::{BlobListing, BlobTable};
use crate::storage::{BlobStat, Storage};
use crate::summary::Summary;

#[derive(Clone, Copy)]
pub(crate) struct AuditOptions<'a> {
    /// What to re-hash.
    pub hashing: Policy<'a>,
    /// Also walk repositories, links, tags and manifests (`verify`).
    pub verify_storage: bool,
    /// The slice of the work this run does (the index is already built for it).
    pub shard: Shard,
    /// Threads that read storage's metadata (listings, stats, links).
    pub io_threads: usize,
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
    let pool = verify::io_pool(opts.io_threads)?;
    let walk = walk_storage(storage, opts, &pool, &AtomicBool::new(false));
    judge_all(storage, index, walk, opts, &pool)
}

/// Audits the cache that `read` returns against `storage`, walking storage on another
/// thread while `read` runs on this one (reading Redis waits on the network, walking
/// storage on the disk: together they take about as long as the longer of the two).
/// When `read` fails, the walk stops early and its error is returned.
pub(crate) fn run_reading<T>(
    storage: &Storage,
    opts: AuditOptions<'_>,
    read: impl FnOnce() -> Result<(CacheIndex, T), String>,
) -> Result<(Audit, T), String> {
    let pool = verify::io_pool(opts.io_threads)?;
    let cancel = AtomicBool::new(false);
    let (walk, read) = std::thread::scope(|s| {
        let walker = s.spawn(|| walk_storage(storage, opts, &pool, &cancel));
        let read = read();
        if read.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (walker.join(), read)
    });
    let (index, extra) = read?;
    let walk = walk.map_err(|_| "the storage walk stopped unexpectedly".to_string())?;
    Ok((judge_all(storage, index, walk, opts, &pool)?, extra))
}

/// One walk of storage when it is verified: the blob directories listed and every
/// repository's links read (see [`verify::Walk`]); nothing otherwise.
fn walk_storage(
    storage: &Storage,
    opts: AuditOptions<'_>,
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
) -> verify::Walk {
    // Without verification nothing is walked: the cache check asks again whatever a
    // listing would call absent, so a listing alone would be work for nothing.
    if !opts.verify_storage {
        return verify::Walk {
            blobs: BlobTable::new(BlobListing::unknown()),
            ..verify::Walk::default()
        };
    }
    let blobs = BlobTable::new(BlobListing::list(storage, pool, cancel));
    tracing::info!(blobs = blobs.listing().len(), "blob directories listed");
    let walk = verify::walk(storage, opts.shard, blobs, pool, cancel);
    tracing::info!(
        repositories = walk.counts.repositories,
        links = walk.counts.links_checked,
        "storage walked"
    );
    walk
}

/// Judges every cache entry against what the walk found, asking storage only what the
/// walk did not (blobs it did not need, links of repositories it did not read).
fn judge_all(
    storage: &Storage,
    index: CacheIndex,
    walk: verify::Walk,
    opts: AuditOptions<'_>,
    pool: &rayon::ThreadPool,
) -> Result<Audit, String> {
    // Digests by id, in digest order; each `Digest` is made from the index when needed.
    let ids = index.sorted_ids();
    let digests = IndexDigests {
        index: &index,
        ids: &ids,
    };
    let verify::Walk {
        findings: storage_findings,
        counts: storage_counts,
        blobs,
        links,
    } = walk;
    // The repositories' entries the walk did not find linked: asked of storage (in
    // parallel) for a blob that is present, as the walk did not read the repository, or
    // a push may have linked it since. Taken before hashing, so that the walk's link sets
    // are gone by then.
    let mut ask: Vec<(u32, u32)> = Vec::new();
    for (at, &id) in (0u32..).zip(&ids) {
        let d = index.digest_of(id);
        for r in index.entry_of(id).repos.iter().filter(|r| r.member) {
            let linked = links
                .get(index.repo_name(r.repo))
                .is_some_and(|set| set.contains(blobs.listing(), &d));
            if !linked {
                ask.push((at, r.repo));
            }
        }
    }
    drop(links);
    // What the walk already knows of each blob (its memo); the rest is asked while
    // hashing. A blob the walk found absent is asked again: the walk ran while the cache
    // was read, and a push writes the blob before its cache entry.
    let known: Vec<Option<BlobStat>> = ids
        .iter()
        .map(|&id| {
            blobs
                .known(&index.digest_of(id))
                .filter(|st| *st != BlobStat::Absent)
        })
        .collect();
    drop(blobs);
    let (checks, hash_counts) = rehash::verify(storage, &digests, known, opts.hashing)?;

    ask.retain(|(at, _)| matches!(checks[*at as usize], BlobCheck::Present { .. }));
    let linked = pool.install(|| {
        ask.par_iter()
            .map(|(at, repo)| storage.is_linked(index.repo_name(*repo), &digests.get(*at as usize)))
            .collect::<Vec<bool>>()
    });
    let unlinked: HashSet<(u32, Digest)> = ask
        .into_iter()
        .zip(linked)
        .filter(|(_, linked)| !linked)
        .map(|((at, repo), _)| (repo, digests.get(at as usize)))
        .collect();
    let mut findings = Vec::new();
    let mut absent = 0;
    for (&id, check) in ids.iter().zip(&checks) {
        if *check == BlobCheck::Absent {
            absent += 1;
        }
        let d = index.digest_of(id);
        judge(
            &index,
            &unlinked,
            &d,
            &index.entry_of(id),
            check,
            &mut findings,
        );
    }
    let checked = ids.len() as u64;
    drop(checks);
    drop(ids);

    let counts = index.counts;
    findings.extend(index.into_malformed());
    let storage_counts = if opts.verify_storage {
        findings.extend(storage_findings);
        Some(storage_counts)
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
        blobs_checked: checked,
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

/// The index's digests, in the order of `ids`.
struct IndexDigests<'a> {
    index: &'a CacheIndex,
    ids: &'a [u32],
}

impl DigestList for IndexDigests<'_> {
    fn get(&self, at: usize) -> Digest {
        self.index.digest_of(self.ids[at])
    }
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
            for r in entry.repos {
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
            for r in entry.repos {
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

/// The engine alone: `run` on a scratch storage root and a hand-built `CacheIndex`,
/// no Redis and no registry.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::index::{HashFields, RepoHash};
    use crate::storage::filesystem::tests::Scratch;
    use sha2::Digest as _;

    fn sha256(bytes: &[u8]) -> Digest {
        Digest::from_raw(
            crate::digest::Algorithm::Sha256,
            &sha2::Sha256::digest(bytes),
        )
        .expect("digest")
    }

    /// Writes a blob into storage and links it into `repo` as a layer.
    fn put(root: &std::path::Path, repo: &str, bytes: &[u8]) -> Digest {
        let d = sha256(bytes);
        let hex = d.hex();
        let v2 = root.join("docker/registry/v2");
        let data = v2.join("blobs/sha256").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("data"), bytes).expect("write");
        let link = v2
            .join("repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(&hex);
        std::fs::create_dir_all(&link).expect("mkdir");
        std::fs::write(link.join("link"), d.to_string()).expect("link");
        d
    }

    /// The registry's three entries for `d` in `repo`, cached with `size`.
    fn cache(idx: &mut CacheIndex, repo: &str, d: Digest, size: &str) {
        let text = d.to_string();
        idx.add_global(
            format!("blobs::{text}").as_bytes(),
            d,
            HashFields {
                digest: Some(text.as_bytes()),
                size: Some(size.as_bytes()),
                length: None,
                mediatype: Some(b"application/octet-stream"),
            },
        );
        let set = format!("repository::{repo}::blobs");
        idx.add_member(set.as_bytes(), repo, text.as_bytes());
        idx.add_repo_hash(
            format!("{set}::{text}").as_bytes(),
            repo,
            d,
            RepoHash::WithMediatype,
            "hash",
        );
    }

    #[test]
    fn judges_a_cache_against_storage_without_any_server() {
        let scratch = Scratch::new("engine");
        let good = put(&scratch.0, "team/app", b"a layer that is there");
        let corrupt = put(&scratch.0, "team/app", b"a layer about to rot");
        let hex = corrupt.hex();
        std::fs::write(
            scratch
                .0
                .join("docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(&hex)
                .join("data"),
            b"a layer that rotted",
        )
        .expect("corrupt it");
        let gone = sha256(b"a layer GC deleted");
        let mut idx = CacheIndex::new();
        cache(&mut idx, "team/app", good, "21");
        cache(&mut idx, "team/app", gone, "18");
        cache(&mut idx, "team/app", corrupt, "20");
        // The right blob, the wrong size.
        cache(&mut idx, "other", good, "99");

        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let audit = run(
            &storage,
            idx,
            AuditOptions {
                hashing: Policy::simple(2, false),
                verify_storage: true,
                shard: Shard::ALL,
                io_threads: 4,
            },
        )
        .expect("audit");
        let got: Vec<(Kind, Option<&str>, Option<Digest>, bool)> = audit
            .findings
            .iter()
            .map(|f| (f.kind, f.repository.as_deref(), f.digest, f.live))
            .collect();
        assert!(got.contains(&(Kind::PhantomBlobDescriptor, None, Some(gone), true)));
        assert!(got.contains(&(
            Kind::PhantomRepositoryBlob,
            Some("team/app"),
            Some(gone),
            true
        )));
        assert!(
            got.iter()
                .any(|g| g.0 == Kind::DigestMismatch && g.2 == Some(corrupt)),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|g| g.0 == Kind::SizeMismatch && g.2 == Some(good))
        );
        assert!(
            got.iter()
                .any(|g| g.0 == Kind::UnlinkedRepositoryBlob && g.1 == Some("other")),
            "{got:?}"
        );
        assert!(
            !got.iter()
                .any(|g| g.2 == Some(good) && g.0 == Kind::PhantomBlobDescriptor)
        );
        assert!(audit.incomplete.is_empty());
        assert_eq!(audit.summary.blobs_checked, 3);
        assert_eq!(audit.summary.blobs_absent, 1);
        assert_eq!(audit.summary.storage.map(|s| s.repositories), Some(1));
        // Sorted, so two runs print the same bytes.
        let mut sorted = audit.findings.clone();
        finding::sort(&mut sorted);
        assert_eq!(sorted, audit.findings);
    }

    fn opts() -> AuditOptions<'static> {
        AuditOptions {
            hashing: Policy::simple(2, true),
            verify_storage: true,
            shard: Shard::ALL,
            io_threads: 3,
        }
    }

    fn kinds(audit: &Audit) -> Vec<(Kind, Option<Digest>)> {
        audit.findings.iter().map(|f| (f.kind, f.digest)).collect()
    }

    #[test]
    fn a_link_reached_through_a_symlink_out_of_the_root_is_not_read() {
        let scratch = Scratch::new("walk-symlink");
        let outside = Scratch::new("walk-outside");
        let d = put(&outside.0, "a", b"a layer");
        let v2 = scratch.0.join("docker/registry/v2");
        // The blob is in storage; repository a's _layers leads out of the root.
        let hex = d.hex();
        let data = v2.join("blobs/sha256").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("data"), b"a layer").expect("write");
        let repo = v2.join("repositories/a");
        std::fs::create_dir_all(repo.join("_manifests/revisions")).expect("mkdir");
        std::os::unix::fs::symlink(
            outside.0.join("docker/registry/v2/repositories/a/_layers"),
            repo.join("_layers"),
        )
        .expect("symlink");
        let mut idx = CacheIndex::new();
        cache(&mut idx, "a", d, "7");
        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let audit = run(&storage, idx, opts()).expect("audit");
        assert!(
            audit
                .findings
                .iter()
                .any(|f| f.kind == Kind::BadLink && f.detail.contains("outside the storage root")),
            "{:#?}",
            audit.findings
        );
    }

    #[test]
    fn what_the_walk_saw_before_a_push_is_asked_again() {
        let scratch = Scratch::new("walk-push");
        let v2 = scratch.0.join("docker/registry/v2");
        std::fs::create_dir_all(v2.join("repositories/a/_layers/sha256")).expect("mkdir");
        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let pool = verify::io_pool(3).expect("pool");
        // The walk runs while the cache is read; the push lands in between.
        let walk = walk_storage(&storage, opts(), &pool, &AtomicBool::new(false));
        let d = put(&scratch.0, "a", b"pushed meanwhile");
        let mut idx = CacheIndex::new();
        cache(&mut idx, "a", d, "16");
        let audit = judge_all(&storage, idx, walk, opts(), &pool).expect("audit");
        assert_eq!(kinds(&audit), vec![], "{:#?}", audit.findings);
    }

    #[test]
    fn links_under_a_directory_that_cannot_be_listed_are_asked_one_by_one() {
        let scratch = Scratch::new("walk-loop");
        let d = put(&scratch.0, "a", b"a layer");
        let repo = scratch.0.join("docker/registry/v2/repositories/a");
        std::fs::remove_dir_all(repo.join("_layers")).expect("rm");
        std::fs::create_dir_all(repo.join("_manifests/revisions")).expect("mkdir");
        // A symlink loop: nothing below it can be read (ELOOP), as root too.
        std::os::unix::fs::symlink(repo.join("_layers"), repo.join("_layers")).expect("loop");
        let mut idx = CacheIndex::new();
        cache(&mut idx, "a", d, "7");
        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let audit = run(&storage, idx, opts()).expect("audit");
        let got = kinds(&audit);
        assert!(
            !got.iter().any(|(k, _)| *k == Kind::UnlinkedRepositoryBlob),
            "{got:?}"
        );
        assert!(
            got.iter().any(|(k, _)| *k == Kind::UnreadableStorage),
            "{got:?}"
        );
        assert!(!audit.incomplete.is_empty());
    }

    #[test]
    fn a_link_that_is_a_socket_is_a_bad_link_as_before() {
        let scratch = Scratch::new("walk-socket");
        let d = put(&scratch.0, "a", b"a layer");
        let link = scratch
            .0
            .join("docker/registry/v2/repositories/a/_layers/sha256")
            .join(d.hex())
            .join("link");
        std::fs::remove_file(&link).expect("rm");
        // Bound at a short path (a socket's path is limited), then moved into place.
        let short = std::env::temp_dir().join(format!("ra-sock-{}", std::process::id()));
        let _ = std::fs::remove_file(&short);
        let _socket = std::os::unix::net::UnixListener::bind(&short).expect("socket");
        std::fs::rename(&short, &link).expect("move the socket");
        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let audit = run(&storage, CacheIndex::new(), opts()).expect("audit");
        assert!(
            audit
                .findings
                .iter()
                .any(|f| f.kind == Kind::BadLink && f.detail.contains("socket")),
            "{:#?}",
            audit.findings
        );
        assert!(audit.incomplete.is_empty(), "{:?}", audit.incomplete);
    }
}
