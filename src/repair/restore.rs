//! Putting back what a journal records as removed, where nothing was written since:
//! the journal read a bounded line at a time, newest removal first.

use super::*;

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RestoreSummary {
    pub journal: String,
    /// Entries put back.
    pub entries_restored: u64,
    /// Entries left alone because the registry has written the key since.
    pub entries_left_alone: u64,
    /// Journal lines that could not be used (a line cut short by a crash, say).
    pub lines_skipped: u64,
    /// How the user's permissions were checked before the first write.
    pub permissions: PermissionCheck,
}

/// Restores every entry that the journal records as removed (or whose removal was cut
/// short), where nothing has been written since.
pub(crate) fn restore(conn: &mut CacheConn, journal_path: &Path) -> Result<RestoreSummary, String> {
    let journal = read_journal(journal_path)?;
    let summary = RestoreSummary {
        journal: journal_path.display().to_string(),
        lines_skipped: journal.lines_skipped,
        ..RestoreSummary::default()
    };
    restore_entries(conn, &journal.removes, &journal.outcomes, summary)
}

/// The writing half of `restore`: which journalled entries to put back, a permission
/// check for all of them, then one script per digest (per key in a cluster), each
/// digest's entries in `restore_order`.
pub(super) fn restore_entries(
    conn: &mut CacheConn,
    removes: &[(u64, Vec<Entry>)],
    outcomes: &BTreeMap<u64, (Outcome, Option<Vec<usize>>)>,
    mut summary: RestoreSummary,
) -> Result<RestoreSummary, String> {
    let script = Script::new(RESTORE_SCRIPT);
    // Newest first, so an entry removed twice comes back with its oldest value last.
    let mut work: Vec<Vec<Entry>> = Vec::new();
    for (id, entries) in removes.iter().rev() {
        let entries: Vec<Entry> = match outcomes.get(id) {
            Some((Outcome::Changed | Outcome::CameBack | Outcome::AlreadyGone, _)) => continue,
            // A removal that failed part-way: only what was read back as removed.
            Some((Outcome::Failed, Some(gone))) => gone
                .iter()
                .filter_map(|i| entries.get(*i).cloned())
                .collect(),
            _ => entries.clone(),
        };
        if !entries.is_empty() {
            work.push(restore_order(&entries));
        }
    }
    let ops = work
        .iter()
        .flatten()
        .filter_map(|e| Some((finding::unescape(&e.key)?, op_tag(&e.op))));
    let checks = acl_checks(RESTORE_COMMANDS, &script, ops);
    summary.permissions = check_permissions(conn, &checks, &script, "restored")?;
    for entries in &work {
        // Per key in a cluster (the keys of one digest are in different slots).
        let batches: Vec<&[Entry]> = if conn.is_cluster() {
            entries.chunks(1).collect()
        } else {
            vec![entries.as_slice()]
        };
        let mut restored = 0i64;
        for batch in batches {
            restored += script_args(batch, &[], None)?
                .invoke(&script, conn.router())
                .map_err(|e| {
                    format!(
                        "restoring cache entries failed after {} entries were put back: {}; run restore again once fixed (entries already back are left alone)",
                        summary.entries_restored + restored as u64,
                        brief(&e)
                    )
                })?;
        }
        summary.entries_restored += restored as u64;
        summary.entries_left_alone += entries.len() as u64 - restored as u64;
    }
    Ok(summary)
}

/// What a journal records, by run and sequence number (`run << 32 | seq`).
#[derive(Debug, Default)]
pub(crate) struct JournalRecords {
    /// Each removal, in the order written.
    removes: Vec<(u64, Vec<Entry>)>,
    /// Each removal's outcome, with the entries read back as removed when it failed
    /// part-way.
    outcomes: BTreeMap<u64, (Outcome, Option<Vec<usize>>)>,
    /// Lines that could not be used (a line cut short by a crash, say).
    pub lines_skipped: u64,
}

impl JournalRecords {
    #[cfg(test)]
    /// Removals the journal records.
    pub(crate) fn removals(&self) -> usize {
        self.removes.len()
    }
}

/// Reads a journal: a regular file of at most `files::MAX_JOURNAL_BYTES`, a line at a
/// time, each at most `files::MAX_JOURNAL_LINE`.
pub(crate) fn read_journal(path: &Path) -> Result<JournalRecords, String> {
    let lines = crate::files::Lines::open(
        "journal",
        path,
        crate::files::MAX_JOURNAL_BYTES,
        crate::files::MAX_JOURNAL_LINE,
    )?;
    parse_journal(lines, path)
}

/// Parses journal lines; `path` names the journal in errors.
pub(crate) fn parse_journal<R: BufRead>(
    mut lines: crate::files::Lines<R>,
    path: &Path,
) -> Result<JournalRecords, String> {
    let mut records = JournalRecords::default();
    let mut run = 0u64;
    let mut saw_begin = false;
    while let Some(line) = lines.next_line()? {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<JournalLine>(line) {
            Ok(JournalLine::Begin { schema, .. }) => {
                if schema != JOURNAL_SCHEMA {
                    return Err(format!(
                        "journal {} has schema {schema:?}, expected {JOURNAL_SCHEMA}",
                        path.display()
                    ));
                }
                saw_begin = true;
                run += 1;
            }
            // Sequence numbers restart with each run appended to the journal.
            Ok(JournalLine::Remove { seq, entries, .. }) => {
                records.removes.push(((run << 32) | seq, entries))
            }
            Ok(JournalLine::Result {
                seq,
                outcome,
                removed,
                ..
            }) => {
                records
                    .outcomes
                    .insert((run << 32) | seq, (outcome, removed));
            }
            Err(_) => records.lines_skipped += 1,
        }
    }
    if !saw_begin {
        return Err(format!(
            "{} is not a registry-audit journal",
            path.display()
        ));
    }
    Ok(records)
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
