//! The correctness net for the audit: random registries (blobs present or missing, links
//! present or missing, cached sizes right or wrong, layers shared by several
//! repositories, partial and malformed cache entries) on a scratch storage root with a
//! hand-built `CacheIndex`, and the audit's findings compared, key by key, with what a
//! plain reference check written here from the registry's rules finds. It needs no
//! server and writes only its own scratch directories.

use std::collections::BTreeMap;

use sha2::Digest as _;

use super::rehash::Policy;
use super::{AuditOptions, run};
use crate::cache::index::{CacheIndex, HashFields, RepoHash};
use crate::digest::{Algorithm, Digest};
use crate::finding::{Finding, Kind};
use crate::shard::Shard;
use crate::storage::Storage;
use crate::storage::filesystem::tests::Scratch;

/// A small deterministic PRNG (SplitMix64): the same seed builds the same registry.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The global descriptor `blobs::<digest>` as the generator wrote it.
#[derive(Debug, Clone)]
enum Global {
    Absent,
    /// A hash with these fields (None: field absent).
    Hash {
        digest: Option<String>,
        size: Option<String>,
        length: Option<String>,
        mediatype: Option<String>,
    },
    /// Some other Redis type.
    WrongType,
}

/// One repository's entries for one digest, as written.
#[derive(Debug, Clone, Copy)]
struct RepoState {
    member: bool,
    hash: RepoHash,
}

/// One digest of a random registry.
#[derive(Debug)]
struct Blob {
    digest: Digest,
    /// The bytes in storage, when the blob is there.
    data: Option<Vec<u8>>,
    global: Global,
    /// Per repository index: linked in storage (layer or revision), and its cache entries.
    linked: Vec<bool>,
    repos: Vec<Option<RepoState>>,
}

const REPOS: [&str; 5] = ["app", "team/web", "team/api", "base/debian", "x"];

fn digest_of(alg: Algorithm, bytes: &[u8]) -> Digest {
    let raw = match alg {
        Algorithm::Sha512 => sha2::Sha512::digest(bytes).to_vec(),
        _ => sha2::Sha256::digest(bytes).to_vec(),
    };
    Digest::from_raw(alg, &raw).expect("digest")
}

fn generate(seed: u64, count: usize) -> Vec<Blob> {
    let mut rng = Rng(seed);
    let mut blobs = Vec::new();
    for i in 0..count {
        let len = rng.below(200) as usize;
        let mut bytes = format!("registry {seed} blob {i} ").into_bytes();
        bytes.extend((0..len).map(|_| rng.next() as u8));
        let alg = if rng.chance(10) {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        };
        let digest = digest_of(alg, &bytes);
        let present = rng.chance(60);
        let actual = bytes.len();
        let text = digest.to_string();
        let global = match rng.below(100) {
            0..15 => Global::Absent,
            15..55 => Global::Hash {
                digest: Some(text.clone()),
                size: Some(actual.to_string()),
                length: None,
                mediatype: Some("application/octet-stream".into()),
            },
            // The wrong size.
            55..67 => Global::Hash {
                digest: Some(text.clone()),
                size: Some((actual + 1 + rng.below(50) as usize).to_string()),
                length: None,
                mediatype: Some("application/octet-stream".into()),
            },
            // Partial: no size, the old `length` only, no digest field, no mediatype.
            67..72 => Global::Hash {
                digest: Some(text.clone()),
                size: None,
                length: None,
                mediatype: Some("application/octet-stream".into()),
            },
            72..76 => Global::Hash {
                digest: Some(text.clone()),
                size: None,
                length: Some(actual.to_string()),
                mediatype: None,
            },
            76..81 => Global::Hash {
                digest: None,
                size: Some(actual.to_string()),
                length: None,
                mediatype: Some("application/octet-stream".into()),
            },
            81..87 => Global::Hash {
                digest: Some(text.clone()),
                size: Some(actual.to_string()),
                length: None,
                mediatype: None,
            },
            // Unusable values.
            87..90 => Global::Hash {
                digest: Some(text.clone()),
                size: Some("twelve".into()),
                length: None,
                mediatype: None,
            },
            90..93 => Global::Hash {
                digest: Some(text.clone()),
                size: Some("-1".into()),
                length: None,
                mediatype: None,
            },
            93..96 => Global::Hash {
                digest: Some(format!("sha256:{}", "0".repeat(64))),
                size: Some(actual.to_string()),
                length: None,
                mediatype: None,
            },
            _ => Global::WrongType,
        };
        // Shared layers: the digest is cached in one to all five repositories.
        let mut repos = vec![None; REPOS.len()];
        let mut linked = vec![false; REPOS.len()];
        let shared = 1 + rng.below(REPOS.len() as u64) as usize;
        for _ in 0..shared {
            let r = rng.below(REPOS.len() as u64) as usize;
            let hash = match rng.below(100) {
                0..60 => RepoHash::WithMediatype,
                60..75 => RepoHash::WithoutMediatype,
                75..95 => RepoHash::Absent,
                _ => RepoHash::WrongType,
            };
            repos[r] = Some(RepoState {
                member: rng.chance(80),
                hash,
            });
        }
        for l in linked.iter_mut() {
            *l = rng.chance(45);
        }
        blobs.push(Blob {
            digest,
            data: present.then_some(bytes),
            global,
            linked,
            repos,
        });
    }
    blobs
}

/// Writes the storage side: blob data, and each link as a layer or a revision.
fn write_storage(root: &std::path::Path, blobs: &[Blob], seed: u64) {
    let v2 = root.join("docker/registry/v2");
    let mut rng = Rng(seed ^ 0xdead_beef);
    for b in blobs {
        let alg = b.digest.algorithm().name();
        let hex = b.digest.hex();
        if let Some(bytes) = &b.data {
            let dir = v2.join("blobs").join(alg).join(&hex[..2]).join(&hex);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("data"), bytes).expect("write blob");
        }
        for (r, &linked) in b.linked.iter().enumerate() {
            if !linked {
                continue;
            }
            let kind = if rng.chance(20) {
                "_manifests/revisions"
            } else {
                "_layers"
            };
            let dir = v2
                .join("repositories")
                .join(REPOS[r])
                .join(kind)
                .join(alg)
                .join(&hex);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("link"), b.digest.to_string()).expect("write link");
        }
    }
}

/// The cache side, as a reader would record it.
fn build_index(blobs: &[Blob], malformed_members: &[usize]) -> CacheIndex {
    let mut idx = CacheIndex::new();
    for b in blobs {
        let text = b.digest.to_string();
        let key = format!("blobs::{text}");
        match &b.global {
            Global::Absent => {}
            Global::WrongType => idx.add_global_wrong_type(key.as_bytes(), b.digest, "string"),
            Global::Hash {
                digest,
                size,
                length,
                mediatype,
            } => idx.add_global(
                key.as_bytes(),
                b.digest,
                HashFields {
                    digest: digest.as_deref().map(str::as_bytes),
                    size: size.as_deref().map(str::as_bytes),
                    length: length.as_deref().map(str::as_bytes),
                    mediatype: mediatype.as_deref().map(str::as_bytes),
                },
            ),
        }
        for (r, state) in b.repos.iter().enumerate() {
            let Some(state) = state else { continue };
            let set = format!("repository::{}::blobs", REPOS[r]);
            if state.member {
                idx.add_member(set.as_bytes(), REPOS[r], text.as_bytes());
            }
            if state.hash != RepoHash::Absent {
                let ty = if state.hash == RepoHash::WrongType {
                    "list"
                } else {
                    "hash"
                };
                idx.add_repo_hash(
                    format!("{set}::{text}").as_bytes(),
                    REPOS[r],
                    b.digest,
                    state.hash,
                    ty,
                );
            }
        }
    }
    for &r in malformed_members {
        let set = format!("repository::{}::blobs", REPOS[r]);
        idx.add_member(set.as_bytes(), REPOS[r], b"sha256:not-a-digest");
    }
    idx
}

/// (kind, repository, digest, live): what each finding is compared by.
type Key = (Kind, Option<String>, Option<Digest>, bool);

/// The reference: the registry's rules (docs/registry-internals.md), applied plainly.
fn reference(blobs: &[Blob], malformed_members: &[usize]) -> Vec<Key> {
    let mut out = Vec::new();
    for b in blobs {
        let d = Some(b.digest);
        // A global lookup hits when the hash has `digest` and a `size` the registry can
        // parse (an unparsable size fails the read: a miss).
        let (global_is_hash, global_hits, cached_size) = match &b.global {
            Global::Hash { digest, size, .. } => {
                let parsed = size.as_deref().and_then(|s| s.parse::<i64>().ok());
                (true, digest.is_some() && parsed.is_some(), parsed)
            }
            _ => (false, false, None),
        };
        // Malformed entries: the registry cannot use them as they are.
        match &b.global {
            Global::WrongType => out.push((Kind::MalformedCacheEntry, None, d, false)),
            Global::Hash { digest, size, .. } => {
                let bad_size = size
                    .as_deref()
                    .is_some_and(|s| !s.parse::<i64>().is_ok_and(|n| n >= 0));
                let bad_digest = digest
                    .as_deref()
                    .is_some_and(|t| *t != b.digest.to_string());
                if bad_size || bad_digest {
                    out.push((Kind::MalformedCacheEntry, None, d, global_hits));
                }
            }
            Global::Absent => {}
        }
        for (r, state) in b.repos.iter().enumerate() {
            if let Some(RepoState {
                hash: RepoHash::WrongType,
                ..
            }) = state
            {
                out.push((
                    Kind::MalformedCacheEntry,
                    Some(REPOS[r].to_string()),
                    d,
                    false,
                ));
            }
        }
        let repo_is_hash =
            |s: &RepoState| matches!(s.hash, RepoHash::WithMediatype | RepoHash::WithoutMediatype);
        // A repository lookup hits: member of the set, global hit, hash with mediatype.
        let repo_hits =
            |s: &RepoState| s.member && global_hits && s.hash == RepoHash::WithMediatype;
        match &b.data {
            None => {
                if global_is_hash {
                    out.push((Kind::PhantomBlobDescriptor, None, d, global_hits));
                }
                for (r, state) in b.repos.iter().enumerate() {
                    let Some(s) = state else { continue };
                    if s.member || repo_is_hash(s) {
                        out.push((
                            Kind::PhantomRepositoryBlob,
                            Some(REPOS[r].to_string()),
                            d,
                            repo_hits(s),
                        ));
                    }
                }
            }
            Some(bytes) => {
                if let Some(cached) = cached_size
                    && cached != bytes.len() as i64
                {
                    out.push((Kind::SizeMismatch, None, d, global_hits));
                }
                for (r, state) in b.repos.iter().enumerate() {
                    let Some(s) = state else { continue };
                    let repo = Some(REPOS[r].to_string());
                    if s.member && !b.linked[r] {
                        out.push((Kind::UnlinkedRepositoryBlob, repo, d, repo_hits(s)));
                    } else if !s.member && repo_is_hash(s) {
                        out.push((Kind::OrphanRepositoryDescriptor, repo, d, false));
                    }
                }
            }
        }
    }
    for &r in malformed_members {
        out.push((
            Kind::MalformedCacheEntry,
            Some(REPOS[r].to_string()),
            None,
            false,
        ));
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn random_registries_match_a_reference_check_key_by_key() {
    let mut totals: BTreeMap<Kind, usize> = BTreeMap::new();
    for seed in 1..=40u64 {
        let blobs = generate(seed, 50);
        let mut rng = Rng(seed.wrapping_mul(7919));
        let malformed_members: Vec<usize> = (0..REPOS.len()).filter(|_| rng.chance(10)).collect();
        let scratch = Scratch::new("random-registry");
        write_storage(&scratch.0, &blobs, seed);
        let index = build_index(&blobs, &malformed_members);
        let cached = index.digest_count();
        let storage = Storage::open_fs(&scratch.0).expect("storage");
        let audit = run(
            &storage,
            index,
            AuditOptions {
                hashing: Policy::simple(2, false),
                verify_storage: false,
                shard: Shard::ALL,
                io_threads: 4,
            },
        )
        .expect("audit");
        let mut got: Vec<Key> = audit
            .findings
            .iter()
            .map(|f| (f.kind, f.repository.clone(), f.digest, f.live))
            .collect();
        got.sort();
        got.dedup();
        let want = reference(&blobs, &malformed_members);
        let missing: Vec<&Key> = want.iter().filter(|k| !got.contains(k)).collect();
        let extra: Vec<&Key> = got.iter().filter(|k| !want.contains(k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "seed {seed}: the audit misses {missing:#?}\nand reports beyond the reference {extra:#?}"
        );
        // Every finding is about a cache key: one per key, nothing said twice.
        assert_eq!(got.len(), audit.findings.len(), "seed {seed}");
        assert!(audit.incomplete.is_empty(), "seed {seed}");
        // With storage verified, the cache check answers links from the walk's link
        // sets instead of asking storage per key: the same cache findings, to the byte.
        let walked = run(
            &storage,
            build_index(&blobs, &malformed_members),
            AuditOptions {
                hashing: Policy::simple(2, false),
                verify_storage: true,
                shard: Shard::ALL,
                io_threads: 3,
            },
        )
        .expect("audit with the walk");
        let cache_findings: Vec<&Finding> =
            walked.findings.iter().filter(|f| f.key.is_some()).collect();
        assert_eq!(
            cache_findings,
            audit.findings.iter().collect::<Vec<_>>(),
            "seed {seed}"
        );
        // A digest is in the cache when any of its keys is.
        let in_cache = |b: &&Blob| {
            !matches!(b.global, Global::Absent)
                || b.repos
                    .iter()
                    .flatten()
                    .any(|s| s.member || s.hash != RepoHash::Absent)
        };
        let absent = blobs
            .iter()
            .filter(in_cache)
            .filter(|b| b.data.is_none())
            .count() as u64;
        assert_eq!(cached, blobs.iter().filter(in_cache).count(), "seed {seed}");
        assert_eq!(audit.summary.blobs_checked, cached as u64, "seed {seed}");
        assert_eq!(audit.summary.blobs_absent, absent, "seed {seed}");
        for k in want {
            *totals.entry(k.0).or_default() += 1;
        }
    }
    // The generator reaches every kind the comparison is about.
    for kind in [
        Kind::PhantomBlobDescriptor,
        Kind::PhantomRepositoryBlob,
        Kind::UnlinkedRepositoryBlob,
        Kind::SizeMismatch,
        Kind::OrphanRepositoryDescriptor,
        Kind::MalformedCacheEntry,
    ] {
        assert!(
            totals.get(&kind).copied().unwrap_or(0) >= 10,
            "{kind:?}: {totals:?}"
        );
    }
}
