//! Redis Cluster: finding every master from any node (CLUSTER SLOTS), a direct
//! connection to each for SCAN and pipelined reads, a cluster connection that follows
//! MOVED/ASK for the keys that move while we read and for writes, and the slot map
//! compared before and after a scan so that a resharding during the scan loses no key:
//! the keys of every slot that changed owner are read again from the new owner. It
//! reads topology and opens connections; what is read or written is the callers'.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Connection, ConnectionAddr, ConnectionInfo, Value};

use crate::cache::redis::{RedisTarget, brief};

/// Slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// Which master serves each slot, as `host:port` (None: no owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMap {
    owners: Vec<Option<(String, u16)>>,
}

impl SlotMap {
    pub(crate) fn read(conn: &mut dyn redis::ConnectionLike) -> Result<SlotMap, String> {
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(conn)
            .map_err(|e| format!("CLUSTER SLOTS failed: {}", brief(&e)))?;
        let mut owners = vec![None; SLOTS];
        let Value::Array(ranges) = reply else {
            return Err("CLUSTER SLOTS gave an unexpected reply".into());
        };
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            let (start, end) = (*start as usize, (*end as usize).min(SLOTS - 1));
            for owner in owners.iter_mut().take(end + 1).skip(start) {
                *owner = Some((host.clone(), *port as u16));
            }
        }
        Ok(SlotMap { owners })
    }

    /// Every master, in a stable order.
    pub(crate) fn masters(&self) -> Vec<(String, u16)> {
        let mut m: Vec<(String, u16)> = self.owners.iter().flatten().cloned().collect();
        m.sort();
        m.dedup();
        m
    }

    /// Slots whose owner differs in `other`, with their owner there.
    pub(crate) fn moved_to(&self, other: &SlotMap) -> BTreeMap<(String, u16), Vec<usize>> {
        let mut out: BTreeMap<(String, u16), Vec<usize>> = BTreeMap::new();
        for (slot, (a, b)) in self.owners.iter().zip(&other.owners).enumerate() {
            if a != b
                && let Some(owner) = b
            {
                out.entry(owner.clone()).or_default().push(slot);
            }
        }
        out
    }
}

/// A connected cluster: a direct connection per master and a routing connection.
pub(crate) struct Cluster {
    target: RedisTarget,
    pub router: ClusterConnection,
}

impl Cluster {
    pub(crate) fn connect(target: &RedisTarget) -> Result<Cluster, String> {
        let mut builder = ClusterClient::builder(vec![target.info.clone()]);
        if let Some(certs) = &target.tls {
            builder = builder.certs(certs.clone());
        }
        let client = builder.build().map_err(|e| {
            format!(
                "cannot use Redis Cluster at {}: {}",
                target.display(),
                brief(&e)
            )
        })?;
        let router = client.get_connection().map_err(|e| {
            format!(
                "cannot reach Redis Cluster at {}: {}",
                target.display(),
                brief(&e)
            )
        })?;
        Ok(Cluster {
            target: target.clone(),
            router,
        })
    }

    /// The current slot map, asked of the cluster.
    pub(crate) fn slot_map(&mut self) -> Result<SlotMap, String> {
        SlotMap::read(&mut self.router)
    }

    /// A direct connection to one master, with the seed's credentials and TLS.
    pub(crate) fn node(&self, host: &str, port: u16) -> Result<Connection, String> {
        let addr = match self.target.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let info: ConnectionInfo = self.target.info.clone().set_addr(addr);
        let node = RedisTarget {
            info,
            tls: self.target.tls.clone(),
            expect_cluster: false,
        };
        let conn = node.connect()?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| format!("Redis node {host}:{port}: {}", brief(&e)))?;
        Ok(conn)
    }
}

/// Whether a connection's server runs in cluster mode.
pub(crate) fn is_cluster(conn: &mut Connection) -> bool {
    let info: Result<String, _> = redis::cmd("INFO").arg("cluster").query(conn);
    info.is_ok_and(|text| text.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// True for a reply that redirects to another node (a slot being migrated).
pub(crate) fn is_redirect(v: &Value) -> bool {
    match v {
        Value::ServerError(e) => matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(owners: &[(usize, usize, u16)]) -> SlotMap {
        let mut o = vec![None; SLOTS];
        for (a, b, port) in owners {
            for slot in o.iter_mut().take(*b + 1).skip(*a) {
                *slot = Some(("127.0.0.1".to_string(), *port));
            }
        }
        SlotMap { owners: o }
    }

    #[test]
    fn moved_slots_are_found_with_their_new_owner() {
        let before = map(&[(0, 8000, 1), (8001, 16383, 2)]);
        let after = map(&[(0, 7990, 1), (7991, 16383, 2)]);
        let moved = after.moved_to(&after);
        assert!(moved.is_empty());
        let moved = before.moved_to(&after);
        assert_eq!(moved.len(), 1);
        assert_eq!(
            moved[&("127.0.0.1".to_string(), 2)],
            (7991..=8000).collect::<Vec<_>>()
        );
        assert_eq!(before.masters().len(), 2);
    }
}
