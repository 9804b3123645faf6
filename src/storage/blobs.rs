//! What storage holds for each blob, asked once per run: the blob directories listed
//! (`blobs/<alg>/<xx>/`, each directory read once, no call per digest), and a memo of
//! the one `stat` of a blob's data that something needed - the cache check, a link, a
//! manifest. A digest whose directory the listing did not find is absent without a
//! system call; wherever the listing is not sure (a directory it could not read, a
//! symlinked one, object storage) the blob is asked about directly. It reads storage
//! only, through [`Storage`], and never writes.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::{BlobStat, Storage};
use crate::digest::{Algorithm, Digest};

/// A set of digests kept compact: sha256 digests as their 32 raw bytes (four
/// big-endian words, so they sort as bytes and compare without `memcmp`) in a sorted
/// vector, the rare other algorithms apart.
#[derive(Debug, Default, Clone)]
pub(crate) struct DigestSet {
    sha256: Vec<[u64; 4]>,
    other: Vec<Digest>,
}

fn sha256_key(d: &Digest) -> Option<[u64; 4]> {
    if d.algorithm() != Algorithm::Sha256 {
        return None;
    }
    let mut key = [0u64; 4];
    for (word, bytes) in key.iter_mut().zip(d.raw().chunks_exact(8)) {
        *word = u64::from_be_bytes(bytes.try_into().ok()?);
    }
    Some(key)
}

impl DigestSet {
    pub(crate) fn push(&mut self, d: Digest) {
        match sha256_key(&d) {
            Some(k) => self.sha256.push(k),
            None => self.other.push(d),
        }
    }

    /// Sorts and removes duplicates; call once after the last `push`.
    pub(crate) fn seal(&mut self) {
        self.sha256.sort_unstable();
        self.sha256.dedup();
        self.sha256.shrink_to_fit();
        self.other.sort_unstable();
        self.other.dedup();
    }

    /// Where `d` is among the sealed sha256 digests, or the other digests.
    fn position(&self, d: &Digest) -> Result<usize, bool> {
        match sha256_key(d) {
            Some(k) => self.sha256.binary_search(&k).map_err(|_| false),
            None => Err(self.other.binary_search(d).is_ok()),
        }
    }

    pub(crate) fn contains(&self, d: &Digest) -> bool {
        matches!(self.position(d), Ok(_) | Err(true))
    }

    pub(crate) fn len(&self) -> usize {
        self.sha256.len() + self.other.len()
    }
}

/// The digests one repository links, kept compact over a blob listing: a listed blob
/// as its position in the listing (4 bytes instead of 32), any other digest whole.
/// Positions are only meaningful with the listing they were taken from.
#[derive(Debug, Default, Clone)]
pub(crate) struct LinkSet {
    listed: Vec<u32>,
    others: DigestSet,
}

impl LinkSet {
    /// An empty set with room for `n` listed digests.
    pub(crate) fn with_capacity(n: usize) -> LinkSet {
        LinkSet {
            listed: Vec::with_capacity(n),
            others: DigestSet::default(),
        }
    }

    pub(crate) fn push(&mut self, listing: &BlobListing, d: Digest) {
        match listing.listed.position(&d) {
            Ok(at) => self.listed.push(at as u32),
            Err(_) => self.others.push(d),
        }
    }

    /// Sorts and removes duplicates; call once after the last `push`.
    pub(crate) fn seal(&mut self) {
        self.listed.sort_unstable();
        self.listed.dedup();
        self.listed.shrink_to_fit();
        self.others.seal();
    }

    pub(crate) fn contains(&self, listing: &BlobListing, d: &Digest) -> bool {
        match listing.listed.position(d) {
            Ok(at) => self.listed.binary_search(&(at as u32)).is_ok(),
            Err(_) => self.others.contains(d),
        }
    }
}

/// The blob directories storage holds, as listed, and where the listing is not sure.
#[derive(Debug, Default)]
pub(crate) struct BlobListing {
    listed: DigestSet,
    /// Nothing could be listed with certainty (object storage answers from its own
    /// listing, or `blobs/` could not be read): every digest is asked about.
    unsure_all: bool,
    unsure_algorithms: HashSet<Algorithm>,
    unsure_prefixes: HashSet<(Algorithm, u8)>,
}

impl BlobListing {
    /// A listing that knows nothing: every digest is asked about.
    pub(crate) fn unknown() -> BlobListing {
        BlobListing {
            unsure_all: true,
            ..BlobListing::default()
        }
    }

    /// Whether storage may hold `d`: listed, or somewhere the listing is not sure of.
    pub(crate) fn may_hold(&self, d: &Digest) -> bool {
        self.unsure_all
            || self.listed.contains(d)
            || self.unsure_algorithms.contains(&d.algorithm())
            || self
                .unsure_prefixes
                .contains(&(d.algorithm(), d.raw().first().copied().unwrap_or(0)))
    }

    /// Blob directories listed.
    pub(crate) fn len(&self) -> usize {
        self.listed.len()
    }

    /// Lists `blobs/<alg>/<xx>/` of a filesystem, the prefix directories on `pool`.
    /// Only plain directories are listed; a symlinked or unreadable one leaves its part
    /// of the digest space unsure, so the blobs in it are stat-ed one by one as before,
    /// with the symlink rule and the unread record of [`Storage::stat_blob`].
    /// When `cancel` is set meanwhile, the listing stops early (and is not to be used).
    pub(crate) fn list(
        storage: &Storage,
        pool: &rayon::ThreadPool,
        cancel: &AtomicBool,
    ) -> BlobListing {
        let Storage::Fs(fs) = storage else {
            return BlobListing::unknown();
        };
        let base = fs.v2.join("blobs");
        let mut out = BlobListing::default();
        let mut prefixes: Vec<(Algorithm, u8, std::path::PathBuf)> = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha384, Algorithm::Sha512] {
            let dir = base.join(alg.name());
            match plain_dir(&dir) {
                Plain::Missing => continue,
                Plain::Unsure => {
                    out.unsure_algorithms.insert(alg);
                    continue;
                }
                Plain::Yes => {}
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                out.unsure_algorithms.insert(alg);
                continue;
            };
            for entry in entries {
                let Ok(entry) = entry else {
                    out.unsure_algorithms.insert(alg);
                    break;
                };
                let Some(prefix) = hex_byte(entry.file_name().as_bytes()) else {
                    continue; // not a prefix the registry would look in
                };
                match entry.file_type() {
                    Ok(t) if t.is_dir() => prefixes.push((alg, prefix, entry.path())),
                    Ok(t) if !t.is_symlink() => {} // a file: no blob below it
                    _ => {
                        out.unsure_prefixes.insert((alg, prefix));
                    }
                }
            }
        }
        let listed: Vec<Result<Vec<Digest>, (Algorithm, u8)>> = pool.install(|| {
            prefixes
                .par_iter()
                .map(|(alg, prefix, dir)| {
                    if cancel.load(Ordering::Relaxed) {
                        return Err((*alg, *prefix));
                    }
                    list_prefix(*alg, *prefix, dir).ok_or((*alg, *prefix))
                })
                .collect()
        });
        // Reserved exactly, so a million blobs never cost a doubling's worth more.
        let total: usize = listed.iter().map(|r| r.as_ref().map_or(0, Vec::len)).sum();
        out.listed.sha256.reserve_exact(total);
        for r in listed {
            match r {
                Ok(ds) => ds.into_iter().for_each(|d| out.listed.push(d)),
                Err(unsure) => {
                    out.unsure_prefixes.insert(unsure);
                }
            }
        }
        out.listed.seal();
        out
    }
}

enum Plain {
    Missing,
    Yes,
    Unsure,
}

/// Whether `dir` is a plain directory (not a symlink), without following it.
fn plain_dir(dir: &Path) -> Plain {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Plain::Yes,
        Ok(m) if m.file_type().is_symlink() => Plain::Unsure,
        Ok(_) => Plain::Missing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Plain::Missing,
        Err(_) => Plain::Unsure,
    }
}

/// `xx` as the byte it names, for a two-character lowercase hex name.
fn hex_byte(name: &[u8]) -> Option<u8> {
    let [a, b] = name else { return None };
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some((v(*a)? << 4) | v(*b)?)
}

/// The digests named by the entries of one prefix directory (`None`: it could not be
/// read to the end). Names that are not a digest of this algorithm and prefix are not
/// where the registry would look, so they are not blobs.
fn list_prefix(alg: Algorithm, prefix: u8, dir: &Path) -> Option<Vec<Digest>> {
    let mut out = Vec::new();
    let mut text = Vec::with_capacity(8 + alg.output_len() * 2);
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        text.clear();
        text.extend_from_slice(alg.name().as_bytes());
        text.push(b':');
        text.extend_from_slice(entry.file_name().as_bytes());
        if let Some(d) = Digest::parse(&text)
            && d.raw().first() == Some(&prefix)
        {
            out.push(d);
        }
    }
    Some(out)
}

/// The memo of blob stats for one run, over a listing: one slot per listed sha256
/// blob (24 bytes), a map for the rest.
#[derive(Debug, Default)]
pub(crate) struct BlobTable {
    listing: BlobListing,
    slots: Vec<Option<Stat>>,
    others: HashMap<Digest, Stat>,
    reasons: Vec<String>,
}

/// A [`BlobStat`] in 16 bytes (the modification time in nanoseconds as an `i64`, good
/// until 2262; an unreadable blob's reason kept apart).
#[derive(Debug, Clone, Copy)]
enum Stat {
    Absent,
    Present { size: u64, modified: i64 },
    Unreadable(u32),
}

impl BlobTable {
    pub(crate) fn new(listing: BlobListing) -> BlobTable {
        BlobTable {
            slots: vec![None; listing.listed.sha256.len()],
            listing,
            ..BlobTable::default()
        }
    }

    pub(crate) fn listing(&self) -> &BlobListing {
        &self.listing
    }

    /// The memo for `d`: `Err(true)` when it still has to be asked about.
    fn known_stat(&self, d: &Digest) -> Result<Stat, bool> {
        match self.listing.listed.position(d) {
            Ok(i) => self.slots.get(i).copied().flatten().ok_or(true),
            Err(_) if !self.listing.may_hold(d) => Ok(Stat::Absent),
            Err(_) => self.others.get(d).copied().ok_or(true),
        }
    }

    /// Stats, on `pool`, every digest of `digests` not asked about yet; a digest the
    /// listing rules out costs nothing.
    pub(crate) fn stat_all(
        &mut self,
        storage: &Storage,
        digests: &[Digest],
        pool: &rayon::ThreadPool,
    ) {
        let todo: Vec<Digest> = {
            let mut seen = HashSet::new();
            digests
                .iter()
                .filter(|d| self.known_stat(d).is_err() && seen.insert(**d))
                .copied()
                .collect()
        };
        let stats: Vec<BlobStat> =
            pool.install(|| todo.par_iter().map(|d| storage.stat_blob(d)).collect());
        for (d, st) in todo.into_iter().zip(stats) {
            self.remember(d, st);
        }
    }

    fn remember(&mut self, d: Digest, st: BlobStat) -> Stat {
        let s = match st {
            BlobStat::Absent => Stat::Absent,
            BlobStat::Present { size, modified } => Stat::Present {
                size,
                modified: i64::try_from(modified).unwrap_or(i64::MAX),
            },
            BlobStat::Unreadable { reason } => {
                self.reasons.push(reason);
                Stat::Unreadable(self.reasons.len() as u32 - 1)
            }
        };
        match self.listing.listed.position(&d) {
            Ok(i) => {
                if let Some(slot) = self.slots.get_mut(i) {
                    *slot = Some(s);
                }
            }
            Err(_) => {
                self.others.insert(d, s);
            }
        }
        s
    }

    /// What the run knows of `d` without asking storage: the memo, or absent when the
    /// listing rules it out; `None` when it has to be asked.
    pub(crate) fn known(&self, d: &Digest) -> Option<BlobStat> {
        self.known_stat(d).ok().map(|s| self.expand(s))
    }

    fn expand(&self, s: Stat) -> BlobStat {
        match s {
            Stat::Absent => BlobStat::Absent,
            Stat::Present { size, modified } => BlobStat::Present {
                size,
                modified: i128::from(modified),
            },
            Stat::Unreadable(i) => BlobStat::Unreadable {
                reason: self.reasons.get(i as usize).cloned().unwrap_or_default(),
            },
        }
    }

    /// What storage holds for `d`, from the memo or asked now.
    pub(crate) fn stat(&mut self, storage: &Storage, d: &Digest) -> BlobStat {
        let s = match self.known_stat(d) {
            Ok(s) => s,
            Err(_) => {
                let st = storage.stat_blob(d);
                self.remember(*d, st)
            }
        };
        self.expand(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::filesystem::tests::Scratch;
    use std::fs;

    fn digest(c: char) -> Digest {
        Digest::parse_str(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool")
    }

    #[test]
    fn the_listing_rules_out_only_what_it_read() {
        let s = Scratch::new("listing");
        let storage = Storage::open_fs(&s.0).expect("storage");
        let v2 = s.0.join("docker/registry/v2");
        let (a, b, c, e) = (digest('a'), digest('b'), digest('c'), digest('e'));
        // a: a blob; b: its directory in the wrong prefix; c: absent; e: under a
        // symlinked prefix directory (inside the root), so the listing is not sure.
        let pa = storage.fs_path(&storage.blob_loc(&a)).expect("path");
        fs::create_dir_all(pa.parent().expect("parent")).expect("mkdir");
        fs::write(&pa, b"a").expect("write");
        fs::create_dir_all(v2.join("blobs/sha256/aa").join(b.hex())).expect("mkdir");
        fs::create_dir_all(v2.join("elsewhere").join(e.hex())).expect("mkdir");
        fs::write(v2.join("elsewhere").join(e.hex()).join("data"), b"e").expect("write");
        std::os::unix::fs::symlink(v2.join("elsewhere"), v2.join("blobs/sha256/ee"))
            .expect("symlink");

        let listing = BlobListing::list(&storage, &pool(), &AtomicBool::new(false));
        assert_eq!(listing.len(), 1);
        assert!(listing.may_hold(&a));
        assert!(!listing.may_hold(&b));
        assert!(!listing.may_hold(&c));
        assert!(listing.may_hold(&e), "a symlinked prefix is asked about");

        let mut table = BlobTable::new(listing);
        table.stat_all(&storage, &[a, b, c, e, a], &pool());
        assert!(matches!(
            table.stat(&storage, &a),
            BlobStat::Present { size: 1, .. }
        ));
        assert_eq!(table.stat(&storage, &b), BlobStat::Absent);
        assert_eq!(table.stat(&storage, &c), BlobStat::Absent);
        assert!(matches!(
            table.stat(&storage, &e),
            BlobStat::Present { size: 1, .. }
        ));
        // The memo answers without storage: the blob removed now still reads as it was.
        fs::remove_file(&pa).expect("rm");
        assert!(matches!(table.stat(&storage, &a), BlobStat::Present { .. }));
    }

    #[test]
    fn digest_sets_hold_every_algorithm() {
        let mut set = DigestSet::default();
        let long = Digest::parse_str(&format!("sha512:{}", "ab".repeat(64))).expect("digest");
        for d in [digest('f'), long, digest('0'), digest('f')] {
            set.push(d);
        }
        set.seal();
        assert_eq!(set.len(), 3);
        assert!(set.contains(&long) && set.contains(&digest('0')));
        assert!(!set.contains(&digest('1')));
    }

    #[test]
    fn link_sets_hold_listed_and_unlisted_digests() {
        let mut listed = DigestSet::default();
        for c in ['1', '5', '9'] {
            listed.push(digest(c));
        }
        listed.seal();
        let listing = BlobListing {
            listed,
            ..BlobListing::default()
        };
        let long = Digest::parse_str(&format!("sha384:{}", "cd".repeat(48))).expect("digest");
        let mut set = LinkSet::with_capacity(1);
        // Listed blobs are kept by position, the rest (a dangling link) whole.
        for d in [digest('9'), digest('3'), long, digest('1'), digest('9')] {
            set.push(&listing, d);
        }
        set.seal();
        for d in [digest('9'), digest('3'), long, digest('1')] {
            assert!(set.contains(&listing, &d), "{d}");
        }
        for d in [digest('5'), digest('7'), digest('0')] {
            assert!(!set.contains(&listing, &d), "{d}");
        }
    }
}
