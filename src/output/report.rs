//! The report: one serde struct holding a run's source, options, summary and sorted
//! findings, rendered as JSON or as a table grouped by kind that ends with a one-line
//! verdict. It also owns writing the report (stdout, or a file replaced atomically) and
//! the exit-code threshold. It computes no findings.

use std::path::Path;
use std::time::SystemTime;

use comfy_table::{ContentArrangement, Table, presets};
use serde::{Deserialize, Serialize};

use crate::cli::{FailOn, Format};
use crate::finding::{Finding, Kind, Severity, terminal_safe};
use crate::summary::{SourceInfo, Summary};

pub(crate) const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub(crate) fn this() -> Tool {
        Tool {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// The options that decide what a run finds; reports with different options are not
/// merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Options {
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
    pub(crate) fn new(quick: bool, fail_on: FailOn) -> Options {
        Options {
            quick,
            fail_on: fail_on_name(fail_on).into(),
            verify_storage: false,
            sample: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Report {
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
    pub(crate) fn new(
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
            started_at: crate::timestamp::rfc3339(started),
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
    pub(crate) fn write(&self, format: Format, output: Option<&Path>) -> Result<(), String> {
        crate::files::write_output(&render(self, format), output)
    }
}

pub(crate) fn fail_on_name(f: FailOn) -> &'static str {
    match f {
        FailOn::Error => "error",
        FailOn::Warning => "warning",
        FailOn::Never => "never",
    }
}

/// 1 when a finding reaches the threshold, else 0.
pub(crate) fn exit_code(findings: &[Finding], fail_on: FailOn) -> u8 {
    let hit = match fail_on {
        FailOn::Never => false,
        FailOn::Warning => !findings.is_empty(),
        FailOn::Error => findings.iter().any(|f| f.severity == Severity::Error),
    };
    u8::from(hit)
}

/// The one line a tired operator can act on. A run that did not read everything
/// (`complete` false) never says OK.
pub(crate) fn verdict(summary: &Summary, findings: &[Finding], complete: bool) -> String {
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

pub(crate) fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Json => render_json(report),
        Format::Table => render_table(report),
        Format::Prometheus => crate::output::metrics::render(report),
    }
}

pub(crate) fn render_json(report: &Report) -> String {
    let mut s =
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

pub(crate) fn render_table(report: &Report) -> String {
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

pub(crate) fn human_bytes(n: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_same_report_as_json_and_a_table_with_names_escaped() {
        let d = crate::digest::Digest::parse_str(&format!("sha256:{}", "c".repeat(64)))
            .expect("digest");
        let mut f = Finding::storage(
            Kind::DanglingTag,
            Severity::Error,
            Some(d),
            Some("team/app".into()),
            "docker/registry/v2/repositories/team/app/_manifests/tags/v1/current/link".into(),
            "tag v1 points to a manifest that is gone \u{1b}[2J".into(),
        );
        f.tag = Some("v1".into());
        let mut summary = Summary::default();
        summary.tally(std::slice::from_ref(&f));
        let verdict = verdict(&summary, std::slice::from_ref(&f), true);
        let mut r = Report::new(
            "check",
            std::time::SystemTime::UNIX_EPOCH,
            std::time::Instant::now(),
            SourceInfo {
                storage_root: "/r".into(),
                cache: "none".into(),
                redis: None,
                cache_dump: None,
                registry_url: None,
                config: None,
            },
            Options::new(false, crate::cli::FailOn::Error),
            summary,
            vec![f],
            verdict,
        );
        r.notes.push("a note".into());
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&r)).expect("the JSON report parses");
        assert_eq!(json["findings"][0]["kind"], "dangling-tag");
        assert_eq!(json["summary"]["findings_by_kind"]["dangling-tag"], 1);
        let table = render_table(&r);
        assert!(table.contains("dangling-tag (1)"), "{table}");
        assert!(table.contains("note: a note"), "{table}");
        assert!(!table.contains('\u{1b}'), "{table}");
        assert_eq!(exit_code(&r.findings, crate::cli::FailOn::Error), 1);
        assert_eq!(exit_code(&r.findings, crate::cli::FailOn::Never), 0);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
