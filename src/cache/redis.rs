//! Reading the registry's cache from Redis: connecting (TCP, TLS or a Unix socket, with
//! the credentials of the registry's config; a single server or any node of a Redis
//! Cluster), then streaming every key with SCAN - on every master of a cluster - and
//! reading the registry-shaped ones with pipelines, a batch per round trip, into a
//! `CacheIndex`. It reads Redis and never writes - writes live in `repair`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use redis::cluster::ClusterConnection;
use redis::{Client, Connection, ConnectionAddr, ConnectionInfo, ConnectionLike, Value};

use crate::cache::cluster::{self as redis_cluster, Cluster};

use crate::cache::index::{self as cache_index, CacheIndex, HashFields, KeyShape, classify};
use crate::digest::Digest;

/// The registry's fields of a descriptor hash, in this order; purge removes these and
/// no others from a global descriptor.
pub(crate) const HASH_FIELDS: [&str; 4] = ["digest", "size", "length", "mediatype"];

/// Where the cache is and how to authenticate; the password never leaves this struct
/// except to Redis.
#[derive(Clone)]
pub(crate) struct RedisTarget {
    pub info: ConnectionInfo,
    pub tls: Option<redis::TlsCertificates>,
    /// The operator said this is a cluster (`--redis-cluster`, or several
    /// `redis.addrs`): a server that is not one is an error, not a silent single node.
    pub expect_cluster: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl RedisTarget {
    /// Parses `redis://[user:pass@]host:port/db`, `rediss://...` or
    /// `redis+unix:///path.sock`.
    pub(crate) fn from_url(url: &str) -> Result<RedisTarget, String> {
        let info: ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
                format!(
                    "invalid Redis URL: {}",
                    e.detail().unwrap_or("unrecognised form")
                )
            })?;
        Ok(RedisTarget {
            info,
            tls: None,
            expect_cluster: false,
        })
    }

    /// The target as a URL with the password masked: safe for reports and errors.
    pub(crate) fn display(&self) -> String {
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
    pub(crate) fn connect(&self) -> Result<Connection, String> {
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
pub(crate) fn brief(e: &redis::RedisError) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("error").to_string()
}

/// A connection to the cache: one server, or a cluster.
pub(crate) enum CacheConn {
    Single(Connection),
    Cluster(Box<Cluster>),
}

impl RedisTarget {
    /// Connects, recognising a Redis Cluster by any of its nodes.
    pub(crate) fn connect_cache(&self) -> Result<CacheConn, String> {
        let mut conn = self.connect()?;
        if redis_cluster::is_cluster(&mut conn) {
            Ok(CacheConn::Cluster(Box::new(Cluster::connect(self)?)))
        } else if self.expect_cluster {
            Err(format!(
                "{} is not a Redis Cluster node (cluster_enabled is 0); Redis Sentinel is not supported: pass --redis URL of the server that holds the cache",
                self.display()
            ))
        } else {
            Ok(CacheConn::Single(conn))
        }
    }
}

/// Where a batch of keys is read: the node that holds them, and in a cluster the
/// routing connection for keys that moved meanwhile.
pub(crate) struct Reader<'a> {
    pub node: &'a mut Connection,
    pub router: Option<&'a mut ClusterConnection>,
}

impl Reader<'_> {
    /// Asks again, through the cluster's routing, a command whose node answered with a
    /// redirect.
    fn reroute(&mut self, cmd: &redis::Cmd) -> Result<Value, String> {
        match self.router.as_deref_mut() {
            Some(router) => cmd.query(router).map_err(|e| {
                format!(
                    "reading a moved key from Redis Cluster failed: {}",
                    brief(&e)
                )
            }),
            None => Err("Redis answered with a cluster redirect outside a cluster".into()),
        }
    }
}

/// Keys already handed out, by hash: SCAN may return a key twice, and a resharding
/// makes some keys read again; each reaches the caller once. The hash is keyed at
/// random per run, so keys written to collide on purpose cannot hide one another.
/// The hashes are kept in 256 sets by their first byte: each grows on its own, so the
/// whole never doubles at once (a million keys would otherwise hold 28 MB while the
/// last set grew, for 9 MB of hashes).
struct Seen {
    parts: Vec<HashSet<u64>>,
    hasher: std::hash::RandomState,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen {
            parts: vec![HashSet::new(); 256],
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl Seen {
    fn first_time(&mut self, key: &[u8]) -> bool {
        let h = std::hash::BuildHasher::hash_one(&self.hasher, key);
        self.parts[(h >> 56) as usize].insert(h)
    }
}

impl CacheConn {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, CacheConn::Cluster(_))
    }

    /// The connection for commands about given keys (a cluster routes them by slot and
    /// follows MOVED/ASK).
    pub(crate) fn router(&mut self) -> &mut dyn ConnectionLike {
        match self {
            CacheConn::Single(c) => c,
            CacheConn::Cluster(c) => &mut c.router,
        }
    }

    /// Streams every key once, in SCAN batches of about `batch`, handing each batch to
    /// `f` with a reader on the node that holds it. In a cluster every master is
    /// scanned, and the slots that changed owner or were migrating while we scanned are
    /// read again (CLUSTER GETKEYSINSLOT on every master), so a resharding loses no key.
    /// Returns how many slots were read again.
    pub(crate) fn for_each_batch(
        &mut self,
        batch: usize,
        mut f: impl FnMut(&mut Reader<'_>, Vec<Vec<u8>>) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut seen = Seen::default();
        match self {
            CacheConn::Single(conn) => scan_node(conn, None, batch, &mut seen, &mut f).map(|_| 0),
            CacheConn::Cluster(cluster) => {
                let mut before = cluster.slot_map()?;
                for (host, port) in before.masters() {
                    let mut node = cluster.node(&host, port)?;
                    scan_node(
                        &mut node,
                        Some(&mut cluster.router),
                        batch,
                        &mut seen,
                        &mut f,
                    )?;
                }
                // Until the slot map holds still and nothing is migrating, for at most
                // RESHARD_WAIT: a resharding on a busy cluster takes a while, and a run
                // that gives up early has to start over.
                let mut reread = 0u64;
                let deadline = Instant::now() + RESHARD_WAIT;
                while Instant::now() < deadline {
                    let after = cluster.slot_map()?;
                    let mut slots: Vec<usize> =
                        before.moved_to(&after).into_values().flatten().collect();
                    let migrating = migrating_slots(&mut cluster.router)?;
                    slots.extend(migrating.iter().copied());
                    slots.sort_unstable();
                    slots.dedup();
                    if slots.is_empty() {
                        return Ok(reread);
                    }
                    reread += slots.len() as u64;
                    tracing::info!(
                        slots = slots.len(),
                        "slots moved during the scan; reading them again"
                    );
                    for (host, port) in after.masters() {
                        let mut node = cluster.node(&host, port)?;
                        for &slot in &slots {
                            let keys = keys_in_slot(&mut node, slot)?;
                            let fresh: Vec<Vec<u8>> =
                                keys.into_iter().filter(|k| seen.first_time(k)).collect();
                            if !fresh.is_empty() {
                                let mut reader = Reader {
                                    node: &mut node,
                                    router: Some(&mut cluster.router),
                                };
                                f(&mut reader, fresh)?;
                            }
                        }
                    }
                    before = after;
                    if !migrating.is_empty() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                Err(format!(
                    "the Redis Cluster kept resharding for {} s after the scan; run again when it is done",
                    RESHARD_WAIT.as_secs()
                ))
            }
        }
    }
}

/// How long a scan of a cluster waits, after the last node, for slots that moved or are
/// migrating to settle (re-reading them as they move).
const RESHARD_WAIT: Duration = Duration::from_secs(120);

/// A SCAN may return each key more than once (while Redis rehashes): it is stopped
/// once it has returned this many times as many keys as the server holds...
pub(crate) const SCAN_KEYS_FACTOR: u64 = 4;
/// ... plus this many (keys added while we scan, a small database).
pub(crate) const SCAN_KEYS_SLACK: u64 = 100_000;
/// A SCAN call visits about COUNT buckets of a table at most about ten times as large
/// as the number of keys (Redis shrinks emptier tables): it is stopped after this many
/// times the keys, divided by COUNT, calls...
pub(crate) const SCAN_CALLS_FACTOR: u64 = 16;
/// ... plus this many.
pub(crate) const SCAN_CALLS_SLACK: u64 = 10_000;

/// The bound on one SCAN (of a node) or SSCAN (of a set), derived from the size the
/// server reports (DBSIZE or SCARD), so a server whose cursor never returns to 0, or
/// that returns keys forever, is stopped instead of read forever.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanLimit {
    /// The largest size the server reported.
    pub size: u64,
    batch: u64,
    /// Keys (or members) returned so far, repeats included.
    pub keys: u64,
    pub calls: u64,
}

impl ScanLimit {
    pub(crate) fn new(size: u64, batch: usize) -> ScanLimit {
        ScanLimit {
            size,
            batch: (batch as u64).max(1),
            keys: 0,
            calls: 0,
        }
    }

    pub(crate) fn max_keys(&self) -> u64 {
        self.size
            .saturating_mul(SCAN_KEYS_FACTOR)
            .saturating_add(SCAN_KEYS_SLACK)
    }

    pub(crate) fn max_calls(&self) -> u64 {
        (self.size.saturating_mul(SCAN_CALLS_FACTOR) / self.batch).saturating_add(SCAN_CALLS_SLACK)
    }

    /// Counts one reply; true once past the bound.
    pub(crate) fn count(&mut self, keys: usize) -> bool {
        self.calls += 1;
        self.keys = self.keys.saturating_add(keys as u64);
        self.exceeded()
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.keys > self.max_keys() || self.calls > self.max_calls()
    }

    /// The bound again with the size now reported (keys added while we scanned).
    pub(crate) fn grow(&mut self, size: u64) {
        self.size = self.size.max(size);
    }

    /// The error once the bound is passed; `what` is `SCAN` (DBSIZE) or `SSCAN of KEY`
    /// (SCARD).
    pub(crate) fn error(&self, what: &str, size_cmd: &str) -> String {
        format!(
            "Redis did not finish its {what}: {} calls returned {} keys while {size_cmd} says {}; stopped at the limit of {} keys and {} calls for that size. Is this a healthy Redis server?",
            self.calls,
            self.keys,
            self.size,
            self.max_keys(),
            self.max_calls()
        )
    }
}

fn size_of(conn: &mut dyn ConnectionLike, cmd: &redis::Cmd, name: &str) -> Result<u64, String> {
    cmd.query(conn)
        .map_err(|e| format!("Redis {name} failed: {}", brief(&e)))
}

fn scan_node(
    conn: &mut Connection,
    mut router: Option<&mut ClusterConnection>,
    batch: usize,
    seen: &mut Seen,
    f: &mut impl FnMut(&mut Reader<'_>, Vec<Vec<u8>>) -> Result<(), String>,
) -> Result<(), String> {
    let dbsize = redis::cmd("DBSIZE");
    let mut limit = ScanLimit::new(size_of(conn, &dbsize, "DBSIZE")?, batch);
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(batch)
            .query(conn)
            .map_err(|e| format!("Redis SCAN failed: {}", brief(&e)))?;
        if limit.count(keys.len()) {
            limit.grow(size_of(conn, &dbsize, "DBSIZE")?);
            if limit.exceeded() {
                return Err(limit.error("SCAN", "DBSIZE"));
            }
        }
        let fresh: Vec<Vec<u8>> = keys.into_iter().filter(|k| seen.first_time(k)).collect();
        if !fresh.is_empty() {
            let mut reader = Reader {
                node: conn,
                router: router.as_deref_mut(),
            };
            f(&mut reader, fresh)?;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// Slots a node of the cluster is migrating or importing right now (CLUSTER NODES).
fn migrating_slots(conn: &mut dyn ConnectionLike) -> Result<Vec<usize>, String> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(conn)
        .map_err(|e| format!("CLUSTER NODES failed: {}", brief(&e)))?;
    let mut slots = Vec::new();
    for token in text.split_whitespace() {
        if let Some(inner) = token.strip_prefix('[')
            && let Some(slot) = inner.split(['-', '>', '<']).next()
            && let Ok(n) = slot.parse::<usize>()
        {
            slots.push(n);
        }
    }
    Ok(slots)
}

fn keys_in_slot(conn: &mut Connection, slot: usize) -> Result<Vec<Vec<u8>>, String> {
    let count: u64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query(conn)
        .map_err(|e| format!("CLUSTER COUNTKEYSINSLOT failed: {}", brief(&e)))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(count)
        .query(conn)
        .map_err(|e| format!("CLUSTER GETKEYSINSLOT failed: {}", brief(&e)))
}

/// Streams the whole keyspace (every master of a cluster) and reads every
/// registry-shaped key into `index` with one pipeline per batch. Repository sets are
/// read with SSCAN, so a huge set never arrives in one reply. Returns how many cluster
/// slots had to be read again because they moved during the scan.
pub(crate) fn scan(
    conn: &mut CacheConn,
    index: &mut CacheIndex,
    batch: usize,
    progress: &indicatif::ProgressBar,
) -> Result<u64, String> {
    conn.for_each_batch(batch, |reader, keys| {
        progress.inc(keys.len() as u64);
        let sets = read_batch(reader, index, keys)?;
        for (key, repo) in sets {
            read_set(reader, index, &key, &repo, batch)?;
        }
        Ok(())
    })
}

/// Reads one SCAN batch; returns the repository sets found, to be read with SSCAN.
fn read_batch(
    reader: &mut Reader<'_>,
    index: &mut CacheIndex,
    keys: Vec<Vec<u8>>,
) -> Result<Vec<(Vec<u8>, String)>, String> {
    // One command per key (each key arrives once: `for_each_batch` removes repeats):
    // HMGET for the hash shapes (its reply says whether the key is a hash), TYPE for
    // sets; malformed keys need no read.
    let read = |key: &[u8], shape: &KeyShape| match shape {
        KeyShape::RepoSet(_) => redis::cmd("TYPE").arg(key).clone(),
        _ => redis::cmd("HMGET").arg(key).arg(&HASH_FIELDS[..]).clone(),
    };
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
            // Another shard's descriptor: not even read.
            KeyShape::Global(_) | KeyShape::RepoHash(..) if !index.owns(&shape) => continue,
            _ => {}
        }
        pipe.add_command(read(&key, &shape));
        pending.push((key, shape));
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut replies: Vec<Value> = pipe
        .query(reader.node)
        .map_err(|e| format!("reading cache keys from Redis failed: {}", brief(&e)))?;
    for (reply, (key, shape)) in replies.iter_mut().zip(&pending) {
        if redis_cluster::is_redirect(reply) {
            *reply = reader.reroute(&read(key, shape))?;
        }
    }
    // A hash reply with none of the fields, or an error (not a hash), needs its TYPE.
    let mut types: Vec<Option<String>> = vec![None; pending.len()];
    for (i, ((key, shape), reply)) in pending.iter().zip(&replies).enumerate() {
        let is_hash_shape = !matches!(shape, KeyShape::RepoSet(_));
        let all_nil =
            matches!(reply, Value::Array(items) if items.iter().all(|v| *v == Value::Nil));
        if is_hash_shape && (all_nil || matches!(reply, Value::ServerError(_))) {
            let cmd = redis::cmd("TYPE").arg(key).clone();
            let answer = match cmd.query::<Value>(reader.node) {
                Ok(v) => v,
                Err(e)
                    if e.code()
                        .is_some_and(|c| matches!(c, "MOVED" | "ASK" | "TRYAGAIN")) =>
                {
                    reader.reroute(&cmd)?
                }
                Err(e) => {
                    return Err(format!(
                        "reading cache keys from Redis failed: {}",
                        brief(&e)
                    ));
                }
            };
            types[i] = Some(type_name(Some(answer)));
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

/// SSCAN of one set, on its node (or through the cluster's routing if it moved).
pub(crate) fn sscan(
    reader: &mut Reader<'_>,
    key: &[u8],
    batch: usize,
    mut f: impl FnMut(Vec<Vec<u8>>),
) -> Result<(), String> {
    let mut cursor: u64 = 0;
    let mut rerouted = false;
    let scard = redis::cmd("SCARD").arg(key).clone();
    let mut limit = ScanLimit::new(set_size(reader, &scard, rerouted)?, batch);
    loop {
        let cmd = redis::cmd("SSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(batch)
            .clone();
        let result: Result<(u64, Vec<Vec<u8>>), redis::RedisError> = if rerouted {
            match reader.router.as_deref_mut() {
                Some(r) => cmd.query(r),
                None => cmd.query(reader.node),
            }
        } else {
            cmd.query(reader.node)
        };
        let (next, members) = match result {
            Ok(r) => r,
            Err(e)
                if !rerouted
                    && reader.router.is_some()
                    && e.code().is_some_and(|c| matches!(c, "MOVED" | "ASK")) =>
            {
                // The set moved: read it again, whole, where it is now.
                rerouted = true;
                cursor = 0;
                limit = ScanLimit::new(set_size(reader, &scard, rerouted)?, batch);
                continue;
            }
            Err(e) => return Err(format!("Redis SSCAN failed: {}", brief(&e))),
        };
        if limit.count(members.len()) {
            limit.grow(set_size(reader, &scard, rerouted)?);
            if limit.exceeded() {
                let what = format!("SSCAN of {}", crate::finding::escape(key));
                return Err(limit.error(&what, "SCARD"));
            }
        }
        f(members);
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// SCARD of a set, on its node (or through the cluster's routing when it moved there).
fn set_size(reader: &mut Reader<'_>, scard: &redis::Cmd, rerouted: bool) -> Result<u64, String> {
    let on_node = |reader: &mut Reader<'_>| size_of(reader.node, scard, "SCARD");
    match reader.router.as_deref_mut() {
        Some(router) if rerouted => size_of(router, scard, "SCARD"),
        Some(_) => match scard.query::<u64>(reader.node) {
            Ok(n) => Ok(n),
            Err(e) if e.code().is_some_and(|c| matches!(c, "MOVED" | "ASK")) => {
                reader.reroute(scard).and_then(|v| {
                    redis::from_redis_value::<u64>(v)
                        .map_err(|e| format!("Redis SCARD failed: {e}"))
                })
            }
            Err(e) => Err(format!("Redis SCARD failed: {}", brief(&e))),
        },
        None => on_node(reader),
    }
}

fn read_set(
    reader: &mut Reader<'_>,
    index: &mut CacheIndex,
    key: &[u8],
    repo: &str,
    batch: usize,
) -> Result<(), String> {
    sscan(reader, key, batch, |members| {
        for m in members {
            index.add_member(key, repo, &m);
        }
    })
}

/// Commands sent per pipeline by `read_digests`.
const TARGETED_BATCH: usize = 1000;

/// Sends `cmds` and returns one reply each, `None` for an error reply (a key of
/// another type, a command the server refuses): one pipeline per batch on a single
/// server; on a cluster each command is routed by its key's slot.
fn run_commands(conn: &mut CacheConn, cmds: &[redis::Cmd]) -> Result<Vec<Option<Value>>, String> {
    let mut replies = Vec::with_capacity(cmds.len());
    for chunk in cmds.chunks(TARGETED_BATCH) {
        match conn {
            CacheConn::Single(c) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for cmd in chunk {
                    pipe.add_command(cmd.clone());
                }
                let got: Vec<Value> = pipe
                    .query(c)
                    .map_err(|e| format!("reading cache keys from Redis failed: {}", brief(&e)))?;
                replies.extend(
                    got.into_iter()
                        .map(|v| (!matches!(v, Value::ServerError(_))).then_some(v)),
                );
            }
            CacheConn::Cluster(cluster) => {
                for cmd in chunk {
                    replies.push(match cmd.query::<Value>(&mut cluster.router) {
                        Ok(v) => Some(v),
                        Err(e) if e.code().is_some() && !e.is_io_error() => None,
                        Err(e) => {
                            return Err(format!(
                                "reading cache keys from Redis Cluster failed: {}",
                                brief(&e)
                            ));
                        }
                    });
                }
            }
        }
    }
    Ok(replies)
}

/// Members asked about per SMISMEMBER by `read_digests`.
const MEMBERS_PER_CHECK: usize = 500;

/// What `read_digests` expects of the keys it reads, to send the fewest commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Mostly there: each hash key's HMGET first, its TYPE only when the reply cannot
    /// tell (no field, or an error), as `scan` reads.
    Present,
    /// Mostly gone (just purged): each key's TYPE first, HMGET only of the hashes.
    Gone,
}

/// Reads only the keys of `wanted` digests into `index`: for each digest its global
/// descriptor `blobs::D`, and for each repository given with it the membership of D in
/// `repository::R::blobs` and `repository::R::blobs::D`. A key of another type is
/// recorded as such and never read as a hash (see `Expect` for the order of HMGET and
/// TYPE); a set's TYPE comes first, and only a set is asked about its members, many per
/// SMISMEMBER (per member with SISMEMBER where the server refuses that, before Redis
/// 6.2). Two pipelined rounds (three on such a server), one to two commands per key:
/// what `gc` reads after its GC instead of scanning the whole cache again.
pub(crate) fn read_digests(
    conn: &mut CacheConn,
    index: &mut CacheIndex,
    wanted: &[(Digest, Vec<String>)],
    expect: Expect,
) -> Result<(), String> {
    // Round 1: the fields (or the type) of every hash key, and the type of every set.
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut sets: Vec<&str> = Vec::new();
    for (d, repos) in wanted {
        keys.push(cache_index::global_key(d).into_bytes());
        for r in repos {
            keys.push(cache_index::repo_hash_key(r, d).into_bytes());
            sets.push(r);
        }
    }
    sets.sort_unstable();
    sets.dedup();
    let type_of = |key: &[u8]| redis::cmd("TYPE").arg(key).clone();
    let hmget = |key: &[u8]| redis::cmd("HMGET").arg(key).arg(&HASH_FIELDS[..]).clone();
    let mut cmds: Vec<redis::Cmd> = keys
        .iter()
        .map(|k| match expect {
            Expect::Present => hmget(k),
            Expect::Gone => type_of(k),
        })
        .collect();
    cmds.extend(
        sets.iter()
            .map(|r| type_of(cache_index::repo_set_key(r).as_bytes())),
    );
    let mut first = run_commands(conn, &cmds)?;
    let set_types: Vec<String> = first
        .split_off(keys.len())
        .into_iter()
        .map(type_name)
        .collect();
    let is_set: HashSet<&str> = sets
        .iter()
        .zip(&set_types)
        .filter(|(_, t)| t.as_str() == "set")
        .map(|(r, _)| *r)
        .collect();
    let (mut fields, mut types): (Vec<Option<Value>>, Vec<Option<String>>) = match expect {
        Expect::Present => (first, vec![None; keys.len()]),
        Expect::Gone => (
            vec![None; keys.len()],
            first.into_iter().map(|t| Some(type_name(t))).collect(),
        ),
    };

    // Round 2: what round 1 left open of each key, and the memberships.
    let open: Vec<usize> = (0..keys.len())
        .filter(|&i| match (expect, &fields[i], types[i].as_deref()) {
            (Expect::Present, Some(Value::Array(items)), _) => {
                items.iter().all(|v| *v == Value::Nil)
            }
            (Expect::Present, _, _) => true,
            (Expect::Gone, _, t) => t == Some("hash"),
        })
        .collect();
    let mut by_set: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (d, repos) in wanted {
        for r in repos {
            if is_set.contains(r.as_str()) {
                by_set.entry(r).or_default().push(d.to_string());
            }
        }
    }
    let mut asks: Vec<(&str, &[String])> = Vec::new();
    for (r, members) in &by_set {
        asks.extend(members.chunks(MEMBERS_PER_CHECK).map(|c| (*r, c)));
    }
    let mut cmds: Vec<redis::Cmd> = open
        .iter()
        .map(|&i| match expect {
            Expect::Present => type_of(&keys[i]),
            Expect::Gone => hmget(&keys[i]),
        })
        .collect();
    cmds.extend(asks.iter().map(|(r, members)| {
        redis::cmd("SMISMEMBER")
            .arg(cache_index::repo_set_key(r))
            .arg(*members)
            .clone()
    }));
    let mut answers = run_commands(conn, &cmds)?;
    let checks = answers.split_off(open.len());
    for (&i, answer) in open.iter().zip(answers) {
        match expect {
            Expect::Present => types[i] = Some(type_name(answer)),
            Expect::Gone => fields[i] = answer,
        }
    }
    for ((key, reply), ty) in keys.iter().zip(fields).zip(types) {
        let ty = ty.unwrap_or_else(|| "hash".to_string());
        let values = if ty == "hash" {
            bulk_list(reply)
        } else {
            Vec::new()
        };
        let field = |i: usize| values.get(i).and_then(|v| v.as_deref());
        let fields = HashFields {
            digest: field(0),
            size: field(1),
            length: field(2),
            mediatype: field(3),
        };
        index.ingest(key, classify(key), &ty, &fields);
    }

    // Round 3, only where SMISMEMBER was refused: one SISMEMBER per member.
    let mut members: Vec<(&str, &String, Option<Value>)> = Vec::new();
    let mut singles: Vec<(&str, &String)> = Vec::new();
    for ((r, chunk), reply) in asks.iter().zip(checks) {
        match reply {
            Some(Value::Array(flags)) if flags.len() == chunk.len() => {
                members.extend(chunk.iter().zip(flags).map(|(m, f)| (*r, m, Some(f))))
            }
            _ => singles.extend(chunk.iter().map(|m| (*r, m))),
        }
    }
    if !singles.is_empty() {
        let cmds: Vec<redis::Cmd> = singles
            .iter()
            .map(|(r, m)| {
                redis::cmd("SISMEMBER")
                    .arg(cache_index::repo_set_key(r))
                    .arg(m.as_str())
                    .clone()
            })
            .collect();
        let replies = run_commands(conn, &cmds)?;
        members.extend(
            singles
                .into_iter()
                .zip(replies)
                .map(|((r, m), v)| (r, m, v)),
        );
    }
    for (r, m, reply) in members {
        if matches!(reply, Some(Value::Int(1) | Value::Boolean(true))) {
            let set = cache_index::repo_set_key(r);
            index.add_member(set.as_bytes(), r, m.as_bytes());
        }
    }
    Ok(())
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

    #[test]
    fn a_scan_is_bounded_by_the_size_the_server_reports() {
        let mut limit = ScanLimit::new(1000, 100);
        assert_eq!(limit.max_keys(), 4000 + SCAN_KEYS_SLACK);
        assert_eq!(limit.max_calls(), 160 + SCAN_CALLS_SLACK);
        assert!(!limit.count(100));
        let mut calls = 1;
        while !limit.count(0) {
            calls += 1;
        }
        assert_eq!(calls, limit.max_calls());
        limit.grow(1_000_000);
        assert!(
            !limit.exceeded(),
            "keys added while scanning raise the bound"
        );
        let e = limit.error("SCAN", "DBSIZE");
        assert!(e.contains("DBSIZE says 1000000"), "{e}");
        // Overflow-proof for any size a server claims.
        let mut huge = ScanLimit::new(u64::MAX, 0);
        assert!(!huge.count(usize::MAX));
    }
}
