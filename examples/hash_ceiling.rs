//! The ceiling of hashing files with `read` and SHA-256 on this machine, for the
//! benchmark: each file read through a buffer the size of the tool's and hashed with the
//! same `sha2`, on THREADS threads, largest files first, with none of the tool's checks.
//! `openssl speed` measures SHA-256 on data already in the CPU's cache; a file read
//! from the page cache is first copied into the buffer by `read`, and that copy is part
//! of what any safe reader pays. Prints the bytes hashed and the seconds taken.
//!
//!   cargo run --release --example hash_ceiling -- THREADS FILE...
//!
//! With `-` for FILE, the file names are read from standard input, one per line.

use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sha2::{Digest, Sha256};

/// The tool's read buffer (`rehash::READ_BUFFER`).
const BUFFER: usize = 512 * 1024;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: hash_ceiling THREADS FILE... (or - to read the names from stdin)";
    let threads: usize = args
        .next()
        .and_then(|t| t.parse().ok())
        .filter(|t| *t > 0)
        .ok_or(usage)?;
    let mut files: Vec<String> = args.collect();
    if files == ["-"] {
        files = std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading file names: {e}"))?;
    }
    if files.is_empty() {
        return Err(usage.into());
    }
    let mut sized: Vec<(u64, String)> = files
        .into_iter()
        .map(|f| match std::fs::metadata(&f) {
            Ok(m) => Ok((m.len(), f)),
            Err(e) => Err(format!("{f}: {e}")),
        })
        .collect::<Result<_, _>>()?;
    sized.sort_by_key(|f| std::cmp::Reverse(f.0));

    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let bytes: Result<u64, String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; BUFFER];
                    let mut total = 0u64;
                    while let Some((_, f)) = sized.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let mut file = std::fs::File::open(f).map_err(|e| format!("{f}: {e}"))?;
                        let mut h = Sha256::new();
                        loop {
                            let n = file.read(&mut buf).map_err(|e| format!("{f}: {e}"))?;
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                            total += n as u64;
                        }
                        std::hint::black_box(h.finalize());
                    }
                    Ok(total)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| "a thread panicked".to_string())?)
            .sum()
    });
    let secs = start.elapsed().as_secs_f64();
    println!("bytes={} seconds={secs:.4}", bytes?);
    Ok(())
}
