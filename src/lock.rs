//! The run lock: overlapping cron runs must not stack. A lock file held with an
//! exclusive advisory lock (released by the kernel when a run dies, so a killed run
//! leaves no lock that blocks) and holding the holder's pid and start time, so a second
//! run can say who holds it and a lock left by a dead run is recognised as stale. It
//! touches only its own file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub(crate) struct Lock {
    _file: File,
}

impl Lock {
    pub(crate) fn acquire(path: &Path) -> Result<Lock, String> {
        // Only a regular file (or a new one) is a lock: never a link, FIFO or device.
        let mut file = crate::files::open_regular_for_update(
            "lock file",
            path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )?;
        // The holder's line is a few dozen bytes: read no more than MAX_LOCK_BYTES.
        let mut previous = Vec::new();
        let _ = (&mut file)
            .take(crate::files::MAX_LOCK_BYTES)
            .read_to_end(&mut previous);
        let previous = String::from_utf8_lossy(&previous).into_owned();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let who = previous.trim();
                return Err(format!(
                    "another registry-audit run holds the lock {} ({}); not starting a second one",
                    path.display(),
                    if who.is_empty() { "pid unknown" } else { who }
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
        }
        if let Some(pid) = previous
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            && pid != std::process::id()
        {
            tracing::warn!(
                "stale lock {} left by pid {pid}, which is no longer running; taking it over",
                path.display()
            );
        }
        let stamp = crate::timestamp::rfc3339(std::time::SystemTime::now());
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = writeln!(file, "pid {} since {stamp}", std::process::id());
        let _ = file.sync_data();
        Ok(Lock { _file: file })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Leave the file (removing it would race with a run that just opened it); the
        // kernel releases the lock with the descriptor. Mark it released.
        let _ = self._file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_stale_lock_is_taken_over() {
        let path = std::env::temp_dir().join(format!("ra-lock-{}", std::process::id()));
        std::fs::write(&path, "pid 999999 since 2020-01-01T00:00:00Z\n").expect("write");
        let first = Lock::acquire(&path).expect("stale lock is taken over");
        let second = Lock::acquire(&path);
        let err = second.err().expect("refused");
        assert!(err.contains("another registry-audit run"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(Lock::acquire(&path).is_ok());
        let _ = std::fs::remove_file(&path);
    }
}
