//! Verifying blobs against storage, in parallel: for each digest, does its data exist,
//! how large is it, and (unless quick) does it hash to its digest. This is the one
//! place with parallel code (`parallel_map` lends the same machinery to `probe`): a rayon pool of `jobs` threads, each blob read once with a
//! reused buffer of a few hundred KiB, never held in memory whole. It only reads
//! storage and knows nothing about the cache.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use sha2::Digest as _;

use crate::digest::{Algorithm, Digest};
use crate::storage::{BlobStat, Storage};

/// Read buffer per worker: large enough for sequential throughput, small enough that
/// memory does not grow with blob size.
pub const READ_BUFFER: usize = 512 * 1024;

/// What storage holds for one digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCheck {
    Absent,
    Present { size: u64, content: Content },
    Unreadable { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Hashes to its digest.
    Verified,
    /// Hashes to something else.
    Mismatch { actual: Digest },
    /// Not hashed (quick mode).
    NotHashed,
}

#[derive(Debug, Default)]
pub struct Totals {
    pub bytes_hashed: AtomicU64,
}

/// Maps `f` over `items` on `threads` threads; results keep the order of `items`. The
/// one parallel primitive besides hashing: `probe` uses it to bound its requests.
pub fn parallel_map<T: Sync, R: Send>(
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

/// Checks every digest; the result is in the same order as `digests`.
pub fn verify(
    storage: &Storage,
    digests: &[Digest],
    jobs: usize,
    quick: bool,
    totals: &Totals,
) -> Result<Vec<BlobCheck>, String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .thread_name(|i| format!("rehash-{i}"))
        .build()
        .map_err(|e| format!("cannot start {jobs} hashing threads: {e}"))?;
    Ok(pool.install(|| {
        digests
            .par_iter()
            .map_init(
                || vec![0u8; READ_BUFFER],
                |buf, d| check_one(storage, d, quick, buf, totals),
            )
            .collect()
    }))
}

fn check_one(
    storage: &Storage,
    d: &Digest,
    quick: bool,
    buf: &mut [u8],
    totals: &Totals,
) -> BlobCheck {
    let size = match storage.stat_blob(d) {
        BlobStat::Absent => return BlobCheck::Absent,
        BlobStat::Unreadable { reason } => return BlobCheck::Unreadable { reason },
        BlobStat::Present { size } => size,
    };
    if quick {
        return BlobCheck::Present {
            size,
            content: Content::NotHashed,
        };
    }
    let hashed = storage
        .open_blob(d)
        .and_then(|mut f| hash_reader(d.algorithm(), &mut f, buf));
    match hashed {
        Ok((actual, read)) => {
            totals.bytes_hashed.fetch_add(read, Ordering::Relaxed);
            let content = if actual == *d {
                Content::Verified
            } else {
                Content::Mismatch { actual }
            };
            // The size hashed is the size that counts, should the file change meanwhile.
            BlobCheck::Present {
                size: read,
                content,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => BlobCheck::Absent,
        Err(e) => BlobCheck::Unreadable {
            reason: format!("{}: {e}", storage.blob_data_path(d).display()),
        },
    }
}

/// Hashes a reader with the given algorithm; returns the digest and the bytes read.
pub fn hash_reader(alg: Algorithm, r: &mut dyn Read, buf: &mut [u8]) -> io::Result<(Digest, u64)> {
    fn run<H: sha2::Digest>(
        mut h: H,
        alg: Algorithm,
        r: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<(Digest, u64)> {
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
        }
        let out = h.finalize();
        Digest::from_raw(alg, &out)
            .map(|d| (d, total))
            .ok_or_else(|| io::Error::other("hash length does not match its algorithm"))
    }
    match alg {
        Algorithm::Sha256 => run(sha2::Sha256::new(), alg, r, buf),
        Algorithm::Sha384 => run(sha2::Sha384::new(), alg, r, buf),
        Algorithm::Sha512 => run(sha2::Sha512::new(), alg, r, buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::Scratch;
    use std::fs;

    fn put(st: &Storage, d: &Digest, bytes: &[u8]) {
        let p = st.blob_data_path(d);
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
        let st = Storage::open(&s.0).expect("open");
        let good = digest_of(Algorithm::Sha256, b"good");
        let big: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        let large = digest_of(Algorithm::Sha512, &big);
        let corrupt = digest_of(Algorithm::Sha256, b"original");
        let absent = digest_of(Algorithm::Sha256, b"gone");
        put(&st, &good, b"good");
        put(&st, &large, &big);
        put(&st, &corrupt, b"tampered");
        let totals = Totals::default();
        let out = verify(&st, &[good, large, corrupt, absent], 2, false, &totals).expect("verify");
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
        assert_eq!(
            totals.bytes_hashed.load(Ordering::Relaxed),
            4 + big.len() as u64 + 8
        );

        let quick = verify(&st, &[corrupt], 1, true, &Totals::default()).expect("verify");
        assert_eq!(
            quick[0],
            BlobCheck::Present {
                size: 8,
                content: Content::NotHashed
            }
        );
    }
}
