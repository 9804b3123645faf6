//! The `restore` command: put back, from purge's journal, every cache entry purge
//! removed, where nothing has been written since. The writing is `repair`'s.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::{Format, RestoreArgs};
use crate::output::report::{self, Tool};
use crate::registry_config;
use crate::repair::{self, RestoreSummary};
use crate::settings;
use crate::summary::SourceInfo;

#[derive(Debug, Serialize)]
struct RestoreReport {
    schema_version: u32,
    tool: Tool,
    command: &'static str,
    result: RestoreSummary,
}

pub(crate) fn run(args: &RestoreArgs) -> Result<u8, String> {
    let recorded = read_journal_source(&args.journal)?;
    let file = match args
        .config
        .as_ref()
        .or(recorded.config.as_ref().map(PathBuf::from).as_ref())
    {
        Some(p) => Some(registry_config::load(p, std::env::vars())?),
        None => None,
    };
    let target = settings::redis_target(args.redis.as_deref(), file.as_ref(), Some(&recorded))?;
    let mut conn = target.connect_cache()?;
    let summary = repair::restore(&mut conn, &args.journal)?;
    match settings::default_format(args.format, None) {
        Format::Prometheus => return Err("restore writes table or json, not prometheus".into()),
        Format::Table => {
            println!(
                "Restored {} entries from {} into {}; left {} alone (written by the registry since){}.",
                summary.entries_restored,
                summary.journal,
                target.display(),
                summary.entries_left_alone,
                if summary.lines_skipped > 0 {
                    format!(
                        "; {} unreadable journal lines skipped",
                        summary.lines_skipped
                    )
                } else {
                    String::new()
                }
            );
            if let Some(note) = &summary.permissions.note {
                println!("Note: {note}.");
            }
        }
        Format::Json => {
            let report = RestoreReport {
                schema_version: report::SCHEMA_VERSION,
                tool: Tool::this(),
                command: "restore",
                result: summary,
            };
            let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n";
            crate::files::write_output(&text, None)?;
        }
    }
    Ok(0)
}

/// The source recorded in a journal's first line.
fn read_journal_source(path: &Path) -> Result<SourceInfo, String> {
    let mut lines = crate::files::Lines::open(
        "journal",
        path,
        crate::files::MAX_JOURNAL_BYTES,
        crate::files::MAX_JOURNAL_LINE,
    )?;
    let first = lines.next_line()?.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(first)
        .map_err(|_| format!("{} is not a registry-audit journal", path.display()))?;
    serde_json::from_value(v["source"].clone())
        .map_err(|_| format!("{} is not a registry-audit journal", path.display()))
}
