//! Verifying blobs against storage, in parallel: for each digest, does its data exist,
//! how large is it, and (unless a policy says to skip it) does it hash to its digest.
//! The hashing is parallel here (`parallel_map` lends the same machinery to the registry
//! probes of `probe`, `check`, `gc` and its restart), on a rayon pool of `jobs` threads;
//! the only other parallel code is the storage walk's pool of I/O threads (`verify`,
//! `storage::blobs`). What the walk already knows of a blob is taken as given. On a
//! filesystem each blob is opened once when all are hashed (the
//! open file gives existence, type and size); a small blob is read in one read, a large
//! one through a reused buffer of a few hundred KiB, never held in memory whole, and
//! large blobs go last, largest first, so no thread is left idle at the end. It reads
//! storage only, and knows nothing about the cache; the verification state it consults
//! and updates is `state`.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::Digest as _;

use crate::audit::state::{self, State};
use crate::digest::{Algorithm, Digest};
use crate::storage::{BlobStat, Storage};
use crate::summary::HashCounts;

/// Read buffer per worker: large enough for sequential throughput, small enough that
/// memory does not grow with blob size.
pub(crate) const READ_BUFFER: usize = 512 * 1024;

/// What storage holds for one digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobCheck {
    Absent,
    Present { size: u64, content: Content },
    Unreadable { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    /// Hashes to its digest.
    Verified,
    /// Hashes to something else.
    /// (Boxed: it is rare, and a check per cached blob stays small.)
    Mismatch { actual: Box<Digest> },
    /// Not hashed this run, and why.
    NotHashed(Skip),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// `--quick`.
    Quick,
    /// Outside this run's `--sample`.
    Sample,
    /// Verified before with the same size and modification time (`--state`).
    Trusted,
    /// `--max-duration` ran out.
    Deadline,
}

/// Which blobs a run re-hashes: `n/m` (the n-th of m slices, so m runs cover every
/// blob exactly once) or a percentage, both chosen by digest, so deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sample {
    Slice {
        n: u64,
        m: u64,
    },
    /// Hundredths of a percent (5% is 500).
    Basis(u64),
}

impl Sample {
    pub(crate) fn parse(text: &str) -> Result<Sample, String> {
        let bad = || format!("--sample '{text}': use a percentage like 5% or a slice like 1/20");
        if let Some(p) = text.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(bad());
            }
            return Ok(Sample::Basis((v * 100.0).round() as u64));
        }
        let (n, m) = text.split_once('/').ok_or_else(bad)?;
        let (n, m): (u64, u64) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if m == 0 || n == 0 || n > m {
            return Err(bad());
        }
        Ok(Sample::Slice { n, m })
    }

    pub(crate) fn includes(&self, d: &Digest) -> bool {
        let mut key = [0u8; 8];
        key.copy_from_slice(&d.raw()[..8]);
        let key = u64::from_be_bytes(key);
        match *self {
            Sample::Slice { n, m } => key % m == n - 1,
            Sample::Basis(b) => key % 10_000 < b,
        }
    }
}

/// What a run re-hashes.
#[derive(Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub jobs: usize,
    pub quick: bool,
    pub sample: Option<Sample>,
    pub deadline: Option<Instant>,
    pub state: Option<&'a State>,
    pub reverify_after: Duration,
}

impl Policy<'_> {
    pub(crate) fn simple(jobs: usize, quick: bool) -> Policy<'static> {
        Policy {
            jobs,
            quick,
            sample: None,
            deadline: None,
            state: None,
            reverify_after: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Totals {
    bytes: AtomicU64,
    hashed: AtomicU64,
    trusted: AtomicU64,
    not_sampled: AtomicU64,
    not_reached: AtomicU64,
}

impl Totals {
    fn counts(&self) -> HashCounts {
        HashCounts {
            bytes_hashed: self.bytes.load(Ordering::Relaxed),
            blobs_hashed: self.hashed.load(Ordering::Relaxed),
            blobs_trusted: self.trusted.load(Ordering::Relaxed),
            blobs_not_sampled: self.not_sampled.load(Ordering::Relaxed),
            blobs_not_reached: self.not_reached.load(Ordering::Relaxed),
        }
    }
}

/// Maps `f` over `items` on `threads` threads; results keep the order of `items`. The
/// one parallel primitive besides hashing: `probe` uses it to bound its requests.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>, String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    Ok(pool.install(|| items.par_iter().map(&f).collect()))
}

/// The digests `verify` checks, by position: a slice, or ids looked up in the cache
/// index (so a million digests need not be copied out of it, 65 bytes each).
pub(crate) trait DigestList: Sync {
    fn get(&self, at: usize) -> Digest;
}

impl DigestList for [Digest] {
    fn get(&self, at: usize) -> Digest {
        self[at]
    }
}

/// Blobs at least this large are hashed after all the others, largest first, each by
/// the next free thread: hashing one blob cannot be split, so a large blob started
/// last would keep one thread busy while the others idle.
const LARGE: u64 = 16 * READ_BUFFER as u64;

/// Checks every digest; the result is in the same order as `digests`. `known` holds,
/// in the same order, what this run already knows of each blob (the storage walk's
/// stat, or absent by its listing); `None` is asked here.
///
/// When every blob is to be hashed and no progress bar needs the total up front (on a
/// filesystem), each blob not known yet is opened once and the open file says whether
/// it is there, its type and its size. Otherwise every blob not known is stat'ed first
/// (existence and size are checked every run), then the ones the policy selects are
/// hashed, with a progress bar of the bytes to go. Either way blobs of [`LARGE`] bytes
/// or more are hashed last, largest first.
pub(crate) fn verify<L: DigestList + ?Sized>(
    storage: &Storage,
    digests: &L,
    known: Vec<Option<BlobStat>>,
    policy: Policy<'_>,
) -> Result<(Vec<BlobCheck>, HashCounts), String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(policy.jobs)
        .thread_name(|i| format!("rehash-{i}"))
        .build()
        .map_err(|e| format!("cannot start {} hashing threads: {e}", policy.jobs))?;
    let totals = Totals::default();
    let now = state::unix_now();
    let bar = crate::progress::bytes(0);
    let late = |st: &BlobStat, skip: Option<Skip>| {
        skip.is_none() && matches!(st, BlobStat::Present { size, .. } if *size >= LARGE)
    };

    // First pass: a check for each blob, or its stat when it is a large one left for later.
    let first: Vec<Result<BlobCheck, BlobStat>> = match storage {
        Storage::Fs(fs)
            if !policy.quick
                && policy.sample.is_none()
                && policy.state.is_none()
                && bar.is_hidden() =>
        {
            pool.install(|| {
                known
                    .into_par_iter()
                    .enumerate()
                    .map_init(
                        || vec![0u8; READ_BUFFER],
                        |buf, (i, known)| {
                            let d = &digests.get(i);
                            let (st, file) = match known {
                                Some(st) => (st, None),
                                None if policy.deadline.is_some_and(|t| Instant::now() >= t) => {
                                    (fs.stat_blob(d), None)
                                }
                                None => fs.stat_and_open(d),
                            };
                            if late(&st, None) {
                                return Err(st);
                            }
                            Ok(check_one(
                                storage, d, st, None, &policy, buf, &totals, &bar, now, file,
                            ))
                        },
                    )
                    .collect()
            })
        }
        _ => {
            let stats: Vec<BlobStat> = pool.install(|| {
                known
                    .into_par_iter()
                    .enumerate()
                    .map(|(i, known)| known.unwrap_or_else(|| storage.stat_blob(&digests.get(i))))
                    .collect()
            });
            let plan: Vec<Option<Skip>> = stats
                .iter()
                .enumerate()
                .map(|(i, st)| match st {
                    BlobStat::Present { size, modified } => {
                        let skip = skip_reason(&policy, &digests.get(i), *size, *modified, now);
                        match skip {
                            Some(Skip::Trusted) => totals.trusted.fetch_add(1, Ordering::Relaxed),
                            Some(Skip::Sample) => {
                                totals.not_sampled.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => 0,
                        };
                        skip
                    }
                    _ => None,
                })
                .collect();
            let to_hash: u64 = stats
                .iter()
                .zip(&plan)
                .filter_map(|(st, skip)| match (st, skip) {
                    (BlobStat::Present { size, .. }, None) => Some(*size),
                    _ => None,
                })
                .sum();
            bar.set_length(to_hash);
            pool.install(|| {
                stats
                    .into_par_iter()
                    .zip(plan.par_iter())
                    .enumerate()
                    .map_init(
                        || vec![0u8; READ_BUFFER],
                        |buf, (i, (st, skip))| {
                            if late(&st, *skip) {
                                return Err(st);
                            }
                            let check = check_one(
                                storage,
                                &digests.get(i),
                                st,
                                *skip,
                                &policy,
                                buf,
                                &totals,
                                &bar,
                                now,
                                None,
                            );
                            if let Some(state) = policy.state {
                                state.maybe_save();
                            }
                            Ok(check)
                        },
                    )
                    .collect()
            })
        }
    };

    // Then the large blobs, largest first, each taken by the next thread that is free.
    let mut large: Vec<(usize, u64)> = first
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Err(BlobStat::Present { size, .. }) => Some((i, *size)),
            _ => None,
        })
        .collect();
    large.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, BlobCheck)>> = pool.broadcast(|_| {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(&(i, _)) = large.get(next.fetch_add(1, Ordering::Relaxed)) {
            let Err(st) = &first[i] else { continue };
            buf.resize(READ_BUFFER, 0);
            let check = check_one(
                storage,
                &digests.get(i),
                st.clone(),
                None,
                &policy,
                &mut buf,
                &totals,
                &bar,
                now,
                None,
            );
            if let Some(state) = policy.state {
                state.maybe_save();
            }
            out.push((i, check));
        }
        out
    });
    let mut late_checks: std::collections::HashMap<usize, BlobCheck> =
        done.into_iter().flatten().collect();
    let checks = first
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Ok(check) => Ok(check),
            Err(_) => late_checks
                .remove(&i)
                .ok_or_else(|| "a large blob was left unhashed".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish();
    Ok((checks, totals.counts()))
}

fn skip_reason(
    policy: &Policy<'_>,
    d: &Digest,
    size: u64,
    modified: i128,
    now: u64,
) -> Option<Skip> {
    if policy.quick {
        return Some(Skip::Quick);
    }
    if policy
        .state
        .is_some_and(|s| s.trusts(d, size, modified, now, policy.reverify_after))
    {
        return Some(Skip::Trusted);
    }
    if policy.sample.is_some_and(|s| !s.includes(d)) {
        return Some(Skip::Sample);
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn check_one(
    storage: &Storage,
    d: &Digest,
    st: BlobStat,
    skip: Option<Skip>,
    policy: &Policy<'_>,
    buf: &mut [u8],
    totals: &Totals,
    bar: &indicatif::ProgressBar,
    now: u64,
    file: Option<io::Result<std::fs::File>>,
) -> BlobCheck {
    let (size, modified) = match st {
        BlobStat::Absent => {
            if let Some(state) = policy.state {
                state.forget(d);
            }
            return BlobCheck::Absent;
        }
        BlobStat::Unreadable { reason } => return BlobCheck::Unreadable { reason },
        BlobStat::Present { size, modified } => (size, modified),
    };
    if let Some(skip) = skip {
        return BlobCheck::Present {
            size,
            content: Content::NotHashed(skip),
        };
    }
    if policy.deadline.is_some_and(|t| Instant::now() >= t) {
        totals.not_reached.fetch_add(1, Ordering::Relaxed);
        return BlobCheck::Present {
            size,
            content: Content::NotHashed(Skip::Deadline),
        };
    }
    // A blob file is hashed expecting the size of the open file (`size`, from its
    // `fstat`): a small blob takes one read of size + 1 bytes (a short read at that size
    // is its end; a full one means it grew, and reading goes on to the end).
    let (file, expected) = match (file, storage) {
        (Some(f), _) => (Some(f), size),
        (None, Storage::Fs(fs)) => match fs.stat_and_open(d) {
            (BlobStat::Present { size, .. }, Some(f)) => (Some(f), size),
            (BlobStat::Unreadable { reason }, _) => return BlobCheck::Unreadable { reason },
            _ => (Some(Err(io::ErrorKind::NotFound.into())), size),
        },
        (None, _) => (None, size),
    };
    let hashed = match file {
        Some(file) => file.and_then(|mut f| {
            let mut reader = Metered {
                inner: &mut f,
                bar,
                deadline: policy.deadline,
            };
            hash_sized(d.algorithm(), &mut reader, buf, Some(expected))
        }),
        None => storage.open_blob(d).and_then(|mut f| {
            let mut reader = Metered {
                inner: &mut f,
                bar,
                deadline: policy.deadline,
            };
            hash_reader(d.algorithm(), &mut reader, buf)
        }),
    };
    match hashed {
        Ok((actual, read)) => {
            totals.bytes.fetch_add(read, Ordering::Relaxed);
            totals.hashed.fetch_add(1, Ordering::Relaxed);
            let content = if actual == *d {
                if let Some(state) = policy.state {
                    state.record(
                        *d,
                        state::Entry {
                            size: read,
                            modified,
                            verified_at: now,
                        },
                    );
                }
                Content::Verified
            } else {
                if let Some(state) = policy.state {
                    state.forget(d);
                }
                Content::Mismatch {
                    actual: Box::new(actual),
                }
            };
            // The size hashed is the size that counts, should the file change meanwhile.
            BlobCheck::Present {
                size: read,
                content,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            totals.not_reached.fetch_add(1, Ordering::Relaxed);
            BlobCheck::Present {
                size,
                content: Content::NotHashed(Skip::Deadline),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => BlobCheck::Absent,
        Err(e) => {
            let place = storage.relative(&storage.blob_loc(d));
            // An I/O error means the blob was not read: the run is incomplete.
            if e.raw_os_error().is_some() {
                storage.record_unread(place.clone(), e.to_string());
            }
            BlobCheck::Unreadable {
                reason: format!("{place}: {e}"),
            }
        }
    }
}

/// A reader that advances the progress bar and stops at the deadline.
struct Metered<'a> {
    inner: &'a mut dyn Read,
    bar: &'a indicatif::ProgressBar,
    deadline: Option<Instant>,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.deadline.is_some_and(|t| Instant::now() >= t) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "--max-duration reached",
            ));
        }
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Hashes a reader with the given algorithm; returns the digest and the bytes read.
pub(crate) fn hash_reader(
    alg: Algorithm,
    r: &mut dyn Read,
    buf: &mut [u8],
) -> io::Result<(Digest, u64)> {
    hash_sized(alg, r, buf, None)
}

/// [`hash_reader`] for a file expected to hold `expected` bytes (its size on the open
/// file): reads are sized to end one byte past it, so a file that has not grown ends
/// with a short read at exactly that size, without a last read of nothing; one that
/// grew is read on to its end. Either way every byte up to the end is hashed.
fn hash_sized(
    alg: Algorithm,
    r: &mut dyn Read,
    buf: &mut [u8],
    expected: Option<u64>,
) -> io::Result<(Digest, u64)> {
    fn run<H: sha2::Digest>(
        mut h: H,
        alg: Algorithm,
        r: &mut dyn Read,
        buf: &mut [u8],
        expected: Option<u64>,
    ) -> io::Result<(Digest, u64)> {
        let mut total = 0u64;
        loop {
            let want = match expected {
                Some(e) if total <= e => {
                    usize::try_from(e - total + 1).map_or(buf.len(), |left| left.min(buf.len()))
                }
                _ => buf.len(),
            };
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
            if n < want && expected == Some(total) {
                break;
            }
        }
        let out = h.finalize();
        Digest::from_raw(alg, &out)
            .map(|d| (d, total))
            .ok_or_else(|| io::Error::other("hash length does not match its algorithm"))
    }
    match alg {
        Algorithm::Sha256 => run(sha2::Sha256::new(), alg, r, buf, expected),
        Algorithm::Sha384 => run(sha2::Sha384::new(), alg, r, buf, expected),
        Algorithm::Sha512 => run(sha2::Sha512::new(), alg, r, buf, expected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::filesystem::tests::Scratch;
    use std::fs;

    fn put(st: &Storage, d: &Digest, bytes: &[u8]) {
        let p = st.fs_path(&st.blob_loc(d)).expect("a filesystem storage");
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, bytes).expect("write");
    }

    fn digest_of(alg: Algorithm, bytes: &[u8]) -> Digest {
        let mut buf = vec![0u8; 7]; // a tiny buffer exercises the read loop
        hash_reader(alg, &mut &bytes[..], &mut buf).expect("hash").0
    }

    #[test]
    fn known_answers() {
        assert_eq!(
            digest_of(Algorithm::Sha256, b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(
            digest_of(Algorithm::Sha384, b"abc")
                .to_string()
                .starts_with("sha384:cb00753f")
        );
        assert!(
            digest_of(Algorithm::Sha512, b"abc")
                .to_string()
                .starts_with("sha512:ddaf35a1")
        );
    }

    #[test]
    fn verifies_present_corrupt_absent_in_order() {
        let s = Scratch::new("rehash");
        let st = Storage::open_fs(&s.0).expect("open");
        let good = digest_of(Algorithm::Sha256, b"good");
        let big: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        let large = digest_of(Algorithm::Sha512, &big);
        let corrupt = digest_of(Algorithm::Sha256, b"original");
        let absent = digest_of(Algorithm::Sha256, b"gone");
        put(&st, &good, b"good");
        put(&st, &large, &big);
        put(&st, &corrupt, b"tampered");
        // Some blobs already known (as the storage walk knows them), the rest asked here.
        let known = vec![
            Some(st.stat_blob(&good)),
            None,
            None,
            Some(BlobStat::Absent),
        ];
        let (out, counts) = verify(
            &st,
            &[good, large, corrupt, absent][..],
            known,
            Policy::simple(2, false),
        )
        .expect("verify");
        assert_eq!(
            out[0],
            BlobCheck::Present {
                size: 4,
                content: Content::Verified
            }
        );
        assert_eq!(
            out[1],
            BlobCheck::Present {
                size: big.len() as u64,
                content: Content::Verified
            }
        );
        assert!(matches!(
            out[2],
            BlobCheck::Present {
                content: Content::Mismatch { .. },
                ..
            }
        ));
        assert_eq!(out[3], BlobCheck::Absent);
        assert_eq!(counts.bytes_hashed, 4 + big.len() as u64 + 8);
        assert_eq!(counts.blobs_hashed, 3);

        let (quick, _) =
            verify(&st, &[corrupt][..], vec![None], Policy::simple(1, true)).expect("verify");
        assert_eq!(
            quick[0],
            BlobCheck::Present {
                size: 8,
                content: Content::NotHashed(Skip::Quick)
            }
        );
    }

    #[test]
    fn sized_reads_hash_every_byte_whether_the_file_grew_or_shrank() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let whole = digest_of(Algorithm::Sha256, &bytes);
        for buf_len in [7, 4096, READ_BUFFER] {
            let mut buf = vec![0u8; buf_len];
            for expected in [0, 1, 99_999, 100_000, 100_001, 1 << 40] {
                let (d, n) =
                    hash_sized(Algorithm::Sha256, &mut &bytes[..], &mut buf, Some(expected))
                        .expect("hash");
                assert_eq!((d, n), (whole, bytes.len() as u64), "{buf_len} {expected}");
            }
        }
    }

    #[test]
    fn large_blobs_are_hashed_last_and_reported_in_order() {
        let s = Scratch::new("rehash-large");
        let st = Storage::open_fs(&s.0).expect("open");
        let big: Vec<u8> = (0..LARGE as usize + 5).map(|i| (i % 241) as u8).collect();
        let large = digest_of(Algorithm::Sha256, &big);
        let tampered = digest_of(Algorithm::Sha256, &big[1..]);
        let small = digest_of(Algorithm::Sha256, b"small");
        put(&st, &large, &big);
        put(&st, &tampered, &big);
        put(&st, &small, b"small");
        for stat_first in [false, true] {
            let mut policy = Policy::simple(2, false);
            if stat_first {
                // A sample of everything takes the stat-first way.
                policy.sample = Some(Sample::Basis(10_000));
            }
            let (out, counts) =
                verify(&st, &[small, large, tampered][..], vec![None; 3], policy).expect("verify");
            assert_eq!(
                out[0],
                BlobCheck::Present {
                    size: 5,
                    content: Content::Verified
                }
            );
            assert_eq!(
                out[1],
                BlobCheck::Present {
                    size: big.len() as u64,
                    content: Content::Verified
                }
            );
            assert_eq!(
                out[2],
                BlobCheck::Present {
                    size: big.len() as u64,
                    content: Content::Mismatch {
                        actual: Box::new(large)
                    }
                }
            );
            assert_eq!(counts.blobs_hashed, 3);
            assert_eq!(counts.bytes_hashed, 5 + 2 * big.len() as u64);
        }
    }

    #[test]
    fn samples_are_deterministic_slices() {
        assert_eq!(Sample::parse("1/4"), Ok(Sample::Slice { n: 1, m: 4 }));
        assert_eq!(Sample::parse("5%"), Ok(Sample::Basis(500)));
        for bad in ["0/4", "5/4", "1/0", "0%", "101%", "x"] {
            assert!(Sample::parse(bad).is_err(), "{bad}");
        }
        let digests: Vec<Digest> = (0..200u32)
            .map(|i| digest_of(Algorithm::Sha256, &i.to_le_bytes()))
            .collect();
        for d in &digests {
            let hits = (1..=4)
                .filter(|n| Sample::Slice { n: *n, m: 4 }.includes(d))
                .count();
            assert_eq!(hits, 1, "each blob is in exactly one of 4 slices");
        }
        let five = digests
            .iter()
            .filter(|d| Sample::Basis(500).includes(d))
            .count();
        assert!(five < 30, "about 5% of 200: {five}");
    }
}
