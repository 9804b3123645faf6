//! Files the operator names, read and written without harm: every input is read from a
//! regular file only (opened without blocking, so a FIFO or a device never stalls the
//! run), up to a documented number of bytes, and JSON-lines inputs a line at a time with
//! a bound per line; every output is written only over nothing or a regular file, never
//! over a symlink, directory, FIFO, socket or device. This module owns those checks and
//! the messages that name the path and the limit; it knows nothing of what the files
//! hold. Its writes are the reports' and state's: `write_output` and `write_atomically`
//! replace a file through a temporary file in the same directory, only over nothing or
//! a regular file.

use std::fmt;
use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The registry's `config.yml` (`--config`): real ones are a few KiB.
pub(crate) const MAX_CONFIG_BYTES: u64 = MIB;
/// A PEM file: `--ca-cert`, and the Redis TLS certificate, key and root CAs of the config.
pub(crate) const MAX_PEM_BYTES: u64 = MIB;
/// A Docker `config.json` (`--docker-config`), for its credentials.
pub(crate) const MAX_DOCKER_CONFIG_BYTES: u64 = 4 * MIB;
/// A cache dump (`check --cache-dump`) in total: about 200 bytes per key, so room for
/// well over a hundred million keys.
pub(crate) const MAX_DUMP_BYTES: u64 = 32 * GIB;
/// One line of a cache dump: a hash with its fields, or up to 1000 members of a set.
/// `export-cache` never writes a longer one (a set's members are split across lines).
pub(crate) const MAX_DUMP_LINE: usize = 8 * MIB as usize;
/// The verification state (`--state`): about 130 bytes per blob verified.
pub(crate) const MAX_STATE_BYTES: u64 = 2 * GIB;
/// A saved purge plan (`purge --plan-out`, read by `purge --apply`).
pub(crate) const MAX_PLAN_BYTES: u64 = GIB;
/// A purge journal (`restore --journal`) in total.
pub(crate) const MAX_JOURNAL_BYTES: u64 = GIB;
/// One line of a purge journal: the entries of one digest.
pub(crate) const MAX_JOURNAL_LINE: usize = 64 * MIB as usize;
/// A shard report given to `merge`.
pub(crate) const MAX_REPORT_BYTES: u64 = GIB;
/// The output of `registry garbage-collect` given to `probe --gc-log`, in total.
pub(crate) const MAX_GC_LOG_BYTES: u64 = 4 * GIB;
/// One line of a GC log (or of the GC command's output that `gc` passes through):
/// longer lines are cut there.
pub(crate) const MAX_GC_LOG_LINE: usize = MIB as usize;
/// The password line read by `probe --password-stdin` (a token can be a few KiB).
pub(crate) const MAX_PASSWORD_BYTES: usize = 64 * KIB as usize;
/// What is read of a lock file: the holder's pid and start time, a few dozen bytes.
pub(crate) const MAX_LOCK_BYTES: u64 = 4 * KIB;
/// The previous node_exporter textfile, read to keep its last success time.
pub(crate) const MAX_METRICS_BYTES: u64 = MIB;

/// Why an input was not read. Every message names the file and, where one applies, the
/// limit.
#[derive(Debug)]
pub enum ReadError {
    /// The file does not exist (some callers start from nothing then).
    NotFound { what: String, path: String },
    Io {
        what: String,
        path: String,
        error: std::io::Error,
    },
    /// A directory, FIFO, socket or device: never read.
    NotRegular {
        what: String,
        path: String,
        kind: &'static str,
        limit: u64,
    },
    TooLarge {
        what: String,
        path: String,
        limit: u64,
    },
    LineTooLong {
        what: String,
        path: String,
        line: u64,
        limit: u64,
    },
}

impl ReadError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::NotFound { .. })
    }

    /// The file could be read in principle, but not now (permissions, I/O): a caller
    /// with a safe fallback may carry on; a refusal (special file, over a limit) never.
    pub fn is_io(&self) -> bool {
        matches!(self, ReadError::Io { .. } | ReadError::NotFound { .. })
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotFound { what, path } => {
                write!(f, "cannot read {what} {path}: it does not exist")
            }
            ReadError::Io { what, path, error } => write!(f, "cannot read {what} {path}: {error}"),
            ReadError::NotRegular {
                what,
                path,
                kind,
                limit,
            } => write!(
                f,
                "{what} {path} is a {kind}, not a regular file: refusing to read it (the limit is a regular file of at most {})",
                limit_text(*limit)
            ),
            ReadError::TooLarge { what, path, limit } => write!(
                f,
                "{what} {path} is larger than the limit of {}: refusing to read it",
                limit_text(*limit)
            ),
            ReadError::LineTooLong {
                what,
                path,
                line,
                limit,
            } => write!(
                f,
                "{what} {path}: line {line} is longer than the limit of {}: stopped reading there",
                limit_text(*limit)
            ),
        }
    }
}

impl From<ReadError> for String {
    fn from(e: ReadError) -> String {
        e.to_string()
    }
}

/// A limit as text: `1 MiB`, `64 MiB`, `2 GiB`, `4096 bytes`.
pub(crate) fn limit_text(bytes: u64) -> String {
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// What a file type is, in words.
pub(crate) fn kind_of(t: &FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Opens `path` for reading without blocking (a FIFO with no writer would stall a
/// plain open), and accepts it only if it is a regular file of at most `max` bytes.
/// Symlinks are followed: an input may well be a link to the real file.
pub(crate) fn open(what: &str, path: &Path, max: u64) -> Result<(File, Metadata), ReadError> {
    let name = || path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| {
            if error.kind() == ErrorKind::NotFound {
                ReadError::NotFound {
                    what: what.into(),
                    path: name(),
                }
            } else {
                ReadError::Io {
                    what: what.into(),
                    path: name(),
                    error,
                }
            }
        })?;
    let meta = file.metadata().map_err(|error| ReadError::Io {
        what: what.into(),
        path: name(),
        error,
    })?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular {
            what: what.into(),
            path: name(),
            kind: kind_of(&meta.file_type()),
            limit: max,
        });
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            what: what.into(),
            path: name(),
            limit: max,
        });
    }
    Ok((file, meta))
}

/// Reads a whole regular file of at most `max` bytes (see [`open`]); a file that grows
/// past `max` while read is refused too.
pub(crate) fn read(what: &str, path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open(what, path, max)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|error| ReadError::Io {
            what: what.into(),
            path: path.display().to_string(),
            error,
        })?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge {
            what: what.into(),
            path: path.display().to_string(),
            limit: max,
        });
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub(crate) fn read_to_string(what: &str, path: &Path, max: u64) -> Result<String, ReadError> {
    let bytes = read(what, path, max)?;
    String::from_utf8(bytes).map_err(|e| ReadError::Io {
        what: what.into(),
        path: path.display().to_string(),
        error: std::io::Error::new(ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// A file (or a pipe) read a line at a time, with a bound on each line and on the
/// total, so that one endless line cannot exhaust memory.
pub(crate) struct Lines<R> {
    inner: R,
    what: String,
    path: String,
    max_line: usize,
    max_total: u64,
    read: u64,
    line_no: u64,
    buf: Vec<u8>,
}

impl Lines<BufReader<File>> {
    /// Opens a regular file of at most `max_total` bytes (see [`open`]) to read lines of
    /// at most `max_line` bytes.
    pub(crate) fn open(
        what: &str,
        path: &Path,
        max_total: u64,
        max_line: usize,
    ) -> Result<Self, ReadError> {
        let (file, _) = open(what, path, max_total)?;
        Ok(Lines::new(
            BufReader::with_capacity(64 * KIB as usize, file),
            what,
            &path.display().to_string(),
            max_total,
            max_line,
        ))
    }
}

/// What one step of a lenient read gives.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    /// A whole line, without its newline.
    Whole(&'a [u8]),
    /// The first `max_line` bytes of a longer line; the rest was skipped.
    Cut(&'a [u8]),
}

impl<R: BufRead> Lines<R> {
    pub(crate) fn new(inner: R, what: &str, path: &str, max_total: u64, max_line: usize) -> Self {
        Lines {
            inner,
            what: what.into(),
            path: path.into(),
            max_line,
            max_total,
            read: 0,
            line_no: 0,
            buf: Vec::new(),
        }
    }

    /// The next line without its newline (a last line without one counts), or None at
    /// the end. A line longer than the bound, or a total past it, is an error: reading
    /// stops there.
    pub(crate) fn next_line(&mut self) -> Result<Option<&[u8]>, ReadError> {
        match self.step(false)? {
            None => Ok(None),
            Some(false) => Ok(Some(&self.buf)),
            Some(true) => Err(ReadError::LineTooLong {
                what: self.what.clone(),
                path: self.path.clone(),
                line: self.line_no,
                limit: self.max_line as u64,
            }),
        }
    }

    /// Like [`Lines::next_line`], but a line longer than the bound is cut there and the
    /// rest of it skipped, for output that is only shown and scanned for known lines.
    pub(crate) fn next_line_lenient(&mut self) -> Result<Option<Line<'_>>, ReadError> {
        Ok(match self.step(true)? {
            None => None,
            Some(false) => Some(Line::Whole(&self.buf)),
            Some(true) => Some(Line::Cut(&self.buf)),
        })
    }

    /// Reads one line into `buf`; Some(true) when it was longer than the bound (and,
    /// when `skip_rest`, the rest of it was consumed).
    fn step(&mut self, skip_rest: bool) -> Result<Option<bool>, ReadError> {
        self.buf.clear();
        let mut any = false;
        let mut too_long = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(ReadError::Io {
                        what: self.what.clone(),
                        path: self.path.clone(),
                        error,
                    });
                }
            };
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                self.line_no += 1;
                return Ok(Some(too_long));
            }
            any = true;
            let (chunk, used, end) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            let room = self.max_line.saturating_sub(self.buf.len());
            if chunk.len() > room {
                too_long = true;
                self.buf.extend_from_slice(&chunk[..room]);
            } else if !too_long {
                self.buf.extend_from_slice(chunk);
            }
            self.read = self.read.saturating_add(used as u64);
            self.inner.consume(used);
            if self.read > self.max_total {
                return Err(ReadError::TooLarge {
                    what: self.what.clone(),
                    path: self.path.clone(),
                    limit: self.max_total,
                });
            }
            if end {
                self.line_no += 1;
                return Ok(Some(too_long));
            }
            if too_long && !skip_rest {
                self.line_no += 1;
                return Ok(Some(true));
            }
        }
    }
}

/// Refuses to write over anything but a regular file: `path` must not exist, or be a
/// regular file (not a symlink to one - the link would be replaced, not its target).
/// `flag` names the setting in the message (`--output`, `--state`, ...).
pub(crate) fn check_output(flag: &str, path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(format!(
            "{flag} {} is a {}: registry-audit writes only a new file or over a regular file, never over a link, directory, FIFO, socket or device; give another path",
            path.display(),
            kind_of(&m.file_type())
        )),
        // Absent, or not reachable: the write itself says what is wrong.
        Err(_) => Ok(()),
    }
}

/// True for `-`, the name of stdout where a report can go.
pub(crate) fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Opens (creating it if absent) a file the tool keeps open to update in place - the
/// journal (appended to) and the lock - only if it is a regular file: never through a
/// symlink, never blocking on a FIFO.
pub(crate) fn open_regular_for_update(
    flag: &str,
    path: &Path,
    options: &mut OpenOptions,
) -> Result<File, String> {
    check_output(flag, path)?;
    let file = options
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                format!(
                    "{flag} {} is a symbolic link: registry-audit never writes through one; give another path",
                    path.display()
                )
            } else {
                format!("cannot open {flag} {}: {e}", path.display())
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot open {flag} {}: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "{flag} {} is a {}: registry-audit writes only a new file or a regular file; give another path",
            path.display(),
            kind_of(&meta.file_type())
        ));
    }
    Ok(file)
}

/// Writes `text` to stdout (no path, or `-`), or replaces `path` atomically.
pub(crate) fn write_output(text: &str, path: Option<&Path>) -> Result<(), String> {
    let Some(path) = path.filter(|p| !crate::files::is_stdout(p)) else {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| format!("cannot write the report: {e}"));
    };
    write_atomically(path, |f| {
        f.write_all(text.as_bytes())
            .map_err(|e| format!("cannot write the report to {}: {e}", path.display()))
    })
}

/// Replaces `path` with what `fill` writes, atomically: a temporary file in the same
/// directory, synced, then renamed, so a reader never sees half a file. Only a path
/// that is absent or a regular file is replaced - never a symlink, directory, FIFO,
/// socket or device (checked before `fill` runs and again before the rename).
pub(crate) fn write_atomically<T>(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<T, String>,
) -> Result<T, String> {
    crate::files::check_output("output", path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // A new file only: never through whatever a stale temporary name points to.
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
    };
    let created = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by an earlier run with our pid: remove the name (not what it points to).
            let _ = std::fs::remove_file(&tmp);
            create()
        }
        other => other,
    };
    let result = created
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
        .and_then(|mut f| {
            let value = fill(&mut f)?;
            f.sync_all()
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            Ok(value)
        })
        .and_then(|value| {
            crate::files::check_output("output", path)?;
            std::fs::rename(&tmp, path)
                .map(|_| value)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8], max_line: usize) -> Lines<&[u8]> {
        Lines::new(text, "test input", "t", 1 << 20, max_line)
    }

    #[test]
    fn limits_read_as_text() {
        assert_eq!(limit_text(MAX_CONFIG_BYTES), "1 MiB");
        assert_eq!(limit_text(MAX_STATE_BYTES), "2 GiB");
        assert_eq!(limit_text(MAX_LOCK_BYTES), "4 KiB");
        assert_eq!(limit_text(1000), "1000 bytes");
    }

    #[test]
    fn lines_are_bounded() {
        let mut l = lines(b"ab\ncdef\n\nxyz", 4);
        assert_eq!(l.next_line().expect("ok"), Some(&b"ab"[..]));
        assert_eq!(l.next_line().expect("ok"), Some(&b"cdef"[..]));
        assert_eq!(l.next_line().expect("ok"), Some(&b""[..]));
        assert_eq!(l.next_line().expect("ok"), Some(&b"xyz"[..]));
        assert_eq!(l.next_line().expect("ok"), None);
        let mut l = lines(b"ab\ncdefg\nh\n", 4);
        assert!(l.next_line().expect("ok").is_some());
        let err = l.next_line().expect_err("too long");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("4 bytes"), "{err}");
        let mut l = lines(b"ab\ncdefg\nh", 4);
        assert_eq!(l.next_line_lenient().expect("ok"), Some(Line::Whole(b"ab")));
        assert_eq!(l.next_line_lenient().expect("ok"), Some(Line::Cut(b"cdef")));
        assert_eq!(l.next_line_lenient().expect("ok"), Some(Line::Whole(b"h")));
        assert_eq!(l.next_line_lenient().expect("ok"), None);
        let mut l = Lines::new(&b"a\nb\nc\n"[..], "x", "t", 3, 10);
        assert!(l.next_line().expect("ok").is_some());
        assert!(l.next_line().is_err(), "past the total");
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let err = read("test input", Path::new("/dev/zero"), 10).expect_err("device");
        assert!(err.to_string().contains("character device"), "{err}");
        assert!(!err.is_io());
        let dir = std::env::temp_dir();
        let err = read("test input", &dir, 10).expect_err("directory");
        assert!(err.to_string().contains("directory"), "{err}");
        let missing = dir.join(format!("ra-files-missing-{}", std::process::id()));
        assert!(read("x", &missing, 10).expect_err("missing").is_not_found());
        assert!(check_output("--output", &missing).is_ok());
        assert!(check_output("--output", Path::new("/dev/null")).is_err());
        assert!(check_output("--output", &dir).is_err());
        let big = dir.join(format!("ra-files-big-{}", std::process::id()));
        std::fs::write(&big, b"0123456789a").expect("write");
        let err = read("test input", &big, 10).expect_err("too large");
        assert!(err.to_string().contains("10 bytes"), "{err}");
        assert_eq!(read("test input", &big, 11).expect("fits").len(), 11);
        let link = dir.join(format!("ra-files-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&big, &link).expect("symlink");
        assert!(read("test input", &link, 11).is_ok(), "inputs follow links");
        assert!(check_output("--output", &link).is_err(), "outputs never do");
        let err = open_regular_for_update(
            "--journal",
            &link,
            OpenOptions::new().append(true).create(true),
        )
        .expect_err("link");
        assert!(err.contains("symbolic link"), "{err}");
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&big);
    }
}
