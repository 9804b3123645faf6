//! The plan: which cache entries to remove for which findings, each with a snapshot
//! of its value now (so a removal is exact and restorable), and the validation of a plan
//! read back from a file (keys of the registry's shapes, each under its own digest).

use super::*;

/// One removal, with the value the entry held when the plan was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Op {
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
pub(crate) struct Entry {
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

pub(super) fn default_severity() -> Severity {
    Severity::Error
}

/// What storage held for the digest when the plan was made; the group is skipped when
/// storage says otherwise at apply time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BlobState {
    Absent,
    Present {
        size: u64,
    },
    /// Not re-checked (malformed entries without a usable digest).
    NotChecked,
}

/// All removals for one digest (or one malformed key), applied atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Group {
    pub digest: Option<Digest>,
    pub blob: BlobState,
    pub entries: Vec<Entry>,
    /// `repository::R::blobs` sets that must still lack the digest (orphan descriptors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_member_of: Vec<String>,
}

/// A finding purge does not fix, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub finding: Finding,
    pub advice: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub schema: String,
    pub created_at: String,
    pub source: SourceInfo,
    pub include_malformed: bool,
    pub groups: Vec<Group>,
    pub kept: Vec<Kept>,
}

impl Plan {
    pub(crate) fn entry_count(&self) -> usize {
        self.groups.iter().map(|g| g.entries.len()).sum()
    }

    /// Reads a saved plan: a regular file of at most `files::MAX_PLAN_BYTES`.
    pub(crate) fn load(path: &Path) -> Result<Plan, String> {
        let text = crate::files::read("plan", path, crate::files::MAX_PLAN_BYTES)?;
        Plan::parse(path, &text)
    }

    /// Parses a plan's bytes; `path` names it in errors.
    pub(crate) fn parse(path: &Path, text: &[u8]) -> Result<Plan, String> {
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
pub(super) fn check_registry_key(key: &str) -> Result<Vec<u8>, String> {
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
    pub(crate) fn validate(&self) -> Result<(), String> {
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
pub(super) fn check_entry(g: &Group, e: &Entry) -> Result<(), String> {
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
pub(super) fn entry_digest(e: &Entry) -> Option<Digest> {
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
pub(super) fn removal_rank(e: &Entry) -> u8 {
    let shape = finding::unescape(&e.key).map(|raw| cache_index::classify(&raw));
    match (shape, &e.op) {
        (Some(cache_index::KeyShape::Global(_)), Op::Fields { .. }) => 0,
        (Some(cache_index::KeyShape::RepoSet(_)), Op::Member { .. }) => 1,
        (Some(cache_index::KeyShape::RepoHash(..)), Op::Fields { .. }) => 2,
        _ => 3,
    }
}

/// A group's entries in removal order (stable within a rank).
pub(crate) fn removal_order(entries: &[Entry]) -> Vec<Entry> {
    let mut out = entries.to_vec();
    out.sort_by_key(removal_rank);
    out
}

/// The reverse for restore: repository parts first, the global descriptor last, so
/// each repository's lookup comes back at the moment the global one does, and a restore
/// cut short leaves nothing served that was not before.
pub(super) fn restore_order(entries: &[Entry]) -> Vec<Entry> {
    let mut out = entries.to_vec();
    out.sort_by_key(|e| std::cmp::Reverse(removal_rank(e)));
    out
}

/// Kinds purge removes; malformed entries only when asked.
pub(crate) fn purges(kind: Kind, include_malformed: bool) -> bool {
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

pub(super) fn advice(kind: Kind) -> &'static str {
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
pub(crate) fn build_plan(
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
pub(super) fn snapshot(conn: &mut dyn ConnectionLike, f: &Finding) -> Result<Vec<Entry>, String> {
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
            // HGETALL alone says what TYPE would: an error for a key of another type
            // (nothing of a repository descriptor to remove), nothing for no key.
            let all: Vec<(Vec<u8>, Vec<u8>)> = match redis::cmd("HGETALL").arg(&hash).query(conn) {
                Ok(all) => all,
                Err(e) if e.code() == Some("WRONGTYPE") => Vec::new(),
                Err(e) => return Err(err(e)),
            };
            if !all.is_empty() {
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
