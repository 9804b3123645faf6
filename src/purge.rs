//! Removing exactly the wrong cache entries, and putting them back. This module owns
//! every write registry-audit ever makes, and only to Redis keys of the registry's
//! shapes: it turns audit findings into a plan (with a snapshot of each entry's current
//! value), re-checks storage just before acting, removes each digest's entries in one
//! Lua script that first verifies they still hold the audited values, and journals what
//! it removed (fsync'd before each removal) so `restore` can put it back. It never
//! touches storage.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::Path;

use redis::{ConnectionLike, Script};

use crate::redis_cache::CacheConn;
use serde::{Deserialize, Serialize};

use crate::cache_index;
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::redis_cache::{HASH_FIELDS, brief};
use crate::report::SourceInfo;
use crate::storage::{BlobStat, Storage};

pub const PLAN_SCHEMA: &str = "registry-audit-purge-plan/1";
pub const JOURNAL_SCHEMA: &str = "registry-audit-journal/1";

/// One removal, with the value the entry held when the plan was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// HDEL these hash fields, if each still holds its value (and, when `exact`, the
    /// hash has no other field - then the key goes away).
    Fields {
        fields: BTreeMap<String, String>,
        exact: bool,
    },
    /// SREM this member from the set.
    Member { member: String },
    /// DEL a whole key (a malformed one), if it still dumps to this payload.
    Key {
        redis_type: String,
        dump_hex: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// The severity of the finding behind the entry (an inert phantom is a warning).
    #[serde(default = "default_severity")]
    pub severity: Severity,
    pub repository: Option<String>,
    /// Escaped key (see `finding::escape`).
    pub key: String,
    #[serde(flatten)]
    pub op: Op,
}

fn default_severity() -> Severity {
    Severity::Error
}

/// What storage held for the digest when the plan was made; the group is skipped when
/// storage says otherwise at apply time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobState {
    Absent,
    Present {
        size: u64,
    },
    /// Not re-checked (malformed entries without a usable digest).
    NotChecked,
}

/// All removals for one digest (or one malformed key), applied atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub digest: Option<Digest>,
    pub blob: BlobState,
    pub entries: Vec<Entry>,
    /// `repository::R::blobs` sets that must still lack the digest (orphan descriptors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_member_of: Vec<String>,
}

/// A finding purge does not fix, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub finding: Finding,
    pub advice: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub schema: String,
    pub created_at: String,
    pub source: SourceInfo,
    pub include_malformed: bool,
    pub groups: Vec<Group>,
    pub kept: Vec<Kept>,
}

impl Plan {
    pub fn entry_count(&self) -> usize {
        self.groups.iter().map(|g| g.entries.len()).sum()
    }

    /// Reads a saved plan: a regular file of at most `files::MAX_PLAN_BYTES`.
    pub fn load(path: &Path) -> Result<Plan, String> {
        let text = crate::files::read("plan", path, crate::files::MAX_PLAN_BYTES)?;
        Plan::parse(path, &text)
    }

    /// Parses a plan's bytes; `path` names it in errors.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Plan, String> {
        let plan: Plan = serde_json::from_slice(text).map_err(|e| {
            format!(
                "plan {} is not a registry-audit purge plan: {e} (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        if plan.schema != PLAN_SCHEMA {
            return Err(format!(
                "plan {} has schema {:?}, expected {PLAN_SCHEMA}",
                path.display(),
                plan.schema
            ));
        }
        for g in &plan.groups {
            for e in &g.entries {
                check_registry_key(&e.key)?;
            }
        }
        Ok(plan)
    }
}

/// Refuses a key that is not of the registry's shapes: a plan or journal edited by hand
/// must not make purge touch another application's keys.
fn check_registry_key(key: &str) -> Result<Vec<u8>, String> {
    let raw = finding::unescape(key)
        .ok_or_else(|| format!("key {key:?} is not in registry-audit's escaped form"))?;
    match cache_index::classify(&raw) {
        cache_index::KeyShape::Foreign => Err(format!(
            "key {key:?} is not one of the registry's cache keys: refusing to touch it"
        )),
        _ => Ok(raw),
    }
}

/// Kinds purge removes; malformed entries only when asked.
pub fn purges(kind: Kind, include_malformed: bool) -> bool {
    match kind {
        Kind::PhantomBlobDescriptor
        | Kind::PhantomRepositoryBlob
        | Kind::UnlinkedRepositoryBlob
        | Kind::SizeMismatch
        | Kind::OrphanRepositoryDescriptor => true,
        Kind::MalformedCacheEntry => include_malformed,
        _ => false,
    }
}

fn advice(kind: Kind) -> &'static str {
    match kind {
        Kind::DigestMismatch => {
            "storage problem: the blob is corrupt; restore it from a backup, or delete it (registry API or storage) and push the image again. The cache is not touched."
        }
        Kind::UnreadableBlob => {
            "storage problem: fix the blob file (permissions, type, symlink) or restore it; the cache is not touched."
        }
        Kind::MalformedCacheEntry => {
            "left alone: pass --include-malformed to remove malformed entries."
        }
        _ => "storage problem: see the finding; the cache is not touched.",
    }
}

/// Builds the plan from audit findings, reading the current value of every entry to
/// remove. Storage problems become `kept` with advice.
pub fn build_plan(
    conn: &mut dyn ConnectionLike,
    storage: &Storage,
    findings: &[Finding],
    include_malformed: bool,
    source: SourceInfo,
    created_at: String,
) -> Result<Plan, String> {
    let mut groups: BTreeMap<(Option<Digest>, String), Group> = BTreeMap::new();
    let mut kept = Vec::new();
    for f in findings {
        if !purges(f.kind, include_malformed) {
            kept.push(Kept {
                finding: f.clone(),
                advice: advice(f.kind).to_string(),
            });
            continue;
        }
        // Malformed entries group by key (their digest may be absent); the rest by digest.
        let group_key = if f.kind == Kind::MalformedCacheEntry {
            (
                None,
                format!(
                    "{}\u{0}{}",
                    f.location(),
                    f.member.clone().unwrap_or_default()
                ),
            )
        } else {
            (f.digest, String::new())
        };
        let group = groups.entry(group_key).or_insert_with(|| Group {
            digest: f.digest.filter(|_| f.kind != Kind::MalformedCacheEntry),
            blob: BlobState::NotChecked,
            entries: Vec::new(),
            not_member_of: Vec::new(),
        });
        for entry in snapshot(conn, f)? {
            if !group
                .entries
                .iter()
                .any(|e| e.key == entry.key && e.op == entry.op)
            {
                group.entries.push(entry);
            }
        }
        if f.kind == Kind::OrphanRepositoryDescriptor
            && let Some(repo) = &f.repository
        {
            group.not_member_of.push(cache_index::repo_set_key(repo));
        }
    }
    let mut out: Vec<Group> = groups
        .into_values()
        .filter(|g| !g.entries.is_empty())
        .collect();
    for g in &mut out {
        if let Some(d) = g.digest {
            g.blob = match storage.stat_blob(&d) {
                BlobStat::Absent => BlobState::Absent,
                BlobStat::Present { size, .. } => BlobState::Present { size },
                BlobStat::Unreadable { .. } => BlobState::NotChecked,
            };
        }
        g.entries
            .sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    }
    Ok(Plan {
        schema: PLAN_SCHEMA.into(),
        created_at,
        source,
        include_malformed,
        groups: out,
        kept,
    })
}

/// The entries behind one finding, with their current values.
fn snapshot(conn: &mut dyn ConnectionLike, f: &Finding) -> Result<Vec<Entry>, String> {
    let err =
        |e: redis::RedisError| format!("reading entries to purge from Redis failed: {}", brief(&e));
    let mut out = Vec::new();
    let entry = |key: String, op: Op| Entry {
        kind: f.kind,
        severity: f.severity,
        repository: f.repository.clone(),
        key,
        op,
    };
    if f.kind == Kind::MalformedCacheEntry {
        let key = f
            .key
            .clone()
            .ok_or("internal: a malformed entry without a key")?;
        let raw = finding::unescape(&key).ok_or("internal: unescapable key")?;
        if let Some(member) = &f.member {
            let m = finding::unescape(member).ok_or("internal: unescapable member")?;
            let is: bool = redis::cmd("SISMEMBER")
                .arg(&raw)
                .arg(&m)
                .query(conn)
                .map_err(err)?;
            if is {
                out.push(entry(
                    key.clone(),
                    Op::Member {
                        member: member.clone(),
                    },
                ));
            }
        } else {
            let ty: String = redis::cmd("TYPE").arg(&raw).query(conn).map_err(err)?;
            let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&raw).query(conn).map_err(err)?;
            if let Some(dump) = dump {
                out.push(entry(
                    key.clone(),
                    Op::Key {
                        redis_type: ty,
                        dump_hex: to_hex(&dump),
                    },
                ));
            }
        }
        return Ok(out);
    }
    let Some(d) = f.digest else { return Ok(out) };
    match &f.repository {
        None => {
            let key = cache_index::global_key(&d);
            let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(&key)
                .arg(&HASH_FIELDS[..])
                .query(conn)
                .map_err(err)?;
            let fields: BTreeMap<String, String> = HASH_FIELDS
                .iter()
                .zip(values)
                .filter_map(|(name, v)| v.map(|v| (name.to_string(), finding::escape(&v))))
                .collect();
            if !fields.is_empty() {
                out.push(entry(
                    key,
                    Op::Fields {
                        fields,
                        exact: false,
                    },
                ));
            }
        }
        Some(repo) => {
            let set = cache_index::repo_set_key(repo);
            let hash = cache_index::repo_hash_key(repo, &d);
            if f.kind != Kind::OrphanRepositoryDescriptor {
                let is: bool = redis::cmd("SISMEMBER")
                    .arg(&set)
                    .arg(d.to_string())
                    .query(conn)
                    .map_err(err)?;
                if is {
                    out.push(entry(
                        set,
                        Op::Member {
                            member: d.to_string(),
                        },
                    ));
                }
            }
            let ty: String = redis::cmd("TYPE").arg(&hash).query(conn).map_err(err)?;
            if ty == "hash" {
                let all: Vec<(Vec<u8>, Vec<u8>)> =
                    redis::cmd("HGETALL").arg(&hash).query(conn).map_err(err)?;
                let fields = all
                    .into_iter()
                    .map(|(k, v)| (finding::escape(&k), finding::escape(&v)))
                    .collect();
                out.push(entry(
                    hash,
                    Op::Fields {
                        fields,
                        exact: true,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// Checks that every entry of a group still holds its planned value and then removes
/// them all, or changes nothing: one script, so Redis runs it atomically.
/// ARGV is flat and binary-safe: per op a tag, a key index, then the op's values.
const REMOVE_SCRIPT: &str = r#"
local function hash_matches(key, exact, n, base)
  if redis.call('TYPE', key).ok ~= 'hash' then return false end
  if exact == '1' and redis.call('HLEN', key) ~= n then return false end
  for i = 0, n - 1 do
    if redis.call('HGET', key, ARGV[base + 2 * i]) ~= ARGV[base + 2 * i + 1] then return false end
  end
  return true
end
local function walk(apply)
  local i = 1
  while i <= #ARGV do
    local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
    if tag == 'F' then
      local exact, n = ARGV[i + 2], tonumber(ARGV[i + 3])
      if apply then
        for j = 0, n - 1 do redis.call('HDEL', key, ARGV[i + 4 + 2 * j]) end
      elseif not hash_matches(key, exact, n, i + 4) then return false end
      i = i + 4 + 2 * n
    elseif tag == 'M' or tag == 'N' then
      local t = redis.call('TYPE', key).ok
      local is = (t == 'set') and redis.call('SISMEMBER', key, ARGV[i + 2]) == 1
      if apply then
        if tag == 'M' then redis.call('SREM', key, ARGV[i + 2]) end
      elseif (tag == 'M') ~= is then return false end
      i = i + 3
    elseif tag == 'K' then
      if apply then redis.call('DEL', key)
      elseif redis.call('TYPE', key).ok ~= ARGV[i + 2] or redis.call('DUMP', key) ~= ARGV[i + 3] then return false end
      i = i + 4
    else
      return redis.error_reply('registry-audit: bad op ' .. tostring(tag))
    end
  end
  return true
end
local function all_gone()
  local i = 1
  while i <= #ARGV do
    local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
    if tag == 'F' then
      local n = tonumber(ARGV[i + 3])
      if redis.call('TYPE', key).ok == 'hash' then
        for j = 0, n - 1 do
          if redis.call('HEXISTS', key, ARGV[i + 4 + 2 * j]) == 1 then return false end
        end
      elseif redis.call('EXISTS', key) == 1 then return false end
      i = i + 4 + 2 * n
    elseif tag == 'M' then
      if redis.call('TYPE', key).ok == 'set' and redis.call('SISMEMBER', key, ARGV[i + 2]) == 1 then return false end
      i = i + 3
    elseif tag == 'N' then
      i = i + 3
    else
      if redis.call('EXISTS', key) == 1 then return false end
      i = i + 4
    end
  end
  return true
end
if walk(false) then
  walk(true)
  return 1
end
if all_gone() then return 2 end
return 0
"#;

/// Puts journalled entries back where nothing has been written since.
const RESTORE_SCRIPT: &str = r#"
local restored = 0
local i = 1
while i <= #ARGV do
  local tag, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if tag == 'F' then
    local n = tonumber(ARGV[i + 3])
    local t = redis.call('TYPE', key).ok
    local free = (t == 'none') or (t == 'hash')
    if t == 'hash' then
      for j = 0, n - 1 do
        if redis.call('HEXISTS', key, ARGV[i + 4 + 2 * j]) == 1 then free = false end
      end
    end
    if free then
      for j = 0, n - 1 do redis.call('HSET', key, ARGV[i + 4 + 2 * j], ARGV[i + 5 + 2 * j]) end
      restored = restored + 1
    end
    i = i + 4 + 2 * n
  elseif tag == 'M' then
    local t = redis.call('TYPE', key).ok
    if (t == 'none' or t == 'set') and redis.call('SISMEMBER', key, ARGV[i + 2]) == 0 then
      redis.call('SADD', key, ARGV[i + 2])
      restored = restored + 1
    end
    i = i + 3
  elseif tag == 'K' then
    if redis.call('EXISTS', key) == 0 then
      redis.call('RESTORE', key, 0, ARGV[i + 3])
      restored = restored + 1
    end
    i = i + 4
  else
    return redis.error_reply('registry-audit: bad op ' .. tostring(tag))
  end
end
return restored
"#;

/// One script call: KEYS and a flat, binary-safe ARGV.
struct ScriptCall {
    keys: Vec<Vec<u8>>,
    argv: Vec<Vec<u8>>,
}

impl ScriptCall {
    fn invoke(&self, script: &Script, conn: &mut dyn ConnectionLike) -> redis::RedisResult<i64> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k.as_slice());
        }
        for a in &self.argv {
            inv.arg(a.as_slice());
        }
        inv.invoke(conn)
    }
}

/// Encodes entries as the scripts' KEYS and ARGV.
fn script_args(
    entries: &[Entry],
    not_member_of: &[String],
    digest: Option<&Digest>,
) -> Result<ScriptCall, String> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut argv: Vec<Vec<u8>> = Vec::new();
    let key_index = |keys: &mut Vec<Vec<u8>>, raw: Vec<u8>| -> Vec<u8> {
        let pos = keys.iter().position(|k| *k == raw).unwrap_or_else(|| {
            keys.push(raw);
            keys.len() - 1
        });
        (pos + 1).to_string().into_bytes()
    };
    let unesc =
        |s: &str| finding::unescape(s).ok_or_else(|| format!("{s:?} is not in escaped form"));
    for e in entries {
        let raw = check_registry_key(&e.key)?;
        let idx = key_index(&mut keys, raw);
        match &e.op {
            Op::Fields { fields, exact } => {
                argv.push(b"F".to_vec());
                argv.push(idx);
                argv.push(if *exact { b"1".to_vec() } else { b"0".to_vec() });
                argv.push(fields.len().to_string().into_bytes());
                for (k, v) in fields {
                    argv.push(unesc(k)?);
                    argv.push(unesc(v)?);
                }
            }
            Op::Member { member } => {
                argv.push(b"M".to_vec());
                argv.push(idx);
                argv.push(unesc(member)?);
            }
            Op::Key {
                redis_type,
                dump_hex,
            } => {
                argv.push(b"K".to_vec());
                argv.push(idx);
                argv.push(redis_type.clone().into_bytes());
                argv.push(from_hex(dump_hex).ok_or("dump payload is not hex")?);
            }
        }
    }
    if let Some(d) = digest {
        for set in not_member_of {
            let raw = check_registry_key(set)?;
            let idx = key_index(&mut keys, raw);
            argv.push(b"N".to_vec());
            argv.push(idx);
            argv.push(d.to_string().into_bytes());
        }
    }
    Ok(ScriptCall { keys, argv })
}

/// What happened to one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Removed,
    /// Storage changed since the audit (the blob came back, or its size changed).
    CameBack,
    /// Redis no longer holds the audited values (the registry wrote since).
    Changed,
    /// Nothing left to remove: the entries were removed already (a plan applied twice).
    AlreadyGone,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub digest: Option<Digest>,
    pub key: String,
    pub outcome: Outcome,
    pub entries: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplySummary {
    pub entries_removed_by_kind: BTreeMap<Kind, u64>,
    pub entries_removed: u64,
    pub digests_removed: u64,
    pub digests_skipped_came_back: u64,
    pub digests_skipped_changed: u64,
    pub digests_already_gone: u64,
    pub journal: String,
    pub results: Vec<GroupResult>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum JournalLine {
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
    },
}

/// `registry-audit-journal-<time>.jsonl` in the current directory, when none is given.
pub fn default_journal(started: std::time::SystemTime) -> std::path::PathBuf {
    let stamp: String = crate::report::rfc3339(started)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    std::path::PathBuf::from(format!("registry-audit-journal-{stamp}.jsonl"))
}

struct Journal {
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
/// `progress` is told each group's result as it happens.
pub fn apply(
    conn: &mut CacheConn,
    storage: &Storage,
    plan: &Plan,
    journal_path: &Path,
    started_at: String,
    mut progress: impl FnMut(&GroupResult),
) -> Result<ApplySummary, String> {
    let mut journal = Journal::open(journal_path)?;
    journal.write(&JournalLine::Begin {
        schema: JOURNAL_SCHEMA.into(),
        started_at,
        source: plan.source.clone(),
    })?;
    let remove = Script::new(REMOVE_SCRIPT);
    let mut summary = ApplySummary {
        journal: journal_path.display().to_string(),
        entries_removed_by_kind: Kind::ALL
            .iter()
            .filter(|k| purges(**k, plan.include_malformed))
            .map(|k| (*k, 0))
            .collect(),
        ..ApplySummary::default()
    };
    for (seq, group) in plan.groups.iter().enumerate() {
        let seq = seq as u64;
        let entries = recheck(storage, group);
        let label = group
            .entries
            .first()
            .map(|e| e.key.clone())
            .unwrap_or_default();
        let outcome = match entries {
            None => Outcome::CameBack,
            Some(entries) if entries.is_empty() => Outcome::CameBack,
            Some(entries) => {
                journal.write(&JournalLine::Remove {
                    seq,
                    digest: group.digest,
                    entries: entries.clone(),
                })?;
                let failed = |e: redis::RedisError| {
                    format!(
                        "removing cache entries failed (journal {} is valid): {}",
                        journal_path.display(),
                        brief(&e)
                    )
                };
                // One script for the whole digest on a single server: all or nothing.
                // In a cluster the keys of one digest live in different slots, so each
                // key is removed by its own conditional script (see README).
                let removed: Vec<&Entry> = if conn.is_cluster() {
                    remove_per_key(
                        conn.router(),
                        &remove,
                        &entries,
                        &group.not_member_of,
                        group.digest.as_ref(),
                    )
                    .map_err(failed)?
                } else {
                    let call = script_args(&entries, &group.not_member_of, group.digest.as_ref())?;
                    match call.invoke(&remove, conn.router()).map_err(failed)? {
                        1 => entries.iter().collect(),
                        // 2: nothing left to remove; 0: a value changed, nothing removed.
                        _ => Vec::new(),
                    }
                };
                let outcome = if !removed.is_empty() {
                    Outcome::Removed
                } else if all_gone(conn.router(), &entries)? {
                    Outcome::AlreadyGone
                } else {
                    Outcome::Changed
                };
                journal.write(&JournalLine::Result { seq, outcome })?;
                for e in removed {
                    *summary.entries_removed_by_kind.entry(e.kind).or_default() += 1;
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
        }
        let result = GroupResult {
            digest: group.digest,
            key: label,
            outcome,
            entries: group.entries.len(),
        };
        progress(&result);
        summary.results.push(result);
    }
    Ok(summary)
}

/// Removes a digest's entries key by key, for a cluster: repository set members first,
/// then repository hashes, then the global descriptor, each only if it still holds the
/// audited value. Removing an entry can only turn an answer of the registry into a
/// miss, never into a wrong answer, so a removal that interleaves with a push leaves at
/// worst a cold entry that the registry fills again from storage.
fn remove_per_key<'a>(
    conn: &mut dyn ConnectionLike,
    script: &Script,
    entries: &'a [Entry],
    not_member_of: &[String],
    digest: Option<&Digest>,
) -> redis::RedisResult<Vec<&'a Entry>> {
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
    let rank = |e: &Entry| match e.op {
        Op::Member { .. } => 0,
        Op::Fields { exact: true, .. } | Op::Key { .. } => 1,
        Op::Fields { exact: false, .. } => 2,
    };
    let mut ordered: Vec<&Entry> = entries.iter().collect();
    ordered.sort_by_key(|e| rank(e));
    let mut removed = Vec::new();
    for e in ordered {
        let Ok(call) = script_args(std::slice::from_ref(e), &[], None) else {
            continue;
        };
        if call.invoke(script, conn)? == 1 {
            removed.push(e);
        }
    }
    Ok(removed)
}

/// Whether none of the entries is there any more (a plan applied twice).
fn all_gone(conn: &mut dyn ConnectionLike, entries: &[Entry]) -> Result<bool, String> {
    let err =
        |e: redis::RedisError| format!("reading cache entries from Redis failed: {}", brief(&e));
    for e in entries {
        let Some(raw) = finding::unescape(&e.key) else {
            continue;
        };
        let present = match &e.op {
            Op::Member { member } => {
                let m = finding::unescape(member).unwrap_or_default();
                let ty: String = redis::cmd("TYPE").arg(&raw).query(conn).map_err(err)?;
                ty == "set"
                    && redis::cmd("SISMEMBER")
                        .arg(&raw)
                        .arg(m)
                        .query::<bool>(conn)
                        .map_err(err)?
            }
            Op::Fields { fields, .. } => {
                let ty: String = redis::cmd("TYPE").arg(&raw).query(conn).map_err(err)?;
                if ty == "hash" {
                    let mut any = false;
                    for f in fields.keys() {
                        let name = finding::unescape(f).unwrap_or_default();
                        any |= redis::cmd("HEXISTS")
                            .arg(&raw)
                            .arg(name)
                            .query::<bool>(conn)
                            .map_err(err)?;
                    }
                    any
                } else {
                    ty != "none"
                }
            }
            Op::Key { .. } => redis::cmd("EXISTS")
                .arg(&raw)
                .query::<bool>(conn)
                .map_err(err)?,
        };
        if present {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Storage, checked again just before removal. `None` when the blob's state is no longer
/// what the plan saw; otherwise the entries still to remove (an unlinked entry whose
/// repository links the blob by now is dropped).
fn recheck(storage: &Storage, group: &Group) -> Option<Vec<Entry>> {
    let Some(d) = group.digest else {
        return Some(group.entries.clone());
    };
    let now = match storage.stat_blob_fresh(&d) {
        BlobStat::Absent => BlobState::Absent,
        BlobStat::Present { size, .. } => BlobState::Present { size },
        BlobStat::Unreadable { .. } => return None,
    };
    if group.blob != BlobState::NotChecked && now != group.blob {
        return None;
    }
    Some(
        group
            .entries
            .iter()
            .filter(|e| {
                !(e.kind == Kind::UnlinkedRepositoryBlob
                    && e.repository
                        .as_deref()
                        .is_some_and(|r| storage.is_linked(r, &d)))
            })
            .cloned()
            .collect(),
    )
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreSummary {
    pub journal: String,
    /// Entries put back.
    pub entries_restored: u64,
    /// Entries left alone because the registry has written the key since.
    pub entries_left_alone: u64,
    /// Journal lines that could not be used (a line cut short by a crash, say).
    pub lines_skipped: u64,
}

/// Restores every entry that the journal records as removed (or whose removal was cut
/// short), where nothing has been written since.
pub fn restore(conn: &mut CacheConn, journal_path: &Path) -> Result<RestoreSummary, String> {
    let journal = read_journal(journal_path)?;
    let (removes, outcomes) = (journal.removes, journal.outcomes);
    let mut summary = RestoreSummary {
        journal: journal_path.display().to_string(),
        lines_skipped: journal.lines_skipped,
        ..RestoreSummary::default()
    };
    let script = Script::new(RESTORE_SCRIPT);
    // Newest first, so an entry removed twice comes back with its oldest value last.
    for (id, entries) in removes.iter().rev() {
        if matches!(
            outcomes.get(id),
            Some(Outcome::Changed | Outcome::CameBack | Outcome::AlreadyGone)
        ) {
            continue;
        }
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
                .map_err(|e| format!("restoring cache entries failed: {}", brief(&e)))?;
        }
        summary.entries_restored += restored as u64;
        summary.entries_left_alone += entries.len() as u64 - restored as u64;
    }
    Ok(summary)
}

/// What a journal records, by run and sequence number (`run << 32 | seq`).
#[derive(Debug, Default)]
pub struct JournalRecords {
    /// Each removal, in the order written.
    removes: Vec<(u64, Vec<Entry>)>,
    outcomes: BTreeMap<u64, Outcome>,
    /// Lines that could not be used (a line cut short by a crash, say).
    pub lines_skipped: u64,
}

impl JournalRecords {
    /// Removals the journal records.
    pub fn removals(&self) -> usize {
        self.removes.len()
    }
}

/// Reads a journal: a regular file of at most `files::MAX_JOURNAL_BYTES`, a line at a
/// time, each at most `files::MAX_JOURNAL_LINE`.
pub fn read_journal(path: &Path) -> Result<JournalRecords, String> {
    let lines = crate::files::Lines::open(
        "journal",
        path,
        crate::files::MAX_JOURNAL_BYTES,
        crate::files::MAX_JOURNAL_LINE,
    )?;
    parse_journal(lines, path)
}

/// Parses journal lines; `path` names the journal in errors.
pub fn parse_journal<R: BufRead>(
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
            Ok(JournalLine::Result { seq, outcome }) => {
                records.outcomes.insert((run << 32) | seq, outcome);
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

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&b)), Some(b));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn refuses_foreign_keys() {
        assert!(check_registry_key("session:1").is_err());
        assert!(check_registry_key("repository::x").is_err());
        assert!(check_registry_key("repository::app::blobs").is_ok());
        assert!(
            check_registry_key("blobs::sha256:zz").is_ok(),
            "malformed but registry-shaped"
        );
    }

    #[test]
    fn storage_problems_are_never_purged() {
        for k in Kind::ALL {
            if k.is_storage_problem() {
                assert!(!purges(k, true), "{k:?}");
            }
        }
        assert!(!purges(Kind::MalformedCacheEntry, false));
        assert!(
            !purges(Kind::LivePhantom, true),
            "in-memory: nothing in Redis to remove"
        );
    }

    #[test]
    fn script_args_are_flat_and_share_keys() {
        let d = Digest::parse_str(&format!("sha256:{}", "ab".repeat(32))).expect("digest");
        let entries = vec![
            Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some("app".into()),
                key: "repository::app::blobs".into(),
                op: Op::Member {
                    member: d.to_string(),
                },
            },
            Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some("app".into()),
                key: format!("repository::app::blobs::{d}"),
                op: Op::Fields {
                    fields: [("mediatype".to_string(), "x".to_string())].into(),
                    exact: true,
                },
            },
        ];
        let call =
            script_args(&entries, &["repository::app::blobs".into()], Some(&d)).expect("args");
        assert_eq!(call.keys.len(), 2);
        let text: Vec<String> = call
            .argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text,
            vec![
                "M".to_string(),
                "1".into(),
                d.to_string(),
                "F".into(),
                "2".into(),
                "1".into(),
                "1".into(),
                "mediatype".into(),
                "x".into(),
                "N".into(),
                "1".into(),
                d.to_string()
            ]
        );
    }

    fn journal(bytes: &[u8]) -> Result<JournalRecords, String> {
        let lines = crate::files::Lines::new(bytes, "journal", "j", u64::MAX, 1 << 16);
        parse_journal(lines, Path::new("j"))
    }

    #[test]
    fn journals_are_read_a_bounded_line_at_a_time() {
        let begin = format!(
            "{{\"type\":\"begin\",\"schema\":\"{JOURNAL_SCHEMA}\",\"started_at\":\"t\",\"source\":{{\"storage_root\":\"/r\",\"cache\":\"redis\"}}}}"
        );
        let remove = "{\"type\":\"remove\",\"seq\":0,\"digest\":null,\"entries\":[]}";
        let r = journal(format!("{begin}\n{remove}\n{{cut").as_bytes()).expect("journal");
        assert_eq!((r.removals(), r.lines_skipped), (1, 1));
        assert!(journal(b"").is_err(), "no begin line");
        let long = format!("{begin}\n{}\n", "x".repeat(1 << 17));
        let err = journal(long.as_bytes()).expect_err("endless line");
        assert!(err.contains("line 2") && err.contains("64 KiB"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn fragments() -> impl Strategy<Value = Vec<u8>> {
            let piece = proptest::sample::select(vec![
                format!("{{\"schema\":\"{PLAN_SCHEMA}\",\"created_at\":\"t\","),
                "\"source\":{\"storage_root\":\"/r\",\"cache\":\"redis\"},".to_string(),
                "\"include_malformed\":true,\"kept\":[],".to_string(),
                "\"groups\":[{\"digest\":null,\"blob\":\"not-checked\",\"entries\":[".to_string(),
                "{\"kind\":\"malformed-cache-entry\",\"repository\":null,\"key\":\"session:1\",\"op\":\"key\",\"redis_type\":\"string\",\"dump_hex\":\"zz\"}".to_string(),
                "{\"kind\":\"phantom-descriptor\",\"key\":\"blobs::\\\\xff\",\"op\":\"member\",\"member\":\"m\"}".to_string(),
                "]}]}".to_string(),
                format!("{{\"type\":\"begin\",\"schema\":\"{JOURNAL_SCHEMA}\",\"started_at\":\"t\",\"source\":{{\"storage_root\":\"/r\",\"cache\":\"redis\"}}}}\n"),
                "{\"type\":\"begin\",\"schema\":\"other\"}\n".to_string(),
                "{\"type\":\"remove\",\"seq\":18446744073709551615,\"digest\":null,\"entries\":[]}\n".to_string(),
                "{\"type\":\"result\",\"seq\":1,\"outcome\":\"removed\"}\n".to_string(),
                ",".to_string(),
                "\n".to_string(),
            ]);
            proptest::collection::vec(piece, 0..10).prop_map(|p| p.concat().into_bytes())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary bytes are a plan or an error naming it, never a panic.
            #[test]
            fn plans_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), shaped in fragments()) {
                for input in [&bytes, &shaped] {
                    if let Err(e) = Plan::parse(Path::new("p"), input) {
                        prop_assert!(e.contains('p'), "{e}");
                    }
                }
            }

            /// Arbitrary bytes are a journal or an error naming it, never a panic.
            #[test]
            fn journals_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), shaped in fragments()) {
                for input in [&bytes, &shaped] {
                    if let Err(e) = journal(input) {
                        prop_assert!(e.contains('j'), "{e}");
                    }
                }
            }
        }
    }
}
