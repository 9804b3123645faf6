//! Applying a plan: storage re-checked for each entry's own digest just before, one
//! script per digest (per key in a cluster), global descriptor first, a journal line
//! fsync'd before each removal, and a failure read back and reported as it is.

use super::*;

/// What happened to one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Outcome {
    Removed,
    /// Storage changed since the audit (the blob came back, or its size changed).
    CameBack,
    /// Redis no longer holds the audited values (the registry wrote since).
    Changed,
    /// Nothing left to remove: the entries were removed already (a plan applied twice).
    AlreadyGone,
    /// Redis failed or refused a command part-way: see the group's `failure` for what
    /// was removed and what is left. Purge stops there.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupResult {
    pub digest: Option<Digest>,
    pub key: String,
    pub outcome: Outcome,
    pub entries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<GroupFailure>,
}

/// What a failed removal did, read back from Redis after the error.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupFailure {
    /// Redis's error, one line.
    pub error: String,
    /// Entries gone now ("key" or "key member").
    pub removed: Vec<String>,
    /// Entries still there.
    pub left: Vec<String>,
    /// Entries that could not be read back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
    /// Lookups of the digest the registry would still answer from the cache ("global",
    /// "repository NAME"); `None` when they could not be read.
    pub still_served: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ApplySummary {
    pub entries_removed_by_kind: BTreeMap<Kind, u64>,
    pub entries_removed: u64,
    pub digests_removed: u64,
    pub digests_skipped_came_back: u64,
    pub digests_skipped_changed: u64,
    pub digests_already_gone: u64,
    /// Digests whose removal failed part-way (at most one: purge stops there).
    pub digests_failed: u64,
    /// Digests not tried because purge stopped at a failure.
    pub digests_not_attempted: u64,
    /// How the user's permissions were checked before the first removal.
    pub permissions: PermissionCheck,
    /// Why purge stopped, one line; `None` when every digest was handled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub journal: String,
    pub results: Vec<GroupResult>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(super) enum JournalLine {
    Begin {
        schema: String,
        started_at: String,
        source: SourceInfo,
    },
    Remove {
        seq: u64,
        digest: Option<Digest>,
        entries: Vec<Entry>,
    },
    Result {
        seq: u64,
        outcome: Outcome,
        /// For a failed removal: the indexes (into the `remove` line's entries) of the
        /// entries read back as gone, which `restore` puts back; absent when they could
        /// not be read (then restore tries them all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        removed: Option<Vec<usize>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// `registry-audit-journal-<time>.jsonl` in the current directory, when none is given.
pub(crate) fn default_journal(started: std::time::SystemTime) -> std::path::PathBuf {
    let stamp: String = crate::timestamp::rfc3339(started)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    std::path::PathBuf::from(format!("registry-audit-journal-{stamp}.jsonl"))
}

pub(super) struct Journal {
    file: File,
}

impl Journal {
    /// Opens the journal to append to: only a regular file (or a new one), never
    /// through a symlink, never a FIFO or device.
    fn open(path: &Path) -> Result<Journal, String> {
        let file = crate::files::open_regular_for_update(
            "journal",
            path,
            OpenOptions::new().create(true).append(true),
        )?;
        Ok(Journal { file })
    }

    /// Appends one line and waits until it is on disk.
    fn write(&mut self, line: &JournalLine) -> Result<(), String> {
        let mut text = serde_json::to_string(line).map_err(|e| e.to_string())?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| format!("cannot write the journal: {e}"))
    }
}

/// Applies a plan group by group: re-check storage, journal, remove atomically.
/// Before anything, the plan is validated and the Redis user's permission to run every
/// command the removal sends is checked (an error: nothing removed, no journal). A
/// removal that fails part-way is read back, journalled and reported, and purge stops
/// there (`ApplySummary::failure`). `progress` is told each group's result as it happens.
pub(crate) fn apply(
    conn: &mut CacheConn,
    storage: &Storage,
    plan: &Plan,
    journal_path: &Path,
    started_at: String,
    mut progress: impl FnMut(&GroupResult),
) -> Result<ApplySummary, String> {
    plan.validate()?;
    let remove = Script::new(REMOVE_SCRIPT);
    let ops = plan.groups.iter().flat_map(|g| {
        let sets = g.not_member_of.iter().map(|s| (s.as_str(), "N"));
        g.entries
            .iter()
            .map(|e| (e.key.as_str(), op_tag(&e.op)))
            .chain(sets)
    });
    let checks = acl_checks(
        REMOVE_COMMANDS,
        &remove,
        ops.filter_map(|(k, tag)| Some((finding::unescape(k)?, tag))),
    );
    let permissions = check_permissions(conn, &checks, &remove, "removed")?;
    let mut journal = Journal::open(journal_path)?;
    journal.write(&JournalLine::Begin {
        schema: JOURNAL_SCHEMA.into(),
        started_at,
        source: plan.source.clone(),
    })?;
    let mut summary = ApplySummary {
        journal: journal_path.display().to_string(),
        entries_removed_by_kind: Kind::ALL
            .iter()
            .filter(|k| purges(**k, plan.include_malformed))
            .map(|k| (*k, 0))
            .collect(),
        permissions,
        ..ApplySummary::default()
    };
    for (seq, group) in plan.groups.iter().enumerate() {
        if summary.failure.is_some() {
            summary.digests_not_attempted += 1;
            continue;
        }
        let seq = seq as u64;
        let label = group
            .entries
            .first()
            .map(|e| e.key.clone())
            .unwrap_or_default();
        let mut failure = None;
        let outcome = match recheck(storage, group) {
            None => Outcome::CameBack,
            Some(entries) if entries.is_empty() => Outcome::CameBack,
            Some(entries) => {
                let entries = removal_order(&entries);
                journal.write(&JournalLine::Remove {
                    seq,
                    digest: group.digest,
                    entries: entries.clone(),
                })?;
                // One script for the whole digest on a single server: all or nothing.
                // In a cluster the keys of one digest live in different slots, so each
                // key is removed by its own conditional script (see README).
                let attempt = if conn.is_cluster() {
                    remove_per_key(
                        conn.router(),
                        &remove,
                        &entries,
                        &group.not_member_of,
                        group.digest.as_ref(),
                    )
                } else {
                    let call = script_args(&entries, &group.not_member_of, group.digest.as_ref())?;
                    // 1: removed; 2: nothing left to remove; 0: a value changed.
                    call.invoke(&remove, conn.router()).map(|r| {
                        if r == 1 {
                            (0..entries.len()).collect()
                        } else {
                            Vec::new()
                        }
                    })
                };
                let (mut journal_removed, mut error) = (None, None);
                let (outcome, removed) = match attempt {
                    Ok(removed) if !removed.is_empty() => (Outcome::Removed, removed),
                    Ok(_) if all_gone(conn.router(), &entries)? => {
                        (Outcome::AlreadyGone, Vec::new())
                    }
                    Ok(_) => (Outcome::Changed, Vec::new()),
                    Err(e) => {
                        let (f, gone) = read_back(conn.router(), group, &entries, brief(&e));
                        error = Some(f.error.clone());
                        summary.failure = Some(failure_line(group, &f, journal_path));
                        // Restore puts back exactly these; all of them when some
                        // entries could not be read.
                        journal_removed = f.unknown.is_empty().then(|| gone.clone());
                        failure = Some(f);
                        (Outcome::Failed, gone)
                    }
                };
                journal.write(&JournalLine::Result {
                    seq,
                    outcome,
                    removed: journal_removed,
                    error,
                })?;
                for i in removed {
                    *summary
                        .entries_removed_by_kind
                        .entry(entries[i].kind)
                        .or_default() += 1;
                    summary.entries_removed += 1;
                }
                outcome
            }
        };
        match outcome {
            Outcome::Removed => summary.digests_removed += 1,
            Outcome::CameBack => summary.digests_skipped_came_back += 1,
            Outcome::Changed => summary.digests_skipped_changed += 1,
            Outcome::AlreadyGone => summary.digests_already_gone += 1,
            Outcome::Failed => summary.digests_failed += 1,
        }
        let result = GroupResult {
            digest: group.digest,
            key: label,
            outcome,
            entries: group.entries.len(),
            failure,
        };
        progress(&result);
        summary.results.push(result);
    }
    Ok(summary)
}

/// The one line a failed run ends with.
pub(super) fn failure_line(group: &Group, f: &GroupFailure, journal: &Path) -> String {
    let what = group
        .digest
        .map(|d| d.to_string())
        .or_else(|| group.entries.first().map(|e| e.key.clone()))
        .unwrap_or_default();
    let served = match &f.still_served {
        Some(v) if v.is_empty() => "nothing of it is served from the cache any more".to_string(),
        Some(v) => format!("still served: {}", v.join(", ")),
        None => "could not read back what is still served".to_string(),
    };
    format!(
        "removing the cache entries of {what} failed part-way ({}): removed {}, left {}{}; {served}; stopped there, journal {} (run purge again once fixed, or restore)",
        finding::escape(f.error.as_bytes()),
        f.removed.len(),
        f.left.len(),
        if f.unknown.is_empty() {
            String::new()
        } else {
            format!(", {} unreadable", f.unknown.len())
        },
        journal.display()
    )
}

/// After a failed removal: which entries are gone and which are left (read back from
/// Redis), and which lookups of the digest the registry would still answer; with the
/// indexes of the entries read back as gone.
pub(super) fn read_back(
    conn: &mut dyn ConnectionLike,
    group: &Group,
    entries: &[Entry],
    error: String,
) -> (GroupFailure, Vec<usize>) {
    let mut f = GroupFailure {
        error,
        removed: Vec::new(),
        left: Vec::new(),
        unknown: Vec::new(),
        still_served: None,
    };
    let mut gone = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match entry_present(conn, e) {
            Ok(false) => {
                f.removed.push(describe(e));
                gone.push(i);
            }
            Ok(true) => f.left.push(describe(e)),
            Err(_) => f.unknown.push(describe(e)),
        }
    }
    f.still_served = group
        .digest
        .and_then(|d| served_lookups(conn, &d, entries).ok());
    (f, gone)
}

/// An entry as the operator reads it: its key, and the member for a set member.
pub(super) fn describe(e: &Entry) -> String {
    match &e.op {
        Op::Member { member } => format!("{} {member}", e.key),
        _ => e.key.clone(),
    }
}

/// The lookups of `d` the registry answers from the cache now, by its rules: the global
/// one when `blobs::D` has `digest` and an integer `size`; a repository's (of those the
/// entries name) when, besides, D is in its set and its hash has a `mediatype`.
pub(super) fn served_lookups(
    conn: &mut dyn ConnectionLike,
    d: &Digest,
    entries: &[Entry],
) -> redis::RedisResult<Vec<String>> {
    let (digest, size): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
        .arg(cache_index::global_key(d))
        .arg("digest")
        .arg("size")
        .query(conn)?;
    let global = digest.is_some() && size.is_some_and(|s| s.parse::<i64>().is_ok());
    let mut out = Vec::new();
    if !global {
        return Ok(out);
    }
    out.push("global".to_string());
    let repos: std::collections::BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| e.repository.as_deref())
        .collect();
    for r in repos {
        let member: bool = redis::cmd("SISMEMBER")
            .arg(cache_index::repo_set_key(r))
            .arg(d.to_string())
            .query(conn)?;
        let mediatype: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(cache_index::repo_hash_key(r, d))
            .arg("mediatype")
            .query(conn)?;
        let hash = mediatype.iter().any(Option::is_some);
        if member && hash {
            out.push(format!("repository {r}"));
        }
    }
    Ok(out)
}

/// Removes a digest's entries key by key, for a cluster, in `removal_order` (the
/// caller's order): the global descriptor first, then repository set members, then
/// repository hashes, each only if it still holds the audited value. Removing an entry
/// can only turn an answer of the registry into a miss, never into a wrong answer, so a
/// removal that interleaves with a push leaves at worst a cold entry that the registry
/// fills again from storage. Returns the indexes of the entries removed.
pub(super) fn remove_per_key(
    conn: &mut dyn ConnectionLike,
    script: &Script,
    entries: &[Entry],
    not_member_of: &[String],
    digest: Option<&Digest>,
) -> redis::RedisResult<Vec<usize>> {
    // An orphan descriptor is removed only while the digest is still not a member.
    if let Some(d) = digest {
        for set in not_member_of {
            let raw = finding::unescape(set).unwrap_or_default();
            let is: bool = redis::cmd("SISMEMBER")
                .arg(raw)
                .arg(d.to_string())
                .query(conn)?;
            if is {
                return Ok(Vec::new());
            }
        }
    }
    let mut removed = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Ok(call) = script_args(std::slice::from_ref(e), &[], None) else {
            continue;
        };
        if call.invoke(script, conn)? == 1 {
            removed.push(i);
        }
    }
    Ok(removed)
}

/// Whether none of the entries is there any more (a plan applied twice).
pub(super) fn all_gone(conn: &mut dyn ConnectionLike, entries: &[Entry]) -> Result<bool, String> {
    for e in entries {
        let present = entry_present(conn, e)
            .map_err(|e| format!("reading cache entries from Redis failed: {}", brief(&e)))?;
        if present {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether any part of the entry is in Redis: a planned field, the member, the key.
pub(super) fn entry_present(conn: &mut dyn ConnectionLike, e: &Entry) -> redis::RedisResult<bool> {
    let Some(raw) = finding::unescape(&e.key) else {
        return Ok(false);
    };
    Ok(match &e.op {
        Op::Member { member } => {
            let m = finding::unescape(member).unwrap_or_default();
            let ty: String = redis::cmd("TYPE").arg(&raw).query(conn)?;
            ty == "set"
                && redis::cmd("SISMEMBER")
                    .arg(&raw)
                    .arg(m)
                    .query::<bool>(conn)?
        }
        Op::Fields { fields, .. } => {
            let ty: String = redis::cmd("TYPE").arg(&raw).query(conn)?;
            if ty == "hash" {
                let names: Vec<Vec<u8>> = fields
                    .keys()
                    .map(|f| finding::unescape(f).unwrap_or_default())
                    .collect();
                !names.is_empty()
                    && redis::cmd("HMGET")
                        .arg(&raw)
                        .arg(names)
                        .query::<Vec<Option<Vec<u8>>>>(conn)?
                        .iter()
                        .any(Option::is_some)
            } else {
                ty != "none"
            }
        }
        Op::Key { .. } => redis::cmd("EXISTS").arg(&raw).query::<bool>(conn)?,
    })
}

/// Storage, checked again just before removal. `None` when the blob's state is no longer
/// what the plan saw; otherwise the entries still to remove. Every entry is checked
/// against its own digest (read from its key, not from the group, which a hand-edited
/// plan could contradict): a phantom entry goes only while its blob is absent, a size
/// mismatch only while storage holds another size, an unlinked entry only while its
/// repository does not link the blob, and a malformed descriptor hash that names a
/// blob in storage is left for its size-mismatch finding.
pub(super) fn recheck(storage: &Storage, group: &Group) -> Option<Vec<Entry>> {
    let mut states: BTreeMap<Digest, BlobState> = BTreeMap::new();
    let mut state_of = |d: &Digest| -> Option<BlobState> {
        if let Some(s) = states.get(d) {
            return Some(*s);
        }
        let s = match storage.stat_blob_fresh(d) {
            BlobStat::Absent => BlobState::Absent,
            BlobStat::Present { size, .. } => BlobState::Present { size },
            BlobStat::Unreadable { .. } => return None,
        };
        states.insert(*d, s);
        Some(s)
    };
    if let Some(d) = group.digest {
        let now = state_of(&d)?;
        if group.blob != BlobState::NotChecked && now != group.blob {
            return None;
        }
    }
    let mut keep = Vec::new();
    for e in &group.entries {
        let own = match entry_digest(e) {
            Some(d) => Some((d, state_of(&d)?)),
            None => None,
        };
        if still_wrong(storage, e, own) {
            keep.push(e.clone());
        }
    }
    Some(keep)
}

/// Whether storage still makes this entry wrong (see `recheck`).
pub(super) fn still_wrong(storage: &Storage, e: &Entry, own: Option<(Digest, BlobState)>) -> bool {
    let Some((d, now)) = own else {
        // No digest to check: a malformed key or member the registry cannot look up.
        return e.kind == Kind::MalformedCacheEntry;
    };
    match e.kind {
        Kind::PhantomBlobDescriptor | Kind::PhantomRepositoryBlob => now == BlobState::Absent,
        Kind::SizeMismatch => match now {
            BlobState::Absent => true,
            BlobState::Present { size } => {
                snapshot_size(e).is_some_and(|cached| cached != size as i64)
            }
            BlobState::NotChecked => false,
        },
        Kind::UnlinkedRepositoryBlob => {
            now == BlobState::Absent
                || e.repository
                    .as_deref()
                    .is_some_and(|r| !storage.is_linked(r, &d))
        }
        // Inert by construction: removed only while the digest is not a set member.
        Kind::OrphanRepositoryDescriptor => true,
        Kind::MalformedCacheEntry => match &e.op {
            Op::Key { redis_type, .. } if redis_type == "hash" => now == BlobState::Absent,
            _ => true,
        },
        _ => false,
    }
}

/// The `size` a global descriptor held when the plan was made.
pub(super) fn snapshot_size(e: &Entry) -> Option<i64> {
    let Op::Fields { fields, .. } = &e.op else {
        return None;
    };
    let raw = finding::unescape(fields.get("size")?)?;
    std::str::from_utf8(&raw).ok()?.parse().ok()
}
