//! Storage verification after GC: walks every repository's layer links, manifest
//! revisions and tags, and follows each tagged manifest (OCI image manifest and index,
//! Docker schema 2 manifest and manifest list, schema 1) to every blob it needs, so that
//! a tag that can no longer be pulled is reported with the tag, the manifest and the
//! missing digest. Storage is read as a hostile graph: each manifest digest is read,
//! hashed and parsed at most once per run (memoised), indexes are followed without
//! recursion and without a depth at which they silently stop, and a manifest that cannot
//! be used (not a regular file, unreadable, too large, not JSON, not a manifest, not the
//! content its digest names, cyclic, nested past [`MAX_NESTING`]) is an error finding
//! naming the tag. It is also the one walk of storage a `check` makes ([`walk`]): each
//! link directory is listed once, links are read and blobs stat-ed on a pool of I/O
//! threads (a blob once per run, through `storage::blobs`), and each repository's set of
//! linked digests is kept, so the cache check asks storage nothing twice. It reads
//! storage only and knows nothing about the cache.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::digest::Digest;
use crate::finding::{Finding, Kind, Severity};
use crate::shard::Shard;
use crate::storage::blobs::{BlobListing, BlobTable, LinkSet};
use crate::storage::{BlobStat, Storage};
use crate::summary::VerifyCounts;

/// Manifests larger than this cannot be used (the registry refuses to accept a manifest
/// over 4 MiB).
pub(crate) const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// Link files hold one digest; anything larger is not a link.
pub(crate) const MAX_LINK: u64 = 1024;
/// Links asked of storage at a time (object storage fetches them concurrently).
const PREFETCH: usize = 1024;
/// How many manifests may stand on one chain below a tag (an index of indexes ... of an
/// image manifest). Every level is still followed; a longer chain is a `bad-manifest`
/// finding, since clients give up long before (and only corrupt content nests so).
pub(crate) const MAX_NESTING: u32 = 8;
/// Problems listed one by one under a tag; past it one more finding says how many
/// were left out, so a hostile manifest naming a million missing layers under many
/// tags cannot flood memory or the report.
pub(crate) const MAX_PROBLEMS_PER_TAG: usize = 1000;

/// Verifies all of storage; returns findings (unsorted) and counts.
pub(crate) fn verify(storage: &Storage) -> (Vec<Finding>, VerifyCounts) {
    verify_shard(storage, Shard::ALL)
}

/// Verifies the repositories `shard` owns.
pub(crate) fn verify_shard(storage: &Storage, shard: Shard) -> (Vec<Finding>, VerifyCounts) {
    // Without even one thread to read with, nothing was verified: said, never sound.
    let pool = match io_pool(DEFAULT_IO_THREADS).or_else(|_| io_pool(1)) {
        Ok(pool) => pool,
        Err(e) => {
            let f = Finding::storage(
                Kind::UnreadableStorage,
                Severity::Error,
                None,
                None,
                "docker/registry/v2".to_string(),
                format!("cannot be read ({e}): storage was not verified"),
            );
            return (vec![f], VerifyCounts::default());
        }
    };
    let blobs = BlobTable::new(BlobListing::list(storage, &pool, &AtomicBool::new(false)));
    let w = walk(storage, shard, blobs, &pool, &AtomicBool::new(false));
    (w.findings, w.counts)
}

/// Threads for reading storage's metadata (directory listings, stats, links) when the
/// command line does not say: the work waits on the kernel and the disk, not the CPU,
/// so more threads than cores keep a slow disk or network filesystem busy.
pub(crate) const DEFAULT_IO_THREADS: usize = 16;

/// A pool of `threads` threads for reading storage's metadata.
pub(crate) fn io_pool(threads: usize) -> Result<rayon::ThreadPool, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("storage-{i}"))
        .build()
        .map_err(|e| format!("cannot start {threads} threads to read storage: {e}"))
}

/// What one walk of storage found: the verification's findings and counts, the blob
/// stats it needed (kept for the cache check), and the links of every repository it
/// read completely, so the cache check asks storage nothing twice.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub findings: Vec<Finding>,
    pub counts: VerifyCounts,
    pub blobs: BlobTable,
    /// Per repository read completely: the digests it links, as a layer or a manifest
    /// revision (a link file exists for the digest's directory). A repository missing
    /// here was not read (another shard's, or something below it could not be read),
    /// and is asked about link by link.
    /// The sets are over `blobs`' listing.
    pub links: HashMap<String, LinkSet>,
}

/// Walks the repositories `shard` owns: verification, blob stats and link sets (see
/// [`Walk`]). Links are read and blobs stat-ed on `pool`; the manifests are followed on
/// this thread. When `cancel` is set (the cache could not be read), it stops early.
pub(crate) fn walk(
    storage: &Storage,
    shard: Shard,
    blobs: BlobTable,
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
) -> Walk {
    let mut v = Verifier {
        storage,
        pool,
        blobs,
        nodes: HashMap::new(),
        under: HashMap::new(),
        findings: Vec::new(),
        counts: VerifyCounts::default(),
        followed: HashSet::new(),
        links: HashMap::new(),
    };
    let (repos, bad) = if cancel.load(Ordering::Relaxed) {
        (Vec::new(), Vec::new())
    } else {
        storage.repositories()
    };
    let bad: Vec<String> = if shard.owns_unsharded() {
        bad
    } else {
        Vec::new()
    };
    for name in bad {
        v.findings.push(Finding::storage(
            Kind::BadLink,
            Severity::Error,
            None,
            None,
            format!("docker/registry/v2/repositories/{name}"),
            format!("'{name}' is not a valid repository name; the registry cannot serve it"),
        ));
    }
    // Repositories go in batches of about PREFETCH reads, so object storage fetches the
    // links (and then the manifests) of many small repositories together.
    let owned: Vec<&String> = repos.iter().filter(|r| shard.owns_repository(r)).collect();
    let mut batch: Vec<Read> = Vec::new();
    for repo in owned {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        v.counts.repositories += 1;
        batch.extend(v.reads(repo));
        if batch.len() >= PREFETCH {
            v.batch(std::mem::take(&mut batch));
        }
    }
    v.batch(batch);
    v.findings.extend(unread_findings(storage));
    Walk {
        findings: v.findings,
        counts: v.counts,
        blobs: v.blobs,
        links: v
            .links
            .into_iter()
            .filter_map(|(repo, set)| {
                set.map(|mut set| {
                    set.seal();
                    (repo, set)
                })
            })
            .collect(),
    }
}

/// Whether every place of storage was read: no `unreadable-storage` finding.
pub(crate) fn all_read(findings: &[Finding]) -> bool {
    !findings.iter().any(|f| f.kind == Kind::UnreadableStorage)
}

/// Storage findings as context for another job (`probe`, `gc`): warnings, except what
/// could not be read, which stays an error (the run is incomplete).
pub(crate) fn as_context(findings: &mut [Finding]) {
    for f in findings
        .iter_mut()
        .filter(|f| f.kind != Kind::UnreadableStorage)
    {
        f.severity = Severity::Warning;
    }
}

/// The places of storage that could not be read since the last call, as
/// `unreadable-storage` findings (errors: what was not read is never sound).
pub(crate) fn unread_findings(storage: &Storage) -> Vec<Finding> {
    storage
        .take_unread()
        .into_iter()
        .map(|(path, why)| {
            Finding::storage(
                Kind::UnreadableStorage,
                Severity::Error,
                None,
                None,
                path,
                format!("cannot be read ({why}): what is below it was not checked"),
            )
        })
        .collect()
}

/// Something wrong below a manifest, found once per manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    /// Manifest `via` references `blob`, which is gone.
    Missing { via: Digest, blob: Digest },
    /// Manifest `via` references `blob`, which is there but cannot be read.
    Unreadable {
        via: Digest,
        blob: Digest,
        why: String,
    },
    /// Manifest `via` references manifest `child`, which cannot be used.
    BadChild {
        via: Digest,
        child: Digest,
        why: String,
    },
}

/// One manifest as followed, memoised per digest: why it cannot be used, or its own
/// problems (references to blobs that are gone or unreadable, child manifests that
/// cannot be used, a cycle) and the child manifests below it. Problems are kept where
/// they are found, never copied up the graph, so memory is linear in the distinct
/// manifests and their references.
#[derive(Debug, Default)]
struct Node {
    /// Why the manifest itself cannot be used; `None` when it can.
    bad: Option<String>,
    own: Vec<Problem>,
    children: Vec<Digest>,
    /// Manifests on the longest chain from this one down (1 for an image manifest).
    height: u32,
}

/// What is wrong below a tagged manifest: the first [`MAX_PROBLEMS_PER_TAG`] problems,
/// in the order of a depth-first walk, and how many there are in all.
#[derive(Debug, Default)]
struct Under {
    first: Vec<Problem>,
    total: usize,
}

/// A manifest being followed: its references and how far through them.
struct Frame {
    digest: Digest,
    refs: Vec<Reference>,
    next: usize,
    node: Node,
}

impl Frame {
    fn new(digest: Digest, refs: Vec<Reference>) -> Frame {
        Frame {
            digest,
            refs,
            next: 0,
            node: Node::default(),
        }
    }

    /// Records child manifest `child`, already followed.
    fn child(&mut self, child: Digest, node: &Node) {
        match &node.bad {
            Some(why) => self.node.own.push(Problem::BadChild {
                via: self.digest,
                child,
                why: why.clone(),
            }),
            None => {
                self.node.children.push(child);
                self.node.height = self.node.height.max(node.height);
            }
        }
    }
}

/// What storage holds for a digest, asked once per run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    Present,
    Absent,
    /// Something is there but cannot be used as blob data (not a regular file, an I/O
    /// error: storage records the latter as unread).
    Unreadable(String),
}

/// One link to read: a layer link, a manifest revision link or a tag's current link.
struct Read {
    repo: String,
    path: String,
    /// No symlink on the way to it: it may be read without the symlink checks.
    plain: bool,
    what: LinkKind,
}

enum LinkKind {
    /// A link in `_layers` or `_manifests/revisions`, named after the digest it should
    /// hold (None when the name is not a valid digest).
    Named {
        expected: Option<Digest>,
        kind: Kind,
        severity: Severity,
        what: &'static str,
    },
    Tag(String),
}

struct Verifier<'a> {
    storage: &'a Storage,
    /// Where links are read and blobs stat-ed.
    pool: &'a rayon::ThreadPool,
    /// Blob presence, checked once per digest.
    blobs: BlobTable,
    /// The digests each repository links (see [`Walk::links`]); `None` once something
    /// below the repository's links could not be read.
    links: HashMap<String, Option<LinkSet>>,
    /// Each manifest already followed.
    nodes: HashMap<Digest, Rc<Node>>,
    /// What is wrong below each tagged manifest already checked.
    under: HashMap<Digest, Rc<Under>>,
    findings: Vec<Finding>,
    counts: VerifyCounts,
    /// (repository, manifest) followed from a tag (for the count).
    followed: HashSet<(String, Digest)>,
}

impl Verifier<'_> {
    /// Every link of `repo` to read, in order: layers, revisions, then tags that have one.
    fn reads(&mut self, repo: &str) -> Vec<Read> {
        let storage = self.storage;
        let mut out = Vec::new();
        let mut complete = true;
        for (sub, kind, severity, what) in [
            (
                "_layers",
                Kind::DanglingLayerLink,
                Severity::Warning,
                "layer link",
            ),
            (
                "_manifests/revisions",
                Kind::DanglingManifestRevision,
                Severity::Error,
                "manifest revision",
            ),
        ] {
            let (dirs, listed) = storage.link_dirs(repo, sub);
            complete &= listed;
            for (path, alg, hex, plain) in dirs {
                out.push(Read {
                    repo: repo.to_string(),
                    path,
                    plain,
                    what: LinkKind::Named {
                        expected: Digest::parse(format!("{alg}:{hex}").as_bytes()),
                        kind,
                        severity,
                        what,
                    },
                });
            }
        }
        // The link set is only as good as the listing: with anything unread below the
        // repository's links, the cache check asks storage link by link instead.
        let named = out.len();
        self.links.insert(
            repo.to_string(),
            complete.then(|| LinkSet::with_capacity(named)),
        );
        for tag in storage.tags(repo) {
            self.counts.tags_checked += 1;
            if !crate::repo_name::is_valid_tag(&tag) {
                let mut f = Finding::storage(
                    Kind::BadLink,
                    Severity::Error,
                    None,
                    Some(repo.to_string()),
                    storage.relative(&format!("repositories/{repo}/_manifests/tags/{tag}")),
                    format!("'{tag}' is not a valid tag name; the registry cannot serve it"),
                );
                f.tag = Some(tag);
                self.findings.push(f);
                continue;
            }
            let path = storage.tag_link(repo, &tag);
            if storage.exists(&path) {
                out.push(Read {
                    repo: repo.to_string(),
                    path,
                    plain: false,
                    what: LinkKind::Tag(tag),
                });
            } else {
                // The registry lists the tag (its directory) yet answers 404 for it.
                let mut f = Finding::storage(
                    Kind::DanglingTag,
                    Severity::Error,
                    None,
                    Some(repo.to_string()),
                    storage.relative(&path),
                    format!(
                        "tag {tag} has no current/link: the registry lists it but cannot serve it"
                    ),
                );
                f.tag = Some(tag);
                self.findings.push(f);
            }
        }
        out
    }

    /// Whether storage has blob `d`; an unreadable blob is not "absent".
    fn presence(&mut self, d: &Digest) -> Presence {
        match self.blobs.stat(self.storage, d) {
            BlobStat::Absent => Presence::Absent,
            BlobStat::Present { .. } => Presence::Present,
            BlobStat::Unreadable { reason } => Presence::Unreadable(reason),
        }
    }

    fn has_blob(&mut self, d: &Digest) -> bool {
        self.presence(d) != Presence::Absent
    }

    /// Checks a batch of links: read PREFETCH at a time, then the manifests of the tags
    /// among them, PREFETCH at a time.
    fn batch(&mut self, reads: Vec<Read>) {
        // A repository's reads are never split between batches.
        self.followed.clear();
        let mut tags = Vec::new();
        for window in reads.chunks(PREFETCH) {
            let paths: Vec<String> = window.iter().map(|r| r.path.clone()).collect();
            self.storage.prefetch(&paths, MAX_LINK);
            let contents = self.read_all(window);
            // The blobs the links name, stat-ed together (each once per run).
            let named: Vec<Digest> = window
                .iter()
                .zip(&contents)
                .filter_map(|(r, c)| match (&r.what, c) {
                    (LinkKind::Named { expected, .. }, Some(Ok(_))) => *expected,
                    _ => None,
                })
                .collect();
            self.blobs.stat_all(self.storage, &named, self.pool);
            for (r, content) in window.iter().zip(contents) {
                // The link file is not there: the directory holds no link.
                let Some(content) = content else {
                    continue;
                };
                if content.as_ref().is_err_and(|e| e.raw_os_error().is_some()) {
                    self.links.insert(r.repo.clone(), None);
                }
                match &r.what {
                    LinkKind::Named {
                        expected,
                        kind,
                        severity,
                        what,
                    } => {
                        self.counts.links_checked += 1;
                        if let (Some(e), Some(Some(set))) = (expected, self.links.get_mut(&r.repo))
                        {
                            set.push(self.blobs.listing(), *e);
                        }
                        let Some(d) =
                            self.read_link(&r.repo, &r.path, Some(*expected), None, content)
                        else {
                            continue;
                        };
                        if !self.has_blob(&d) {
                            let detail = if *kind == Kind::DanglingLayerLink {
                                format!(
                                    "{what} to a blob that is gone (garbage collection of distribution 2.8 leaves these; harmless unless a manifest still needs the blob)"
                                )
                            } else {
                                format!(
                                    "{what} to a manifest whose blob is gone: pulls by this digest fail"
                                )
                            };
                            self.findings.push(Finding::storage(
                                *kind,
                                *severity,
                                Some(d),
                                Some(r.repo.clone()),
                                self.storage.relative(&r.path),
                                detail,
                            ));
                        }
                    }
                    LinkKind::Tag(tag) => {
                        if let Some(manifest) =
                            self.read_link(&r.repo, &r.path, None, Some(tag), content)
                        {
                            tags.push((r, tag, manifest));
                        }
                    }
                }
            }
        }
        for window in tags.chunks(PREFETCH) {
            let unread: BTreeSet<Digest> = window
                .iter()
                .map(|t| t.2)
                .filter(|m| !self.nodes.contains_key(m))
                .collect();
            let locs: Vec<String> = unread.iter().map(|m| self.storage.blob_loc(m)).collect();
            self.storage.prefetch(&locs, MAX_MANIFEST);
            for (r, tag, manifest) in window {
                self.tag(&r.repo, tag, &r.path, *manifest);
            }
        }
    }

    /// Checks one tag that resolved to `manifest`: its blob, and every blob under it.
    fn tag(&mut self, repo: &str, tag: &str, path: &str, manifest: Digest) {
        if !self.has_blob(&manifest) {
            let mut f = Finding::storage(
                Kind::DanglingTag,
                Severity::Error,
                Some(manifest),
                Some(repo.to_string()),
                self.storage.relative(path),
                format!(
                    "tag {tag} points to manifest {manifest}, whose blob is gone: the tag cannot be pulled"
                ),
            );
            f.tag = Some(tag.to_string());
            self.findings.push(f);
            return;
        }
        if self.followed.insert((repo.to_string(), manifest)) {
            self.counts.tagged_manifests_checked += 1;
        }
        let below = self.follow(manifest);
        let under = self.under(manifest);
        let storage = self.storage;
        let finding = |kind, digest, via: Option<Digest>, detail: String| {
            let mut f = Finding::storage(
                kind,
                Severity::Error,
                Some(digest),
                Some(repo.to_string()),
                storage.relative(path),
                detail,
            );
            f.tag = Some(tag.to_string());
            f.manifest = via;
            f
        };
        if let Some(why) = &below.bad {
            self.findings.push(finding(
                Kind::BadManifest,
                manifest,
                Some(manifest),
                format!(
                    "tag {tag} points to manifest {manifest}, which cannot be used ({why}): the tag cannot be pulled"
                ),
            ));
            return;
        }
        if below.height > MAX_NESTING {
            self.findings.push(finding(
                Kind::BadManifest,
                manifest,
                Some(manifest),
                format!(
                    "tag {tag}: manifests nest {} deep below {manifest}, past the limit of {MAX_NESTING}: the tag cannot be pulled",
                    below.height
                ),
            ));
        }
        let mut found = Vec::new();
        for p in &under.first {
            found.push(match p {
                Problem::Missing { via, blob } => finding(
                    Kind::MissingReferencedBlob,
                    *blob,
                    Some(*via),
                    format!(
                        "tag {tag}: manifest {via} references {blob}, whose blob is gone: the image cannot be pulled"
                    ),
                ),
                Problem::Unreadable { via, blob, why } => finding(
                    Kind::UnreadableBlob,
                    *blob,
                    Some(*via),
                    format!(
                        "tag {tag}: manifest {via} references {blob}, whose blob cannot be read ({why}): the image cannot be pulled"
                    ),
                ),
                Problem::BadChild { via, child, why } => finding(
                    Kind::BadManifest,
                    *child,
                    Some(*via),
                    format!(
                        "tag {tag}: manifest {via} references manifest {child}, which cannot be used ({why}): the image cannot be pulled"
                    ),
                ),
            });
        }
        if under.total > under.first.len() {
            let mut f = finding(
                Kind::MissingReferencedBlob,
                manifest,
                Some(manifest),
                format!(
                    "tag {tag}: {} more problems below manifest {manifest} are not listed (the first {MAX_PROBLEMS_PER_TAG} are): the image cannot be pulled",
                    under.total - under.first.len()
                ),
            );
            f.digest = None;
            found.push(f);
        }
        self.findings.extend(found);
    }

    /// The content of every link of `window`, read on the pool: `None` when the link
    /// file is not there at all (its directory holds no link), nothing read for a
    /// directory not named after a digest (`Ok` empty: only its name is reported).
    fn read_all(&self, window: &[Read]) -> Vec<Option<io::Result<Vec<u8>>>> {
        let storage = self.storage;
        self.pool.install(|| {
            window
                .par_iter()
                .map(|r| {
                    let unnamed = matches!(r.what, LinkKind::Named { expected: None, .. });
                    let content = match r.what {
                        LinkKind::Named { expected: None, .. } => Ok(Vec::new()),
                        // With a symlink on the way, the checked read.
                        LinkKind::Named { .. } if !r.plain => storage.read_small(&r.path, MAX_LINK),
                        // Content that is not a digest is read again the checked way,
                        // which tells a regular file from anything else.
                        LinkKind::Named { .. } => match storage.read_listed(&r.path, MAX_LINK) {
                            Ok(c) if Digest::parse(&c).is_none() => {
                                storage.read_small(&r.path, MAX_LINK)
                            }
                            other => other,
                        },
                        LinkKind::Tag(_) => storage.read_small(&r.path, MAX_LINK),
                    };
                    match content {
                        // Not found, yet something is there (a symlink that leads
                        // nowhere): read_link reports it.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            storage.exists(&r.path).then_some(Err(e))
                        }
                        Ok(_) if unnamed && !storage.exists(&r.path) => None,
                        other => Some(other),
                    }
                })
                .collect()
        })
    }

    /// Reads a link; reports it as `bad-link` when it is not exactly a digest (the
    /// registry does not trim a link: whitespace around the digest makes it answer 500),
    /// or not the one its path names. A link that cannot be read for an I/O reason is
    /// unread storage (the run is incomplete), not a bad link.
    fn read_link(
        &mut self,
        repo: &str,
        path: &str,
        expected: Option<Option<Digest>>,
        tag: Option<&str>,
        content: io::Result<Vec<u8>>,
    ) -> Option<Digest> {
        let bad = |v: &mut Self, why: String| {
            let mut f = Finding::storage(
                Kind::BadLink,
                Severity::Error,
                expected.flatten(),
                Some(repo.to_string()),
                v.storage.relative(path),
                why,
            );
            f.tag = tag.map(str::to_string);
            v.findings.push(f);
            None
        };
        if expected == Some(None) {
            return bad(
                self,
                "the link's directory is not named after a valid digest".into(),
            );
        }
        let content = match content {
            Ok(c) => c,
            Err(e) if e.raw_os_error().is_some() => {
                self.storage
                    .record_unread(self.storage.relative(path), e.to_string());
                return None;
            }
            Err(e) => return bad(self, format!("link cannot be read: {e}")),
        };
        let Some(d) = Digest::parse(&content) else {
            let why = if Digest::parse(content.trim_ascii()).is_some() {
                "a digest with white space around it, which the registry cannot parse"
            } else {
                "not a digest"
            };
            return bad(
                self,
                format!("link holds '{}', {why}", crate::finding::escape(&content)),
            );
        };
        match expected {
            Some(Some(e)) if e != d => bad(self, format!("link holds {d} but its path names {e}")),
            _ => Some(d),
        }
    }

    /// Follows `root` and every manifest below it, depth first with an explicit stack
    /// (no recursion, so no depth overflows), loading each manifest once per run. A
    /// manifest met again on its own path is a cycle, which only corrupt content forms.
    fn follow(&mut self, root: Digest) -> Rc<Node> {
        if let Some(n) = self.nodes.get(&root) {
            return n.clone();
        }
        let mut stack = match self.load(root) {
            Ok(refs) => vec![Frame::new(root, refs)],
            Err(bad) => return self.remember(root, bad),
        };
        let mut on_path: HashSet<Digest> = HashSet::from([root]);
        while let Some(top) = stack.last_mut() {
            let Some(r) = top.refs.get(top.next).cloned() else {
                let Some(mut done) = stack.pop() else {
                    break;
                };
                on_path.remove(&done.digest);
                done.node.height += 1;
                let node = Rc::new(done.node);
                self.nodes.insert(done.digest, node.clone());
                match stack.last_mut() {
                    Some(parent) => parent.child(done.digest, &node),
                    None => return node,
                }
                continue;
            };
            top.next += 1;
            let via = top.digest;
            let presence = self.presence(&r.digest);
            let Some(top) = stack.last_mut() else {
                break;
            };
            match presence {
                Presence::Absent => top.node.own.push(Problem::Missing {
                    via,
                    blob: r.digest,
                }),
                Presence::Unreadable(why) => top.node.own.push(Problem::Unreadable {
                    via,
                    blob: r.digest,
                    why,
                }),
                Presence::Present if !r.is_manifest => {}
                Presence::Present if on_path.contains(&r.digest) => {
                    top.node.own.push(Problem::BadChild {
                        via,
                        child: r.digest,
                        why: format!(
                            "it references {} again, a cycle only corrupt content can form",
                            r.digest
                        ),
                    })
                }
                Presence::Present => {
                    if let Some(known) = self.nodes.get(&r.digest).cloned() {
                        top.child(r.digest, &known);
                    } else {
                        match self.load(r.digest) {
                            Ok(refs) => {
                                on_path.insert(r.digest);
                                stack.push(Frame::new(r.digest, refs));
                            }
                            Err(bad) => {
                                let node = self.remember(r.digest, bad);
                                if let Some(top) = stack.last_mut() {
                                    top.child(r.digest, &node);
                                }
                            }
                        }
                    }
                }
            }
        }
        self.nodes.get(&root).cloned().unwrap_or_default()
    }

    /// The problems below followed manifest `root`, each manifest visited once: the
    /// first [`MAX_PROBLEMS_PER_TAG`] in walk order, and the count of all.
    fn under(&mut self, root: Digest) -> Rc<Under> {
        if let Some(u) = self.under.get(&root) {
            return u.clone();
        }
        let mut under = Under::default();
        let mut seen: HashSet<Digest> = HashSet::from([root]);
        let mut todo = vec![root];
        while let Some(d) = todo.pop() {
            let Some(node) = self.nodes.get(&d) else {
                continue;
            };
            under.total += node.own.len();
            let room = MAX_PROBLEMS_PER_TAG.saturating_sub(under.first.len());
            under.first.extend(node.own.iter().take(room).cloned());
            for c in node.children.iter().rev() {
                if seen.insert(*c) {
                    todo.push(*c);
                }
            }
        }
        under.first.sort();
        under.first.dedup();
        let under = Rc::new(under);
        self.under.insert(root, under.clone());
        under
    }

    /// Memoises a manifest that cannot be used.
    fn remember(&mut self, d: Digest, why: String) -> Rc<Node> {
        let node = Rc::new(Node {
            bad: Some(why),
            ..Node::default()
        });
        self.nodes.insert(d, node.clone());
        node
    }

    /// Reads manifest `d` (at most [`MAX_MANIFEST`] bytes, a regular file only), checks
    /// that it hashes to `d`, and parses its references; `Err` says why it cannot be used.
    /// An I/O error is also recorded as unread storage.
    fn load(&mut self, d: Digest) -> Result<Vec<Reference>, String> {
        let loc = self.storage.blob_loc(&d);
        let bytes = match self.storage.read_small(&loc, MAX_MANIFEST) {
            Ok(b) => b,
            Err(e) => {
                if e.raw_os_error().is_some() || e.kind() == io::ErrorKind::PermissionDenied {
                    self.storage
                        .record_unread(self.storage.relative(&loc), e.to_string());
                }
                return Err(format!("its blob cannot be read: {e}"));
            }
        };
        let mut buf = [0u8; 8192];
        match crate::audit::rehash::hash_reader(d.algorithm(), &mut &bytes[..], &mut buf) {
            Ok((actual, _)) if actual == d => {}
            Ok((actual, _)) => {
                return Err(format!(
                    "its content does not hash to its digest but to {actual}"
                ));
            }
            Err(e) => return Err(format!("it cannot be hashed: {e}")),
        }
        parse_manifest(&bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    pub digest: Digest,
    pub is_manifest: bool,
}

/// A field of a JSON object as Go's decoder (the registry's, and clients') finds it:
/// the exact key, else any key equal to it ignoring ASCII case.
fn field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a serde_json::Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// Media types of the manifests the registry serves (distribution 2.8 and 3).
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The references of a manifest as the registry reads one back from storage: by
/// `schemaVersion` (1, or 2 with the `mediaType` of a Docker or OCI manifest or index; an
/// OCI document without `mediaType` is an index when it has `manifests`). Foreign layers
/// (`urls` set, or a non-distributable or foreign media type) are not expected in
/// storage and are skipped. `Err` says why the bytes are not a manifest the registry
/// would serve.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Vec<Reference>, String> {
    use serde_json::Value;
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let not = |why: String| Err(format!("not a manifest: {why}"));
    let Some(obj) = doc.as_object() else {
        return not("not a JSON object".into());
    };
    let media = match field(obj, "mediaType") {
        None => "",
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return not("mediaType is not a string".into()),
    };
    let mut out = Vec::new();
    let mut descriptors = |field: &str, is_manifest: bool, required: bool| -> Result<(), String> {
        let list: Vec<&Value> = match (field, self::field(obj, field)) {
            ("config", Some(v)) => vec![v],
            (_, Some(Value::Array(a))) => a.iter().collect(),
            (_, None) if !required => Vec::new(),
            (_, None) => return Err(format!("not a manifest: no {field}")),
            (_, Some(_)) => return Err(format!("not a manifest: {field} is not a list")),
        };
        for (i, v) in list.into_iter().enumerate() {
            let key = if field == "fsLayers" {
                "blobSum"
            } else {
                "digest"
            };
            let Some(desc) = v.as_object() else {
                return Err(format!("not a manifest: {field}[{i}] is not an object"));
            };
            let kind = self::field(desc, "mediaType")
                .and_then(Value::as_str)
                .unwrap_or("");
            let foreign = kind.contains("foreign") || kind.contains("nondistributable");
            let has_urls = self::field(desc, "urls")
                .and_then(Value::as_array)
                .is_some_and(|u| !u.is_empty());
            if foreign || has_urls {
                continue;
            }
            let Some(digest) = self::field(desc, key)
                .and_then(Value::as_str)
                .and_then(Digest::parse_str)
            else {
                return Err(format!("not a manifest: {field}[{i}] has no valid {key}"));
            };
            out.push(Reference {
                digest,
                is_manifest,
            });
        }
        Ok(())
    };
    match field(obj, "schemaVersion").and_then(Value::as_i64) {
        Some(1) => descriptors("fsLayers", false, true)?,
        Some(2) => {
            let index = match media {
                DOCKER_LIST | OCI_INDEX => true,
                DOCKER_MANIFEST | OCI_MANIFEST => false,
                "" => field(obj, "manifests").is_some(),
                other => {
                    return not(format!(
                        "unknown mediaType '{}'",
                        crate::finding::escape(other.as_bytes())
                    ));
                }
            };
            if index {
                descriptors("manifests", true, true)?;
            } else {
                descriptors("config", false, true)?;
                descriptors("layers", false, false)?;
            }
        }
        Some(v) => return not(format!("schemaVersion {v}")),
        None => return not("no schemaVersion".into()),
    }
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_image_manifests_indexes_and_schema1() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}","urls":["http://x"]}},{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}"}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let parse_references = |b: &[u8]| parse_manifest(b).unwrap_or_default();
        let refs = parse_references(image.as_bytes());
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert!(refs.iter().all(|r| !r.is_manifest));

        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b')
        );
        let refs = parse_references(index.as_bytes());
        assert_eq!(refs.len(), 2);
        assert!(refs.iter().all(|r| r.is_manifest));

        let schema1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}}]}}"#,
            d('f')
        );
        assert_eq!(parse_references(schema1.as_bytes()).len(), 1);
        assert!(parse_references(b"not json").is_empty());
    }

    /// JSON shaped like manifests: the keys the parser looks at, nested and mixed with
    /// values of every type.
    fn manifest_like() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let digest = prop_oneof![
            Just(format!("sha256:{}", "a".repeat(64))),
            Just(format!("sha512:{}", "b".repeat(128))),
            "[a-z0-9:]{0,80}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            prop_oneof![Just(1i64), Just(2)].prop_map(Value::from),
            digest.prop_map(Value::String),
            prop_oneof![
                Just(DOCKER_MANIFEST),
                Just(DOCKER_LIST),
                Just(OCI_MANIFEST),
                Just(OCI_INDEX),
                Just("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            ]
            .prop_map(|m| Value::String(m.into())),
        ];
        let key = prop_oneof![
            Just("schemaVersion"),
            Just("mediaType"),
            Just("manifests"),
            Just("config"),
            Just("layers"),
            Just("fsLayers"),
            Just("digest"),
            Just("blobSum"),
            Just("urls"),
            Just("other"),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Arbitrary bytes: a manifest's references, or a reason; never a panic.
        #[test]
        fn arbitrary_bytes_parse_or_say_why(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            match parse_manifest(&bytes) {
                Ok(refs) => proptest::prop_assert!(refs.len() <= bytes.len()),
                Err(why) => proptest::prop_assert!(why.starts_with("not ")),
            }
        }

        /// Manifest-shaped JSON reaches every branch of the parser: references are
        /// valid digests, or the reason says what is not a manifest.
        #[test]
        fn manifest_shaped_json_parses_or_says_why(doc in manifest_like()) {
            let bytes = serde_json::to_vec(&doc).unwrap_or_default();
            match parse_manifest(&bytes) {
                Ok(refs) => {
                    for r in refs {
                        proptest::prop_assert!(Digest::parse_str(&r.digest.to_string()).is_some());
                    }
                }
                Err(why) => proptest::prop_assert!(why.starts_with("not a manifest") || why.starts_with("not JSON")),
            }
        }

        /// A link file's bytes: a digest, or nothing; never a panic.
        #[test]
        fn arbitrary_link_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Some(d) = Digest::parse(bytes.trim_ascii()) {
                let text = d.to_string();
                proptest::prop_assert_eq!(text.as_bytes(), bytes.trim_ascii());
            }
        }

        /// Whatever a name holds, the terminal form has no control character and the
        /// JSON form gives back every byte.
        #[test]
        fn names_are_escaped_for_terminal_and_json(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let json = crate::finding::escape(&bytes);
            proptest::prop_assert_eq!(crate::finding::unescape(&json), Some(bytes.clone()));
            let shown = crate::finding::terminal_safe(&String::from_utf8_lossy(&bytes));
            proptest::prop_assert!(!shown.chars().any(char::is_control));
        }
    }
}
