//! The verification state kept between runs (`--state FILE`): for each blob verified,
//! its size, modification time and when it was verified, so later runs re-hash only
//! blobs that are new, changed or due again. The file is replaced atomically, saved
//! during long runs so a crash keeps the progress, and a corrupt or foreign file
//! (another storage root, another format) is reported and rebuilt, never trusted. It
//! reads and writes only its own file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub(crate) const FORMAT: &str = "registry-audit-state";
pub(crate) const VERSION: u32 = 1;
/// How often a long run saves its progress.
const SAVE_EVERY: Duration = Duration::from_secs(15);

/// What was known of a blob when it was last verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub modified: i128,
    /// When it was verified, seconds since the epoch.
    pub verified_at: u64,
}

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    version: u32,
    storage_root: String,
    blobs: BTreeMap<String, Entry>,
}

pub(crate) struct State {
    path: PathBuf,
    storage_root: String,
    entries: Mutex<HashMap<Digest, Entry>>,
    last_save: Mutex<Instant>,
}

impl State {
    /// Loads the state for `storage_root`; a missing file is an empty state, a corrupt
    /// or foreign one (or one that cannot be read now) is an empty state plus a warning
    /// to report. A path that is not a regular file, or a file larger than
    /// `files::MAX_STATE_BYTES`, is an error: it is neither read nor later replaced.
    pub(crate) fn load(path: &Path, storage_root: &str) -> Result<(State, Option<String>), String> {
        let (entries, warning) =
            match crate::files::read("state", path, crate::files::MAX_STATE_BYTES) {
                Err(e) if e.is_not_found() => (HashMap::new(), None),
                Err(e) if e.is_io() => (HashMap::new(), Some(format!("{e}; starting afresh"))),
                Err(e) => return Err(e.to_string()),
                Ok(bytes) => parse(path, &bytes, storage_root),
            };
        Ok((
            State {
                path: path.to_path_buf(),
                storage_root: storage_root.to_string(),
                entries: Mutex::new(entries),
                last_save: Mutex::new(Instant::now()),
            },
            warning,
        ))
    }

    /// True when the blob was verified with this size and modification time, less than
    /// `reverify_after` before `now`.
    pub(crate) fn trusts(
        &self,
        d: &Digest,
        size: u64,
        modified: i128,
        now: u64,
        reverify_after: Duration,
    ) -> bool {
        let Ok(entries) = self.entries.lock() else {
            return false;
        };
        entries.get(d).is_some_and(|e| {
            e.size == size
                && e.modified == modified
                && now.saturating_sub(e.verified_at) < reverify_after.as_secs().max(1)
                && reverify_after > Duration::ZERO
        })
    }

    pub(crate) fn record(&self, d: Digest, entry: Entry) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(d, entry);
        }
    }

    pub(crate) fn forget(&self, d: &Digest) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(d);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.lock().map(|e| e.is_empty()).unwrap_or(true)
    }

    /// Saves when the last save is long enough ago; called while hashing, so a crash
    /// loses at most a few seconds of work.
    pub(crate) fn maybe_save(&self) {
        let due = match self.last_save.try_lock() {
            Ok(mut last) if last.elapsed() >= SAVE_EVERY => {
                *last = Instant::now();
                true
            }
            _ => false,
        };
        if due && let Err(e) = self.save() {
            tracing::warn!("{e}");
        }
    }

    /// Replaces the file atomically with the current state.
    pub(crate) fn save(&self) -> Result<(), String> {
        let blobs: BTreeMap<String, Entry> = match self.entries.lock() {
            Ok(entries) => entries.iter().map(|(d, e)| (d.to_string(), *e)).collect(),
            Err(_) => return Err("state lock poisoned".into()),
        };
        let file = File {
            format: FORMAT.into(),
            version: VERSION,
            storage_root: self.storage_root.clone(),
            blobs,
        };
        crate::files::write_atomically(&self.path, |f| {
            let mut w = std::io::BufWriter::new(f);
            serde_json::to_writer(&mut w, &file)
                .map_err(|e| e.to_string())
                .and_then(|_| w.flush().map_err(|e| e.to_string()))
                .map_err(|e| format!("cannot write state {}: {e}", self.path.display()))
        })
    }
}

/// The entries of a state file's bytes, for `storage_root`; anything but a sound state
/// of that root gives no entries and a warning (`path` names the file in it).
fn parse(
    path: &Path,
    bytes: &[u8],
    storage_root: &str,
) -> (HashMap<Digest, Entry>, Option<String>) {
    let mut entries = HashMap::new();
    let warning = match serde_json::from_slice::<File>(bytes) {
        Err(e) => Some(format!(
            "state {} is corrupt ({e}); it is rebuilt and not trusted",
            path.display()
        )),
        Ok(f) if f.format != FORMAT || f.version != VERSION => Some(format!(
            "state {} is not a registry-audit state (format {:?} version {}); it is rebuilt",
            path.display(),
            f.format,
            f.version
        )),
        Ok(f) if f.storage_root != storage_root => Some(format!(
            "state {} belongs to storage {}, not {storage_root}; it is rebuilt",
            path.display(),
            f.storage_root
        )),
        Ok(f) => {
            let mut bad = None;
            for (k, v) in f.blobs {
                match Digest::parse_str(&k) {
                    Some(d) => {
                        entries.insert(d, v);
                    }
                    None => {
                        bad = Some(format!(
                            "state {} holds a bad digest {k:?}; it is rebuilt",
                            path.display()
                        ));
                        entries.clear();
                        break;
                    }
                }
            }
            bad
        }
    };
    (entries, warning)
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse_str(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    #[test]
    fn saves_loads_and_distrusts_foreign_or_corrupt_files() {
        let path = std::env::temp_dir().join(format!("ra-state-{}", std::process::id()));
        let (s, w) = State::load(&path, "/root-a").expect("load");
        assert!(w.is_none() && s.is_empty());
        let e = Entry {
            size: 3,
            modified: 7,
            verified_at: 1000,
        };
        s.record(d('a'), e);
        s.save().expect("save");
        let (s, w) = State::load(&path, "/root-a").expect("load");
        assert!(w.is_none());
        assert!(s.trusts(&d('a'), 3, 7, 1500, Duration::from_secs(3600)));
        assert!(
            !s.trusts(&d('a'), 4, 7, 1500, Duration::from_secs(3600)),
            "size changed"
        );
        assert!(
            !s.trusts(&d('a'), 3, 8, 1500, Duration::from_secs(3600)),
            "mtime changed"
        );
        assert!(
            !s.trusts(&d('a'), 3, 7, 5000, Duration::from_secs(3600)),
            "due again"
        );
        assert!(
            !s.trusts(&d('b'), 3, 7, 1500, Duration::from_secs(3600)),
            "never verified"
        );

        let (s, w) = State::load(&path, "/root-b").expect("load");
        assert!(w.expect("warning").contains("belongs to storage"));
        assert!(s.is_empty());

        std::fs::write(&path, b"{not json").expect("write");
        let (s, w) = State::load(&path, "/root-a").expect("load");
        assert!(w.expect("warning").contains("corrupt"));
        assert!(s.is_empty());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn special_or_huge_state_files_are_errors() {
        let err = State::load(Path::new("/dev/zero"), "/r")
            .err()
            .expect("refused");
        assert!(err.contains("/dev/zero") && err.contains("2 GiB"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn state_text() -> impl Strategy<Value = String> {
            let blob = proptest::sample::select(vec![
                format!(
                    "\"sha256:{}\":{{\"size\":1,\"modified\":-5,\"verified_at\":2}}",
                    "a".repeat(64)
                ),
                "\"sha256:zz\":{\"size\":1,\"modified\":0,\"verified_at\":0}".to_string(),
                format!("\"sha256:{}\":{{\"size\":-1}}", "b".repeat(64)),
                "\"x\":[]".to_string(),
            ]);
            (
                proptest::sample::select(vec![FORMAT, "other", ""]),
                0..3u32,
                proptest::sample::select(vec!["/r", "/s"]),
                proptest::collection::vec(blob, 0..4),
            )
                .prop_map(|(format, version, root, blobs)| {
                    format!(
                        "{{\"format\":\"{format}\",\"version\":{version},\"storage_root\":\"{root}\",\"blobs\":{{{}}}}}",
                        blobs.join(",")
                    )
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary bytes: no entries and a warning naming the file, never a panic.
            #[test]
            fn arbitrary_bytes_are_distrusted(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let (entries, warning) = parse(Path::new("s"), &bytes, "/r");
                if warning.is_some() {
                    prop_assert!(entries.is_empty());
                }
            }

            /// State-shaped input: trusted only when sound and of this root.
            #[test]
            fn state_shaped_input(text in state_text()) {
                let (entries, warning) = parse(Path::new("s"), text.as_bytes(), "/r");
                match warning {
                    Some(w) => {
                        prop_assert!(entries.is_empty());
                        prop_assert!(w.contains("state s"), "{w}");
                    }
                    None => prop_assert!(text.contains(FORMAT) && text.contains("\"/r\"")),
                }
            }
        }
    }
}
