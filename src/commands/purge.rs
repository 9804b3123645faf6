//! The `purge` command: audit (or load a saved plan), show the plan, get a
//! confirmation, apply it step by step reporting each result, and print the summary.
//! The removal itself, its safety checks and the journal live in `repair`; this module
//! only sequences them and talks to the operator.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use crate::audit::AuditOptions;
use crate::cli::{FailOn, Format, PurgeArgs};
use crate::finding::Severity;
use crate::output::report::{self, Tool};
use crate::repair::{self, ApplySummary, Outcome, Plan};
use crate::settings::{self, Source};
use crate::storage::Storage;

/// What the run did with the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// Nothing to remove.
    Nothing,
    DryRun,
    /// Plan saved with --plan-out.
    Saved,
    /// The operator answered no.
    Declined,
    /// No terminal to ask on and no --yes.
    NotConfirmed,
    Applied,
}

#[derive(Debug, Serialize)]
pub(crate) struct PurgeReport {
    pub schema_version: u32,
    pub tool: Tool,
    pub command: &'static str,
    pub started_at: String,
    pub duration_ms: u64,
    pub mode: Mode,
    pub plan: Plan,
    pub result: Option<ApplySummary>,
}

struct PurgeSettings {
    format: Format,
    fail_on: FailOn,
    yes: bool,
    dry_run: bool,
    plan_out: Option<PathBuf>,
    journal: Option<PathBuf>,
}

pub(crate) fn run(args: &PurgeArgs) -> Result<u8, String> {
    let started = SystemTime::now();
    let clock = Instant::now();
    let s = PurgeSettings {
        format: match settings::default_format(args.format, None) {
            Format::Prometheus => return Err("purge writes table or json, not prometheus".into()),
            f => f,
        },
        fail_on: args.fail_on,
        yes: args.yes,
        dry_run: args.dry_run,
        plan_out: args.plan_out.clone(),
        journal: args.journal.clone(),
    };
    // Outputs that would destroy a special file are refused before any work.
    for (flag, path) in [("--plan-out", &s.plan_out), ("--journal", &s.journal)] {
        if let Some(p) = path {
            crate::files::check_output(flag, p)?;
        }
    }
    let (source, storage, plan) = match &args.apply {
        Some(path) => {
            let plan = Plan::load(path)?;
            plan.validate()?;
            let source = Source::resolve(&args.source, Some(&plan.source), settings::Want::Redis)?;
            let storage = Storage::open(&source.storage)?;
            (source, storage, plan)
        }
        None => {
            let source = Source::from_args(&args.source)?;
            let scan_count = settings::scan_count(&args.source)?;
            let opts = AuditOptions {
                hashing: crate::audit::rehash::Policy::simple(
                    settings::jobs(args.jobs, &source.storage)?,
                    args.quick,
                ),
                verify_storage: false,
                shard: crate::shard::Shard::ALL,
                io_threads: crate::audit::verify::DEFAULT_IO_THREADS,
            };
            let (storage, audit) = super::audit_source(&source, scan_count, opts)?;
            let mut conn = source.redis()?.connect_cache()?;
            let plan = repair::build_plan(
                conn.router(),
                &storage,
                &audit.findings,
                args.include_malformed,
                super::source_info(&source),
                crate::timestamp::rfc3339(started),
            )?;
            (source, storage, plan)
        }
    };
    let table = s.format == Format::Table;
    if table {
        print!("{}", render_plan(&plan));
    }
    let mode = if plan.groups.is_empty() {
        Mode::Nothing
    } else if s.dry_run {
        Mode::DryRun
    } else if let Some(path) = &s.plan_out {
        let text = serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())? + "\n";
        crate::files::write_output(&text, Some(path))?;
        Mode::Saved
    } else if s.yes {
        Mode::Applied
    } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        if confirm(&plan)? {
            Mode::Applied
        } else {
            Mode::Declined
        }
    } else {
        Mode::NotConfirmed
    };

    let mut result = None;
    if mode == Mode::Applied {
        let journal = s
            .journal
            .clone()
            .unwrap_or_else(|| repair::default_journal(started));
        let mut conn = source.redis()?.connect_cache()?;
        if table {
            println!("\nApplying; journal: {}", journal.display());
        }
        let summary = repair::apply(
            &mut conn,
            &storage,
            &plan,
            &journal,
            crate::timestamp::rfc3339(started),
            |r| {
                if table {
                    let what = r
                        .digest
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| r.key.clone());
                    let outcome = match r.outcome {
                        Outcome::Removed => format!("removed {} entries", r.entries),
                        Outcome::CameBack => {
                            "kept: the blob came back in storage since the audit".into()
                        }
                        Outcome::Changed => {
                            "kept: the registry changed these entries since the audit".into()
                        }
                        Outcome::AlreadyGone => "nothing to do: already removed".into(),
                        Outcome::Failed => match &r.failure {
                            Some(f) => format!(
                                "FAILED ({}): removed [{}], left [{}]{}",
                                f.error,
                                f.removed.join(", "),
                                f.left.join(", "),
                                match &f.still_served {
                                    Some(v) if v.is_empty() => "; nothing served any more".into(),
                                    Some(v) => format!("; still served: {}", v.join(", ")),
                                    None => "; could not read what is still served".into(),
                                }
                            ),
                            None => "FAILED".into(),
                        },
                    };
                    println!("  {what}: {outcome}");
                    let _ = std::io::stdout().flush();
                }
            },
        )?;
        result = Some(summary);
    }

    let failure = result.as_ref().and_then(|r| r.failure.clone());
    let code = exit_code(&plan, mode, result.as_ref(), s.fail_on);
    if table {
        print!(
            "{}",
            render_outcome(&plan, mode, result.as_ref(), s.plan_out.as_deref())
        );
    } else {
        let report = PurgeReport {
            schema_version: report::SCHEMA_VERSION,
            tool: Tool::this(),
            command: "purge",
            started_at: crate::timestamp::rfc3339(started),
            duration_ms: clock.elapsed().as_millis() as u64,
            mode,
            plan,
            result,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n";
        crate::files::write_output(&text, None)?;
    }
    if mode == Mode::NotConfirmed {
        return Err("not on a terminal and --yes not given: nothing was changed; review the plan above, then run again with --yes".into());
    }
    // A removal that failed part-way never ends as a success, whatever was printed.
    if let Some(failure) = failure {
        return Err(failure);
    }
    Ok(code)
}

/// 1 when something at or above the threshold is left in place.
fn exit_code(plan: &Plan, mode: Mode, result: Option<&ApplySummary>, fail_on: FailOn) -> u8 {
    let threshold = |sev: Severity| match fail_on {
        FailOn::Never => false,
        FailOn::Warning => true,
        FailOn::Error => sev == Severity::Error,
    };
    let kept = plan.kept.iter().any(|k| threshold(k.finding.severity));
    let planned = plan
        .groups
        .iter()
        .flat_map(|g| &g.entries)
        .any(|e| threshold(e.severity));
    let left = match (mode, result) {
        (Mode::Applied, Some(r)) => r.digests_skipped_changed > 0 && fail_on != FailOn::Never,
        (Mode::Nothing, _) => false,
        _ => planned,
    };
    u8::from(kept || left)
}

fn confirm(plan: &Plan) -> Result<bool, String> {
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "Remove these {} cache entries ({} digests) from Redis? [y/N] ",
        plan.entry_count(),
        plan.groups.len()
    );
    let _ = err.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

fn render_plan(plan: &Plan) -> String {
    let mut out = format!(
        "registry-audit purge: storage {} against {}\n",
        plan.source.storage_root,
        plan.source.describe_cache()
    );
    if plan.groups.is_empty() {
        out.push_str("\nNothing to remove: no cache entry is proven wrong.\n");
    } else {
        out.push_str(&format!(
            "\nPlan: remove {} entries for {} digests\n",
            plan.entry_count(),
            plan.groups.len()
        ));
        let mut table = Table::new();
        table
            .load_style(presets::UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(["digest", "storage", "kind", "key", "removal"]);
        for g in &plan.groups {
            let digest = g
                .digest
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into());
            let storage = match g.blob {
                repair::BlobState::Absent => "absent".to_string(),
                repair::BlobState::Present { size } => format!("present, {size} B"),
                repair::BlobState::NotChecked => "-".into(),
            };
            for e in &g.entries {
                let removal = match &e.op {
                    repair::Op::Fields {
                        fields,
                        exact: true,
                    } => format!("DEL ({} fields)", fields.len()),
                    repair::Op::Fields { fields, .. } => {
                        format!(
                            "HDEL {}",
                            fields.keys().cloned().collect::<Vec<_>>().join(" ")
                        )
                    }
                    repair::Op::Member { member } => format!("SREM {member}"),
                    repair::Op::Key { redis_type, .. } => format!("DEL ({redis_type})"),
                };
                table.add_row([
                    digest.clone(),
                    storage.clone(),
                    e.kind.name().to_string(),
                    e.key.clone(),
                    removal,
                ]);
            }
        }
        out.push_str(&table.to_string());
        out.push('\n');
    }
    if !plan.kept.is_empty() {
        out.push_str(&format!("\nNot touched ({}):\n", plan.kept.len()));
        for k in &plan.kept {
            let d = k
                .finding
                .digest
                .map(|d| d.to_string())
                .unwrap_or_else(|| k.finding.location().to_string());
            out.push_str(&format!(
                "  {} {}: {}\n",
                k.finding.kind.name(),
                d,
                k.advice
            ));
        }
    }
    out
}

fn render_outcome(
    plan: &Plan,
    mode: Mode,
    result: Option<&ApplySummary>,
    plan_out: Option<&Path>,
) -> String {
    match (mode, result) {
        (Mode::Nothing, _) => String::new(),
        (Mode::DryRun, _) => "\nDry run: nothing was changed.\n".into(),
        (Mode::Saved, _) => format!(
            "\nPlan saved to {}: nothing was changed. Apply it with `registry-audit purge --apply {} --yes`.\n",
            plan_out
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            plan_out
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        (Mode::Declined, _) => "\nNothing was changed.\n".into(),
        (Mode::NotConfirmed, _) => String::new(),
        (Mode::Applied, Some(r)) => {
            let mut out = format!(
                "\nRemoved {} of {} planned entries ({} digests).\n",
                r.entries_removed,
                plan.entry_count(),
                r.digests_removed
            );
            if let Some(note) = &r.permissions.note {
                out.push_str(&format!("Note: {note}.\n"));
            }
            for (kind, n) in &r.entries_removed_by_kind {
                if *n > 0 {
                    out.push_str(&format!("  {}: {n}\n", kind.name()));
                }
            }
            if r.digests_skipped_came_back > 0 {
                out.push_str(&format!(
                    "Kept {} digests whose blobs came back in storage since the audit.\n",
                    r.digests_skipped_came_back
                ));
            }
            if r.digests_already_gone > 0 {
                out.push_str(&format!(
                    "{} digests had no entries left to remove.\n",
                    r.digests_already_gone
                ));
            }
            if r.digests_skipped_changed > 0 {
                out.push_str(&format!(
                    "Kept {} digests whose entries the registry changed since the audit: run purge again.\n",
                    r.digests_skipped_changed
                ));
            }
            if r.digests_failed > 0 {
                out.push_str(&format!(
                    "FAILED on {} digest (see above); {} digests not attempted.\n",
                    r.digests_failed, r.digests_not_attempted
                ));
            }
            out.push_str(&format!(
                "Journal: {} (undo with `registry-audit restore --journal {}`)\n",
                r.journal, r.journal
            ));
            out
        }
        (Mode::Applied, None) => String::new(),
    }
}
