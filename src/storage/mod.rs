//! Read-only access to the registry's storage - its filesystem driver through
//! `filesystem`, object storage through `object` - behind one `Storage` type: where a blob's data and
//! a repository's links live, whether they exist, and opening a blob for hashing. Places
//! in storage are named by their path below `docker/registry/v2/` (a "loc"), built from
//! an already validated `Digest` and repository name; on a filesystem a blob reached
//! through a symlink is opened only when the link resolves inside the root. This module
//! never writes, renames or deletes anything.

pub(crate) mod blobs;
pub(crate) mod filesystem;
pub(crate) mod object;
pub(crate) mod object_spec;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::digest::Digest;
pub(crate) use filesystem::{FsStorage, StorageError};

/// The places in storage that a walk could not list or read (permissions, I/O errors),
/// as (path relative to the root, why). A walk carries on past them; the audit turns
/// them into findings and calls the run incomplete, since what was not read is never
/// sound.
#[derive(Debug, Default)]
pub(crate) struct Unread(Mutex<BTreeMap<String, String>>);

impl Unread {
    pub(crate) fn record(&self, path: String, why: String) {
        tracing::warn!(
            "cannot read {}: {why}",
            crate::finding::escape(path.as_bytes())
        );
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(path)
            .or_insert(why);
    }

    /// Everything recorded so far, sorted by path; the list starts again empty.
    pub(crate) fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

/// What storage says about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobStat {
    /// No data file: the blob is gone (or was never there).
    Absent,
    /// A regular file of this many bytes, last modified at `modified` (nanoseconds
    /// since the epoch).
    Present { size: u64, modified: i128 },
    /// Something is there but cannot be used as blob data.
    Unreadable { reason: String },
}

/// Where the registry keeps its blobs.
#[derive(Debug, Clone)]
pub(crate) enum StorageSpec {
    /// The filesystem driver's `rootdirectory`.
    Fs(PathBuf),
    /// The s3, gcs or azure driver: a bucket or container (and root prefix).
    Object(Box<object::ObjectSpec>),
}

impl StorageSpec {
    /// For reports: the root directory, or the store's URL (`s3://bucket/prefix`, ...).
    pub(crate) fn describe(&self) -> String {
        match self {
            StorageSpec::Fs(p) => p.display().to_string(),
            StorageSpec::Object(s) => s.describe(),
        }
    }
}

/// A registry's storage, opened for reading, whatever the driver.
pub(crate) enum Storage {
    Fs(FsStorage),
    Object(Box<object::ObjectStorage>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Storage {
    pub(crate) fn open(spec: &StorageSpec) -> Result<Storage, String> {
        match spec {
            StorageSpec::Fs(root) => Storage::open_fs(root).map_err(|e| e.to_string()),
            StorageSpec::Object(spec) => {
                object::ObjectStorage::open(spec).map(|o| Storage::Object(Box::new(o)))
            }
        }
    }

    pub(crate) fn open_fs(root: &Path) -> Result<Storage, StorageError> {
        FsStorage::open(root).map(Storage::Fs)
    }

    /// The root directory, or the store's URL (`s3://bucket/prefix`, ...).
    pub(crate) fn describe(&self) -> String {
        match self {
            Storage::Fs(fs) => fs.root().display().to_string(),
            Storage::Object(o) => o.describe(),
        }
    }

    /// `blobs/<alg>/<first two hex>/<hex>/data`
    pub(crate) fn blob_loc(&self, d: &Digest) -> String {
        blob_loc(d)
    }

    pub(crate) fn stat_blob(&self, d: &Digest) -> BlobStat {
        match self {
            Storage::Fs(fs) => fs.stat_blob(d),
            Storage::Object(o) => o.stat_blob(d),
        }
    }

    /// Asks storage again, now (object storage answers `stat_blob` from its listing).
    pub(crate) fn stat_blob_fresh(&self, d: &Digest) -> BlobStat {
        match self {
            Storage::Fs(fs) => fs.stat_blob(d),
            Storage::Object(o) => o.stat_blob_fresh(d),
        }
    }

    pub(crate) fn open_blob(&self, d: &Digest) -> io::Result<Box<dyn io::Read + Send>> {
        match self {
            Storage::Fs(fs) => fs
                .open_blob(d)
                .map(|f| Box::new(f) as Box<dyn io::Read + Send>),
            Storage::Object(o) => o.open_blob(d),
        }
    }

    pub(crate) fn is_linked(&self, repo: &str, d: &Digest) -> bool {
        match self {
            Storage::Fs(fs) => fs.is_linked(repo, d),
            Storage::Object(o) => o.is_linked(repo, d),
        }
    }

    /// A loc as a path relative to the storage root, for reports.
    pub(crate) fn relative(&self, loc: &str) -> String {
        format!("docker/registry/v2/{loc}")
    }

    pub(crate) fn repositories(&self) -> (Vec<String>, Vec<String>) {
        match self {
            Storage::Fs(fs) => fs.repositories(),
            Storage::Object(o) => o.repositories(),
        }
    }

    pub(crate) fn blob_sizes(&self) -> Vec<(Digest, u64)> {
        match self {
            Storage::Fs(fs) => fs.blob_sizes(),
            Storage::Object(o) => o.blob_sizes(),
        }
    }

    /// The link files `<sub>/<alg>/<hex>/link` of a repository, as (loc, alg, hex).
    pub(crate) fn links(&self, repo: &str, sub: &str) -> Vec<(String, String, String)> {
        match self {
            Storage::Fs(fs) => fs
                .links(repo, sub)
                .into_iter()
                .map(|(p, a, h)| (fs.loc_of(&p), a, h))
                .collect(),
            Storage::Object(o) => o.links(repo, sub),
        }
    }

    /// Like [`Storage::links`], but on a filesystem every link directory, listed
    /// without a call per link (a directory without its `link` file shows when the link
    /// is read), as (loc, alg, hex, plain: no symlink on the way, so it may be read with
    /// [`Storage::read_listed`]), and whether everything below was listed; object storage
    /// lists the link objects themselves.
    pub(crate) fn link_dirs(
        &self,
        repo: &str,
        sub: &str,
    ) -> (Vec<(String, String, String, bool)>, bool) {
        match self {
            Storage::Fs(fs) => {
                let (dirs, complete) = fs.link_dirs(repo, sub);
                let dirs = dirs
                    .into_iter()
                    .map(|(p, a, h, plain)| (fs.loc_of(&p), a, h, plain))
                    .collect();
                (dirs, complete)
            }
            Storage::Object(o) => (
                o.links(repo, sub)
                    .into_iter()
                    .map(|(l, a, h)| (l, a, h, true))
                    .collect(),
                true,
            ),
        }
    }

    pub(crate) fn tags(&self, repo: &str) -> Vec<String> {
        match self {
            Storage::Fs(fs) => fs.tags(repo),
            Storage::Object(o) => o.tags(repo),
        }
    }

    /// `repositories/<repo>/_manifests/tags/<tag>/current/link`
    pub(crate) fn tag_link(&self, repo: &str, tag: &str) -> String {
        format!("repositories/{repo}/_manifests/tags/{tag}/current/link")
    }

    pub(crate) fn exists(&self, loc: &str) -> bool {
        match self {
            Storage::Fs(fs) => fs.exists_path(&fs.v2.join(loc)),
            Storage::Object(o) => o.exists(loc),
        }
    }

    /// Tells storage which small objects (links, manifests) are about to be read with
    /// `read_small`, before the next call: object storage fetches them concurrently now,
    /// a filesystem does nothing.
    pub(crate) fn prefetch(&self, locs: &[String], max: u64) {
        if let Storage::Object(o) = self {
            o.prefetch(locs, max);
        }
    }

    pub(crate) fn read_small(&self, loc: &str, max: u64) -> io::Result<Vec<u8>> {
        match self {
            Storage::Fs(fs) => fs.read_small(&fs.v2.join(loc), max),
            Storage::Object(o) => o.read_small(loc, max),
        }
    }

    /// Like [`Storage::read_small`], for a `plain` link of [`Storage::link_dirs`]: on a
    /// filesystem, three calls per file.
    pub(crate) fn read_listed(&self, loc: &str, max: u64) -> io::Result<Vec<u8>> {
        match self {
            Storage::Fs(fs) => fs.read_listed(&fs.v2.join(loc), max),
            Storage::Object(o) => o.read_small(loc, max),
        }
    }

    #[cfg(test)]
    /// The file behind a loc, on a filesystem (for tests that build storage).
    pub(crate) fn fs_path(&self, loc: &str) -> Option<PathBuf> {
        match self {
            Storage::Fs(fs) => Some(fs.v2.join(loc)),
            Storage::Object(_) => None,
        }
    }

    /// Records a place that could not be read (a path relative to the root).
    pub(crate) fn record_unread(&self, path: String, why: String) {
        match self {
            Storage::Fs(fs) => fs.unread.record(path, why),
            Storage::Object(_) => tracing::warn!("cannot read {path}: {why}"),
        }
    }

    /// The places a walk could not read since the last call (see [`Unread`]); object
    /// storage fails the whole run on a listing error instead, so it has none.
    pub(crate) fn take_unread(&self) -> Vec<(String, String)> {
        match self {
            Storage::Fs(fs) => fs.unread.take(),
            Storage::Object(_) => Vec::new(),
        }
    }

    /// Requests and bytes of object storage; `None` on a filesystem.
    pub(crate) fn object_counts(&self) -> Option<crate::summary::ObjectCounts> {
        match self {
            Storage::Fs(_) => None,
            Storage::Object(o) => Some(o.counts()),
        }
    }
}

/// `blobs/<alg>/<first two hex>/<hex>/data`
pub(crate) fn blob_loc(d: &Digest) -> String {
    let hex = d.hex();
    format!("blobs/{}/{}/{hex}/data", d.algorithm().name(), &hex[..2])
}
