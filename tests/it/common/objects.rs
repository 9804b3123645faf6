//! Test harness: object stores: `moto_server` (S3, and GCS through a proxy), Azurite, a faulty proxy, and copying a storage tree into a store.

use super::*;

/// The key prefix (the s3 driver's rootdirectory) the tests use in buckets.
pub(crate) const S3_PREFIX: &str = "reg";

/// A local S3-compatible server: moto_server from PyPI's moto[server] (scripts/test
/// installs it in a virtual environment and names it in MOTO_SERVER).
pub(crate) struct Moto {
    pub port: u16,
    _proc: Proc,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        Moto::start_with_env(&[])
    }

    /// With authentication on: only the first request goes unchecked (the bucket's
    /// creation); later ones need credentials moto knows.
    pub(crate) fn start_authenticating() -> Moto {
        Moto::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Moto {
        let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".to_string());
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {program} ({e}): run scripts/test, which installs moto[server]"
                    )
                });
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                // Ready when it accepts connections (an HTTP request would count as one
                // of the unauthenticated actions of `start_authenticating`).
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        port,
                        _proc: Proc(child),
                    };
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "moto_server did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start moto_server");
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    pub(crate) fn create_bucket(&self, bucket: &str) {
        let r = Moto::agent()
            .put(&format!("{}/{bucket}", self.endpoint()))
            .send_empty()
            .expect("create bucket");
        assert_eq!(r.status().as_u16(), 200, "create bucket");
    }

    pub(crate) fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        self.put_with_acl(bucket, key, body, "private");
    }

    /// With a canned ACL: `public-read` objects can be read without credentials.
    pub(crate) fn put_with_acl(&self, bucket: &str, key: &str, body: &[u8], acl: &str) {
        let r = Moto::agent()
            .put(&format!("{}/{bucket}/{key}", self.endpoint()))
            .header("x-amz-acl", acl)
            .send(body)
            .expect("put");
        assert_eq!(r.status().as_u16(), 200, "put {key}");
    }

    /// A signed PUT (object_store, test credentials): it may overwrite what the
    /// registry wrote.
    pub(crate) fn put_signed(&self, bucket: &str, key: &str, body: &[u8]) {
        use object_store::ObjectStoreExt;
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .expect("s3 client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(store.put(&object_store::path::Path::from(key), body.to_vec().into()))
            .expect("signed put");
    }

    pub(crate) fn exists(&self, bucket: &str, key: &str) -> bool {
        // Unsigned, moto answers 403 for an object that exists (private) and 404 for
        // one that does not.
        Moto::agent()
            .get(&format!("{}/{bucket}/{key}", self.endpoint()))
            .call()
            .map(|r| matches!(r.status().as_u16(), 200 | 403))
            .unwrap_or(false)
    }

    /// Uploads a storage tree (the registry's root directory) under `prefix`.
    pub(crate) fn upload_tree(&self, bucket: &str, root: &Path, prefix: &str) {
        self.upload_tree_with_acl(bucket, root, prefix, "private");
    }

    pub(crate) fn upload_tree_with_acl(&self, bucket: &str, root: &Path, prefix: &str, acl: &str) {
        for (key, body) in tree_objects(root, prefix) {
            self.put_with_acl(bucket, &key, &body, acl);
        }
    }
}

/// The object key of a blob in a registry in object storage under S3_PREFIX.
pub(crate) fn s3_blob_key(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').expect("digest");
    format!(
        "{S3_PREFIX}/docker/registry/v2/blobs/{alg}/{}/{hex}/data",
        &hex[..2]
    )
}

/// A proxy in front of a local S3 that misbehaves like a busy object store: the first
/// `throttle` requests get 503 SlowDown, the next one has its connection dropped
/// without an answer; every later request is passed through (one per connection).
pub(crate) struct FaultyProxy {
    pub port: u16,
    pub faults: std::sync::Arc<AtomicUsize>,
}

impl FaultyProxy {
    pub(crate) fn start(upstream_port: u16, throttle: usize) -> FaultyProxy {
        FaultyProxy::spawn(upstream_port, throttle, true, false)
    }

    /// No fault: every request passed on with the percent-escapes of its path decoded.
    /// GCS's XML API takes an object name as one escaped segment (`a%2Fb`), as
    /// object_store's GCS client sends it; moto, standing in for it, wants `a/b`.
    pub(crate) fn decoding(upstream_port: u16) -> FaultyProxy {
        FaultyProxy::spawn(upstream_port, 0, false, true)
    }

    fn spawn(upstream_port: u16, throttle: usize, drop_one: bool, decode: bool) -> FaultyProxy {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let faults = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = faults.clone();
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().flatten().enumerate() {
                let nth = n + 1;
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut client = client;
                    // The request head (GET, HEAD and LIST carry no body).
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    if nth <= throttle {
                        seen.fetch_add(1, Ordering::Relaxed);
                        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                        let _ = write!(
                            client,
                            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                    if drop_one && nth == throttle + 1 {
                        seen.fetch_add(1, Ordering::Relaxed);
                        return; // dropped: closed without an answer
                    }
                    let mut text = String::from_utf8_lossy(&head).into_owned();
                    if decode {
                        text = decode_request_path(&text);
                    }
                    let text = text.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
                    let text = text.replacen("Connection: keep-alive\r\n", "", 1);
                    let Ok(mut upstream) =
                        std::net::TcpStream::connect(("127.0.0.1", upstream_port))
                    else {
                        return;
                    };
                    if upstream.write_all(text.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 65536];
                    while let Ok(k) = upstream.read(&mut buf) {
                        if k == 0 || client.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        FaultyProxy { port, faults }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The request head with the path of its request line (not the query) percent-decoded.
fn decode_request_path(head: &str) -> String {
    let (line, rest) = head.split_once("\r\n").unwrap_or((head, ""));
    let mut words: Vec<String> = line.split(' ').map(str::to_string).collect();
    if let Some(target) = words.get_mut(1) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.clone(), None),
        };
        let mut out = Vec::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match (b[i], b.get(i + 1..i + 3)) {
                (b'%', Some(hex))
                    if std::str::from_utf8(hex)
                        .is_ok_and(|h| u8::from_str_radix(h, 16).is_ok()) =>
                {
                    out.push(
                        u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("0"), 16)
                            .unwrap_or(0),
                    );
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        *target = String::from_utf8_lossy(&out).into_owned();
        if let Some(q) = query {
            target.push('?');
            target.push_str(&q);
        }
    }
    format!("{}\r\n{rest}", words.join(" "))
}

/// Azurite, Microsoft's Azure Storage emulator (npm's `azurite`; scripts/test installs it
/// under target/ and names its `azurite-blob` in AZURITE), blob service only, in memory.
pub(crate) struct Azurite {
    pub port: u16,
    _proc: Proc,
}

/// The emulator's well-known account and key.
pub(crate) const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub(crate) const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    pub(crate) fn start() -> Azurite {
        use std::io::BufRead;
        let program = std::env::var("AZURITE").unwrap_or_else(|_| "azurite-blob".to_string());
        let mut child = Command::new(&program)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--silent",
                "--skipApiVersionCheck",
                "--disableTelemetry",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {program} ({e}): run scripts/test, which installs azurite")
            });
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc(child);
        // It picks its own port and says which: "... successfully listens on http://127.0.0.1:N".
        let mut lines = std::io::BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .and_then(Result::ok)
                .expect("azurite exited before listening");
            if let Some(at) = line.find("listens on http://127.0.0.1:") {
                let port = line[at + "listens on http://127.0.0.1:".len()..].trim();
                break port.parse().expect("azurite's port");
            }
        };
        // Keep draining what it prints so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Azurite { port, _proc: proc }
    }

    /// The blob service of the emulator's account, path-style.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// Creates a container: a request signed with the account's shared key.
    pub(crate) fn create_container(&self, name: &str) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &b64.decode(AZURITE_KEY).expect("key"),
        );
        let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let r = Moto::agent()
            .put(&format!("{}/{name}?restype=container", self.endpoint()))
            .header("x-ms-date", &date)
            .header("x-ms-version", version)
            .header(
                "Authorization",
                &format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
            )
            .send_empty()
            .expect("create container");
        assert_eq!(r.status().as_u16(), 201, "create container {name}");
    }

    fn store(&self, container: &str) -> object_store::azure::MicrosoftAzure {
        object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_container_name(container)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("azure client")
    }

    pub(crate) fn put(&self, container: &str, key: &str, body: &[u8]) {
        put_objects(&self.store(container), &[(key.to_string(), body.to_vec())]);
    }

    /// Uploads a storage tree (the registry's root directory) under `prefix`.
    pub(crate) fn upload_tree(&self, container: &str, root: &Path, prefix: &str) {
        put_objects(&self.store(container), &tree_objects(root, prefix));
    }
}

/// Every file below `root` as (object key under `prefix`, content).
pub(crate) fn tree_objects(root: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("under root").display();
                out.push((format!("{prefix}/{rel}"), fs::read(&p).expect("read")));
            }
        }
    }
    out
}

fn put_objects(store: &dyn object_store::ObjectStore, objects: &[(String, Vec<u8>)]) {
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (key, body) in objects {
        rt.block_on(store.put(
            &object_store::path::Path::from(key.as_str()),
            body.clone().into(),
        ))
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
}
