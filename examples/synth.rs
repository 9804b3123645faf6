//! Builds a synthetic registry for benchmarks: storage in the real layout under ROOT and
//! the registry's cache keys in Redis, with a fraction of phantoms.
//!
//!     cargo run --release --example synth -- ROOT REDIS_URL BLOBS REPOS [PHANTOM_FRACTION] [SIZES] [REPOS_PER_BLOB]
//!
//! SIZES is a comma-separated list of blob sizes in bytes, cycled (default: a mix of
//! small manifests and configs and layers up to 400 KB). REPOS_PER_BLOB is how many
//! repositories link (and cache) each blob (default 3).

use std::path::PathBuf;
use std::process::ExitCode;

use registry_audit_synth::{Spec, generate};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!(
            "usage: synth ROOT REDIS_URL BLOBS REPOS [PHANTOM_FRACTION] [SIZES] [REPOS_PER_BLOB]"
        );
        return ExitCode::from(2);
    }
    let parse = |s: &str| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
    let run = || -> Result<(), String> {
        let mut spec = Spec::mixed(parse(&args[2])?, parse(&args[3])?);
        if let Some(f) = args.get(4) {
            spec.phantom_fraction = f.parse().map_err(|e| format!("{f}: {e}"))?;
        }
        if let Some(sizes) = args.get(5) {
            spec.sizes = sizes.split(',').map(parse).collect::<Result<_, _>>()?;
        }
        if let Some(n) = args.get(6) {
            spec.repos_per_blob = parse(n)?;
        }
        let mut conn = redis::Client::open(args[1].as_str())
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("Redis: {e}"))?;
        let g = generate(&PathBuf::from(&args[0]), Some(&mut conn), &spec)?;
        println!(
            "blobs={} bytes={} phantoms={} keys={}",
            g.blobs, g.bytes, g.phantoms, g.keys
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synth: {e}");
            ExitCode::from(2)
        }
    }
}
