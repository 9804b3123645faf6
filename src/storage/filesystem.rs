//! The registry's filesystem driver, read: its root directory opened once, blobs
//! stat-ed and opened (through a symlink only when it resolves inside the root), and
//! repositories, links and tags listed - each directory once, what cannot be listed
//! recorded as unread. It never writes, renames or deletes anything.

use std::collections::HashSet;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use std::os::unix::fs::OpenOptionsExt;

use super::{BlobStat, Unread};
use crate::digest::Digest;

/// A link directory as [`FsStorage::link_dirs`] lists it: (path of its `link`, alg,
/// hex dir, whether no directory on the way is a symlink).
pub(crate) type LinkDir = (PathBuf, String, String, bool);

/// The registry's storage root (`rootdirectory`) on a filesystem, opened for reading.
#[derive(Debug)]
pub(crate) struct FsStorage {
    /// The canonical root directory.
    root: PathBuf,
    /// `<root>/docker/registry/v2`.
    pub(super) v2: PathBuf,
    /// Directories below `v2` already found not to be symlinks (nor under one), so a
    /// million blobs cost two `lstat`s each rather than six.
    plain_dirs: RwLock<HashSet<PathBuf>>,
    /// The same knowledge for the blob directories, by algorithm and first byte:
    /// `blobs`, `blobs/<alg>` and `blobs/<alg>/<xx>` all found to be real directories,
    /// so opening a blob there needs no `lstat` of them (see [`FsStorage::open_fast`]).
    plain_prefixes: Box<[AtomicBool]>,
    /// Places a walk could not read (see [`Unread`]).
    pub(super) unread: Unread,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("storage root {0} does not exist: pass the registry's rootdirectory with --root")]
    MissingRoot(PathBuf),
    #[error("storage root {0} is not a readable directory: {1}")]
    BadRoot(PathBuf, io::Error),
    #[error(
        "no registry storage under {0} (expected docker/registry/v2 inside it): is this the registry's rootdirectory? (a registry that has never stored a blob has none yet: nothing to audit)"
    )]
    NotARegistry(PathBuf),
}

impl FsStorage {
    /// Opens the storage root. A root without `docker/registry/v2` is refused rather than
    /// treated as empty: auditing against the wrong directory would call every cached blob
    /// a phantom.
    pub(crate) fn open(root: &Path) -> Result<FsStorage, StorageError> {
        let canonical = match fs::canonicalize(root) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::MissingRoot(root.to_path_buf()));
            }
            Err(e) => return Err(StorageError::BadRoot(root.to_path_buf(), e)),
        };
        match fs::read_dir(&canonical) {
            Ok(_) => {}
            Err(e) => return Err(StorageError::BadRoot(root.to_path_buf(), e)),
        }
        let v2 = canonical.join("docker/registry/v2");
        if !v2.is_dir() {
            return Err(StorageError::NotARegistry(root.to_path_buf()));
        }
        Ok(FsStorage {
            root: canonical,
            v2,
            plain_dirs: RwLock::new(HashSet::new()),
            plain_prefixes: (0..3 * 256).map(|_| AtomicBool::new(false)).collect(),
            unread: Unread::default(),
        })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// `<v2>/blobs/<alg>/<first two hex>/<hex>/data`
    pub(crate) fn blob_data_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        let alg = digest.algorithm().name();
        // One allocation: this runs for every blob of every run.
        let mut p = std::ffi::OsString::with_capacity(
            self.v2.as_os_str().len() + "/blobs///data".len() + alg.len() + 2 + hex.len() + 8,
        );
        p.push(self.v2.as_os_str());
        for part in ["/blobs/", alg, "/", &hex[..2], "/", &hex, "/data"] {
            p.push(part);
        }
        PathBuf::from(p)
    }

    /// `<v2>/repositories/<name>`; `repo` must be a validated repository name.
    pub(crate) fn repository_path(&self, repo: &str) -> PathBuf {
        self.v2.join("repositories").join(repo)
    }

    /// Existence, type and size of a blob's data, without reading it.
    pub(crate) fn stat_blob(&self, digest: &Digest) -> BlobStat {
        let path = self.blob_data_path(digest);
        match self.checked_metadata(&path) {
            Ok(meta) if meta.is_file() => present(&meta),
            Ok(_) => BlobStat::Unreadable {
                reason: format!("{} is not a regular file", self.relative(&path)),
            },
            Err(e) if is_absent(&e) => BlobStat::Absent,
            Err(e) => {
                // An I/O error (not a symlink refused above) means storage was not read.
                if e.raw_os_error().is_some() {
                    self.unread.record(self.relative(&path), e.to_string());
                }
                BlobStat::Unreadable {
                    reason: format!("{}: {e}", self.relative(&path)),
                }
            }
        }
    }

    /// Opens a blob's data for reading, refusing symlinks that lead outside the root and
    /// anything that is not a regular file.
    pub(crate) fn open_blob(&self, digest: &Digest) -> io::Result<File> {
        let path = self.blob_data_path(digest);
        match self.open_fast(digest, &path) {
            Fast::Absent(e) => Err(e),
            Fast::Opened(f, meta) if meta.is_file() => Ok(f),
            Fast::Opened(_, meta) => Err(not_regular(&meta)),
            Fast::Slow => {
                self.checked_metadata(&path)?;
                open_regular(&path)
            }
        }
    }

    /// What [`FsStorage::stat_blob`] says of a blob, and when it is present, the blob
    /// opened as [`FsStorage::open_blob`] opens it - in one `open` and one `fstat` on
    /// the usual layout (no symlinks), instead of a stat, a second stat and an open.
    /// The size and time of a present blob are those of the open file.
    pub(crate) fn stat_and_open(&self, digest: &Digest) -> (BlobStat, Option<io::Result<File>>) {
        let path = self.blob_data_path(digest);
        match self.open_fast(digest, &path) {
            Fast::Absent(_) => (BlobStat::Absent, None),
            Fast::Opened(f, meta) if meta.is_file() => (present(&meta), Some(Ok(f))),
            Fast::Opened(..) => (
                BlobStat::Unreadable {
                    reason: format!("{} is not a regular file", self.relative(&path)),
                },
                None,
            ),
            Fast::Slow => {
                let st = self.stat_blob(digest);
                let file = matches!(st, BlobStat::Present { .. }).then(|| {
                    self.checked_metadata(&path)?;
                    open_regular(&path)
                });
                (st, file)
            }
        }
    }

    /// The fast way to a blob's data, for the usual layout: when `blobs`, its algorithm
    /// and prefix directories are known to be real directories and the blob's own
    /// directory is one too (one `lstat`), `data` is opened with `O_NOFOLLOW` (a
    /// symlink fails the open rather than being followed), non-blocking (a FIFO never
    /// blocks) and without becoming a controlling terminal, and its type is read from
    /// the open file. Anything else - a symlink anywhere below `v2`, an error other
    /// than "not found" - is `Slow`: the caller takes the path of `checked_metadata`,
    /// which resolves symlinks and keeps only those inside the root, exactly as before.
    fn open_fast(&self, digest: &Digest, path: &Path) -> Fast {
        if !self.plain_prefix(digest, path) {
            return Fast::Slow;
        }
        let Some(hex_dir) = path.parent() else {
            return Fast::Slow;
        };
        match fs::symlink_metadata(hex_dir) {
            Ok(m) if m.is_dir() => {}
            Err(e) if is_absent(&e) => return Fast::Absent(e),
            _ => return Fast::Slow,
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path);
        match file {
            Ok(f) => match f.metadata() {
                Ok(meta) => Fast::Opened(f, meta),
                Err(_) => Fast::Slow,
            },
            Err(e) if is_absent(&e) => Fast::Absent(e),
            Err(_) => Fast::Slow,
        }
    }

    /// Whether `blobs/<alg>/<xx>` and the two directories above it are real
    /// directories (not symlinks); a yes is remembered for the run, as `plain_dirs`.
    fn plain_prefix(&self, digest: &Digest, path: &Path) -> bool {
        let alg = match digest.algorithm() {
            crate::digest::Algorithm::Sha256 => 0,
            crate::digest::Algorithm::Sha384 => 1,
            crate::digest::Algorithm::Sha512 => 2,
        };
        let Some(flag) = self
            .plain_prefixes
            .get(alg * 256 + usize::from(digest.raw()[0]))
        else {
            return false;
        };
        if flag.load(Ordering::Relaxed) {
            return true;
        }
        // data -> hex -> prefix -> alg -> blobs
        let prefix = path.ancestors().nth(2);
        let plain = prefix.is_some_and(|prefix| {
            prefix.ancestors().take(3).all(|d| {
                d.starts_with(&self.v2)
                    && fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_dir())
            })
        });
        if plain {
            flag.store(true, Ordering::Relaxed);
        }
        plain
    }

    /// Whether repository `repo` links `digest` as a layer or as a manifest revision.
    /// An I/O error other than "not found" counts as linked: the audit must not call an
    /// entry wrong on the strength of a permission problem.
    pub(crate) fn is_linked(&self, repo: &str, digest: &Digest) -> bool {
        let base = self.repository_path(repo);
        let alg = digest.algorithm().name();
        let hex = digest.hex();
        let layer = base.join("_layers").join(alg).join(&hex).join("link");
        let revision = base
            .join("_manifests/revisions")
            .join(alg)
            .join(&hex)
            .join("link");
        [layer, revision].iter().any(|p| self.exists_path(p))
    }

    /// Whether something is at `p` (not following a symlink). An error other than "not
    /// found" is recorded as unread and counts as present, so nothing is called missing
    /// on the strength of a permission problem.
    pub(super) fn exists_path(&self, p: &Path) -> bool {
        match fs::symlink_metadata(p) {
            Ok(_) => true,
            Err(e) if is_absent(&e) => false,
            Err(e) => {
                self.unread.record(self.relative(p), e.to_string());
                true
            }
        }
    }

    /// The loc (path below `docker/registry/v2/`) of a path of this storage.
    pub(super) fn loc_of(&self, p: &Path) -> String {
        crate::finding::escape(p.strip_prefix(&self.v2).unwrap_or(p).as_os_str().as_bytes())
    }

    /// The path of `p` relative to the storage root, for reports, in the lossless
    /// escaping of [`crate::finding::escape`].
    pub(crate) fn relative(&self, p: &Path) -> String {
        crate::finding::escape(
            p.strip_prefix(&self.root)
                .unwrap_or(p)
                .as_os_str()
                .as_bytes(),
        )
    }

    /// Every repository, sorted: directories under `repositories/` that hold
    /// `_layers`, `_manifests` or `_uploads`. Names that are not valid repository names
    /// are returned apart (escaped losslessly), so the caller can report them. Symlinked
    /// directories are followed as the registry follows them, but only inside the root;
    /// a directory that cannot be listed is recorded as unread, once.
    pub(crate) fn repositories(&self) -> (Vec<String>, Vec<String>) {
        let base = self.v2.join("repositories");
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let mut walker = walkdir::WalkDir::new(&base)
            .follow_links(true)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| {
                e.file_type().is_dir() && !e.file_name().as_bytes().starts_with(b"_")
            });
        while let Some(entry) = walker.next() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let at = e.path().unwrap_or(&base).to_path_buf();
                    if !e.io_error().is_some_and(is_absent) {
                        self.unread.record(self.relative(&at), e.to_string());
                    }
                    continue;
                }
            };
            let dir = entry.path();
            if entry.path_is_symlink() && !self.inside(dir) {
                walker.skip_current_dir();
                continue;
            }
            if let Err(e) = fs::read_dir(dir) {
                if !is_absent(&e) {
                    self.unread.record(self.relative(dir), e.to_string());
                }
                walker.skip_current_dir();
                continue;
            }
            let mut marked = false;
            for c in ["_layers", "_manifests", "_uploads"] {
                match fs::metadata(dir.join(c)) {
                    Ok(m) if m.is_dir() => marked = true,
                    Ok(_) => {}
                    Err(e) if is_absent(&e) => {}
                    Err(e) => self
                        .unread
                        .record(self.relative(&dir.join(c)), e.to_string()),
                }
            }
            if !marked {
                continue;
            }
            let raw = dir
                .strip_prefix(&base)
                .unwrap_or(dir)
                .as_os_str()
                .as_bytes();
            match std::str::from_utf8(raw) {
                Ok(name) if crate::repo_name::is_valid(name) => good.push(name.to_string()),
                _ => bad.push(crate::finding::escape(raw)),
            }
        }
        good.sort();
        bad.sort();
        (good, bad)
    }

    /// Whether symlinked `p` resolves inside the root; one that leaves it (or leads
    /// nowhere) is recorded as unread: it is never followed out of the root.
    fn inside(&self, p: &Path) -> bool {
        match fs::canonicalize(p) {
            Ok(real) if real.starts_with(&self.root) => true,
            Ok(real) => {
                self.unread.record(
                    self.relative(p),
                    format!(
                        "a symlink that leads outside the storage root, to {}",
                        crate::finding::escape(real.as_os_str().as_bytes())
                    ),
                );
                false
            }
            Err(e) => {
                self.unread.record(self.relative(p), e.to_string());
                false
            }
        }
    }

    /// Every blob in storage with its size: `blobs/<alg>/<xx>/<hex>/data`. Directories
    /// whose names are not a digest are skipped.
    pub(crate) fn blob_sizes(&self) -> Vec<(Digest, u64)> {
        let base = self.v2.join("blobs");
        let mut out = Vec::new();
        for (alg, alg_dir) in self.dir_entries(&base) {
            for (_, prefix_dir) in self.dir_entries(&alg_dir) {
                for (hex, _) in self.dir_entries(&prefix_dir) {
                    let Some(d) = Digest::parse(format!("{alg}:{hex}").as_bytes()) else {
                        continue;
                    };
                    if let BlobStat::Present { size, .. } = self.stat_blob(&d) {
                        out.push((d, size));
                    }
                }
            }
        }
        out
    }

    /// The `link` files under `<repo>/<sub>/<alg>/<hex>/link` that exist, as (path,
    /// alg, hex dir), sorted; `sub` is `_layers` or `_manifests/revisions`.
    pub(crate) fn links(&self, repo: &str, sub: &str) -> Vec<(PathBuf, String, String)> {
        let (dirs, _) = self.link_dirs(repo, sub);
        dirs.into_iter()
            .filter(|(link, ..)| self.exists_path(link))
            .map(|(link, alg, hex, _)| (link, alg, hex))
            .collect()
    }

    /// The link directories `<repo>/<sub>/<alg>/<hex>/`, as (path of their `link`,
    /// alg, hex dir, plain), sorted, and whether they were all listed (nothing below
    /// recorded as unread); `sub` is `_layers` or `_manifests/revisions`. Each directory
    /// is read once and no link is stat-ed here: whether the `link` file is there shows
    /// when it is read. `plain` says that no directory from the root down to the link
    /// is a symlink, so [`FsStorage::read_listed`] may read it without the symlink
    /// checks of [`FsStorage::read_small`].
    pub(crate) fn link_dirs(&self, repo: &str, sub: &str) -> (Vec<LinkDir>, bool) {
        let base = self.repository_path(repo).join(sub);
        let base_plain = self.plain_below_v2(&base);
        let mut complete = true;
        let mut out = Vec::new();
        for (alg, alg_dir, alg_link) in self.dir_entries_flagged(&base, &mut complete) {
            for (hex, hex_dir, hex_link) in self.dir_entries_flagged(&alg_dir, &mut complete) {
                let plain = base_plain && !alg_link && !hex_link;
                out.push((hex_dir.join("link"), alg.clone(), hex, plain));
            }
        }
        (out, complete)
    }

    /// Whether `dir` and every directory between it and `docker/registry/v2` is a plain
    /// directory, not a symlink (one `lstat` each).
    fn plain_below_v2(&self, dir: &Path) -> bool {
        let Ok(rel) = dir.strip_prefix(&self.v2) else {
            return false;
        };
        let mut at = self.v2.clone();
        rel.components().all(|c| {
            at.push(c);
            fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_dir())
        })
    }

    /// The tags of a repository, sorted (a name that is not UTF-8 comes escaped, and so
    /// is never a valid tag).
    pub(crate) fn tags(&self, repo: &str) -> Vec<String> {
        self.dir_entries(&self.repository_path(repo).join("_manifests/tags"))
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// The directories in `dir` as (name, path), sorted by name; a name that is not
    /// UTF-8 comes escaped losslessly (the path keeps its bytes). A symlink to a
    /// directory inside the root counts, as the registry follows it. A missing `dir` has
    /// none; one that cannot be listed, an entry whose type cannot be read, or a symlink
    /// out of the root is recorded as unread.
    fn dir_entries(&self, dir: &Path) -> Vec<(String, PathBuf)> {
        self.dir_entries_flagged(dir, &mut true)
            .into_iter()
            .map(|(name, path, _)| (name, path))
            .collect()
    }

    /// [`FsStorage::dir_entries`], each with whether it is a symlink; `complete` turns
    /// false when anything in `dir` was recorded as unread.
    fn dir_entries_flagged(&self, dir: &Path, complete: &mut bool) -> Vec<(String, PathBuf, bool)> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if is_absent(&e) => return Vec::new(),
            Err(e) => {
                *complete = false;
                self.unread.record(self.relative(dir), e.to_string());
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    *complete = false;
                    self.unread.record(self.relative(dir), e.to_string());
                    continue;
                }
            };
            let path = entry.path();
            let (is_dir, symlink) = match entry.file_type() {
                Ok(t) if t.is_dir() => (true, false),
                Ok(t) if t.is_symlink() => {
                    let inside = self.inside(&path);
                    *complete &= inside;
                    (
                        inside && fs::metadata(&path).is_ok_and(|m| m.is_dir()),
                        true,
                    )
                }
                Ok(_) => (false, false),
                Err(e) => {
                    *complete = false;
                    self.unread.record(self.relative(&path), e.to_string());
                    (false, false)
                }
            };
            if is_dir {
                out.push((
                    crate::finding::escape(entry.file_name().as_bytes()),
                    path,
                    symlink,
                ));
            }
        }
        out.sort();
        out
    }

    /// Reads a small file below the root (a link, a manifest), at most `max` bytes, with
    /// the same symlink rule as blobs.
    pub(crate) fn read_small(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let meta = self.checked_metadata(path)?;
        if !meta.is_file() {
            return Err(not_regular(&meta));
        }
        if meta.len() > max {
            return Err(io::Error::other(format!("larger than {max} bytes")));
        }
        read_bounded(open_regular(path)?, max)
    }

    /// Reads a small file in a directory this run listed itself, with no symlink from
    /// the root down to it (a `plain` link of [`FsStorage::link_dirs`]), at most `max` bytes, in
    /// three calls: an open that neither follows a final symlink nor blocks, one read of
    /// up to `max + 1` bytes, a close. What that read cannot vouch for - a symlink, an
    /// error, content that is empty or over `max` - takes [`FsStorage::read_small`]'s
    /// checked path instead, which names what is there (a FIFO, a directory, a file too
    /// large). Content the caller finds odd deserves the same second look.
    pub(crate) fn read_listed(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            // A symlink, a socket, a device without a driver, ...: the checked way
            // names what is there.
            Err(_) => return self.read_small(path, max),
        };
        let mut out = vec![0u8; usize::try_from(max).unwrap_or(usize::MAX).min(64 * 1024) + 1];
        match io::Read::read(&mut &f, &mut out) {
            // A regular file answers a read with all it has up to the request.
            Ok(n) if n > 0 && (n as u64) <= max && n < out.len() => {
                out.truncate(n);
                Ok(out)
            }
            _ => {
                drop(f);
                self.read_small(path, max)
            }
        }
    }

    /// Metadata of `path` (below the root), following symlinks only when every one of
    /// them resolves inside the root. The fast path costs one `lstat` per component
    /// below `blobs/`; only a symlink triggers a full resolution.
    fn checked_metadata(&self, path: &Path) -> io::Result<Metadata> {
        let meta = fs::symlink_metadata(path)?;
        let mut symlinked = meta.file_type().is_symlink();
        if !symlinked {
            let mut checked = Vec::new();
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == self.v2 || !d.starts_with(&self.v2) {
                    break;
                }
                if self.plain_dirs.read().is_ok_and(|known| known.contains(d)) {
                    break;
                }
                if fs::symlink_metadata(d)?.file_type().is_symlink() {
                    symlinked = true;
                    break;
                }
                checked.push(d.to_path_buf());
                dir = d.parent();
            }
            // Only the directories that hold other entries are worth remembering.
            if !symlinked && let Ok(mut known) = self.plain_dirs.write() {
                known.extend(checked.into_iter().skip(1));
            }
        }
        if !symlinked {
            return Ok(meta);
        }
        let resolved = fs::canonicalize(path)?;
        if !resolved.starts_with(&self.root) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "symlink leads outside the storage root to {}",
                    resolved.display()
                ),
            ));
        }
        fs::metadata(&resolved)
    }
}

/// How [`FsStorage::open_fast`] went.
enum Fast {
    /// Nothing there (the error says what).
    Absent(io::Error),
    /// Opened, with the metadata of the open file (of any type).
    Opened(File, Metadata),
    /// Not the usual layout, or an error: take the careful path.
    Slow,
}

/// A regular file's size and modification time as a present blob.
fn present(meta: &Metadata) -> BlobStat {
    BlobStat::Present {
        size: meta.len(),
        modified: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128),
    }
}

/// Whether an error means "nothing there": not found, or a path through a file.
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Opens a file for reading only if it is a regular file: the open never blocks (a FIFO
/// swapped in after a stat is opened non-blocking, then refused), and the type is
/// checked on the open file itself.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok(f)
}

/// Reads all of `f`, failing past `max` bytes (the size on disk may change meanwhile).
pub(crate) fn read_bounded(f: impl io::Read, max: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    io::Read::read_to_end(&mut f.take(max.saturating_add(1)), &mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(out)
}

fn not_regular(meta: &Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "a {}, not a regular file",
            crate::files::kind_of(&meta.file_type())
        ),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory under the system temp dir, removed on drop.
    pub(crate) struct Scratch(pub PathBuf);
    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "registry-audit-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(p.join("docker/registry/v2/blobs")).expect("scratch dir");
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn digest(c: char) -> Digest {
        Digest::parse_str(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    #[test]
    fn refuses_a_root_that_is_not_a_registry() {
        let s = Scratch::new("notreg");
        assert!(matches!(
            FsStorage::open(&s.0.join("nope")),
            Err(StorageError::MissingRoot(_))
        ));
        assert!(matches!(
            FsStorage::open(&s.0.join("docker")),
            Err(StorageError::NotARegistry(_))
        ));
        assert!(FsStorage::open(&s.0).is_ok());
    }

    #[test]
    fn stats_present_absent_and_odd_blobs() {
        let s = Scratch::new("stat");
        let st = FsStorage::open(&s.0).expect("open");
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        let pa = st.blob_data_path(&a);
        fs::create_dir_all(pa.parent().expect("parent")).expect("mkdir");
        fs::write(&pa, b"hello").expect("write");
        fs::create_dir_all(st.blob_data_path(&c)).expect("dir as data");
        assert!(matches!(
            st.stat_blob(&a),
            BlobStat::Present { size: 5, .. }
        ));
        assert_eq!(st.stat_blob(&b), BlobStat::Absent);
        assert!(matches!(st.stat_blob(&c), BlobStat::Unreadable { .. }));
    }

    #[test]
    fn symlinks_out_of_the_root_are_unreadable() {
        let s = Scratch::new("link");
        let outside = Scratch::new("outside");
        fs::write(outside.0.join("secret"), b"secret").expect("write");
        let st = FsStorage::open(&s.0).expect("open");
        let d = digest('d');
        let p = st.blob_data_path(&d);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(outside.0.join("secret"), &p).expect("symlink");
        assert!(matches!(st.stat_blob(&d), BlobStat::Unreadable { .. }));
        assert!(st.open_blob(&d).is_err());

        // A directory symlink leaving the root is caught too.
        let e = digest('e');
        let hexdir = st.blob_data_path(&e);
        let hexdir = hexdir.parent().expect("hexdir");
        fs::create_dir_all(hexdir.parent().expect("prefix")).expect("mkdir");
        fs::create_dir_all(outside.0.join("dir")).expect("mkdir");
        fs::write(outside.0.join("dir/data"), b"x").expect("write");
        std::os::unix::fs::symlink(outside.0.join("dir"), hexdir).expect("symlink");
        assert!(matches!(st.stat_blob(&e), BlobStat::Unreadable { .. }));

        // A symlink that stays inside the root is followed.
        let f = digest('f');
        let pf = st.blob_data_path(&f);
        fs::create_dir_all(pf.parent().expect("parent")).expect("mkdir");
        fs::write(s.0.join("docker/registry/v2/inside"), b"abc").expect("write");
        std::os::unix::fs::symlink(s.0.join("docker/registry/v2/inside"), &pf).expect("symlink");
        assert!(matches!(
            st.stat_blob(&f),
            BlobStat::Present { size: 3, .. }
        ));
    }

    #[test]
    fn stat_and_open_agrees_with_stat_blob_on_every_kind_of_entry() {
        let s = Scratch::new("statopen");
        let outside = Scratch::new("statopen-out");
        fs::write(outside.0.join("data"), b"secret").expect("write");
        let st = FsStorage::open(&s.0).expect("open");
        let dir_of = |d: &Digest| {
            let p = st.blob_data_path(d);
            fs::create_dir_all(p.parent().expect("parent").parent().expect("prefix"))
                .expect("mkdir");
            p
        };
        let mkdir = |p: &Path| fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        // A regular file, an absent one, a directory as data, a FIFO.
        let (a, b, c, f) = (digest('a'), digest('b'), digest('c'), digest('f'));
        let pa = dir_of(&a);
        mkdir(&pa);
        fs::write(&pa, b"hello").expect("write");
        dir_of(&b);
        fs::create_dir_all(dir_of(&c)).expect("dir as data");
        let pf = dir_of(&f);
        mkdir(&pf);
        let fifo = std::process::Command::new("mkfifo").arg(&pf).status();
        // A data symlink inside the root, one out of it, and a symlinked blob directory.
        let (i, o, h) = (digest('1'), digest('2'), digest('3'));
        fs::write(s.0.join("docker/registry/v2/inside"), b"abc").expect("write");
        let pi = dir_of(&i);
        mkdir(&pi);
        std::os::unix::fs::symlink(s.0.join("docker/registry/v2/inside"), &pi).expect("link");
        let po = dir_of(&o);
        mkdir(&po);
        std::os::unix::fs::symlink(outside.0.join("data"), &po).expect("link");
        let ph = dir_of(&h);
        std::os::unix::fs::symlink(&outside.0, ph.parent().expect("hex")).expect("link");

        for d in [a, b, c, f, i, o, h] {
            if d == f && !fifo.as_ref().is_ok_and(|s| s.success()) {
                continue;
            }
            let (stat, file) = st.stat_and_open(&d);
            assert_eq!(stat, st.stat_blob(&d), "{d}");
            assert_eq!(
                file.is_some(),
                matches!(stat, BlobStat::Present { .. }),
                "{d}"
            );
            if let Some(file) = file {
                let mut f = file.expect("opened");
                let bytes = read_bounded(&mut f, 100).expect("read");
                let BlobStat::Present { size, .. } = stat else {
                    unreachable!()
                };
                assert_eq!(bytes.len() as u64, size);
            }
            assert_eq!(
                st.open_blob(&d).is_ok(),
                matches!(stat, BlobStat::Present { .. }),
                "{d}"
            );
        }
        assert!(matches!(
            st.stat_and_open(&i).0,
            BlobStat::Present { size: 3, .. }
        ));
        assert!(matches!(
            st.stat_and_open(&o).0,
            BlobStat::Unreadable { .. }
        ));
        assert!(matches!(
            st.stat_and_open(&h).0,
            BlobStat::Unreadable { .. }
        ));
        assert_eq!(st.stat_and_open(&b).0, BlobStat::Absent);
    }

    #[test]
    fn links_are_found_as_layer_or_revision() {
        let s = Scratch::new("links");
        let st = FsStorage::open(&s.0).expect("open");
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        let repo = st.repository_path("team/app");
        let l = repo.join("_layers/sha256").join(a.hex());
        fs::create_dir_all(&l).expect("mkdir");
        fs::write(l.join("link"), a.to_string()).expect("write");
        let r = repo.join("_manifests/revisions/sha256").join(b.hex());
        fs::create_dir_all(&r).expect("mkdir");
        fs::write(r.join("link"), b.to_string()).expect("write");
        assert!(st.is_linked("team/app", &a));
        assert!(st.is_linked("team/app", &b));
        assert!(!st.is_linked("team/app", &c));
        assert!(!st.is_linked("other", &a));
    }
}
