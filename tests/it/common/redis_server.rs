//! Test harness: a real `redis-server` on a free port, and the registry's cache entries written as the registry writes them.

use super::*;

pub(crate) struct Redis {
    pub port: u16,
    pub password: Option<String>,
    _proc: Proc,
    _dir: Scratch,
}

impl Redis {
    pub(crate) fn start() -> Redis {
        Redis::start_with(None)
    }

    pub(crate) fn start_with(password: Option<&str>) -> Redis {
        need("redis-server");
        for _ in 0..5 {
            let dir = Scratch::new("redis");
            let port = free_port();
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if let Some(p) = password {
                cmd.args(["--requirepass", p]);
            }
            let mut child = cmd.spawn().expect("start redis-server");
            let url = Redis::url_for(port, password);
            let start = Instant::now();
            let mut pause = Duration::from_millis(5);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                if ping(&url) {
                    return Redis {
                        port,
                        password: password.map(str::to_string),
                        _proc: Proc(child),
                        _dir: dir,
                    };
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "redis-server did not start"
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
        panic!("could not start redis-server");
    }

    fn url_for(port: u16, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{port}/0"),
            None => format!("redis://127.0.0.1:{port}/0"),
        }
    }

    pub(crate) fn url(&self) -> String {
        Redis::url_for(self.port, self.password.as_deref())
    }

    pub(crate) fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    /// Every key with its type and content, sorted: a byte-for-byte picture of the database.
    pub(crate) fn dump(&self) -> Vec<(Vec<u8>, String)> {
        let mut c = self.conn();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut c).expect("keys");
        let mut out = Vec::new();
        for k in keys {
            let dumped: Vec<u8> = redis::cmd("DUMP").arg(&k).query(&mut c).expect("dump");
            // DUMP of a set or hash depends on insertion order; compare contents instead.
            let ty: String = redis::cmd("TYPE").arg(&k).query(&mut c).expect("type");
            let content = match ty.as_str() {
                "hash" => {
                    let mut v: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                        .arg(&k)
                        .query(&mut c)
                        .expect("hgetall");
                    v.sort();
                    format!("hash {v:?}")
                }
                "set" => {
                    let mut v: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                        .arg(&k)
                        .query(&mut c)
                        .expect("smembers");
                    v.sort();
                    format!("set {v:?}")
                }
                _ => format!("{ty} {dumped:?}"),
            };
            out.push((k, content));
        }
        out.sort();
        out
    }
}

fn ping(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

/// Writes the registry's three entries for `digest` in `repo`, as the registry does.
pub(crate) fn cache(c: &mut redis::Connection, repo: &str, digest: &str, size: usize) {
    redis::pipe()
        .cmd("HSET")
        .arg(format!("blobs::{digest}"))
        .arg("digest")
        .arg(digest)
        .arg("size")
        .arg(size)
        .arg("mediatype")
        .arg("application/octet-stream")
        .cmd("SADD")
        .arg(format!("repository::{repo}::blobs"))
        .arg(digest)
        .cmd("HSET")
        .arg(format!("repository::{repo}::blobs::{digest}"))
        .arg("mediatype")
        .arg("application/octet-stream")
        .query::<()>(c)
        .expect("cache");
}
