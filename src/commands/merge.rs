//! The `merge` command: shard reports (`check --shard K/N`) combined into the report a
//! single full run would give - the same findings in the same order, the same summary
//! and verdict; only timings differ. It refuses reports of different registries or
//! options, and missing or duplicate shards. It reads report files and writes a report.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::cli::{FailOn, MergeArgs};
use crate::finding;
use crate::output::report::{self, Report};
use crate::settings::{self, ReportSettings};
use crate::shard::Shard;
use crate::summary::Summary;

pub(crate) fn run(args: &MergeArgs) -> Result<u8, String> {
    let output = settings::output_path("--output", args.report.output.as_deref())?;
    let reports = args
        .reports
        .iter()
        .map(|p| load(p).map(|r| (p.clone(), r)))
        .collect::<Result<Vec<_>, String>>()?;
    let merged = merge(reports)?;
    // The threshold the shards ran with, unless given here.
    let fail_on = args
        .report
        .fail_on_given
        .unwrap_or(match merged.options.fail_on.as_str() {
            "warning" => FailOn::Warning,
            "never" => FailOn::Never,
            _ => FailOn::Error,
        });
    let settings = ReportSettings {
        format: settings::default_format(args.report.format, output.as_deref()),
        output,
        fail_on,
        push: args.report.push.clone(),
    };
    let code = report::exit_code(&merged.findings, settings.fail_on);
    let text = report::render(&merged, settings.format);
    crate::files::write_output(&text, settings.output.as_deref())?;
    crate::commands::pushgateway::push_report(&settings.push, &merged)?;
    Ok(code)
}

fn load(path: &Path) -> Result<Report, String> {
    let text = crate::files::read_to_string("report", path, crate::files::MAX_REPORT_BYTES)?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a registry-audit JSON report: {e} (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// Combines shard reports; errors say which report does not fit.
pub(crate) fn merge(reports: Vec<(PathBuf, Report)>) -> Result<Report, String> {
    let (first_path, first) = reports
        .first()
        .ok_or("give the shard reports to merge")?
        .clone();
    let mut shards: Vec<(PathBuf, Shard)> = Vec::new();
    for (path, r) in &reports {
        let name = path.display();
        if r.schema_version != report::SCHEMA_VERSION || r.command != "check" {
            return Err(format!(
                "{name}: not a check report of schema {}",
                report::SCHEMA_VERSION
            ));
        }
        if r.source != first.source {
            return Err(format!(
                "{name} audits {} against {}, but {} audits {} against {}: reports of different registries",
                r.source.storage_root,
                r.source.describe_cache(),
                first_path.display(),
                first.source.storage_root,
                first.source.describe_cache()
            ));
        }
        if r.options != first.options {
            return Err(format!(
                "{name} ran with options {:?}, {} with {:?}: run every shard with the same options",
                r.options,
                first_path.display(),
                first.options
            ));
        }
        let spec = r
            .shard
            .as_deref()
            .ok_or_else(|| format!("{name} is not a shard report (it ran without --shard)"))?;
        shards.push((path.clone(), Shard::parse(spec)?));
    }
    let n = shards[0].1.n;
    let mut seen = BTreeSet::new();
    for (path, s) in &shards {
        if s.n != n {
            return Err(format!(
                "{} is shard {s}, but {} is of {n} shards",
                path.display(),
                first_path.display()
            ));
        }
        if !seen.insert(s.k) {
            return Err(format!("shard {s} is given twice ({})", path.display()));
        }
    }
    let missing: Vec<String> = (1..=n)
        .filter(|k| !seen.contains(k))
        .map(|k| format!("{k}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(format!("missing shard reports: {}", missing.join(", ")));
    }

    let mut merged = first.clone();
    merged.shard = None;
    merged.findings = Vec::new();
    merged.notes = Vec::new();
    merged.summary = Summary::default();
    for (_, r) in reports {
        merged.started_at = merged.started_at.min(r.started_at.clone());
        merged.duration_ms = merged.duration_ms.max(r.duration_ms);
        merged.complete &= r.complete;
        for note in r.notes {
            if !merged.notes.contains(&note) {
                merged.notes.push(note);
            }
        }
        merged.summary.add(&r.summary);
        merged.findings.extend(r.findings);
    }
    finding::sort(&mut merged.findings);
    merged.summary.tally(&merged.findings);
    merged.verdict = report::verdict(&merged.summary, &merged.findings, merged.complete);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::FailOn;
    use crate::digest::Digest;
    use crate::finding::{Finding, Kind, Severity};
    use crate::output::report::Options;
    use crate::summary::SourceInfo;

    fn shard(k: u32, complete: bool, findings: Vec<Finding>) -> (PathBuf, Report) {
        let source = SourceInfo {
            storage_root: "/var/lib/registry".into(),
            cache: "redis".into(),
            redis: Some("redis://127.0.0.1:6379/0".into()),
            cache_dump: None,
            registry_url: None,
            config: None,
        };
        let mut summary = Summary {
            keys_scanned: 10,
            blobs_checked: 4,
            ..Summary::default()
        };
        summary.tally(&findings);
        let mut r = Report::new(
            "check",
            std::time::SystemTime::UNIX_EPOCH,
            std::time::Instant::now(),
            source,
            Options::new(true, FailOn::Error),
            summary,
            findings,
            String::new(),
        );
        r.shard = Some(format!("{k}/2"));
        r.complete = complete;
        (PathBuf::from(format!("shard-{k}.json")), r)
    }

    fn phantom(c: char) -> Finding {
        let d = Digest::parse_str(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest");
        Finding::cache(
            Kind::PhantomBlobDescriptor,
            Severity::Error,
            true,
            Some(d),
            None,
            format!("blobs::{d}"),
            "gone".into(),
        )
    }

    #[test]
    fn shards_join_into_one_sorted_report_that_is_incomplete_if_any_was() {
        let merged = merge(vec![
            shard(2, true, vec![phantom('b')]),
            shard(1, false, vec![phantom('a')]),
        ])
        .expect("merge");
        assert_eq!(merged.summary.keys_scanned, 20);
        assert_eq!(merged.summary.errors, 2);
        let digests: Vec<String> = merged
            .findings
            .iter()
            .filter_map(|f| f.digest.map(|d| d.to_string()))
            .collect();
        assert!(digests[0] < digests[1]);
        assert!(!merged.complete);
        assert!(
            merged.verdict.starts_with("INCOMPLETE"),
            "{}",
            merged.verdict
        );
        assert!(merged.shard.is_none());

        let err = merge(vec![shard(1, true, vec![])]).expect_err("a shard missing");
        assert!(err.contains("missing shard reports: 2/2"), "{err}");
        let err = merge(vec![shard(1, true, vec![]), shard(1, true, vec![])]).expect_err("twice");
        assert!(err.contains("given twice"), "{err}");
    }
}
