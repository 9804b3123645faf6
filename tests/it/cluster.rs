//! Redis Cluster: three real `redis-server --cluster-enabled yes` joined with
//! `redis-cli --cluster create`, holding the same registry keys as a single Redis;
//! check, export-cache, purge and restore give the same results on both, and a
//! resharding during the scan loses no key.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use registry_audit_synth::{Spec, generate};

struct ClusterNodes {
    ports: Vec<u16>,
    _procs: Vec<Proc>,
    _dir: Scratch,
}

impl ClusterNodes {
    fn start() -> ClusterNodes {
        let dir = Scratch::new("cluster");
        let mut ports = Vec::new();
        let mut procs = Vec::new();
        for i in 0..3 {
            let sub = dir.path(&format!("n{i}"));
            fs::create_dir_all(&sub).expect("mkdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("port");
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                ])
                .args([
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&sub)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            procs.push(Proc(child));
            let url = format!("redis://127.0.0.1:{port}/");
            wait_until("cluster node", Duration::from_secs(20), || {
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            });
            ports.push(port);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = ClusterNodes {
            ports,
            _procs: procs,
            _dir: dir,
        };
        wait_until("cluster_state:ok", Duration::from_secs(30), || {
            c.ports.iter().all(|p| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c.node(*p))
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
        c
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.ports[0])
    }

    fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection())
            .expect("node")
    }

    fn router(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.url()])
            .and_then(|c| c.get_connection())
            .expect("cluster connection")
    }

    /// Every key with its content, over all masters (as `Redis::dump`).
    fn dump(&self) -> Vec<(Vec<u8>, String)> {
        let mut out = Vec::new();
        for p in &self.ports {
            let mut c = self.node(*p);
            let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut c).expect("keys");
            for k in keys {
                out.push((k.clone(), content(&mut c, &k)));
            }
        }
        out.sort();
        out
    }

    fn id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port))
            .expect("myid")
    }
}

fn content(c: &mut redis::Connection, k: &[u8]) -> String {
    let ty: String = redis::cmd("TYPE").arg(k).query(c).expect("type");
    match ty.as_str() {
        "hash" => {
            let mut v: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL").arg(k).query(c).expect("h");
            v.sort();
            format!("hash {v:?}")
        }
        "set" => {
            let mut v: Vec<Vec<u8>> = redis::cmd("SMEMBERS").arg(k).query(c).expect("s");
            v.sort();
            format!("set {v:?}")
        }
        other => {
            let dumped: Vec<u8> = redis::cmd("DUMP").arg(k).query(c).expect("dump");
            format!("{other} {dumped:?}")
        }
    }
}

/// Copies every key of a single Redis into the cluster (DUMP and RESTORE).
fn copy_into(single: &Redis, cluster: &ClusterNodes) {
    let mut from = single.conn();
    let mut to = cluster.router();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut from).expect("keys");
    for k in keys {
        let payload: Vec<u8> = redis::cmd("DUMP").arg(&k).query(&mut from).expect("dump");
        redis::cmd("RESTORE")
            .arg(&k)
            .arg(0)
            .arg(payload)
            .arg("REPLACE")
            .query::<()>(&mut to)
            .expect("restore");
    }
}

fn registry(tag: &str, blobs: u64) -> (Scratch, Redis, ClusterNodes) {
    let dir = Scratch::new(tag);
    let single = Redis::start();
    let mut spec = Spec::mixed(blobs, 9);
    spec.phantom_fraction = 0.1;
    spec.sizes = vec![300, 900, 2000];
    generate(&dir.path("root"), Some(&mut single.conn()), &spec).expect("generate");
    let mut c = single.conn();
    redis::pipe()
        .cmd("SET")
        .arg("session:7")
        .arg("x")
        .cmd("SADD")
        .arg("repository::team1/app1::blobs")
        .arg("sha256:bad")
        .query::<()>(&mut c)
        .expect("extra keys");
    let cluster = ClusterNodes::start();
    copy_into(&single, &cluster);
    (dir, single, cluster)
}

fn comparable(out: &str) -> serde_json::Value {
    let mut v = json(out);
    let o = v.as_object_mut().expect("object");
    o.remove("started_at");
    o.remove("duration_ms");
    o.remove("source");
    v
}

#[test]
fn cluster_gives_the_same_results_as_a_single_redis() {
    let (dir, single, cluster) = registry("clustersame", 400);
    let root = dir.path("root").display().to_string();
    let (su, cu) = (single.url(), cluster.url());

    let (c1, o1, e1) = run_tool(&["check", "--root", &root, "--redis", &su, "--format", "json"]);
    let (c2, o2, e2) = run_tool(&["check", "--root", &root, "--redis", &cu, "--format", "json"]);
    assert_eq!(c1, 1, "{e1}");
    assert_eq!(c2, c1, "{e2}");
    assert_eq!(comparable(&o2), comparable(&o1));

    // export-cache: the same lines (in another order).
    let lines = |url: &str, name: &str| -> BTreeSet<String> {
        let out = dir.path(name).display().to_string();
        let (code, _, err) = run_tool(&["export-cache", "--redis", url, "--output", &out]);
        assert_eq!(code, 0, "{err}");
        let text = fs::read_to_string(&out).expect("dump");
        let mut set = BTreeSet::new();
        for l in text.lines().skip(1) {
            // Members of one set may be split differently: one line per member.
            let v: serde_json::Value = serde_json::from_str(l).expect("line");
            match v["members"].as_array() {
                Some(ms) => ms.iter().for_each(|m| {
                    set.insert(format!("{} {m}", v["key"]));
                }),
                None => {
                    set.insert(l.to_string());
                }
            }
        }
        set
    };
    assert_eq!(lines(&cu, "cluster.jsonl"), lines(&su, "single.jsonl"));

    // purge and restore: the same keys removed, and everything back.
    let before_single = single.dump();
    let before_cluster = cluster.dump();
    assert_eq!(before_cluster, before_single);
    let (js, jc) = (
        dir.path("js.jsonl").display().to_string(),
        dir.path("jc.jsonl").display().to_string(),
    );
    let (c1, o1, e1) = run_tool(&[
        "purge",
        "--root",
        &root,
        "--redis",
        &su,
        "--yes",
        "--journal",
        &js,
        "--format",
        "json",
    ]);
    let (c2, o2, e2) = run_tool(&[
        "purge",
        "--root",
        &root,
        "--redis",
        &cu,
        "--yes",
        "--journal",
        &jc,
        "--format",
        "json",
    ]);
    assert_eq!((c1, c2), (0, 0), "{e1}\n{e2}");
    assert_eq!(
        json(&o2)["result"]["entries_removed_by_kind"],
        json(&o1)["result"]["entries_removed_by_kind"]
    );
    assert_eq!(cluster.dump(), single.dump());
    assert_ne!(cluster.dump(), before_cluster);
    let (c1, _, e1) = run_tool(&["restore", "--journal", &js, "--redis", &su]);
    let (c2, _, e2) = run_tool(&["restore", "--journal", &jc, "--redis", &cu]);
    assert_eq!((c1, c2), (0, 0), "{e1}\n{e2}");
    assert_eq!(single.dump(), before_single);
    assert_eq!(cluster.dump(), before_cluster);
}

#[test]
fn a_resharding_during_the_scan_loses_no_key() {
    let (dir, single, cluster) = registry("reshard", 3000);
    let root = dir.path("root").display().to_string();
    let (su, cu) = (single.url(), cluster.url());
    let (_, expected, _) = run_tool(&[
        "check",
        "--root",
        &root,
        "--redis",
        &su,
        "--format",
        "json",
        "--skip-storage",
        "--quick",
    ]);
    // Move slots back and forth while a slow scan (10 keys a call) runs, until one
    // resharding is seen overlapping the scan (the report says so); every run must
    // find exactly what the single Redis holds.
    let mut overlapped = false;
    for attempt in 0..4 {
        let (a, b) = if attempt % 2 == 0 { (0, 1) } else { (1, 0) };
        let (from, to) = (cluster.id(cluster.ports[a]), cluster.id(cluster.ports[b]));
        let node = format!("127.0.0.1:{}", cluster.ports[a]);
        let mut reshard = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &node,
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
            ])
            .args([
                "--cluster-slots",
                "2000",
                "--cluster-yes",
                "--cluster-pipeline",
                "10",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("reshard");
        let (code, got, err) = run_tool(&[
            "check",
            "--root",
            &root,
            "--redis",
            &cu,
            "--format",
            "json",
            "--skip-storage",
            "--quick",
            "--scan-count",
            "10",
        ]);
        let status = reshard.wait().expect("reshard wait");
        assert!(status.success(), "the reshard failed");
        assert_eq!(code, 1, "{err}");
        assert_eq!(
            comparable_without_notes(&got),
            comparable_without_notes(&expected)
        );
        let report = json(&got);
        if report["notes"].as_array().expect("notes").iter().any(|n| {
            n.as_str()
                .unwrap_or("")
                .contains("resharded during the scan")
        }) {
            overlapped = true;
            break;
        }
        // Let the cluster settle before moving the slots back.
        wait_until("cluster_state:ok", Duration::from_secs(30), || {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut cluster.node(cluster.ports[0]))
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        });
    }
    assert!(overlapped, "no resharding overlapped a scan in four tries");
}

fn comparable_without_notes(out: &str) -> serde_json::Value {
    let mut v = comparable(out);
    v.as_object_mut().expect("object").remove("notes");
    v
}

#[test]
fn purge_asks_every_master_for_the_users_permissions() {
    // Each node has its own ACL: the user may do everything on two masters, but not
    // SREM on the third. Purge must find out before it removes anything.
    let (dir, _single, cluster) = registry("clusteracl", 60);
    let root = dir.path("root").display().to_string();
    for (i, p) in cluster.ports.iter().enumerate() {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg("purger")
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all");
        if i == 2 {
            cmd.arg("-srem");
        }
        cmd.query::<()>(&mut cluster.node(*p)).expect("acl setuser");
    }
    let url = format!("redis://purger:pw@127.0.0.1:{}/", cluster.ports[0]);
    let before = cluster.dump();
    let journal = dir.path("j.jsonl");
    let (code, out, err) = run_tool(&[
        "purge",
        "--root",
        &root,
        "--redis",
        &url,
        "--yes",
        "--journal",
        &journal.display().to_string(),
    ]);
    assert_eq!(code, 2, "{err}\n{out}");
    assert!(
        err.contains("may not run SREM")
            && err.contains("'purger'")
            && err.contains(&format!("on node 127.0.0.1:{}", cluster.ports[2]))
            && err.contains("nothing was removed"),
        "{err}"
    );
    assert!(!journal.exists());
    assert_eq!(cluster.dump(), before);

    // Granted on every node, the same purge runs.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("purger")
        .arg("+srem")
        .query::<()>(&mut cluster.node(cluster.ports[2]))
        .expect("acl setuser");
    let (code, out, err) = run_tool(&[
        "purge",
        "--root",
        &root,
        "--redis",
        &url,
        "--yes",
        "--journal",
        &journal.display().to_string(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out)["result"]["permissions"]["method"],
        "acl-dryrun",
        "{out}"
    );
    assert_ne!(cluster.dump(), before);
}
