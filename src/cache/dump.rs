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
//! {"end":"registry-audit-cache-dump","keys":3,"set_members":2}
//! ```
//!
//! Each key appears once; a set's lines follow each other. A key on a second line
//! anywhere else is an error naming the key and both lines, since the second line would
//! silently override the first.
//!
//! The last line, the trailer, records how many keys (a set spanning several lines
//! counts once) and set members the dump holds. A dump without it, or whose counts
//! disagree with what was read, is incomplete: a dump cut at a line boundary would
//! otherwise look like a small cache. Its entries are still audited, but the run says
//! `complete: false`. Each line is at most `files::MAX_DUMP_LINE` bytes and the whole
//! dump at most `files::MAX_DUMP_BYTES`; past either the reader stops with an error.
//!
//! Keys, members, field names and values use the lossless escaping of
//! `finding::escape` (`\\` for a backslash, `\xNN` for control and non-UTF-8 bytes).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use redis::Value;
use serde::{Deserialize, Serialize};

use crate::cache::cluster as redis_cluster;
use crate::cache::index::{CacheIndex, HashFields, KeyShape, classify};
use crate::cache::redis::{self as redis_cache, CacheConn, brief};
use crate::files::{self, MAX_DUMP_LINE};
use crate::finding;

pub(crate) const FORMAT: &str = "registry-audit-cache-dump";
pub(crate) const VERSION: u32 = 1;
/// Members per line for large sets.
const MEMBERS_PER_LINE: usize = 1000;
/// Escaped member bytes per line for large sets, so that a line of long members stays
/// well within `files::MAX_DUMP_LINE`.
const MEMBER_BYTES_PER_LINE: usize = MAX_DUMP_LINE / 4;

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

/// The last line: what the dump holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    /// Always `FORMAT`.
    end: String,
    keys: u64,
    set_members: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ExportCounts {
    pub keys: u64,
    pub set_members: u64,
    pub foreign_keys_skipped: u64,
}

/// Streams every registry-shaped key of the database (every master of a cluster) to
/// `out`.
pub(crate) fn export(
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
                    let mut pending_bytes = 0usize;
                    let mut total = 0u64;
                    let mut write_err = None;
                    redis_cache::sscan(reader, &key, batch, |members| {
                        total += members.len() as u64;
                        for m in members {
                            if write_err.is_some() {
                                break;
                            }
                            let escaped = finding::escape(&m);
                            // A line holds up to MEMBERS_PER_LINE members, and fewer
                            // when they are long.
                            if !pending.is_empty()
                                && pending_bytes + escaped.len() > MEMBER_BYTES_PER_LINE
                                && write_err.is_none()
                            {
                                write_err =
                                    write_members(&mut w, &key, std::mem::take(&mut pending)).err();
                                pending_bytes = 0;
                            }
                            pending_bytes += escaped.len() + 3;
                            pending.push(escaped);
                            if pending.len() >= MEMBERS_PER_LINE && write_err.is_none() {
                                write_err =
                                    write_members(&mut w, &key, std::mem::take(&mut pending)).err();
                                pending_bytes = 0;
                            }
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
    write_line(
        &mut w,
        &Trailer {
            end: FORMAT.into(),
            keys: counts.keys,
            set_members: counts.set_members,
        },
    )?;
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

/// Writes one line; a line longer than the reader accepts (a hash whose values are
/// megabytes long, or one such set member) is an error, never a dump that cannot be read.
fn write_line<T: Serialize + LineKey>(w: &mut dyn Write, value: &T) -> Result<(), String> {
    let mut text = serde_json::to_vec(value).map_err(|e| format!("cannot write the dump: {e}"))?;
    if text.len() > MAX_DUMP_LINE {
        return Err(format!(
            "cannot export key {}: its line would be {} bytes, over the dump's limit of {} per line; inspect the key with redis-cli (it is no descriptor the registry wrote)",
            value.key(),
            text.len(),
            files::limit_text(MAX_DUMP_LINE as u64)
        ));
    }
    text.push(b'\n');
    w.write_all(&text)
        .map_err(|e| format!("cannot write the dump: {e}"))
}

/// The key a dump line is about, for errors.
trait LineKey {
    fn key(&self) -> &str;
}

impl LineKey for Line {
    fn key(&self) -> &str {
        &self.key
    }
}

impl LineKey for Header {
    fn key(&self) -> &str {
        "(header)"
    }
}

impl LineKey for Trailer {
    fn key(&self) -> &str {
        "(trailer)"
    }
}

/// What reading a dump found besides its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DumpRead {
    /// Why the dump cannot be trusted to hold the whole cache (no trailer, or counts
    /// that disagree): the audit of what it held stands, but the run is incomplete.
    pub incomplete: Option<String>,
}

/// Reads a dump into `index`, streaming, a line at a time within the limits of
/// `files`; a malformed line is an error naming the line and column.
pub(crate) fn read(path: &Path, index: &mut CacheIndex) -> Result<DumpRead, String> {
    let lines = files::Lines::open(
        "cache dump",
        path,
        files::MAX_DUMP_BYTES,
        files::MAX_DUMP_LINE,
    )?;
    read_lines(lines, &path.display().to_string(), index)
}

/// Reads dump lines into `index`; `name` names the dump in errors.
pub(crate) fn read_lines<R: BufRead>(
    mut lines: files::Lines<R>,
    name: &str,
    index: &mut CacheIndex,
) -> Result<DumpRead, String> {
    let at = |line: u64, col: usize, what: &str| {
        format!("cache dump {name}: line {line}, column {col}: {what}")
    };
    // Keys seen so far, with the line each first appeared on. Export writes each key
    // once; only a large set spans several lines, and those lines follow each other.
    let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
    // The set whose lines are being read, so that its next line may continue it.
    let mut open_set: Option<Vec<u8>> = None;
    let mut header_seen = false;
    let mut trailer: Option<(u64, Trailer)> = None;
    let (mut keys, mut members) = (0u64, 0u64);
    let mut n = 0u64;
    while let Some(line) = lines.next_line()? {
        n += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        if let Some((end, _)) = &trailer {
            return Err(at(
                n,
                1,
                &format!("more data after the dump's end (line {end}): not one dump"),
            ));
        }
        if !header_seen {
            let h: Header = serde_json::from_slice(line).map_err(|e| {
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
        let entry: Line = match serde_json::from_slice(line) {
            Ok(entry) => entry,
            Err(e) => match serde_json::from_slice::<Trailer>(line) {
                Ok(t) if t.end == FORMAT => {
                    trailer = Some((n, t));
                    continue;
                }
                _ => return Err(at(n, e.column(), &e.to_string())),
            },
        };
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
        let continued = match seen.get(&key) {
            None => {
                seen.insert(key.clone(), n);
                false
            }
            Some(_) if entry.redis_type == "set" && open_set.as_ref() == Some(&key) => true,
            Some(first) => {
                // A second line for a key would override the first (a live entry could
                // turn inert) and a copied line keeps the trailer's count: refuse it.
                return Err(at(
                    n,
                    1,
                    &format!(
                        "key {} appears again (first on line {first}); a dump holds each key once (a set's members only on lines that follow each other): it is damaged or was edited; re-export it",
                        finding::escape(&key)
                    ),
                ));
            }
        };
        open_set = (entry.redis_type == "set").then(|| key.clone());
        keys += u64::from(!continued);
        members += entry.members.as_ref().map_or(0, |m| m.len() as u64);
        let repo = match (&shape, continued) {
            // More members of a repository set already ingested.
            (KeyShape::RepoSet(r), true) => Some(r.clone()),
            // More members of a set of another shape: already counted as one key.
            (_, true) => None,
            (_, false) => index.ingest(&key, shape, &entry.redis_type, &fields),
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
    let incomplete = match trailer {
        None => Some(format!(
            "cache dump {name} has no end line: it was cut short, or written by an older registry-audit (re-export it with this version); the {keys} keys it holds were audited, but the cache may hold more"
        )),
        Some((_, t)) if t.keys != keys || t.set_members != members => Some(format!(
            "cache dump {name} says it holds {} keys and {} set members, but {keys} keys and {members} members were read: it is damaged or was cut and mended; re-export it",
            t.keys, t.set_members
        )),
        Some(_) => None,
    };
    Ok(DumpRead { incomplete })
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
    fn a_key_on_a_second_line_is_refused_unless_it_continues_a_set() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let e = format!("sha256:{}", "cd".repeat(32));
        let global = |x: &str| {
            format!(
                "{{\"key\":\"blobs::{x}\",\"type\":\"hash\",\"fields\":{{\"digest\":\"{x}\",\"size\":\"3\"}}}}"
            )
        };
        let set = |x: &str| {
            format!("{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"{x}\"]}}")
        };
        let trailer = |keys: u64, members: u64| {
            format!(
                "{{\"end\":\"registry-audit-cache-dump\",\"keys\":{keys},\"set_members\":{members}}}"
            )
        };
        // The same hash line twice (a copy replacing another, trailer unchanged).
        let copied = format!(
            "{HEADER}\n{}\n{}\n{}\n",
            global(&d),
            global(&d),
            trailer(2, 0)
        );
        let err = dump(&copied).expect_err("refused");
        assert!(
            err.contains("line 3")
                && err.contains(&format!("blobs::{d}"))
                && err.contains("first on line 2"),
            "{err}"
        );
        // A hash key again as a set, and a set's lines apart: refused too.
        let retyped = format!(
            "{HEADER}\n{}\n{{\"key\":\"blobs::{d}\",\"type\":\"set\",\"members\":[]}}\n",
            global(&d)
        );
        assert!(dump(&retyped).is_err());
        let apart = format!(
            "{HEADER}\n{}\n{}\n{}\n{}\n",
            set(&d),
            global(&e),
            set(&e),
            trailer(2, 2)
        );
        let err = dump(&apart).expect_err("refused");
        assert!(
            err.contains("line 4") && err.contains("repository::a::blobs"),
            "{err}"
        );
        // A set continued on the following lines is one key, as export writes it.
        let split = format!(
            "{HEADER}\n{}\n{}\n{}\n{}\n",
            global(&e),
            set(&d),
            set(&e),
            trailer(2, 2)
        );
        let idx = dump(&split).expect("split set");
        assert_eq!(idx.counts.keys, 2);
    }

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

    fn read_bytes(bytes: &[u8], max_line: usize) -> Result<(CacheIndex, DumpRead), String> {
        let mut idx = CacheIndex::new();
        let lines = files::Lines::new(bytes, "cache dump", "t", u64::MAX, max_line);
        read_lines(lines, "t", &mut idx).map(|r| (idx, r))
    }

    #[test]
    fn the_trailer_makes_a_dump_complete() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let body = format!(
            "{HEADER}\n{{\"key\":\"blobs::{d}\",\"type\":\"hash\",\"fields\":{{\"digest\":\"{d}\",\"size\":\"3\"}}}}\n{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"{d}\"]}}\n{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"x\"]}}\n"
        );
        let whole = format!("{body}{{\"end\":\"{FORMAT}\",\"keys\":2,\"set_members\":2}}\n");
        let (_, r) = read_bytes(whole.as_bytes(), MAX_DUMP_LINE).expect("dump");
        assert_eq!(r.incomplete, None);
        // Without the trailer: audited, but incomplete, and the note says what to do.
        let (idx, r) = read_bytes(body.as_bytes(), MAX_DUMP_LINE).expect("dump");
        assert_eq!(idx.counts.keys, 2);
        let why = r.incomplete.expect("incomplete");
        assert!(why.contains("re-export"), "{why}");
        // A line dropped before the trailer: the counts disagree.
        let mut lines: Vec<&str> = whole.lines().collect();
        lines.remove(3);
        let (_, r) = read_bytes(lines.join("\n").as_bytes(), MAX_DUMP_LINE).expect("dump");
        let why = r.incomplete.expect("incomplete");
        assert!(
            why.contains("2 set members, but 2 keys and 1 members"),
            "{why}"
        );
        // Data after the trailer is not one dump.
        let err = read_bytes(format!("{whole}{HEADER}\n").as_bytes(), MAX_DUMP_LINE)
            .expect_err("after the end");
        assert!(err.contains("line 6"), "{err}");
        // One endless line stops the reader with the limit named.
        let err = read_bytes(&[b'{'; 200], 100).expect_err("too long");
        assert!(err.contains("line 1") && err.contains("100 bytes"), "{err}");
    }

    #[test]
    fn export_refuses_lines_the_reader_would_refuse() {
        let mut out = Vec::new();
        let huge = Line {
            key: "blobs::x".into(),
            redis_type: "hash".into(),
            fields: Some(BTreeMap::from([(
                "digest".to_string(),
                "a".repeat(MAX_DUMP_LINE),
            )])),
            members: None,
        };
        let err = write_line(&mut out, &huge).expect_err("too long");
        assert!(err.contains("blobs::x") && err.contains("8 MiB"), "{err}");
        assert!(out.is_empty(), "nothing half-written");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Dump lines: the registry's entries, damaged ones, trailers and noise.
        fn dump_text() -> impl Strategy<Value = Vec<u8>> {
            let d = format!("sha256:{}", "ab".repeat(32));
            let line = proptest::sample::select(vec![
                HEADER.to_string(),
                format!(
                    "{{\"key\":\"blobs::{d}\",\"type\":\"hash\",\"fields\":{{\"digest\":\"{d}\",\"size\":\"-1\"}}}}"
                ),
                format!(
                    "{{\"key\":\"repository::a::blobs\",\"type\":\"set\",\"members\":[\"{d}\",\"\\\\xzz\"]}}"
                ),
                format!(
                    "{{\"key\":\"repository::a::blobs::{d}\",\"type\":\"hash\",\"fields\":{{\"mediatype\":\"m\"}}}}"
                ),
                "{\"key\":\"blobs::\\\\xff\",\"type\":\"set\",\"members\":[\"a\"]}".to_string(),
                "{\"key\":\"repository::A::blobs\",\"type\":\"string\"}".to_string(),
                "{\"key\":\"x\",\"type\":\"hash\",\"fields\":{\"size\":\"\\\\x\"}}".to_string(),
                format!("{{\"end\":\"{FORMAT}\",\"keys\":1,\"set_members\":18446744073709551615}}"),
                "{\"end\":\"other\",\"keys\":0,\"set_members\":0}".to_string(),
                "{\"key\":".to_string(),
                String::new(),
                "\u{0}\u{7f}".to_string(),
            ]);
            (
                proptest::collection::vec(line, 0..10),
                proptest::collection::vec(any::<u8>(), 0..40),
            )
                .prop_map(|(lines, noise)| {
                    let mut text = lines.join("\n").into_bytes();
                    text.extend_from_slice(&noise);
                    text
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary bytes are read or refused with a message naming the dump.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                if let Err(e) = read_bytes(&bytes, 64) {
                    prop_assert!(e.starts_with("cache dump t"), "{e}");
                }
            }

            /// Dump-shaped input: read (complete or not) or refused, never a panic.
            #[test]
            fn dump_shaped_input_never_panics(bytes in dump_text()) {
                if let Err(e) = read_bytes(&bytes, MAX_DUMP_LINE) {
                    prop_assert!(e.starts_with("cache dump t"), "{e}");
                }
            }
        }
    }
}
