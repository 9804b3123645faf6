//! The report: one serde struct holding a run's source, options, summary and sorted
//! findings, rendered as JSON or as a table grouped by kind that ends with a one-line
//! verdict. It also owns writing the report (stdout, or a file replaced atomically) and
//! the exit-code threshold. It computes no findings.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use comfy_table::{ContentArrangement, Table, presets};
use serde::{Deserialize, Serialize};

use crate::audit::Summary;
use crate::cli::{FailOn, Format};
use crate::finding::{Finding, Kind, Severity, terminal_safe};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub fn this() -> Tool {
        Tool {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// What was audited; never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub storage_root: String,
    /// `redis`, `dump` or `none` (storage verification only).
    pub cache: String,
    /// The Redis URL with any password masked.
    pub redis: Option<String>,
    /// The cache dump audited instead of Redis.
    pub cache_dump: Option<String>,
    /// The registry `probe` asked.
    #[serde(default)]
    pub registry_url: Option<String>,
    pub config: Option<String>,
}

impl SourceInfo {
    /// The cache, for a report's first line.
    pub fn describe_cache(&self) -> String {
        match (&self.redis, &self.cache_dump, &self.registry_url) {
            (Some(r), _, _) => r.clone(),
            (None, Some(d), _) => format!("cache dump {d}"),
            (None, None, Some(u)) => format!("the running registry at {u}"),
            (None, None, None) => "no cache (storage only)".into(),
        }
    }
}

/// The options that decide what a run finds; reports with different options are not
/// merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    pub quick: bool,
    pub fail_on: String,
    /// Whether repositories, tags and manifests were walked.
    #[serde(default)]
    pub verify_storage: bool,
    /// `--sample`, as given.
    #[serde(default)]
    pub sample: Option<String>,
}

impl Options {
    pub fn new(quick: bool, fail_on: FailOn) -> Options {
        Options {
            quick,
            fail_on: fail_on_name(fail_on).into(),
            verify_storage: false,
            sample: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: Tool,
    pub command: String,
    pub started_at: String,
    pub duration_ms: u64,
    /// False when `--max-duration` stopped re-hashing before every selected blob.
    pub complete: bool,
    /// Things the operator should know about the run itself (a rebuilt state file, ...).
    pub notes: Vec<String>,
    /// `K/N` when this run did one shard of the work (see `merge`).
    #[serde(default)]
    pub shard: Option<String>,
    pub source: SourceInfo,
    pub options: Options,
    pub summary: Summary,
    pub findings: Vec<Finding>,
    pub verdict: String,
}

impl Report {
    /// A report of `command` that started at `started` (`clock` measures its
    /// duration), with the run's findings, summary and verdict.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        command: &str,
        started: SystemTime,
        clock: std::time::Instant,
        source: SourceInfo,
        options: Options,
        summary: Summary,
        findings: Vec<Finding>,
        verdict: String,
    ) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            tool: Tool::this(),
            command: command.into(),
            started_at: rfc3339(started),
            duration_ms: clock.elapsed().as_millis() as u64,
            complete: true,
            notes: Vec::new(),
            shard: None,
            source,
            options,
            summary,
            findings,
            verdict,
        }
    }

    /// Renders the report and writes it to stdout or `output`.
    pub fn write(&self, format: Format, output: Option<&Path>) -> Result<(), String> {
        write_output(&render(self, format), output)
    }
}

pub fn fail_on_name(f: FailOn) -> &'static str {
    match f {
        FailOn::Error => "error",
        FailOn::Warning => "warning",
        FailOn::Never => "never",
    }
}

/// 1 when a finding reaches the threshold, else 0.
pub fn exit_code(findings: &[Finding], fail_on: FailOn) -> u8 {
    let hit = match fail_on {
        FailOn::Never => false,
        FailOn::Warning => !findings.is_empty(),
        FailOn::Error => findings.iter().any(|f| f.severity == Severity::Error),
    };
    u8::from(hit)
}

/// The one line a tired operator can act on. A run that did not read everything
/// (`complete` false) never says OK.
pub fn verdict(summary: &Summary, findings: &[Finding], complete: bool) -> String {
    let judged = judge(summary, findings);
    match (complete, findings.is_empty()) {
        (true, _) => judged,
        (false, true) => "INCOMPLETE: nothing wrong was found in what could be read, but not everything was read (see the notes): this is not a clean bill of health.".into(),
        (false, false) => format!("INCOMPLETE: not everything was read (see the notes). {judged}"),
    }
}

fn judge(summary: &Summary, findings: &[Finding]) -> String {
    if findings.is_empty() {
        return format!(
            "OK: the cache agrees with storage ({} keys, {} blobs checked).",
            summary.keys_scanned, summary.blobs_checked
        );
    }
    // Each finding counts in the first group it fits.
    let (mut live_phantoms, mut corrupt, mut broken, mut other_live, mut rest) = (0, 0, 0, 0, 0);
    let mut unread = 0;
    for f in findings {
        match f.kind {
            Kind::PhantomBlobDescriptor | Kind::PhantomRepositoryBlob | Kind::LivePhantom
                if f.live =>
            {
                live_phantoms += 1
            }
            Kind::DigestMismatch | Kind::UnreadableBlob => corrupt += 1,
            Kind::UnreadableStorage => unread += 1,
            Kind::DanglingTag
            | Kind::MissingReferencedBlob
            | Kind::BadManifest
            | Kind::DanglingManifestRevision
            | Kind::BadLink
                if f.severity == Severity::Error =>
            {
                broken += 1
            }
            _ if f.live => other_live += 1,
            _ => rest += 1,
        }
    }
    let in_memory = findings.iter().any(|f| f.kind == Kind::LivePhantom);
    let mut parts = Vec::new();
    if live_phantoms > 0 {
        let fix = if in_memory {
            "the in-memory cache is cleared only by restarting the registry (DELETE /v2/<repo>/blobs/<digest> clears the repository entry, not the global one)"
        } else {
            "run `registry-audit purge` to remove exactly these"
        };
        parts.push(format!(
            "{live_phantoms} live phantom {}: clients are told deleted blobs exist, so re-pushes skip uploads and pulls fail; {fix}.",
            plural(live_phantoms, "entry", "entries")
        ));
    }
    if unread > 0 {
        parts.push(format!(
            "{unread} {} in storage could not be read (permissions or I/O errors): what is below {} was not checked; run as a user that can read the whole storage root.",
            plural(unread, "place", "places"),
            plural(unread, "it", "them")
        ));
    }
    if corrupt > 0 {
        parts.push(format!(
            "{corrupt} {} corrupt or unreadable in storage: restore from backup or delete and re-push; the cache is not the cause.",
            plural(corrupt, "blob", "blobs")
        ));
    }
    if broken > 0 {
        parts.push(format!(
            "{broken} broken {} in storage (a tag or manifest that cannot be pulled): push the images again or restore the missing blobs.",
            plural(broken, "reference", "references")
        ));
    }
    if other_live > 0 {
        parts.push(format!(
            "{other_live} other served {} wrong (size, link or shape): `registry-audit purge` removes them.",
            plural(other_live, "entry is", "entries are")
        ));
    }
    if rest > 0 {
        parts.push(format!(
            "{rest} {} that nobody is served (inert cache entries, links GC left behind, failed probes): harmless; see the findings.",
            plural(rest, "finding", "findings")
        ));
    }
    parts.join(" ")
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Json => render_json(report),
        Format::Table => render_table(report),
        Format::Prometheus => crate::output::metrics::render(report),
    }
}

pub fn render_json(report: &Report) -> String {
    let mut s =
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.summary;
    out.push_str(&format!(
        "registry-audit {}: storage {} against {}\n",
        report.command,
        terminal_safe(&report.source.storage_root),
        terminal_safe(&report.source.describe_cache())
    ));
    out.push_str(&format!(
        "{} cache keys and {} set members read ({} other keys left alone); {} blobs checked, {} absent, {} hashed{}\n",
        s.keys_scanned,
        s.set_members_scanned,
        s.foreign_keys_skipped,
        s.blobs_checked,
        s.blobs_absent,
        human_bytes(s.bytes_hashed),
        if report.options.quick { " (--quick: sizes only)" } else { "" }
    ));
    if let Some(o) = &s.object_storage {
        out.push_str(&format!(
            "object storage: {} requests, {} read\n",
            o.requests,
            human_bytes(o.bytes)
        ));
    }
    for kind in Kind::ALL {
        let group: Vec<&Finding> = report.findings.iter().filter(|f| f.kind == kind).collect();
        if group.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{} ({})\n", kind.name(), group.len()));
        let mut table = Table::new();
        table
            .load_style(presets::UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header([
                "severity",
                "live",
                "repository",
                "digest",
                "key / path",
                "detail",
            ]);
        for f in group {
            let mut key = f.location().to_string();
            if let Some(m) = &f.member {
                key.push_str(&format!(" (member {m})"));
            }
            if let Some(t) = &f.tag {
                key = format!("tag {t}: {key}");
            }
            // Names come from storage and Redis: nothing raw reaches the terminal.
            table.add_row([
                f.severity.name().to_string(),
                if f.live { "live" } else { "inert" }.to_string(),
                terminal_safe(f.repository.as_deref().unwrap_or("(global)")),
                f.digest
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "-".into()),
                terminal_safe(&key),
                terminal_safe(&f.detail),
            ]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
    }
    out.push('\n');
    for note in &report.notes {
        out.push_str(&format!("note: {}\n", terminal_safe(note)));
    }
    out.push_str(&terminal_safe(&report.verdict));
    out.push('\n');
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Writes `text` to stdout (no path, or `-`), or replaces `path` atomically.
pub fn write_output(text: &str, path: Option<&Path>) -> Result<(), String> {
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
pub fn write_atomically<T>(
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

/// RFC 3339 UTC time, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month 1-12, day 1-31) of `days` since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_872_742)),
            "2026-11-28T13:32:22Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
