//! The `export-cache` command: connect to the registry's Redis (from the flags or its
//! config) and write every registry-shaped key to a dump file (or stdout) that
//! `check --cache-dump` audits offline. It reads Redis only.

use crate::cache::dump::export;

/// The `export-cache` command.
pub(crate) fn run(args: &crate::cli::ExportArgs) -> Result<u8, String> {
    if args.scan_count == 0 {
        return Err("--scan-count must be at least 1".into());
    }
    // Refused before any work: a dump is never written over a special file.
    let output = crate::settings::output_path("--output", args.output.as_deref())?;
    let file = match &args.config {
        Some(p) => Some(crate::registry_config::load(p, std::env::vars())?),
        None => None,
    };
    let target = crate::settings::redis_target(args.redis.as_deref(), file.as_ref(), None)?;
    let mut conn = target.connect_cache()?;
    let created = crate::timestamp::rfc3339(std::time::SystemTime::now());
    let counts = match &output {
        None => export(
            &mut conn,
            &mut std::io::stdout().lock(),
            &target.display(),
            &created,
            args.scan_count,
        )?,
        Some(path) => crate::files::write_atomically(path, |f| {
            export(&mut conn, f, &target.display(), &created, args.scan_count)
        })?,
    };
    tracing::info!(
        keys = counts.keys,
        members = counts.set_members,
        "cache exported"
    );
    if let Some(path) = &output {
        eprintln!(
            "Exported {} cache keys ({} set members; {} other keys skipped) to {}",
            counts.keys,
            counts.set_members,
            counts.foreign_keys_skipped,
            path.display()
        );
    }
    Ok(0)
}
