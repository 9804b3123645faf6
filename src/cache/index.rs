//! The registry's blob-descriptor cache as a compact per-digest index, whatever it was
//! read from. This module owns the registry's key shapes (`blobs::<digest>`,
//! `repository::<name>::blobs`, `repository::<name>::blobs::<digest>`), the checks that
//! turn an unusable entry into a `malformed-cache-entry` finding, and the registry's rule
//! for when an entry is served as a hit (`live`). It never talks to Redis or storage:
//! `cache::redis` and `cache::dump` feed it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::digest::{Algorithm, Digest};
use crate::finding::{self, Finding, Kind, Severity};
use crate::repo_name;
use crate::shard::Shard;

/// What a raw key is, by its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyShape {
    /// `blobs::<digest>`: the global descriptor hash.
    Global(Digest),
    /// `repository::<name>::blobs`: the set of digests known in a repository.
    RepoSet(String),
    /// `repository::<name>::blobs::<digest>`: the per-repository descriptor hash.
    RepoHash(String, Digest),
    /// Registry-shaped, but the registry could never look it up.
    Malformed {
        repository: Option<String>,
        reason: String,
    },
    /// Not the registry's: another application's key.
    Foreign,
}

pub(crate) const GLOBAL_PREFIX: &[u8] = b"blobs::";
pub(crate) const REPO_PREFIX: &[u8] = b"repository::";
const SET_SUFFIX: &[u8] = b"::blobs";
const HASH_INFIX: &[u8] = b"::blobs::";

pub(crate) fn global_key(d: &Digest) -> String {
    format!("blobs::{d}")
}

pub(crate) fn repo_set_key(repo: &str) -> String {
    format!("repository::{repo}::blobs")
}

pub(crate) fn repo_hash_key(repo: &str, d: &Digest) -> String {
    format!("repository::{repo}::blobs::{d}")
}

/// Classifies a raw Redis key by the registry's key shapes.
pub(crate) fn classify(key: &[u8]) -> KeyShape {
    if let Some(rest) = key.strip_prefix(GLOBAL_PREFIX) {
        return match Digest::parse(rest) {
            Some(d) => KeyShape::Global(d),
            None => KeyShape::Malformed {
                repository: None,
                reason: format!("'{}' is not a valid digest", finding::escape(rest)),
            },
        };
    }
    let Some(rest) = key.strip_prefix(REPO_PREFIX) else {
        return KeyShape::Foreign;
    };
    let (name, digest) = if let Some(name) = rest.strip_suffix(SET_SUFFIX) {
        (name, None)
    } else if let Some(at) = find(rest, HASH_INFIX) {
        (&rest[..at], Some(&rest[at + HASH_INFIX.len()..]))
    } else {
        return KeyShape::Foreign;
    };
    let repository = match std::str::from_utf8(name) {
        Ok(n) if repo_name::is_valid(n) => n.to_string(),
        _ => {
            return KeyShape::Malformed {
                repository: None,
                reason: format!("'{}' is not a valid repository name", finding::escape(name)),
            };
        }
    };
    match digest {
        None => KeyShape::RepoSet(repository),
        Some(raw) => match Digest::parse(raw) {
            Some(d) => KeyShape::RepoHash(repository, d),
            None => KeyShape::Malformed {
                repository: Some(repository),
                reason: format!("'{}' is not a valid digest", finding::escape(raw)),
            },
        },
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `size` field of a global descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeField {
    Missing,
    Valid(i64),
    /// Present but not an integer: the registry's read fails, a miss.
    Invalid,
}

/// A `blobs::<digest>` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GlobalEntry {
    Hash {
        has_digest: bool,
        size: SizeField,
    },
    /// Not a hash: every lookup errors, a miss.
    WrongType,
}

impl GlobalEntry {
    /// The registry serves the global descriptor when the hash has both `digest` and a
    /// `size` it can parse as an integer (a missing `mediatype` does not matter).
    pub(crate) fn is_live(&self) -> bool {
        matches!(
            self,
            GlobalEntry::Hash {
                has_digest: true,
                size: SizeField::Valid(_)
            }
        )
    }

    pub(crate) fn cached_size(&self) -> Option<i64> {
        match self {
            GlobalEntry::Hash {
                size: SizeField::Valid(s),
                ..
            } => Some(*s),
            _ => None,
        }
    }
}

/// The `repository::<name>::blobs::<digest>` hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RepoHash {
    Absent,
    WithMediatype,
    /// The hash exists without `mediatype`: the registry's HGET finds nothing, a miss.
    WithoutMediatype,
    WrongType,
}

/// One repository's entries for one digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RepoEntry {
    pub repo: u32,
    /// The digest is a member of `repository::<name>::blobs`.
    pub member: bool,
    pub hash: RepoHash,
}

/// One digest's entries: its global descriptor and its repository entries (in
/// repository id order), viewed in the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DigestEntry<'a> {
    pub global: Option<GlobalEntry>,
    pub repos: &'a [RepoEntry],
}

impl DigestEntry<'_> {
    pub(crate) fn global_live(&self) -> bool {
        self.global.is_some_and(|g| g.is_live())
    }

    /// The registry answers a repository-scoped lookup from the cache only when the
    /// digest is in the repository's set, the global descriptor is live, and the
    /// repository hash has a `mediatype` field.
    pub(crate) fn repo_live(&self, entry: &RepoEntry) -> bool {
        entry.member && self.global_live() && entry.hash == RepoHash::WithMediatype
    }
}

/// The fields of a registry hash that matter, as read from Redis or a dump.
#[derive(Debug, Clone, Default)]
pub(crate) struct HashFields<'a> {
    pub digest: Option<&'a [u8]>,
    pub size: Option<&'a [u8]>,
    pub length: Option<&'a [u8]>,
    pub mediatype: Option<&'a [u8]>,
}

/// Counts of what was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ScanCounts {
    /// Registry-shaped keys read.
    pub keys: u64,
    /// Members of repository sets read.
    pub set_members: u64,
    /// Keys of other applications, skipped.
    pub foreign_keys: u64,
}

/// Marks a digest id whose digest is not sha256 (kept in `Digests::long`).
const LONG: u8 = 0x80;
/// An empty slot of `Digests::slots`.
const EMPTY: u32 = u32::MAX;

/// Every digest of the index, interned to a dense `u32` id. A sha256 digest (what the
/// registry writes) is kept as its 32 raw bytes in one flat vector and found again
/// through an open-addressing table of ids, hashed with a random key (so hostile
/// digests cannot collide on purpose); sha384 and sha512 digests, rare, live in a small
/// side table. Per digest a byte of flags holds the global descriptor (and `LONG`).
#[derive(Default)]
struct Digests {
    /// By id: the raw sha256; for a long digest, its index in `long` (first 4 bytes).
    raw: Vec<[u8; 32]>,
    /// By id: `LONG` | the packed `Option<GlobalEntry>` (see `pack_global`).
    flags: Vec<u8>,
    /// By id: the global descriptor's size, when it is valid.
    sizes: Vec<i64>,
    /// Ids of the sha256 digests, `EMPTY` where free; linear probing. Its length is a
    /// power of two, at least twice the number of sha256 digests.
    slots: Vec<u32>,
    sha256: usize,
    hasher: std::hash::RandomState,
    long: Vec<Digest>,
    long_ids: HashMap<Digest, u32>,
}

impl Digests {
    fn len(&self) -> usize {
        self.flags.len()
    }

    /// The slot where `raw` is, or the free slot where it would go.
    fn probe(&self, raw: &[u8; 32]) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.hasher.hash_one(raw) as usize & mask;
        loop {
            let id = self.slots[at];
            if id == EMPTY || &self.raw[id as usize] == raw {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    fn find(&self, d: &Digest) -> Option<u32> {
        match <[u8; 32]>::try_from(d.raw()) {
            Ok(raw) if d.algorithm() == Algorithm::Sha256 => {
                if self.slots.is_empty() {
                    return None;
                }
                let id = self.slots[self.probe(&raw)];
                (id != EMPTY).then_some(id)
            }
            _ => self.long_ids.get(d).copied(),
        }
    }

    /// The id of `d`, given one if it is new.
    fn intern(&mut self, d: &Digest) -> u32 {
        if let Some(id) = self.find(d) {
            return id;
        }
        // Ids are dense: a digest takes at least 45 bytes here, so 2^32 of them
        // would not fit in memory long before the id could overflow.
        let id = self.flags.len() as u32;
        match <[u8; 32]>::try_from(d.raw()) {
            Ok(raw) if d.algorithm() == Algorithm::Sha256 => {
                if (self.sha256 + 1) * 2 > self.slots.len() {
                    self.grow();
                }
                let at = self.probe(&raw);
                self.slots[at] = id;
                self.sha256 += 1;
                self.raw.push(raw);
                self.flags.push(0);
            }
            _ => {
                let mut raw = [0u8; 32];
                raw[..4].copy_from_slice(&(self.long.len() as u32).to_le_bytes());
                self.long.push(*d);
                self.long_ids.insert(*d, id);
                self.raw.push(raw);
                self.flags.push(LONG);
            }
        }
        self.sizes.push(0);
        id
    }

    fn grow(&mut self) {
        let len = (self.slots.len() * 2).max(64);
        self.slots = vec![EMPTY; len];
        for id in 0..self.flags.len() {
            if self.flags[id] & LONG == 0 {
                let at = self.probe(&self.raw[id]);
                self.slots[at] = id as u32;
            }
        }
    }

    fn digest(&self, id: u32) -> Digest {
        let raw = self.raw[id as usize];
        if self.flags[id as usize] & LONG == 0 {
            return Digest::sha256(raw);
        }
        let at = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        self.long[at as usize]
    }

    fn global(&self, id: u32) -> Option<GlobalEntry> {
        unpack_global(self.flags[id as usize] & !LONG, self.sizes[id as usize])
    }

    fn set_global(&mut self, id: u32, g: GlobalEntry) {
        let (code, size) = pack_global(g);
        let at = id as usize;
        self.flags[at] = (self.flags[at] & LONG) | code;
        self.sizes[at] = size;
    }

    fn shrink_to_fit(&mut self) {
        self.raw.shrink_to_fit();
        self.flags.shrink_to_fit();
        self.sizes.shrink_to_fit();
    }
}

/// `Option<GlobalEntry>` as a code below `LONG` and a size: 0 absent, 1 not a hash,
/// else 2 + 3 * has_digest + (0 size missing, 1 valid, 2 invalid).
fn pack_global(g: GlobalEntry) -> (u8, i64) {
    match g {
        GlobalEntry::WrongType => (1, 0),
        GlobalEntry::Hash { has_digest, size } => {
            let (kind, n) = match size {
                SizeField::Missing => (0, 0),
                SizeField::Valid(n) => (1, n),
                SizeField::Invalid => (2, 0),
            };
            (2 + 3 * u8::from(has_digest) + kind, n)
        }
    }
}

fn unpack_global(code: u8, size: i64) -> Option<GlobalEntry> {
    match code {
        0 => None,
        1 => Some(GlobalEntry::WrongType),
        _ => Some(GlobalEntry::Hash {
            has_digest: (code - 2) / 3 == 1,
            size: match (code - 2) % 3 {
                0 => SizeField::Missing,
                1 => SizeField::Valid(size),
                _ => SizeField::Invalid,
            },
        }),
    }
}

/// One repository entry as it was read (a set membership, or a repository hash of
/// this kind), before `Links` merges the ones of each (digest, repository). Packed:
/// 9 bytes, since there are two per repository entry while the cache is read.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct RepoOp {
    digest: u32,
    repo: u32,
    /// `OP_MEMBER`, or the `RepoHash` as `hash_code` gives it.
    op: u8,
}

const OP_MEMBER: u8 = 4;

fn hash_code(h: RepoHash) -> u8 {
    match h {
        RepoHash::Absent => 0,
        RepoHash::WithMediatype => 1,
        RepoHash::WithoutMediatype => 2,
        RepoHash::WrongType => 3,
    }
}

fn hash_of(code: u8) -> RepoHash {
    match code {
        1 => RepoHash::WithMediatype,
        2 => RepoHash::WithoutMediatype,
        3 => RepoHash::WrongType,
        _ => RepoHash::Absent,
    }
}

/// The repository entries of every digest, merged: one flat vector sorted by digest id
/// then repository id, and where each digest's run of it starts.
#[derive(Default)]
struct Links {
    /// `entries[starts[id]..starts[id + 1]]` are digest `id`'s; ids at or past
    /// `starts.len() - 1` (interned after the merge, with no repository entry) have none.
    starts: Vec<u32>,
    entries: Vec<RepoEntry>,
}

impl Links {
    /// Merges `ops` the way entries were recorded one by one: a membership sets
    /// `member`, a repository hash sets `hash` (the last one read wins).
    fn merge(mut ops: Vec<RepoOp>, digests: usize) -> Links {
        // Stable: of two reads of one key, the later stays later.
        ops.sort_by_key(|o| (u64::from(o.digest) << 32) | u64::from(o.repo));
        let same = |a: &RepoOp, b: &RepoOp| a.digest == b.digest && a.repo == b.repo;
        let distinct = ops.windows(2).filter(|w| !same(&w[0], &w[1])).count() + 1;
        let mut links = Links {
            starts: Vec::with_capacity(digests + 1),
            entries: Vec::with_capacity(if ops.is_empty() { 0 } else { distinct }),
        };
        let mut ops = ops.into_iter().peekable();
        for id in 0..digests as u32 {
            // Entries are fewer than reads, which fit in memory: u32 is enough.
            links.starts.push(links.entries.len() as u32);
            while let Some(first) = ops.next_if(|o| o.digest == id) {
                let mut entry = RepoEntry {
                    repo: first.repo,
                    member: false,
                    hash: RepoHash::Absent,
                };
                let mut op = Some(first);
                while let Some(o) = op {
                    match o.op {
                        OP_MEMBER => entry.member = true,
                        code => entry.hash = hash_of(code),
                    }
                    op = ops.next_if(|next| same(next, &first));
                }
                links.entries.push(entry);
            }
        }
        links.starts.push(links.entries.len() as u32);
        links
    }

    fn of(&self, id: u32) -> &[RepoEntry] {
        let at = id as usize;
        match (self.starts.get(at), self.starts.get(at + 1)) {
            (Some(&a), Some(&b)) => &self.entries[a as usize..b as usize],
            _ => &[],
        }
    }

    /// The entries again as reads, in order, so that more can be merged with them.
    fn into_ops(self) -> Vec<RepoOp> {
        let mut ops = Vec::with_capacity(self.entries.len() * 2);
        for (id, w) in self.starts.windows(2).enumerate() {
            for e in &self.entries[w[0] as usize..w[1] as usize] {
                let op = |op| RepoOp {
                    digest: id as u32,
                    repo: e.repo,
                    op,
                };
                if e.member {
                    ops.push(op(OP_MEMBER));
                }
                if e.hash != RepoHash::Absent || !e.member {
                    ops.push(op(hash_code(e.hash)));
                }
            }
        }
        ops
    }
}

/// Every registry-shaped cache entry, indexed by digest, plus the findings about
/// entries that could not be indexed because they are malformed. Compact for millions
/// of keys: digests interned (`Digests`), repository names interned to ids, and the
/// repository entries read as flat 9-byte records, merged into one sorted vector
/// (`Links`) on the first look-up after a write (or at `finish`).
pub(crate) struct CacheIndex {
    /// Only entries of this shard are indexed (and counted).
    shard: Shard,
    repos: Vec<String>,
    repo_ids: HashMap<String, u32>,
    digests: Digests,
    /// Repository entries read since the last merge.
    pending: Mutex<Vec<RepoOp>>,
    /// The merged repository entries, built from `pending` when first needed.
    links: OnceLock<Links>,
    malformed: Vec<Finding>,
    pub counts: ScanCounts,
}

impl std::fmt::Debug for CacheIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheIndex")
            .field("shard", &self.shard)
            .field("repositories", &self.repos.len())
            .field("digests", &self.digests.len())
            .field("malformed", &self.malformed)
            .field("counts", &self.counts)
            .finish()
    }
}

impl Default for CacheIndex {
    fn default() -> CacheIndex {
        CacheIndex::for_shard(Shard::ALL)
    }
}

impl CacheIndex {
    pub(crate) fn new() -> CacheIndex {
        CacheIndex::for_shard(Shard::ALL)
    }

    pub(crate) fn for_shard(shard: Shard) -> CacheIndex {
        CacheIndex {
            shard,
            repos: Vec::new(),
            repo_ids: HashMap::new(),
            digests: Digests::default(),
            pending: Mutex::new(Vec::new()),
            links: OnceLock::new(),
            malformed: Vec::new(),
            counts: ScanCounts::default(),
        }
    }

    /// Whether this shard owns a key of this shape.
    pub(crate) fn owns(&self, shape: &KeyShape) -> bool {
        match shape {
            KeyShape::Global(d) | KeyShape::RepoHash(_, d) => self.shard.owns_digest(d),
            _ => self.shard.owns_unsharded(),
        }
    }

    pub(crate) fn repo_name(&self, id: u32) -> &str {
        &self.repos[id as usize]
    }

    /// Every repository named by an entry, by id.
    pub(crate) fn repo_names(&self) -> &[String] {
        &self.repos
    }

    /// Every digest with an entry, and its entries (in the order digests were first read).
    pub(crate) fn digests(&self) -> impl Iterator<Item = (Digest, DigestEntry<'_>)> {
        let links = self.links();
        (0..self.digests.len() as u32)
            .map(move |id| (self.digests.digest(id), self.view(links, id)))
    }

    /// Every digest id, in the order of the digests (as `Digest` sorts).
    pub(crate) fn sorted_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..self.digests.len() as u32).collect();
        ids.sort_unstable_by_key(|id| self.digests.digest(*id));
        ids
    }

    /// The digest of an id (from `sorted_ids`).
    pub(crate) fn digest_of(&self, id: u32) -> Digest {
        self.digests.digest(id)
    }

    /// The entries of an id (from `sorted_ids`).
    pub(crate) fn entry_of(&self, id: u32) -> DigestEntry<'_> {
        self.view(self.links(), id)
    }

    pub(crate) fn entry(&self, d: &Digest) -> Option<DigestEntry<'_>> {
        let id = self.digests.find(d)?;
        Some(self.view(self.links(), id))
    }

    pub(crate) fn digest_count(&self) -> usize {
        self.digests.len()
    }

    /// Merges what was read and gives back spare capacity: for after a whole read (a
    /// look-up would merge anyway; this only makes the moment, and the memory, known).
    pub(crate) fn finish(&mut self) {
        let _ = self.links();
        self.digests.shrink_to_fit();
    }

    pub(crate) fn into_malformed(self) -> Vec<Finding> {
        self.malformed
    }

    #[cfg(test)]
    pub(crate) fn malformed(&self) -> &[Finding] {
        &self.malformed
    }

    fn view<'a>(&'a self, links: &'a Links, id: u32) -> DigestEntry<'a> {
        DigestEntry {
            global: self.digests.global(id),
            repos: links.of(id),
        }
    }

    fn links(&self) -> &Links {
        self.links.get_or_init(|| {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            Links::merge(std::mem::take(&mut *pending), self.digests.len())
        })
    }

    fn repo_id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.repo_ids.get(name) {
            return id;
        }
        let id = self.repos.len() as u32;
        self.repos.push(name.to_string());
        self.repo_ids.insert(name.to_string(), id);
        id
    }

    /// Records one repository entry read: `op` is `OP_MEMBER` or a `hash_code`.
    fn repo_op(&mut self, repo: &str, d: &Digest, op: u8) {
        let repo = self.repo_id(repo);
        let digest = self.digests.intern(d);
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(links) = self.links.take() {
            // Read more after a look-up: merge again, after what was merged.
            let mut ops = links.into_ops();
            ops.append(pending);
            *pending = ops;
        }
        pending.push(RepoOp { digest, repo, op });
    }

    /// Records one key, whatever it was read from: its shape, its Redis type (`none`
    /// when it vanished meanwhile) and, for a hash, its fields. Returns the repository
    /// when the key is a repository set, whose members the caller adds next.
    pub(crate) fn ingest(
        &mut self,
        key: &[u8],
        shape: KeyShape,
        redis_type: &str,
        fields: &HashFields<'_>,
    ) -> Option<String> {
        let owned = self.owns(&shape);
        if shape == KeyShape::Foreign {
            self.counts.foreign_keys += u64::from(owned);
            return None;
        }
        if !owned {
            // Another shard counts it; a set's members are still this shard's to read.
            return match (shape, redis_type) {
                (KeyShape::RepoSet(repo), "set") => Some(repo),
                _ => None,
            };
        }
        self.counts.keys += 1;
        match shape {
            KeyShape::Foreign => {}
            KeyShape::Malformed { repository, reason } => {
                self.add_malformed_key(key, repository, reason)
            }
            KeyShape::Global(d) => match redis_type {
                "none" => {}
                "hash" => self.add_global(key, d, fields.clone()),
                other => self.add_global_wrong_type(key, d, other),
            },
            KeyShape::RepoSet(repo) => match redis_type {
                "none" => {}
                "set" => return Some(repo),
                other => self.add_set_wrong_type(key, &repo, other),
            },
            KeyShape::RepoHash(repo, d) => {
                let hash = match redis_type {
                    "none" => return None,
                    "hash" if fields.mediatype.is_some() => RepoHash::WithMediatype,
                    "hash" => RepoHash::WithoutMediatype,
                    _ => RepoHash::WrongType,
                };
                self.add_repo_hash(key, &repo, d, hash, redis_type);
            }
        }
        None
    }

    /// Records a malformed registry-shaped key.
    pub(crate) fn add_malformed_key(
        &mut self,
        key: &[u8],
        repository: Option<String>,
        reason: String,
    ) {
        self.malformed
            .push(malformed(None, repository, key, None, reason));
    }

    /// Records a `blobs::<digest>` key of a type other than hash.
    pub(crate) fn add_global_wrong_type(&mut self, key: &[u8], d: Digest, redis_type: &str) {
        let id = self.digests.intern(&d);
        self.digests.set_global(id, GlobalEntry::WrongType);
        self.malformed.push(malformed(
            Some(d),
            None,
            key,
            None,
            format!("is a {redis_type}, not a hash: the registry cannot read it"),
        ));
    }

    /// Records a `blobs::<digest>` hash from its raw fields.
    pub(crate) fn add_global(&mut self, key: &[u8], d: Digest, fields: HashFields<'_>) {
        let size = match fields.size {
            None => SizeField::Missing,
            Some(raw) => match std::str::from_utf8(raw)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(n) => SizeField::Valid(n),
                None => SizeField::Invalid,
            },
        };
        let entry = GlobalEntry::Hash {
            has_digest: fields.digest.is_some(),
            size,
        };
        let live = entry.is_live();
        let mut problems = Vec::new();
        match (size, fields.size) {
            (SizeField::Invalid, Some(raw)) => {
                problems.push(format!("size '{}' is not an integer", finding::escape(raw)))
            }
            (SizeField::Valid(n), _) if n < 0 => problems.push(format!("size {n} is negative")),
            _ => {}
        }
        if let Some(raw) = fields.digest
            && Digest::parse(raw) != Some(d)
        {
            problems.push(format!(
                "digest field '{}' disagrees with the key",
                finding::escape(raw)
            ));
        }
        if !problems.is_empty() {
            let mut f = malformed(Some(d), None, key, None, problems.join("; "));
            f.live = live;
            self.malformed.push(f);
        }
        let _ = fields.length; // the old `length` field alone is a miss: not malformed
        let id = self.digests.intern(&d);
        self.digests.set_global(id, entry);
    }

    /// Records one member of `repository::<repo>::blobs`.
    pub(crate) fn add_member(&mut self, set_key: &[u8], repo: &str, member: &[u8]) {
        let parsed = Digest::parse(member);
        let owned = match &parsed {
            Some(d) => self.shard.owns_digest(d),
            None => self.shard.owns_unsharded(),
        };
        if !owned {
            return;
        }
        self.counts.set_members += 1;
        match parsed {
            Some(d) => self.repo_op(repo, &d, OP_MEMBER),
            None => self.malformed.push(malformed(
                None,
                Some(repo.to_string()),
                set_key,
                Some(member),
                format!("member '{}' is not a valid digest", finding::escape(member)),
            )),
        }
    }

    /// Records a repository set key of a type other than set.
    pub(crate) fn add_set_wrong_type(&mut self, key: &[u8], repo: &str, redis_type: &str) {
        self.malformed.push(malformed(
            None,
            Some(repo.to_string()),
            key,
            None,
            format!("is a {redis_type}, not a set: the registry cannot read it"),
        ));
    }

    /// Records a `repository::<repo>::blobs::<digest>` key.
    pub(crate) fn add_repo_hash(
        &mut self,
        key: &[u8],
        repo: &str,
        d: Digest,
        hash: RepoHash,
        redis_type: &str,
    ) {
        self.repo_op(repo, &d, hash_code(hash));
        if hash == RepoHash::WrongType {
            self.malformed.push(malformed(
                Some(d),
                Some(repo.to_string()),
                key,
                None,
                format!("is a {redis_type}, not a hash: the registry cannot read it"),
            ));
        }
    }
}

fn malformed(
    digest: Option<Digest>,
    repository: Option<String>,
    key: &[u8],
    member: Option<&[u8]>,
    detail: String,
) -> Finding {
    let mut f = Finding::cache(
        Kind::MalformedCacheEntry,
        Severity::Warning,
        false,
        digest,
        repository,
        finding::escape(key),
        detail,
    );
    f.member = member.map(finding::escape);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn d() -> Digest {
        Digest::parse_str(D).expect("digest")
    }

    #[test]
    fn classifies_the_registry_key_shapes() {
        assert_eq!(
            classify(format!("blobs::{D}").as_bytes()),
            KeyShape::Global(d())
        );
        assert_eq!(
            classify(b"repository::team/app::blobs"),
            KeyShape::RepoSet("team/app".into())
        );
        assert_eq!(
            classify(format!("repository::team/app::blobs::{D}").as_bytes()),
            KeyShape::RepoHash("team/app".into(), d())
        );
    }

    #[test]
    fn hostile_keys_are_malformed_and_foreign_keys_are_not_ours() {
        for bad in [
            &b"blobs::sha256:../../etc/passwd"[..],
            b"blobs::",
            b"repository::../../etc::blobs",
            b"repository::\xff::blobs",
            b"repository::a/b::blobs::sha256:zz",
            b"repository::::blobs",
        ] {
            assert!(
                matches!(classify(bad), KeyShape::Malformed { .. }),
                "{}",
                finding::escape(bad)
            );
        }
        for foreign in [
            &b"session:42"[..],
            b"repository::x",
            b"blob::x",
            b"myapp::blobs::x",
        ] {
            assert_eq!(classify(foreign), KeyShape::Foreign);
        }
    }

    #[test]
    fn live_follows_the_registry_lookup() {
        let mut idx = CacheIndex::new();
        let key = format!("blobs::{D}");
        idx.add_global(
            key.as_bytes(),
            d(),
            HashFields {
                digest: Some(D.as_bytes()),
                size: Some(b"12"),
                length: None,
                mediatype: None,
            },
        );
        let set = b"repository::a::blobs";
        idx.add_member(set, "a", D.as_bytes());
        idx.add_member(set, "b", D.as_bytes());
        idx.add_repo_hash(b"k", "a", d(), RepoHash::WithMediatype, "hash");
        idx.add_repo_hash(b"k", "b", d(), RepoHash::WithoutMediatype, "hash");
        idx.add_repo_hash(b"k", "c", d(), RepoHash::WithMediatype, "hash");
        let e = idx.entry(&d()).expect("entry");
        assert!(e.global_live());
        let live: Vec<(String, bool)> = e
            .repos
            .iter()
            .map(|r| (idx.repo_name(r.repo).to_string(), e.repo_live(r)))
            .collect();
        assert_eq!(
            live,
            vec![("a".into(), true), ("b".into(), false), ("c".into(), false)]
        );
        assert!(idx.malformed().is_empty());
    }

    #[test]
    fn unusable_global_fields_are_malformed_and_not_live() {
        let mut idx = CacheIndex::new();
        let key = format!("blobs::{D}");
        idx.add_global(
            key.as_bytes(),
            d(),
            HashFields {
                digest: Some(D.as_bytes()),
                size: Some(b"twelve"),
                length: None,
                mediatype: None,
            },
        );
        assert!(!idx.entry(&d()).expect("entry").global_live());
        assert_eq!(idx.malformed().len(), 1);
        assert!(!idx.malformed()[0].live);

        // Only the old `length` field: a miss, but normal for old entries.
        let mut idx = CacheIndex::new();
        idx.add_global(
            key.as_bytes(),
            d(),
            HashFields {
                digest: Some(D.as_bytes()),
                size: None,
                length: Some(b"12"),
                mediatype: None,
            },
        );
        assert!(!idx.entry(&d()).expect("entry").global_live());
        assert!(idx.malformed().is_empty());

        // A digest field naming another blob is served as it is: live and malformed.
        let mut idx = CacheIndex::new();
        idx.add_global(
            key.as_bytes(),
            d(),
            HashFields {
                digest: Some(b"sha256:0000"),
                size: Some(b"-1"),
                length: None,
                mediatype: None,
            },
        );
        assert_eq!(idx.malformed().len(), 1);
        assert!(idx.malformed()[0].live);
        assert!(idx.malformed()[0].detail.contains("negative"));
    }

    #[test]
    fn reads_after_a_look_up_merge_with_what_was_read() {
        let long = Digest::parse_str(&format!("sha512:{}", "ab".repeat(64))).expect("sha512");
        let mut idx = CacheIndex::new();
        let set = b"repository::a::blobs";
        idx.add_member(set, "a", D.as_bytes());
        idx.add_repo_hash(b"k", "b", long, RepoHash::WithoutMediatype, "hash");
        let e = idx.entry(&d()).expect("entry");
        assert_eq!(e.global, None);
        assert_eq!(e.repos.len(), 1);
        // More read after that look-up: the later read of a hash wins, membership stays.
        idx.add_repo_hash(b"k", "a", d(), RepoHash::WithoutMediatype, "hash");
        idx.add_repo_hash(b"k", "a", d(), RepoHash::WithMediatype, "hash");
        idx.add_repo_hash(b"k", "c", d(), RepoHash::Absent, "none");
        idx.add_member(b"repository::b::blobs", "b", long.to_string().as_bytes());
        idx.add_global_wrong_type(b"k", long, "string");
        idx.finish();
        let a = RepoEntry {
            repo: 0,
            member: true,
            hash: RepoHash::WithMediatype,
        };
        let c = RepoEntry {
            repo: 2,
            member: false,
            hash: RepoHash::Absent,
        };
        assert_eq!(idx.entry(&d()).expect("entry").repos, &[a, c]);
        let e = idx.entry(&long).expect("sha512 entry");
        assert_eq!(e.global, Some(GlobalEntry::WrongType));
        assert_eq!(
            e.repos,
            &[RepoEntry {
                repo: 1,
                member: true,
                hash: RepoHash::WithoutMediatype
            }]
        );
        let all: Vec<Digest> = idx.digests().map(|(d, _)| d).collect();
        assert_eq!(all, vec![d(), long]);
        assert_eq!(idx.digest_count(), 2);
        assert!(idx.entry(&Digest::sha256([7; 32])).is_none());
    }

    #[test]
    fn every_global_entry_round_trips_through_its_packed_form() {
        let sizes = [
            SizeField::Missing,
            SizeField::Invalid,
            SizeField::Valid(0),
            SizeField::Valid(-1),
            SizeField::Valid(i64::MAX),
        ];
        let mut all = vec![GlobalEntry::WrongType];
        for has_digest in [false, true] {
            all.extend(sizes.map(|size| GlobalEntry::Hash { has_digest, size }));
        }
        for g in all {
            let (code, size) = pack_global(g);
            assert!(code != 0 && code & LONG == 0);
            assert_eq!(unpack_global(code, size), Some(g));
        }
    }

    /// What the index costs on ~1M keys (330,000 blobs, each in two repositories'
    /// sets with a repository hash): peak and retained resident memory of this process
    /// while it reads them, per key. Alone, since it reads the process's peak:
    /// `cargo test --lib -- --ignored --exact cache::index::tests::a_million_keys_stay_compact --nocapture`
    #[test]
    #[ignore = "measures the whole process's memory: run alone"]
    fn a_million_keys_stay_compact() {
        fn status(field: &str) -> Option<u64> {
            let text = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = text.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
                .map(|kb| kb * 1024)
        }
        let Some(before) = status("VmRSS:") else {
            return; // not Linux
        };
        const BLOBS: u32 = 330_000;
        let mut idx = CacheIndex::new();
        let mut keys = 0u64;
        for i in 0..BLOBS {
            let raw: [u8; 32] = sha2::Sha256::digest(i.to_le_bytes()).into();
            let digest = Digest::sha256(raw);
            let text = digest.to_string();
            let key = global_key(&digest);
            let fields = HashFields {
                digest: Some(text.as_bytes()),
                size: Some(b"1234"),
                length: None,
                mediatype: Some(b"application/octet-stream"),
            };
            idx.ingest(key.as_bytes(), classify(key.as_bytes()), "hash", &fields);
            keys += 1;
            for r in [i % 1000, (i + 1) % 1000] {
                let repo = format!("team/repo{r}");
                let key = repo_hash_key(&repo, &digest);
                idx.ingest(key.as_bytes(), classify(key.as_bytes()), "hash", &fields);
                idx.add_member(repo_set_key(&repo).as_bytes(), &repo, text.as_bytes());
                keys += 1;
            }
        }
        keys += 1000; // the sets
        idx.finish();
        let e = idx
            .entry(&idx.digests().next().expect("one").0)
            .expect("entry");
        assert!(e.repos.iter().all(|r| e.repo_live(r)) && e.repos.len() == 2);
        let peak = status("VmHWM:").unwrap_or(0).saturating_sub(before);
        let kept = status("VmRSS:").unwrap_or(0).saturating_sub(before);
        println!(
            "{keys} keys, {} digests: peak {:.1} MB ({} bytes per key), retained {:.1} MB ({} bytes per key)",
            idx.digest_count(),
            peak as f64 / 1e6,
            peak / keys,
            kept as f64 / 1e6,
            kept / keys
        );
        assert!(peak / keys <= 100, "peak {peak} bytes for {keys} keys");
    }

    #[test]
    fn bad_members_are_findings_with_the_raw_member() {
        let mut idx = CacheIndex::new();
        idx.add_member(b"repository::a::blobs", "a", b"sha256:\xff..");
        let f = &idx.malformed()[0];
        assert_eq!(f.member.as_deref(), Some("sha256:\\xff.."));
        assert_eq!(f.digest, None);
        assert_eq!(f.repository.as_deref(), Some("a"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Keys of the registry's shapes around arbitrary bytes, and arbitrary bytes.
        fn keys() -> impl Strategy<Value = Vec<u8>> {
            let raw = proptest::collection::vec(any::<u8>(), 0..80);
            (
                0..5usize,
                raw.clone(),
                raw,
                proptest::sample::select(vec![&b"sha256:"[..], b"sha512:", b"", b"::"]),
            )
                .prop_map(|(shape, a, b, alg)| {
                    let mut k = Vec::new();
                    match shape {
                        0 => {}
                        1 => k.extend_from_slice(b"blobs::"),
                        2 | 3 => k.extend_from_slice(b"repository::"),
                        _ => k.extend_from_slice(b"repository::blobs::"),
                    }
                    k.extend_from_slice(&a);
                    if shape == 2 {
                        k.extend_from_slice(b"::blobs");
                    }
                    if shape == 3 {
                        k.extend_from_slice(b"::blobs::");
                        k.extend_from_slice(alg);
                        k.extend_from_slice(&b);
                    }
                    k
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any key is classified without a panic, and an index takes it in.
            #[test]
            fn any_key_is_classified(key in keys(), member in proptest::collection::vec(any::<u8>(), 0..80)) {
                let shape = classify(&key);
                if let KeyShape::Malformed { reason, .. } = &shape {
                    prop_assert!(!reason.is_empty());
                    prop_assert!(!reason.contains('\n'), "one line, escaped");
                }
                let mut index = CacheIndex::new();
                if let Some(repo) = index.ingest(&key, shape, "set", &HashFields::default()) {
                    index.add_member(&key, &repo, &member);
                }
                let _ = index.malformed();
            }
        }
    }
}
