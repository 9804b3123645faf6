//! Cache dumps: the registry's cache entries in a documented JSON-lines file, so a cache
//! can be audited offline. `export` streams them out of Redis (reading only); `read`
//! feeds a dump into the same `CacheIndex` Redis feeds, so the audit, `live` included,
//! is the same. Only keys of the registry's shapes are written or read; anything else
//! in a dump is ignored like another application's key.
//!
//! The format: a header line, then one line per key (a large set spans several lines,
//! each adding members):
//!
//! ```text
//! {"format":"registry-audit-cache-dump","version":1,"source":"redis://127.0.0.1:6379/0","created_at":"2026-11-28T13:30:08Z"}
//! {"key":"blobs::sha256:…","type":"hash","fields":{"digest":"sha256:…","size":"1234","mediatype":"application/octet-stream"}}
//! {"key":"repository::team/app::blobs","type":"set","members":["sha256:…","sha256:…"]}
//! {"key":"repository::team/app::blobs::sha256:…","type":"hash","fields":{"mediatype":"application/octet-stream"}}
//! {"key":"blobs::sha256:…","type":"string"}
//! ```
//!
//! Keys, members, field names and values use the lossless escaping of
//! `finding::escape` (`\\` for a backslash, `\xNN` for control and non-UTF-8 bytes).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use redis::Value;
use serde::{Deserialize, Serialize};

use crate::cache_index::{CacheIndex, HashFields, KeyShape, classify};
use crate::finding;
use crate::redis_cache::{self, CacheConn, brief};
use crate::redis_cluster;

pub const FORMAT: &str = "registry-audit-cache-dump";
pub const VERSION: u32 = 1;
/// Members per line for large sets.
const MEMBERS_PER_LINE: usize = 1000;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    #[serde(default)]
    source: String,
    #[serde(default)]
    created_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    #[serde(rename = "type")]
    redis_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fields: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    members: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ExportCounts {
    pub keys: u64,
    pub set_members: u64,
    pub foreign_keys_skipped: u64,
}

/// Streams every registry-shaped key of the database (every master of a cluster) to
/// `out`.
pub fn export(
    conn: &mut CacheConn,
    out: &mut dyn Write,
    source: &str,
    created_at: &str,
    batch: usize,
) -> Result<ExportCounts, String> {
    let mut w = BufWriter::new(out);
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        source: source.into(),
        created_at: created_at.into(),
    };
    write_line(&mut w, &header)?;
    let mut counts = ExportCounts::default();
    conn.for_each_batch(batch, |reader, keys| {
        let ours: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| {
                let foreign = classify(k) == KeyShape::Foreign;
                counts.foreign_keys_skipped += u64::from(foreign);
                !foreign
            })
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for k in &ours {
            pipe.cmd("TYPE").arg(k);
            pipe.cmd("HGETALL").arg(k);
        }
        let replies: Vec<Value> = pipe
            .query(reader.node)
            .map_err(|e| format!("reading cache keys from Redis failed: {}", brief(&e)))?;
        let mut replies = replies.into_iter();
        for key in ours {
            let mut ty = replies.next();
            let mut all = replies.next();
            if ty.as_ref().is_some_and(redis_cluster::is_redirect) {
                // The key moved while we read: ask where it is now.
                let router = reader
                    .router
                    .as_deref_mut()
                    .ok_or("a cluster redirect outside a cluster")?;
                ty = Some(
                    redis::cmd("TYPE")
                        .arg(&key)
                        .query(router)
                        .map_err(|e| brief(&e))?,
                );
                all = Some(
                    redis::cmd("HGETALL")
                        .arg(&key)
                        .query(router)
                        .unwrap_or(Value::Nil),
                );
            }
            let ty = match ty {
                Some(Value::SimpleString(s)) => s,
                _ => "unknown".into(),
            };
            match ty.as_str() {
                "none" => continue,
                "hash" => {
                    let fields = hash_pairs(all)
                        .into_iter()
                        .map(|(k, v)| (finding::escape(&k), finding::escape(&v)))
                        .collect();
                    write_line(
                        &mut w,
                        &Line {
                            key: finding::escape(&key),
                            redis_type: ty,
                            fields: Some(fields),
                            members: None,
                        },
                    )?;
                }
                "set" => {
                    let mut pending: Vec<String> = Vec::new();
                    let mut total = 0u64;
                    let mut write_err = None;
                    redis_cache::sscan(reader, &key, batch, |members| {
                        total += members.len() as u64;
                        pending.extend(members.iter().map(|m| finding::escape(m)));
                        while pending.len() >= MEMBERS_PER_LINE && write_err.is_none() {
                            let chunk: Vec<String> = pending.drain(..MEMBERS_PER_LINE).collect();
                            write_err = write_members(&mut w, &key, chunk).err();
                        }
                    })?;
                    if let Some(e) = write_err {
                        return Err(e);
                    }
                    if !pending.is_empty() {
                        write_members(&mut w, &key, pending)?;
                    }
                    counts.set_members += total;
                }
                _ => write_line(
                    &mut w,
                    &Line {
                        key: finding::escape(&key),
                        redis_type: ty,
                        fields: None,
                        members: None,
                    },
                )?,
            }
            counts.keys += 1;
        }
        Ok(())
    })?;
    w.flush()
        .map_err(|e| format!("cannot write the dump: {e}"))?;
    Ok(counts)
}

fn write_members(w: &mut dyn Write, key: &[u8], members: Vec<String>) -> Result<(), String> {
    write_line(
        w,
        &Line {
            key: finding::escape(key),
            redis_type: "set".into(),
            fields: None,
            members: Some(members),
        },
    )
}

fn hash_pairs(v: Option<Value>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes = |v: Value| match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        other => format!("{other:?}").into_bytes(),
    };
    match v {
        Some(Value::Array(items)) => {
            let mut it = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((bytes(k), bytes(v)));
            }
            out
        }
        Some(Value::Map(pairs)) => pairs
            .into_iter()
            .map(|(k, v)| (bytes(k), bytes(v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn write_line<T: Serialize>(w: &mut dyn Write, value: &T) -> Result<(), String> {
    serde_json::to_writer(&mut *w, value)
        .map_err(|e| e.to_string())
        .and_then(|_| w.write_all(b"\n").map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot write the dump: {e}"))
}

/// The `export-cache` command.
pub fn run_export(args: &crate::cli::ExportArgs) -> Result<u8, String> {
    if args.scan_count == 0 {
        return Err("--scan-count must be at least 1".into());
    }
    let file = match &args.config {
        Some(p) => Some(crate::config::load(p, std::env::vars())?),
        None => None,
    };
    let target = crate::settings::redis_target(args.redis.as_deref(), file.as_ref(), None)?;
    let mut conn = target.connect_cache()?;
    let created = crate::report::rfc3339(std::time::SystemTime::now());
    let counts = match &args.output {
        None => export(
            &mut conn,
            &mut std::io::stdout().lock(),
            &target.display(),
            &created,
            args.scan_count,
        )?,
        Some(path) => crate::report::write_atomically(path, |f| {
            export(&mut conn, f, &target.display(), &created, args.scan_count)
        })?,
    };
    tracing::info!(
        keys = counts.keys,
        members = counts.set_members,
        "cache exported"
    );
    if let Some(path) = &args.output {
        eprintln!(
            "Exported {} cache keys ({} set members; {} other keys skipped) to {}",
            counts.keys,
            counts.set_members,
            counts.foreign_keys_skipped,
            path.display()
        );
    }
    Ok(0)
}

/// Reads a dump into `index`, streaming; a malformed line is an error naming the line
/// and column.
pub fn read(path: &Path, index: &mut CacheIndex) -> Result<(), String> {
    let file =
        File::open(path).map_err(|e| format!("cannot read cache dump {}: {e}", path.display()))?;
    let at = |line: usize, col: usize, what: &str| {
        format!(
            "cache dump {}: line {line}, column {col}: {what}",
            path.display()
        )
    };
    let mut seen_sets: HashSet<Vec<u8>> = HashSet::new();
    let mut header_seen = false;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| at(n, 1, &format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        if !header_seen {
            let h: Header = serde_json::from_str(&line).map_err(|e| {
                at(
                    n,
                    e.column(),
                    &format!("not a registry-audit cache dump header: {e}"),
                )
            })?;
            if h.format != FORMAT || h.version != VERSION {
                return Err(at(
                    n,
                    1,
                    &format!(
                        "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                        h.format, h.version
                    ),
                ));
            }
            header_seen = true;
            continue;
        }
        let entry: Line =
            serde_json::from_str(&line).map_err(|e| at(n, e.column(), &e.to_string()))?;
        let unescape = |s: &str, what: &str| {
            finding::unescape(s)
                .ok_or_else(|| at(n, 1, &format!("{what} {s:?} is not in the escaped form")))
        };
        let key = unescape(&entry.key, "key")?;
        let shape = classify(&key);
        let raw_fields: Vec<(String, Vec<u8>)> = match &entry.fields {
            Some(f) => f
                .iter()
                .map(|(k, v)| Ok((k.clone(), unescape(v, "value")?)))
                .collect::<Result<_, String>>()?,
            None => Vec::new(),
        };
        let get = |name: &str| {
            raw_fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        };
        let fields = HashFields {
            digest: get("digest"),
            size: get("size"),
            length: get("length"),
            mediatype: get("mediatype"),
        };
        let is_set = matches!(shape, KeyShape::RepoSet(_)) && entry.redis_type == "set";
        let repo = if is_set && !seen_sets.insert(key.clone()) {
            match &shape {
                KeyShape::RepoSet(r) => Some(r.clone()),
                _ => None,
            }
        } else {
            index.ingest(&key, shape, &entry.redis_type, &fields)
        };
        if let Some(repo) = repo {
            for m in entry.members.iter().flatten() {
                index.add_member(&key, &repo, &unescape(m, "member")?);
            }
        }
    }
    if !header_seen {
        return Err(at(1, 1, "empty file, not a registry-audit cache dump"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(text: &str) -> Result<CacheIndex, String> {
        let dir =
            std::env::temp_dir().join(format!("ra-dump-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).expect("write");
        let mut idx = CacheIndex::new();
        let r = read(&dir, &mut idx);
        let _ = std::fs::remove_file(&dir);
        r.map(|_| idx)
    }

    const HEADER: &str =
        r#"{"format":"registry-audit-cache-dump","version":1,"source":"x","created_at":"y"}"#;

    #[test]
    fn reads_entries_and_live_the_same_way() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let text = format!(
            "{HEADER}\n{{\"key\":\"blobs::{d}\",\"type\":\"hash\",\"fields\":{{\"digest\":\"{d}\",\"size\":\"3\"}}}}\n{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"{d}\"]}}\n{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"sha256:\\\\xff\"]}}\n{{\"key\":\"repository::a::blobs::{d}\",\"type\":\"hash\",\"fields\":{{\"mediatype\":\"m\"}}}}\n{{\"key\":\"session:1\",\"type\":\"string\"}}\n"
        );
        let idx = dump(&text).expect("dump");
        let digest = crate::digest::Digest::parse_str(&d).expect("digest");
        let e = idx.entry(&digest).expect("entry");
        assert!(e.global_live());
        assert!(e.repo_live(&e.repos[0]));
        assert_eq!(idx.counts.keys, 3, "the set spanning two lines counts once");
        assert_eq!(idx.counts.set_members, 2);
        assert_eq!(idx.counts.foreign_keys, 1);
        assert_eq!(idx.malformed().len(), 1);
    }

    #[test]
    fn malformed_dumps_name_line_and_column() {
        let err = dump(&format!("{HEADER}\n{{\"key\": 5}}\n")).expect_err("error");
        assert!(err.contains("line 2, column"), "{err}");
        let err = dump("{\"format\":\"other\",\"version\":1}\n").expect_err("error");
        assert!(err.contains("line 1"), "{err}");
        let err = dump("").expect_err("error");
        assert!(err.contains("empty"), "{err}");
        let err = dump(&format!(
            "{HEADER}\n{{\"key\":\"blobs::x\",\"type\":\"hash\",\"bogus\":1}}\n"
        ))
        .expect_err("error");
        assert!(err.contains("line 2"), "{err}");
    }
}
