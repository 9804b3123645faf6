//! Removing exactly the wrong cache entries, and putting them back. This module owns
//! every write registry-audit ever makes, and only to Redis keys of the registry's
//! shapes: it turns audit findings into a plan (with a snapshot of each entry's current
//! value), validates a plan read back, asks Redis up front whether the user may run
//! every command the writes need, re-checks storage (each entry against its own digest)
//! just before acting, removes each digest's entries in one Lua script that first
//! verifies they still hold the audited values - global descriptor first, so a script
//! Redis fails part-way leaves nothing served - reads back and reports such a failure,
//! and journals what it removed (fsync'd before each removal) so `restore` can put it
//! back. It never touches storage.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::Path;

use redis::{ConnectionLike, Script};

use crate::cache::redis::CacheConn;
use serde::{Deserialize, Serialize};

use crate::cache::index as cache_index;
use crate::cache::redis::{HASH_FIELDS, brief};
use crate::digest::Digest;
use crate::finding::{self, Finding, Kind, Severity};
use crate::storage::{BlobStat, Storage};
use crate::summary::SourceInfo;

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

impl Plan {
    /// Checks that every group is one purge could have made: each entry's key is of the
    /// registry's shapes, names its group's digest (a set member is that digest), fits
    /// its kind and its operation, and an orphan descriptor is guarded by its set.
    /// A plan edited by hand must not make purge remove another digest's entries.
    pub fn validate(&self) -> Result<(), String> {
        for g in &self.groups {
            for e in &g.entries {
                check_entry(g, e).map_err(|why| {
                    format!(
                        "plan entry {} ({}) {why}: refusing the plan, nothing was changed",
                        e.key,
                        e.kind.name()
                    )
                })?;
            }
            for set in &g.not_member_of {
                let raw = check_registry_key(set)?;
                if g.digest.is_none()
                    || !matches!(
                        cache_index::classify(&raw),
                        cache_index::KeyShape::RepoSet(_)
                    )
                {
                    return Err(format!(
                        "plan names {set} as a repository set guarding {}: refusing the plan, nothing was changed",
                        g.digest
                            .map(|d| d.to_string())
                            .unwrap_or("no digest".into())
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether one entry belongs in its group (see `Plan::validate`).
fn check_entry(g: &Group, e: &Entry) -> Result<(), String> {
    use cache_index::KeyShape;
    let raw = check_registry_key(&e.key)?;
    let shape = cache_index::classify(&raw);
    let Some(d) = g.digest else {
        // Malformed entries: one key (or one set member) each, any registry shape.
        if e.kind != Kind::MalformedCacheEntry {
            return Err("is in a group without a digest".into());
        }
        return match (&e.op, &shape) {
            (Op::Key { .. }, _) => Ok(()),
            (Op::Member { member }, KeyShape::RepoSet(_) | KeyShape::Malformed { .. }) => {
                match finding::unescape(member).and_then(|m| Digest::parse(&m)) {
                    Some(_) if matches!(shape, KeyShape::RepoSet(_)) => {
                        Err("names a valid digest member: not a malformed entry".into())
                    }
                    _ => Ok(()),
                }
            }
            _ => Err("has an operation purge never plans for a malformed entry".into()),
        };
    };
    let repo_matches = |r: &str| e.repository.as_deref() == Some(r);
    let ok = match (&shape, &e.op, e.kind) {
        (
            KeyShape::Global(kd),
            Op::Fields { exact: false, .. },
            Kind::PhantomBlobDescriptor | Kind::SizeMismatch,
        ) => *kd == d && e.repository.is_none(),
        (
            KeyShape::RepoSet(r),
            Op::Member { member },
            Kind::PhantomRepositoryBlob | Kind::UnlinkedRepositoryBlob,
        ) => {
            repo_matches(r) && finding::unescape(member).and_then(|m| Digest::parse(&m)) == Some(d)
        }
        (
            KeyShape::RepoHash(r, kd),
            Op::Fields { exact: true, .. },
            Kind::PhantomRepositoryBlob | Kind::UnlinkedRepositoryBlob,
        ) => *kd == d && repo_matches(r),
        (
            KeyShape::RepoHash(r, kd),
            Op::Fields { exact: true, .. },
            Kind::OrphanRepositoryDescriptor,
        ) => *kd == d && repo_matches(r) && g.not_member_of.contains(&cache_index::repo_set_key(r)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("does not belong to the group of {d}"))
    }
}

/// The digest an entry is about, read from its own key (or set member), not its group.
fn entry_digest(e: &Entry) -> Option<Digest> {
    let raw = finding::unescape(&e.key)?;
    match (cache_index::classify(&raw), &e.op) {
        (cache_index::KeyShape::Global(d), _) | (cache_index::KeyShape::RepoHash(_, d), _) => {
            Some(d)
        }
        (cache_index::KeyShape::RepoSet(_), Op::Member { member }) => {
            Digest::parse(&finding::unescape(member)?)
        }
        _ => None,
    }
}

/// Where an entry's removal falls in its digest's order. The registry serves a
/// repository lookup only when the digest is in the repository's set, the global
/// descriptor hits and the repository hash has a `mediatype`; the global lookup needs
/// the global descriptor alone. So the global descriptor goes first: its removal turns
/// every lookup of the digest into a miss at once, and whatever a failure leaves after
/// it is inert. Then each repository's gate (the set member), then repository hashes,
/// then whole malformed keys. Removing only ever turns a hit into a miss, so no prefix
/// of this order makes an inert entry live.
fn removal_rank(e: &Entry) -> u8 {
    let shape = finding::unescape(&e.key).map(|raw| cache_index::classify(&raw));
    match (shape, &e.op) {
        (Some(cache_index::KeyShape::Global(_)), Op::Fields { .. }) => 0,
        (Some(cache_index::KeyShape::RepoSet(_)), Op::Member { .. }) => 1,
        (Some(cache_index::KeyShape::RepoHash(..)), Op::Fields { .. }) => 2,
        _ => 3,
    }
}

/// A group's entries in removal order (stable within a rank).
pub fn removal_order(entries: &[Entry]) -> Vec<Entry> {
    let mut out = entries.to_vec();
    out.sort_by_key(removal_rank);
    out
}

/// The reverse for restore: repository parts first, the global descriptor last, so
/// each repository's lookup comes back at the moment the global one does, and a restore
/// cut short leaves nothing served that was not before.
fn restore_order(entries: &[Entry]) -> Vec<Entry> {
    let mut out = entries.to_vec();
    out.sort_by_key(|e| std::cmp::Reverse(removal_rank(e)));
    out
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
/// them all, or changes nothing: one script, so Redis runs it atomically - but Redis
/// does not undo what a script did before an error (a command the user's ACL refuses),
/// so the ops come in `removal_order` and the caller re-reads the keys after an error.
/// ARGV is flat and binary-safe: per op a tag, a key index, then the op's values.
/// Every command it calls is in `script_commands`, which the permission check asks about.
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
        -- One HDEL for all the fields (in chunks only for a huge hash): a descriptor
        -- loses `digest` and `size` together.
        local names = {}
        for j = 0, n - 1 do names[#names + 1] = ARGV[i + 4 + 2 * j] end
        for s = 1, #names, 200 do
          redis.call('HDEL', key, unpack(names, s, math.min(s + 199, #names)))
        end
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
      -- One HSET for all the fields (in chunks only for a huge hash).
      local kv = {}
      for j = 0, 2 * n - 1 do kv[#kv + 1] = ARGV[i + 4 + j] end
      for s = 1, #kv, 400 do
        redis.call('HSET', key, unpack(kv, s, math.min(s + 399, #kv)))
      end
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

/// How the Redis user's permissions were established before the first write.
/// Ordered strongest first: a cluster's check is as good as its weakest node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PermissionMethod {
    /// `ACL DRYRUN` for the connected user (Redis 7, a user that may run `ACL`).
    AclDryrun,
    /// `redis.acl_check_cmd` inside a script (Redis 7, a user that may not run `ACL`).
    AclCheckCmd,
    /// Redis has neither (before 7): not checked up front. The removal order still
    /// leaves nothing live behind a refusal, and the run stops and says what it left.
    #[default]
    NotChecked,
}

/// The outcome of the up-front permission check (a refusal is an error instead).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PermissionCheck {
    pub method: PermissionMethod,
    /// The Redis user the commands run as (`ACL WHOAMI`).
    pub user: String,
    /// Distinct (command, key) pairs asked about, on every node.
    pub commands_checked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One command as the server's ACL sees it: name (and subcommand), key, and
/// placeholders where ACL looks at neither.
type AclCheck = Vec<Vec<u8>>;

/// The commands `REMOVE_SCRIPT` calls per op tag, with the reads `apply` makes around
/// it (`all_gone`, and the re-read and liveness check after a failure).
const REMOVE_COMMANDS: &[(&str, &[&str])] = &[
    (
        "F",
        &["TYPE", "HLEN", "HGET", "HDEL", "HEXISTS", "EXISTS", "HMGET"],
    ),
    ("M", &["TYPE", "SISMEMBER", "SREM"]),
    ("N", &["TYPE", "SISMEMBER"]),
    ("K", &["TYPE", "DUMP", "DEL", "EXISTS"]),
];

/// The commands `RESTORE_SCRIPT` calls per op tag.
const RESTORE_COMMANDS: &[(&str, &[&str])] = &[
    ("F", &["TYPE", "HEXISTS", "HSET"]),
    ("M", &["TYPE", "SISMEMBER", "SADD"]),
    ("K", &["EXISTS", "RESTORE"]),
];

fn op_tag(op: &Op) -> &'static str {
    match op {
        Op::Fields { .. } => "F",
        Op::Member { .. } => "M",
        Op::Key { .. } => "K",
    }
}

/// `name key` with placeholder arguments of the right arity.
fn command_on(name: &str, key: &[u8]) -> AclCheck {
    let mut c = vec![name.as_bytes().to_vec(), key.to_vec()];
    match name {
        "TYPE" | "HLEN" | "EXISTS" | "DUMP" | "DEL" => {}
        "HSET" => c.extend([b"x".to_vec(), b"x".to_vec()]),
        "RESTORE" => c.extend([b"0".to_vec(), b"x".to_vec()]),
        _ => c.push(b"x".to_vec()),
    }
    c
}

/// Every command a run of `script` over these (key, op tag) pairs sends, once each:
/// EVALSHA naming each key, and each command the script calls on it.
fn acl_checks<'a>(
    table: &[(&str, &[&str])],
    script: &Script,
    ops: impl Iterator<Item = (Vec<u8>, &'a str)>,
) -> Vec<AclCheck> {
    let mut out = std::collections::BTreeSet::new();
    for (key, tag) in ops {
        out.insert(vec![
            b"EVALSHA".to_vec(),
            script.get_hash().as_bytes().to_vec(),
            b"1".to_vec(),
            key.clone(),
        ]);
        for (t, names) in table {
            if *t == tag {
                for name in *names {
                    out.insert(command_on(name, &key));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Asks Redis, before the first write, whether the connected user may run every command
/// in `checks` (and load `script`): `ACL DRYRUN` where the user may run it, else
/// `redis.acl_check_cmd` in a script, else (Redis before 7) a note. In a cluster every
/// master is asked, since each node has its own ACL. A refusal is an error that names
/// the command, the key and the user; `verb` says what did not happen ("removed").
pub fn check_permissions(
    conn: &mut CacheConn,
    checks: &[AclCheck],
    script: &Script,
    verb: &str,
) -> Result<PermissionCheck, String> {
    match conn {
        CacheConn::Single(c) => check_node(c, checks, script, verb, None),
        CacheConn::Cluster(cluster) => {
            let masters = cluster.slot_map()?.masters();
            let mut total = PermissionCheck {
                method: PermissionMethod::AclDryrun,
                ..PermissionCheck::default()
            };
            for (host, port) in masters {
                let mut node = cluster.node(&host, port)?;
                let name = format!("{host}:{port}");
                let one = check_node(&mut node, checks, script, verb, Some(&name))?;
                total.method = total.method.max(one.method);
                total.commands_checked += one.commands_checked;
                if total.user.is_empty() {
                    total.user = one.user;
                }
                if total.note.is_none() {
                    total.note = one.note.map(|n| format!("{name}: {n}"));
                }
            }
            Ok(total)
        }
    }
}

/// Checks one server.
fn check_node(
    c: &mut dyn ConnectionLike,
    checks: &[AclCheck],
    script: &Script,
    verb: &str,
    node: Option<&str>,
) -> Result<PermissionCheck, String> {
    let user = whoami(c);
    let mut all: Vec<AclCheck> = Vec::with_capacity(checks.len() + 1);
    // EVALSHA of a script the server does not hold yet loads it first.
    let loaded = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(script.get_hash())
        .query::<Vec<bool>>(c)
        .is_ok_and(|v| v == [true]);
    if !loaded {
        all.push(vec![
            b"SCRIPT".to_vec(),
            b"LOAD".to_vec(),
            b"return 1".to_vec(),
        ]);
    }
    all.extend_from_slice(checks);
    let refused = |check: &AclCheck, why: &str| {
        let name = String::from_utf8_lossy(&check[0]).to_ascii_uppercase();
        let (command, key) = match name.as_str() {
            "SCRIPT" => ("SCRIPT LOAD".to_string(), None),
            "EVALSHA" => (name, check.get(3)),
            _ => (name, check.get(1)),
        };
        format!(
            "Redis user '{}' may not run {command}{}{} ({}): nothing was {verb}; grant the user the commands purge and restore need (listed in the README's purge section) or use one that has them",
            finding::escape(user.as_deref().unwrap_or("(unknown)").as_bytes()),
            key.map(|k| format!(" on key {}", finding::escape(k)))
                .unwrap_or_default(),
            node.map(|n| format!(" on node {n}")).unwrap_or_default(),
            finding::escape(why.trim().as_bytes()),
        )
    };
    let mut note = None;
    if let Some(u) = &user {
        match dryrun(c, u, &all) {
            Ok(None) => {
                return Ok(PermissionCheck {
                    method: PermissionMethod::AclDryrun,
                    user: u.clone(),
                    commands_checked: all.len() as u64,
                    note: None,
                });
            }
            Ok(Some((i, why))) => return Err(refused(&all[i], &why)),
            Err(why) => note = Some(why),
        }
    }
    match acl_check_cmd(c, &all) {
        Ok(AclAnswer::Allowed) => Ok(PermissionCheck {
            method: PermissionMethod::AclCheckCmd,
            user: user.unwrap_or_default(),
            commands_checked: all.len() as u64,
            note: None,
        }),
        Ok(AclAnswer::Refused(i, why)) => Err(refused(&all[i], &why)),
        Ok(AclAnswer::Unavailable) => Ok(PermissionCheck {
            method: PermissionMethod::NotChecked,
            user: user.unwrap_or_default(),
            commands_checked: 0,
            note: Some(format!(
                "permissions not checked up front: this Redis has neither ACL DRYRUN nor redis.acl_check_cmd (Redis 7){}",
                note.map(|n| format!("; ACL DRYRUN: {n}"))
                    .unwrap_or_default()
            )),
        }),
        // The check script itself was refused: EVALSHA or SCRIPT LOAD, which every
        // removal needs too.
        Err(e) => {
            let text = brief(&e);
            let lower = text.to_ascii_lowercase();
            let what = if lower.contains("script|load") {
                vec![b"SCRIPT".to_vec(), b"LOAD".to_vec()]
            } else if lower.contains("noperm") {
                vec![b"EVALSHA".to_vec()]
            } else {
                return Err(format!(
                    "checking the Redis user's permissions failed: {text}; nothing was {verb}"
                ));
            };
            Err(refused(&what, &text))
        }
    }
}

/// The connected user: `ACL WHOAMI`, or `CLIENT INFO` for a user that may not run ACL.
fn whoami(c: &mut dyn ConnectionLike) -> Option<String> {
    if let Ok(u) = redis::cmd("ACL").arg("WHOAMI").query::<String>(c) {
        return Some(u);
    }
    let info: String = redis::cmd("CLIENT").arg("INFO").query(c).ok()?;
    info.split_whitespace()
        .find_map(|f| f.strip_prefix("user="))
        .map(str::to_string)
}

/// `ACL DRYRUN` for each check, pipelined: `Ok(None)` all allowed, `Ok(Some((index,
/// reason)))` the first refused, `Err` when DRYRUN itself is unavailable.
fn dryrun(
    c: &mut dyn ConnectionLike,
    user: &str,
    checks: &[AclCheck],
) -> Result<Option<(usize, String)>, String> {
    // Is DRYRUN there, and may this user run it? (Any answer about PING says yes.)
    redis::cmd("ACL")
        .arg("DRYRUN")
        .arg(user)
        .arg("PING")
        .query::<redis::Value>(c)
        .map_err(|e| brief(&e))?;
    for (n, batch) in checks.chunks(500).enumerate() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for check in batch {
            let cmd = pipe.cmd("ACL").arg("DRYRUN").arg(user);
            for a in check {
                cmd.arg(a.as_slice());
            }
        }
        let replies: Vec<redis::Value> = pipe.query(c).map_err(|e| brief(&e))?;
        for (i, reply) in replies.iter().enumerate() {
            let why = match reply {
                redis::Value::Okay => continue,
                redis::Value::SimpleString(s) if s == "OK" => continue,
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                redis::Value::ServerError(e) => e.to_string(),
                other => format!("unexpected answer {other:?}"),
            };
            return Ok(Some((n * 500 + i, why)));
        }
    }
    Ok(None)
}

enum AclAnswer {
    Allowed,
    Refused(usize, String),
    Unavailable,
}

/// Asks the server from inside a script whether the current user may run each command.
/// ARGV: per command, its argument count then its arguments.
const CHECK_SCRIPT: &str = r#"
if type(redis.acl_check_cmd) ~= 'function' then return {-1, ''} end
local i, n = 1, 0
while i <= #ARGV do
  local c = tonumber(ARGV[i])
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(ARGV, i + 1, i + c))
  if not ok then
    if type(allowed) == 'table' then allowed = allowed.err end
    return {n + 1, tostring(allowed)}
  end
  if not allowed then return {n + 1, 'the ACL refuses it'} end
  n = n + 1
  i = i + 1 + c
end
return {0, ''}
"#;

fn acl_check_cmd(c: &mut dyn ConnectionLike, checks: &[AclCheck]) -> redis::RedisResult<AclAnswer> {
    let script = Script::new(CHECK_SCRIPT);
    for (n, batch) in checks.chunks(300).enumerate() {
        let mut inv = script.prepare_invoke();
        for check in batch {
            inv.arg(check.len());
            for a in check {
                inv.arg(a.as_slice());
            }
        }
        let (at, why): (i64, String) = inv.invoke(c)?;
        match at {
            0 => {}
            -1 => return Ok(AclAnswer::Unavailable),
            i => return Ok(AclAnswer::Refused(n * 300 + i as usize - 1, why)),
        }
    }
    Ok(AclAnswer::Allowed)
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
    /// Redis failed or refused a command part-way: see the group's `failure` for what
    /// was removed and what is left. Purge stops there.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub digest: Option<Digest>,
    pub key: String,
    pub outcome: Outcome,
    pub entries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<GroupFailure>,
}

/// What a failed removal did, read back from Redis after the error.
#[derive(Debug, Clone, Serialize)]
pub struct GroupFailure {
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
pub struct ApplySummary {
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
pub fn default_journal(started: std::time::SystemTime) -> std::path::PathBuf {
    let stamp: String = crate::timestamp::rfc3339(started)
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
/// Before anything, the plan is validated and the Redis user's permission to run every
/// command the removal sends is checked (an error: nothing removed, no journal). A
/// removal that fails part-way is read back, journalled and reported, and purge stops
/// there (`ApplySummary::failure`). `progress` is told each group's result as it happens.
pub fn apply(
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
fn failure_line(group: &Group, f: &GroupFailure, journal: &Path) -> String {
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
fn read_back(
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
fn describe(e: &Entry) -> String {
    match &e.op {
        Op::Member { member } => format!("{} {member}", e.key),
        _ => e.key.clone(),
    }
}

/// The lookups of `d` the registry answers from the cache now, by its rules: the global
/// one when `blobs::D` has `digest` and an integer `size`; a repository's (of those the
/// entries name) when, besides, D is in its set and its hash has a `mediatype`.
fn served_lookups(
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
        let hash: bool = redis::cmd("HEXISTS")
            .arg(cache_index::repo_hash_key(r, d))
            .arg("mediatype")
            .query(conn)?;
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
fn remove_per_key(
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
fn all_gone(conn: &mut dyn ConnectionLike, entries: &[Entry]) -> Result<bool, String> {
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
fn entry_present(conn: &mut dyn ConnectionLike, e: &Entry) -> redis::RedisResult<bool> {
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
                let mut any = false;
                for f in fields.keys() {
                    let name = finding::unescape(f).unwrap_or_default();
                    any |= redis::cmd("HEXISTS")
                        .arg(&raw)
                        .arg(name)
                        .query::<bool>(conn)?;
                }
                any
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
fn recheck(storage: &Storage, group: &Group) -> Option<Vec<Entry>> {
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
fn still_wrong(storage: &Storage, e: &Entry, own: Option<(Digest, BlobState)>) -> bool {
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
fn snapshot_size(e: &Entry) -> Option<i64> {
    let Op::Fields { fields, .. } = &e.op else {
        return None;
    };
    let raw = finding::unescape(fields.get("size")?)?;
    std::str::from_utf8(&raw).ok()?.parse().ok()
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
    /// How the user's permissions were checked before the first write.
    pub permissions: PermissionCheck,
}

/// Restores every entry that the journal records as removed (or whose removal was cut
/// short), where nothing has been written since.
pub fn restore(conn: &mut CacheConn, journal_path: &Path) -> Result<RestoreSummary, String> {
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
fn restore_entries(
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
pub struct JournalRecords {
    /// Each removal, in the order written.
    removes: Vec<(u64, Vec<Entry>)>,
    /// Each removal's outcome, with the entries read back as removed when it failed
    /// part-way.
    outcomes: BTreeMap<u64, (Outcome, Option<Vec<usize>>)>,
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

    fn digest(byte: &str) -> Digest {
        Digest::parse_str(&format!("sha256:{}", byte.repeat(32))).expect("digest")
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The entries purge plans for a phantom digest held in repositories `repos`, and the
    /// global descriptor when `global`.
    fn phantom_entries(d: &Digest, global: bool, repos: &[&str]) -> Vec<Entry> {
        let mut out = Vec::new();
        if global {
            out.push(Entry {
                kind: Kind::PhantomBlobDescriptor,
                severity: Severity::Error,
                repository: None,
                key: cache_index::global_key(d),
                op: Op::Fields {
                    fields: fields(&[
                        ("digest", &d.to_string()),
                        ("size", "5"),
                        ("mediatype", "m"),
                    ]),
                    exact: false,
                },
            });
        }
        for r in repos {
            out.push(Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some(r.to_string()),
                key: cache_index::repo_set_key(r),
                op: Op::Member {
                    member: d.to_string(),
                },
            });
            out.push(Entry {
                kind: Kind::PhantomRepositoryBlob,
                severity: Severity::Error,
                repository: Some(r.to_string()),
                key: cache_index::repo_hash_key(r, d),
                op: Op::Fields {
                    fields: fields(&[("mediatype", "m")]),
                    exact: true,
                },
            });
        }
        out
    }

    /// One digest's cache entries, and the lookups the registry answers from them - by
    /// `cache_index`'s rules, the same the audit uses.
    #[derive(Clone)]
    struct Model {
        global: BTreeMap<String, String>,
        /// repository -> (member of its set, fields of its hash)
        repos: BTreeMap<String, (bool, BTreeMap<String, String>)>,
    }

    impl Model {
        fn full(d: &Digest, repos: &[&str]) -> Model {
            Model {
                global: fields(&[
                    ("digest", &d.to_string()),
                    ("size", "5"),
                    ("mediatype", "m"),
                ]),
                repos: repos
                    .iter()
                    .map(|r| (r.to_string(), (true, fields(&[("mediatype", "m")]))))
                    .collect(),
            }
        }

        fn served(&self) -> std::collections::BTreeSet<String> {
            use cache_index::{DigestEntry, GlobalEntry, RepoEntry, RepoHash, SizeField};
            let size = match self.global.get("size").map(|s| s.parse::<i64>()) {
                None => SizeField::Missing,
                Some(Ok(n)) => SizeField::Valid(n),
                Some(Err(_)) => SizeField::Invalid,
            };
            let entry = DigestEntry {
                global: (!self.global.is_empty()).then_some(GlobalEntry::Hash {
                    has_digest: self.global.contains_key("digest"),
                    size,
                }),
                repos: Vec::new(),
            };
            let mut out = std::collections::BTreeSet::new();
            if entry.global_live() {
                out.insert("global".to_string());
            }
            for (i, (name, (member, hash))) in self.repos.iter().enumerate() {
                let r = RepoEntry {
                    repo: i as u32,
                    member: *member,
                    hash: match (hash.is_empty(), hash.contains_key("mediatype")) {
                        (true, _) => RepoHash::Absent,
                        (false, true) => RepoHash::WithMediatype,
                        (false, false) => RepoHash::WithoutMediatype,
                    },
                };
                if entry.repo_live(&r) {
                    out.insert(format!("repository {name}"));
                }
            }
            out
        }

        fn remove(&mut self, e: &Entry) {
            let raw = finding::unescape(&e.key).expect("key");
            match (cache_index::classify(&raw), &e.op) {
                (cache_index::KeyShape::Global(_), Op::Fields { fields, .. }) => {
                    fields.keys().for_each(|f| {
                        self.global.remove(f);
                    })
                }
                (cache_index::KeyShape::RepoSet(r), Op::Member { .. }) => {
                    self.repos.get_mut(&r).expect("repo").0 = false
                }
                (cache_index::KeyShape::RepoHash(r, _), Op::Fields { .. }) => {
                    self.repos.get_mut(&r).expect("repo").1.clear()
                }
                other => panic!("unexpected entry {other:?}"),
            }
        }

        /// The lookups served after removing `order[..k]`, for every k.
        fn after_each_prefix(&self, order: &[Entry]) -> Vec<std::collections::BTreeSet<String>> {
            let mut m = self.clone();
            let mut out = vec![m.served()];
            for e in order {
                m.remove(e);
                out.push(m.served());
            }
            out
        }
    }

    fn permutations(items: &[Entry]) -> Vec<Vec<Entry>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first.clone());
                out.push(p);
            }
        }
        out
    }

    /// After any prefix of the removal order (a failure can stop it anywhere), no
    /// lookup is served that was not served before, and as few are served as any order
    /// could achieve after as many removals.
    fn assert_order_is_safe(model: &Model, entries: &[Entry]) {
        let ours = model.after_each_prefix(&removal_order(entries));
        for w in ours.windows(2) {
            assert!(w[1].is_subset(&w[0]), "a removal made a lookup live: {w:?}");
        }
        let all: Vec<_> = permutations(entries)
            .iter()
            .map(|p| model.after_each_prefix(p))
            .collect();
        for k in 0..=entries.len() {
            let best = all.iter().map(|p| p[k].len()).min().expect("some order");
            assert_eq!(
                ours[k].len(),
                best,
                "after {k} removals our order still serves {:?}",
                ours[k]
            );
        }
    }

    #[test]
    fn removing_the_global_descriptor_first_leaves_nothing_served_after_any_failure() {
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["team/a", "team/b"]);
        let model = Model::full(&d, &["team/a", "team/b"]);
        assert_eq!(model.served().len(), 3, "global and both repositories live");
        let order = removal_order(&entries);
        assert_eq!(order[0].key, cache_index::global_key(&d));
        let after = model.after_each_prefix(&order);
        for (k, served) in after.iter().enumerate().skip(1) {
            assert!(served.is_empty(), "after {k} removals: {served:?}");
        }
        assert_order_is_safe(&model, &entries);

        // The old order (members, hashes, global last) leaves the global descriptor - the
        // one that breaks a re-push - served if the last step fails.
        let mut old = entries.clone();
        old.sort_by_key(|e| match e.op {
            Op::Member { .. } => 0,
            Op::Fields { exact: true, .. } | Op::Key { .. } => 1,
            Op::Fields { exact: false, .. } => 2,
        });
        let after_old = model.after_each_prefix(&old);
        assert!(after_old[entries.len() - 1].contains("global"));
    }

    #[test]
    fn without_a_global_entry_each_repository_gate_goes_first() {
        // An unlinked blob: the global descriptor is right and stays; the repositories'
        // entries go, each repository's lookup dying with its first removal.
        let d = digest("cd");
        let entries: Vec<Entry> = phantom_entries(&d, false, &["a", "b", "c"])
            .into_iter()
            .map(|mut e| {
                e.kind = Kind::UnlinkedRepositoryBlob;
                e
            })
            .collect();
        let model = Model::full(&d, &["a", "b", "c"]);
        let order = removal_order(&entries);
        assert!(order[..3].iter().all(|e| matches!(e.op, Op::Member { .. })));
        let after = model.after_each_prefix(&order);
        assert_eq!(after[1].len(), 3, "global + two repositories");
        assert_eq!(after[3].iter().collect::<Vec<_>>(), vec!["global"]);
        assert_order_is_safe(&model, &entries);
    }

    #[test]
    fn partial_entries_and_inert_states_stay_inert() {
        // Some parts already evicted (allkeys-lru): a member without its hash, a hash
        // without its member, a global without `size`.
        let d = digest("ef");
        let entries = phantom_entries(&d, true, &["a", "b"]);
        let mut model = Model::full(&d, &["a", "b"]);
        model.global.remove("size");
        model.repos.get_mut("a").expect("a").1.clear();
        model.repos.get_mut("b").expect("b").0 = false;
        assert!(model.served().is_empty());
        for p in permutations(&entries) {
            for served in model.after_each_prefix(&p) {
                assert!(served.is_empty(), "an inert entry became live: {served:?}");
            }
        }
    }

    #[test]
    fn restore_puts_the_global_descriptor_back_last() {
        let d = digest("12");
        let entries = phantom_entries(&d, true, &["a"]);
        let order = restore_order(&entries);
        assert_eq!(
            order.last().map(|e| e.key.clone()),
            Some(cache_index::global_key(&d))
        );
    }

    /// `redis.call('NAME'` and `redis.pcall('NAME'` of a Lua script.
    fn called(script: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for pat in ["redis.call('", "redis.pcall('"] {
            for part in script.split(pat).skip(1) {
                out.insert(part.split('\'').next().unwrap_or("").to_ascii_uppercase());
            }
        }
        out
    }

    #[test]
    fn the_permission_check_asks_about_every_command_the_scripts_call() {
        for (script, table) in [
            (REMOVE_SCRIPT, REMOVE_COMMANDS),
            (RESTORE_SCRIPT, RESTORE_COMMANDS),
        ] {
            let asked: std::collections::BTreeSet<String> = table
                .iter()
                .flat_map(|(_, names)| names.iter().map(|n| n.to_string()))
                .collect();
            let calls = called(script);
            assert!(!calls.is_empty());
            assert!(calls.is_subset(&asked), "{calls:?} not all in {asked:?}");
        }
        // Each key is asked about with EVALSHA and the commands of its op.
        let script = Script::new(REMOVE_SCRIPT);
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["app"]);
        let checks = acl_checks(
            REMOVE_COMMANDS,
            &script,
            entries
                .iter()
                .map(|e| (finding::unescape(&e.key).expect("key"), op_tag(&e.op))),
        );
        let has = |name: &str, key: &str| {
            checks
                .iter()
                .any(|c| c[0] == name.as_bytes() && c.iter().any(|a| a == key.as_bytes()))
        };
        let set = cache_index::repo_set_key("app");
        let global = cache_index::global_key(&d);
        assert!(has("SREM", &set) && has("EVALSHA", &set) && has("SISMEMBER", &set));
        assert!(has("HDEL", &global) && has("HGET", &global) && has("EVALSHA", &global));
        assert!(has("HDEL", &cache_index::repo_hash_key("app", &d)));
        assert!(!has("SREM", &global), "commands follow the op");
    }

    fn plan_of(groups: Vec<Group>) -> Plan {
        Plan {
            schema: PLAN_SCHEMA.into(),
            created_at: String::new(),
            source: serde_json::from_value(serde_json::json!({
                "storage_root": "/r", "cache": "redis"
            }))
            .unwrap_or_else(|_| panic!("source info")),
            include_malformed: false,
            groups,
            kept: Vec::new(),
        }
    }

    fn group(d: &Digest, entries: Vec<Entry>) -> Group {
        Group {
            digest: Some(*d),
            blob: BlobState::Absent,
            entries,
            not_member_of: Vec::new(),
        }
    }

    #[test]
    fn a_plan_entry_must_name_its_groups_digest() {
        let (d, other) = (digest("ab"), digest("cd"));
        assert!(
            plan_of(vec![group(&d, phantom_entries(&d, true, &["a"]))])
                .validate()
                .is_ok()
        );
        // Another digest's global descriptor, set member or hash in d's group.
        for i in 0..3 {
            let mut entries = phantom_entries(&d, true, &["a"]);
            entries[i] = phantom_entries(&other, true, &["a"])[i].clone();
            let err = plan_of(vec![group(&d, entries)])
                .validate()
                .expect_err("foreign entry");
            assert!(
                err.contains("does not belong") && err.contains(&d.to_string()),
                "{err}"
            );
        }
        // A repository entry that says another repository.
        let mut entries = phantom_entries(&d, false, &["a"]);
        entries[0].repository = Some("b".into());
        assert!(plan_of(vec![group(&d, entries)]).validate().is_err());
        // A kind that does not fit the key: an "unlinked" global descriptor.
        let mut entries = phantom_entries(&d, true, &[]);
        entries[0].kind = Kind::UnlinkedRepositoryBlob;
        assert!(plan_of(vec![group(&d, entries)]).validate().is_err());
        // An orphan descriptor without the set that guards it.
        let mut entries = phantom_entries(&d, false, &["a"]);
        entries.remove(0);
        entries[0].kind = Kind::OrphanRepositoryDescriptor;
        let mut g = group(&d, entries);
        assert!(plan_of(vec![g.clone()]).validate().is_err());
        g.not_member_of.push(cache_index::repo_set_key("a"));
        assert!(plan_of(vec![g]).validate().is_ok());
        // A valid digest passed off as a malformed set member.
        let entry = Entry {
            kind: Kind::MalformedCacheEntry,
            severity: Severity::Warning,
            repository: Some("a".into()),
            key: cache_index::repo_set_key("a"),
            op: Op::Member {
                member: d.to_string(),
            },
        };
        let g = Group {
            digest: None,
            blob: BlobState::NotChecked,
            entries: vec![entry.clone()],
            not_member_of: Vec::new(),
        };
        assert!(plan_of(vec![g.clone()]).validate().is_err());
        let mut g = g;
        g.entries[0].op = Op::Member {
            member: "sha256:bad".into(),
        };
        assert!(plan_of(vec![g]).validate().is_ok());
    }

    #[test]
    fn an_entry_is_checked_against_its_own_digest() {
        let d = digest("ab");
        let entries = phantom_entries(&d, true, &["a"]);
        for e in &entries {
            assert_eq!(entry_digest(e), Some(d), "{}", e.key);
        }
        let size = Entry {
            kind: Kind::SizeMismatch,
            ..entries[0].clone()
        };
        assert_eq!(snapshot_size(&size), Some(5));
    }
}
