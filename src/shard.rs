//! Shards: `--shard K/N` makes a run audit only the K-th of N slices of the work, so N
//! machines (a Kubernetes Indexed Job, N cron hosts) each do 1/N against the same
//! storage and Redis, and `merge` puts the reports back together. Digests (cache keys
//! and blobs alike) are sliced by their own bytes, repositories (for the storage walk)
//! by a hash of their name, and what has neither (other applications' keys, malformed
//! keys without a digest, repository sets themselves) belongs to shard 1. Every piece of
//! work is owned by exactly one shard.

use std::fmt;

use crate::digest::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    /// 1-based.
    pub k: u64,
    pub n: u64,
}

impl Shard {
    pub(crate) const ALL: Shard = Shard { k: 1, n: 1 };

    pub(crate) fn parse(text: &str) -> Result<Shard, String> {
        let bad = || format!("--shard '{text}': use K/N with 1 <= K <= N, like 2/8");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (k, n): (u64, u64) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || k == 0 || k > n {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }

    /// From a Kubernetes Indexed Job: JOB_COMPLETION_INDEX (0-based) of N.
    pub(crate) fn from_index(index: &str, n: u64) -> Result<Shard, String> {
        let i: u64 = index
            .trim()
            .parse()
            .map_err(|_| format!("JOB_COMPLETION_INDEX '{index}' is not a number"))?;
        Shard::parse(&format!("{}/{n}", i + 1))
    }

    /// Digests are sliced by bytes 8..16 of the digest (the sample of `--sample` uses
    /// bytes 0..8, so the two do not correlate).
    pub(crate) fn owns_digest(&self, d: &Digest) -> bool {
        let mut key = [0u8; 8];
        key.copy_from_slice(&d.raw()[8..16]);
        u64::from_be_bytes(key) % self.n == self.k - 1
    }

    /// Repositories are sliced by an FNV-1a hash of the name.
    pub(crate) fn owns_repository(&self, name: &str) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h % self.n == self.k - 1
    }

    /// Work with neither a digest nor a repository: shard 1's.
    pub(crate) fn owns_unsharded(&self) -> bool {
        self.k == 1
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_digest_and_repository_has_exactly_one_owner() {
        for n in [1u64, 3, 8] {
            for i in 0..500u32 {
                let d = Digest::from_raw(
                    crate::digest::Algorithm::Sha256,
                    &sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                        i.to_le_bytes(),
                    )),
                )
                .expect("digest");
                let owners = (1..=n)
                    .filter(|k| Shard { k: *k, n }.owns_digest(&d))
                    .count();
                assert_eq!(owners, 1);
                let repo = format!("team/app{i}");
                let owners = (1..=n)
                    .filter(|k| Shard { k: *k, n }.owns_repository(&repo))
                    .count();
                assert_eq!(owners, 1);
            }
        }
    }

    #[test]
    fn parses() {
        assert_eq!(Shard::parse("2/8"), Ok(Shard { k: 2, n: 8 }));
        assert_eq!(Shard::from_index("0", 3), Ok(Shard { k: 1, n: 3 }));
        for bad in ["0/3", "4/3", "1/0", "x", "1-3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
