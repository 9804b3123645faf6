//! Reading the registry's cache from Redis: connecting (TCP, TLS or a Unix socket, with
//! the credentials of the registry's config), then streaming every key with SCAN and
//! reading the registry-shaped ones with pipelines, a batch per round trip, into a
//! `CacheIndex`. It reads Redis and never writes - writes live in `purge`.

use std::collections::HashSet;
use std::time::Duration;

use redis::{Client, Connection, ConnectionAddr, ConnectionInfo, Value};

use crate::cache_index::{CacheIndex, HashFields, KeyShape, classify};

/// The registry's fields of a descriptor hash, in this order; purge removes these and
/// no others from a global descriptor.
pub const HASH_FIELDS: [&str; 4] = ["digest", "size", "length", "mediatype"];

/// Where the cache is and how to authenticate; the password never leaves this struct
/// except to Redis.
#[derive(Clone)]
pub struct RedisTarget {
    pub info: ConnectionInfo,
    pub tls: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl RedisTarget {
    /// Parses `redis://[user:pass@]host:port/db`, `rediss://...` or
    /// `redis+unix:///path.sock`.
    pub fn from_url(url: &str) -> Result<RedisTarget, String> {
        let info: ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
                format!(
                    "invalid Redis URL: {}",
                    e.detail().unwrap_or("unrecognised form")
                )
            })?;
        Ok(RedisTarget { info, tls: None })
    }

    /// The target as a URL with the password masked: safe for reports and errors.
    pub fn display(&self) -> String {
        let redis = self.info.redis_settings();
        let mut auth = String::new();
        if let Some(user) = redis.username() {
            auth.push_str(user);
        }
        if redis.password().is_some() {
            auth.push_str(":***");
        }
        if !auth.is_empty() {
            auth.push('@');
        }
        let db = redis.db();
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => format!("redis://{auth}{host}:{port}/{db}"),
            ConnectionAddr::TcpTls { host, port, .. } => {
                format!("rediss://{auth}{host}:{port}/{db}")
            }
            ConnectionAddr::Unix(path) => {
                format!("redis+unix://{auth}{}?db={db}", path.display())
            }
            _ => format!("redis (unsupported address) db {db}"),
        }
    }

    /// Connects and checks the connection with PING, so that a refused password or an
    /// unreachable server is an error here, with a message that says what to fix.
    pub fn connect(&self) -> Result<Connection, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match &self.tls {
            Some(certs) => Client::build_with_tls(self.info.clone(), certs.clone()),
            None => Client::open(self.info.clone()),
        }
        .map_err(|e| format!("cannot use Redis {}: {}", self.display(), brief(&e)))?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(10))
            .map_err(|e| self.connect_error(&e))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .and_then(|_| conn.set_write_timeout(Some(Duration::from_secs(60))))
            .map_err(|e| self.connect_error(&e))?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(|e| self.connect_error(&e))?;
        Ok(conn)
    }

    fn connect_error(&self, e: &redis::RedisError) -> String {
        let what = brief(e);
        let lower = what.to_ascii_lowercase();
        if lower.contains("noauth")
            || lower.contains("wrongpass")
            || lower.contains("authentication")
            || lower.contains("invalid password")
            || lower.contains("auth")
        {
            format!(
                "Redis at {} refused the credentials ({what}): check the password (redis.password or the --redis URL)",
                self.display()
            )
        } else {
            format!(
                "cannot reach Redis at {} ({what}): check that it runs and the address (redis.addr or --redis)",
                self.display()
            )
        }
    }
}

/// One line for a Redis error, without anything from the connection string.
pub fn brief(e: &redis::RedisError) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("error").to_string()
}

/// Streams the whole keyspace with SCAN (`batch` keys per call) and reads every
/// registry-shaped key into `index` with one pipeline per batch. Repository sets are
/// read with SSCAN, so a huge set never arrives in one reply.
pub fn scan(
    conn: &mut Connection,
    index: &mut CacheIndex,
    batch: usize,
    progress: &indicatif::ProgressBar,
) -> Result<(), String> {
    let mut cursor: u64 = 0;
    let mut seen_sets: HashSet<Vec<u8>> = HashSet::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(batch)
            .query(conn)
            .map_err(|e| format!("Redis SCAN failed: {}", brief(&e)))?;
        progress.inc(keys.len() as u64);
        let sets = read_batch(conn, index, keys, &mut seen_sets)?;
        for (key, repo) in sets {
            read_set(conn, index, &key, &repo, batch)?;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// Reads one SCAN batch; returns the repository sets found, to be read with SSCAN.
fn read_batch(
    conn: &mut Connection,
    index: &mut CacheIndex,
    keys: Vec<Vec<u8>>,
    seen_sets: &mut HashSet<Vec<u8>>,
) -> Result<Vec<(Vec<u8>, String)>, String> {
    // One command per key: HMGET for the hash shapes (its reply says whether the key
    // is a hash), TYPE for sets; malformed keys need no read.
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut pending = Vec::new();
    for key in keys {
        let shape = classify(&key);
        match &shape {
            KeyShape::Foreign | KeyShape::Malformed { .. } => {
                index.ingest(&key, shape, "", &HashFields::default());
                continue;
            }
            // SCAN may return a key twice; read it once.
            KeyShape::Global(d) if index.has_global(d) => continue,
            KeyShape::RepoSet(_) if !seen_sets.insert(key.clone()) => continue,
            KeyShape::RepoSet(_) => pipe.cmd("TYPE").arg(&key),
            _ => pipe.cmd("HMGET").arg(&key).arg(&HASH_FIELDS[..]),
        };
        pending.push((key, shape));
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let replies: Vec<Value> = pipe
        .query(conn)
        .map_err(|e| format!("reading cache keys from Redis failed: {}", brief(&e)))?;
    // A hash reply with none of the fields, or an error (not a hash), needs its TYPE:
    // asked in a second, small pipeline.
    let mut unsure: Vec<usize> = Vec::new();
    for (i, ((_, shape), reply)) in pending.iter().zip(&replies).enumerate() {
        let is_hash_shape = !matches!(shape, KeyShape::RepoSet(_));
        let all_nil =
            matches!(reply, Value::Array(items) if items.iter().all(|v| *v == Value::Nil));
        if is_hash_shape && (all_nil || matches!(reply, Value::ServerError(_))) {
            unsure.push(i);
        }
    }
    let mut types: Vec<Option<String>> = vec![None; pending.len()];
    if !unsure.is_empty() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &i in &unsure {
            pipe.cmd("TYPE").arg(&pending[i].0);
        }
        let answers: Vec<Value> = pipe
            .query(conn)
            .map_err(|e| format!("reading cache keys from Redis failed: {}", brief(&e)))?;
        for (&i, t) in unsure.iter().zip(answers) {
            types[i] = Some(type_name(Some(t)));
        }
    }
    let mut sets = Vec::new();
    for (((key, shape), reply), ty) in pending.into_iter().zip(replies).zip(types) {
        let (kind, values) = match (&shape, ty) {
            (KeyShape::RepoSet(_), _) => (type_name(Some(reply)), Vec::new()),
            (_, Some(t)) => (t, bulk_list(Some(reply))),
            (_, None) => ("hash".to_string(), bulk_list(Some(reply))),
        };
        let field = |i: usize| values.get(i).and_then(|v| v.as_deref());
        let fields = HashFields {
            digest: field(0),
            size: field(1),
            length: field(2),
            mediatype: field(3),
        };
        if let Some(repo) = index.ingest(&key, shape, &kind, &fields) {
            sets.push((key, repo));
        }
    }
    Ok(sets)
}

fn read_set(
    conn: &mut Connection,
    index: &mut CacheIndex,
    key: &[u8],
    repo: &str,
    batch: usize,
) -> Result<(), String> {
    let mut cursor: u64 = 0;
    loop {
        let (next, members): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(batch)
            .query(conn)
            .map_err(|e| format!("Redis SSCAN failed: {}", brief(&e)))?;
        for m in members {
            index.add_member(key, repo, &m);
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

fn type_name(v: Option<Value>) -> String {
    match v {
        Some(Value::SimpleString(s)) => s,
        Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(Value::Okay) => "ok".into(),
        _ => "unknown".into(),
    }
}

fn bulk_list(v: Option<Value>) -> Vec<Option<Vec<u8>>> {
    match v {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::BulkString(b) => Some(b),
                Value::SimpleString(s) => Some(s.into_bytes()),
                Value::Int(n) => Some(n.to_string().into_bytes()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_masks_the_password() {
        let t = RedisTarget::from_url("redis://:s3cret@10.0.0.5:6379/2").expect("url");
        assert_eq!(t.display(), "redis://:***@10.0.0.5:6379/2");
        let t = RedisTarget::from_url("redis://bob:s3cret@h:1/0").expect("url");
        assert_eq!(t.display(), "redis://bob:***@h:1/0");
        assert!(!format!("{t:?}").contains("s3cret"));
        let t = RedisTarget::from_url("redis+unix:///run/redis.sock").expect("url");
        assert!(t.display().starts_with("redis+unix:///run/redis.sock"));
        let t = RedisTarget::from_url("rediss://h:6380/0").expect("url");
        assert_eq!(t.display(), "rediss://h:6380/0");
    }

    #[test]
    fn rejects_what_is_not_a_redis_url() {
        assert!(RedisTarget::from_url("http://x").is_err());
        assert!(RedisTarget::from_url("not a url").is_err());
    }
}
