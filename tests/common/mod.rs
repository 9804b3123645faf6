//! Test harness: a real `redis-server`, the real registry (`docker-registry serve`) and
//! `skopeo`, all on 127.0.0.1 with ports picked at run time, plus OCI images generated
//! on the fly. Readiness is polled, never waited for with a fixed sleep.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub const BIN: &str = env!("CARGO_BIN_EXE_registry-audit");

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ra-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `ready` until it is true or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    while !ready() {
        assert!(start.elapsed() < limit, "{what} not ready after {limit:?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run .ci/run (or apt-get install redis-server docker-registry skopeo)"
    );
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Redis {
    pub port: u16,
    pub password: Option<String>,
    _proc: Proc,
    _dir: Scratch,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    pub fn start_with(password: Option<&str>) -> Redis {
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

    pub fn url(&self) -> String {
        Redis::url_for(self.port, self.password.as_deref())
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    /// Every key with its type and content, sorted: a byte-for-byte picture of the database.
    pub fn dump(&self) -> Vec<(Vec<u8>, String)> {
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

/// Which blob-descriptor cache the registry uses.
pub enum Cache<'a> {
    Redis(&'a Redis),
    InMemory,
}

pub struct Registry {
    pub port: u16,
    pub root: PathBuf,
    pub config: PathBuf,
    /// Basic-auth user and password when the registry uses htpasswd.
    pub creds: Option<(String, String)>,
    /// The token service, when the registry uses bearer tokens.
    pub token_realm: Option<String>,
    /// Served over TLS.
    pub https: bool,
    log: PathBuf,
    proc: Option<Proc>,
}

/// The htpasswd fixture's user and password (bcrypt, generated once, committed).
pub const HTPASSWD_USER: &str = "audit";
pub const HTPASSWD_PASSWORD: &str = "s3cret-audit";

impl Registry {
    pub fn start(dir: &Scratch, cache: Cache<'_>) -> Registry {
        Registry::start_with(dir, cache, false)
    }

    /// Starts the registry; with `htpasswd`, behind basic auth (fixtures/htpasswd).
    pub fn start_with(dir: &Scratch, cache: Cache<'_>, htpasswd: bool) -> Registry {
        Registry::start_auth(
            dir,
            cache,
            if htpasswd { Auth::Htpasswd } else { Auth::None },
        )
    }

    /// Starts the registry behind the given authentication.
    pub fn start_auth(dir: &Scratch, cache: Cache<'_>, auth_kind: Auth<'_>) -> Registry {
        Registry::start_full(dir, cache, auth_kind, None)
    }

    /// Starts the registry over HTTPS with this certificate and key (PEM files).
    pub fn start_tls(dir: &Scratch, cache: Cache<'_>, cert: &Path, key: &Path) -> Registry {
        Registry::start_full(dir, cache, Auth::None, Some((cert, key)))
    }

    /// Starts the registry with its s3 driver, on a bucket of a local S3 server.
    pub fn start_s3(dir: &Scratch, cache: Cache<'_>, s3: &Moto, bucket: &str) -> Registry {
        Registry::start_storage(dir, cache, Auth::None, None, Some((s3, bucket)))
    }

    fn start_full(
        dir: &Scratch,
        cache: Cache<'_>,
        auth_kind: Auth<'_>,
        tls: Option<(&Path, &Path)>,
    ) -> Registry {
        Registry::start_storage(dir, cache, auth_kind, tls, None)
    }

    fn start_storage(
        dir: &Scratch,
        cache: Cache<'_>,
        auth_kind: Auth<'_>,
        tls: Option<(&Path, &Path)>,
        s3: Option<(&Moto, &str)>,
    ) -> Registry {
        let htpasswd = matches!(auth_kind, Auth::Htpasswd);
        need("docker-registry");
        let root = dir.path("storage");
        fs::create_dir_all(&root).expect("root");
        let (storage_cache, redis_section) = match &cache {
            Cache::Redis(r) => {
                let pw = r
                    .password
                    .as_ref()
                    .map(|p| format!("  password: {p}\n"))
                    .unwrap_or_default();
                (
                    "  cache:\n    blobdescriptor: redis\n".to_string(),
                    format!("redis:\n  addr: 127.0.0.1:{}\n{pw}  db: 0\n", r.port),
                )
            }
            Cache::InMemory => (
                "  cache:\n    blobdescriptor: inmemory\n".to_string(),
                String::new(),
            ),
        };
        let auth = match auth_kind {
            Auth::Htpasswd => {
                let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    fixture.display()
                )
            }
            Auth::Token(t) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                t.realm(),
                t.cert.display()
            ),
            Auth::None => String::new(),
        };
        let mut reg = Registry {
            port: 0,
            root: root.clone(),
            config: dir.path("config.yml"),
            creds: htpasswd.then(|| (HTPASSWD_USER.to_string(), HTPASSWD_PASSWORD.to_string())),
            https: tls.is_some(),
            token_realm: match auth_kind {
                Auth::Token(t) => Some(t.realm()),
                _ => None,
            },
            log: dir.path("registry.log"),
            proc: None,
        };
        let tls_section = match tls {
            Some((cert, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let driver = match s3 {
            Some((moto, bucket)) => format!(
                "  s3:\n    accesskey: test\n    secretkey: test\n    region: us-east-1\n    regionendpoint: {}\n    bucket: {bucket}\n    secure: false\n    v4auth: true\n    rootdirectory: /{S3_PREFIX}\n  redirect:\n    disable: true\n",
                moto.endpoint()
            ),
            None => format!("  filesystem:\n    rootdirectory: {}\n", root.display()),
        };
        for _ in 0..5 {
            reg.port = free_port();
            fs::write(
                &reg.config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n{driver}  delete:\n    enabled: true\n{storage_cache}http:\n  addr: 127.0.0.1:{}\n{tls_section}{redis_section}{auth}",
                    reg.port
                ),
            )
            .expect("config");
            if reg.spawn() {
                return reg;
            }
        }
        panic!(
            "could not start docker-registry: {}",
            fs::read_to_string(&reg.log).unwrap_or_default()
        );
    }

    /// Starts the process on the configured port; false if it exited (port taken).
    fn spawn(&mut self) -> bool {
        let log = fs::File::create(&self.log).expect("log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            // The AWS SDK of the s3 driver fails on a CA bundle it cannot use.
            .env_remove("AWS_CA_BUNDLE")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let start = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            // 401 is ready too: the registry asks for credentials.
            if matches!(
                http_status("GET", &format!("{}/v2/", self.url())),
                Some(200 | 401)
            ) {
                self.proc = Some(Proc(child));
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "registry did not start"
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Stops the registry and starts it again on the same port: its in-memory cache
    /// starts empty.
    pub fn restart(&mut self) {
        self.proc = None; // kills and waits
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("registry did not restart");
    }

    /// The id of the registry process this harness started, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn docker_ref(&self, repo_tag: &str) -> String {
        format!("docker://127.0.0.1:{}/{repo_tag}", self.port)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("digest");
        self.root
            .join("docker/registry/v2/blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// An API request with the registry's credentials, if any.
    pub fn http(&self, method: &str, path: &str) -> Option<u16> {
        if let Some(realm) = &self.token_realm {
            // /v2/<repo>/(blobs|manifests)/<ref>: a token for that repository.
            let repo = path
                .trim_start_matches("/v2/")
                .rsplitn(3, '/')
                .nth(2)
                .unwrap_or("");
            let token = fetch_token(realm, &format!("repository:{repo}:pull,push,delete"));
            return http_status_header(
                method,
                &format!("{}{path}", self.url()),
                &format!("Bearer {token}"),
            );
        }
        http_status_auth(
            method,
            &format!("{}{path}", self.url()),
            self.creds.as_ref(),
        )
    }

    /// Deletes a manifest through the API, as an operator deleting a tag does.
    pub fn delete_manifest(&self, repo: &str, digest: &str) {
        let status = self.http("DELETE", &format!("/v2/{repo}/manifests/{digest}"));
        assert_eq!(status, Some(202), "DELETE manifest {repo}@{digest}");
    }

    /// HEAD of a blob in a repository: what a client asks before uploading.
    pub fn head_blob(&self, repo: &str, digest: &str) -> Option<u16> {
        self.http("HEAD", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// Runs the registry's own garbage collection.
    pub fn garbage_collect(&self) -> Output {
        let out = Command::new("docker-registry")
            .env_remove("AWS_CA_BUNDLE")
            .arg("garbage-collect")
            .arg(&self.config)
            .output()
            .expect("run garbage-collect");
        assert!(
            out.status.success(),
            "garbage-collect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// skopeo's credential flag for this registry, if it needs one.
    fn skopeo_creds(&self, flag: &str) -> Vec<String> {
        match &self.creds {
            Some((u, p)) => vec![format!("{flag}={u}:{p}")],
            None => Vec::new(),
        }
    }
}

pub fn http_status(method: &str, url: &str) -> Option<u16> {
    http_status_auth(method, url, None)
}

pub fn http_status_auth(method: &str, url: &str, creds: Option<&(String, String)>) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let auth = creds.map(|(u, p)| {
        format!(
            "Basic {}",
            registry_audit::registry_client::base64_encode(format!("{u}:{p}").as_bytes())
        )
    });
    macro_rules! send {
        ($req:expr) => {{
            let mut req = $req;
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }};
    }
    let resp = match method {
        "GET" => send!(agent.get(url)),
        "HEAD" => send!(agent.head(url)),
        "DELETE" => send!(agent.delete(url)),
        other => panic!("method {other}"),
    };
    resp.ok().map(|r| r.status().as_u16())
}

pub fn sha256(bytes: &[u8]) -> String {
    let out = sha2::Sha256::digest(bytes);
    let mut s = String::from("sha256:");
    for b in out.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Deterministic pseudo-random bytes (xorshift), so images differ by seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An OCI image written as an OCI layout directory, ready for `skopeo copy oci:DIR:TAG`.
pub struct Image {
    pub dir: PathBuf,
    pub tag: String,
    pub layers: Vec<String>,
    pub config: String,
    pub manifest: String,
}

impl Image {
    pub fn blobs(&self) -> Vec<String> {
        let mut v = self.layers.clone();
        v.push(self.config.clone());
        v.push(self.manifest.clone());
        v
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, bytes).expect("write blob");
    d
}

/// Gzips layer content, so skopeo pushes the layer as it is (it compresses
/// uncompressed layers on push, which would change their digests).
pub fn gzip(content: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(content).expect("gzip");
    enc.finish().expect("gzip")
}

/// Builds an image from layer contents (gzipped here); the config names `label` so
/// configs differ.
pub fn make_image(dir: &Path, label: &str, layers: &[Vec<u8>]) -> Image {
    fs::create_dir_all(dir).expect("image dir");
    let layers: Vec<Vec<u8>> = layers.iter().map(|l| gzip(l)).collect();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let layer_digests: Vec<String> = layers.iter().map(|l| put_blob(dir, l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"test": label}},
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = put_blob(dir, &config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": l.len()
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = put_blob(dir, &manifest_bytes);
    write_layout_index(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_digest,
        manifest_bytes.len(),
    );
    Image {
        dir: dir.to_path_buf(),
        tag: "latest".into(),
        layers: layer_digests,
        config: config_digest,
        manifest: manifest_digest,
    }
}

/// The OCI layout's `index.json`, its `latest` tag naming the given manifest or index.
fn write_layout_index(dir: &Path, media_type: &str, digest: &str, size: usize) {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type, "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"}
        }]
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("index.json");
}

/// An OCI image index of one image per label (each with its own layer and config),
/// written as an OCI layout whose `latest` is the index. `layers`/`config` of the
/// returned Image list every child's blobs; `children` their manifests.
pub fn make_index_image(dir: &Path, labels: &[&str]) -> (Image, Vec<String>) {
    fs::create_dir_all(dir).expect("image dir");
    let mut children = Vec::new();
    let mut layers = Vec::new();
    let mut configs = Vec::new();
    let mut descriptors = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let sub = dir.join(format!("child-{i}"));
        let child = make_image(&sub, label, &[bytes(100 + i as u64, 20_000)]);
        for d in child.blobs() {
            let from = sub.join("blobs/sha256").join(&d[7..]);
            let to = dir.join("blobs/sha256").join(&d[7..]);
            fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            fs::copy(from, to).expect("copy blob");
        }
        let manifest_bytes =
            fs::read(dir.join("blobs/sha256").join(&child.manifest[7..])).expect("manifest");
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": child.manifest, "size": manifest_bytes.len(),
            "platform": {"architecture": if i == 0 { "amd64" } else { "arm64" }, "os": "linux"}
        }));
        children.push(child.manifest.clone());
        layers.extend(child.layers.clone());
        configs.push(child.config.clone());
        fs::remove_dir_all(&sub).expect("cleanup");
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    });
    let index_bytes = serde_json::to_vec(&index).expect("index");
    let index_digest = put_blob(dir, &index_bytes);
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    write_layout_index(
        dir,
        "application/vnd.oci.image.index.v1+json",
        &index_digest,
        index_bytes.len(),
    );
    let image = Image {
        dir: dir.to_path_buf(),
        tag: "latest".into(),
        layers,
        config: configs.join(","),
        manifest: index_digest,
    };
    (image, children)
}

/// Pushes an image; returns the digest of the manifest as the registry stored it
/// (skopeo may re-encode the manifest on the way).
pub fn push(reg: &Registry, image: &Image, repo_tag: &str) -> String {
    push_with(reg, image, repo_tag, &[])
}

/// Pushes an image index with all its images.
pub fn push_all(reg: &Registry, image: &Image, repo_tag: &str) -> String {
    push_with(reg, image, repo_tag, &["--all"])
}

fn push_with(reg: &Registry, image: &Image, repo_tag: &str, extra: &[&str]) -> String {
    let digestfile = image
        .dir
        .with_extension(format!("pushed-{}", repo_tag.replace(['/', ':'], "_")));
    need("skopeo");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false", "-q"])
        .args(extra)
        .args(reg.skopeo_creds("--dest-creds"))
        .arg("--digestfile")
        .arg(&digestfile)
        .arg(format!("oci:{}:{}", image.dir.display(), image.tag))
        .arg(reg.docker_ref(repo_tag))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "push {repo_tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = fs::read_to_string(&digestfile).expect("digestfile");
    let _ = fs::remove_file(&digestfile);
    digest.trim().to_string()
}

/// Pulls into a fresh OCI directory; true when the pull worked.
pub fn pull(reg: &Registry, repo_tag: &str, into: &Path) -> (bool, String) {
    let _ = fs::remove_dir_all(into);
    need("skopeo");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false", "-q"])
        .args(reg.skopeo_creds("--src-creds"))
        .arg(reg.docker_ref(repo_tag))
        .arg(format!("oci:{}:pulled", into.display()))
        .output()
        .expect("run skopeo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the tool; returns exit code, stdout, stderr.
pub fn run_tool(args: &[&str]) -> (i32, String, String) {
    run_tool_env(args, &[])
}

pub fn run_tool_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Keep the developer's own REGISTRY_* settings out of the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("REGISTRY_") && !env.iter().any(|(e, _)| *e == k) {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run registry-audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The report a run printed, or Null when it printed nothing (a run that could not run).
pub fn json_or_null(stdout: &str) -> serde_json::Value {
    if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        json(stdout)
    }
}

/// (kind, repository, digest) of every finding, sorted.
pub fn finding_triples(
    report: &serde_json::Value,
) -> Vec<(String, Option<String>, Option<String>)> {
    let mut v: Vec<_> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().expect("kind").to_string(),
                f["repository"].as_str().map(str::to_string),
                f["digest"].as_str().map(str::to_string),
            )
        })
        .collect();
    v.sort();
    v
}

/// Three repositories sharing a base layer: `team/app1` and `mirror/app1` hold the same
/// image, `team/app2` shares only the base layer.
pub struct Scenario {
    pub dir: Scratch,
    pub redis: Redis,
    pub registry: Registry,
    pub app1: Image,
    pub app2: Image,
    /// The manifest digest of team/app2:v1 as the registry stored it.
    pub app2_manifest: String,
}

pub fn shared_layers_scenario(tag: &str) -> Scenario {
    let dir = Scratch::new(tag);
    let redis = Redis::start();
    let registry = Registry::start(&dir, Cache::Redis(&redis));
    let (app1, app2, app2_manifest) = push_two_apps(&registry, &dir, [300_000, 70_000, 90_000]);
    push(&registry, &app1, "mirror/app1:v1");
    let (ok, err) = pull(&registry, "mirror/app1:v1", &dir.path("pulled"));
    assert!(ok, "pull mirror/app1:v1: {err}");
    Scenario {
        dir,
        redis,
        registry,
        app1,
        app2,
        app2_manifest,
    }
}

/// Deletes team/app2's manifest and runs the registry's GC.
pub fn delete_app2_and_gc(s: &Scenario) {
    s.registry.delete_manifest("team/app2", &s.app2_manifest);
    s.registry.garbage_collect();
    assert!(
        !s.registry.has_blob(&s.app2.layers[1]),
        "GC should delete app2's own layer"
    );
    assert!(
        s.registry.has_blob(&s.app2.layers[0]),
        "GC keeps the shared base layer"
    );
}

/// Two images sharing a base layer of `sizes[0]` bytes (app1 with a layer of `sizes[1]`,
/// app2 with one of `sizes[2]`), pushed as team/app1:v1 and team/app2:v1 and pulled
/// back; returns them and the manifest digest of team/app2:v1.
pub fn push_two_apps(reg: &Registry, dir: &Scratch, sizes: [usize; 3]) -> (Image, Image, String) {
    let base = bytes(1, sizes[0]);
    let app1 = make_image(
        &dir.path("img1"),
        "app1",
        &[base.clone(), bytes(2, sizes[1])],
    );
    let app2 = make_image(&dir.path("img2"), "app2", &[base, bytes(3, sizes[2])]);
    push(reg, &app1, "team/app1:v1");
    let app2_manifest = push(reg, &app2, "team/app2:v1");
    for r in ["team/app1:v1", "team/app2:v1"] {
        let (ok, err) = pull(reg, r, &dir.path("pulled"));
        assert!(ok, "pull {r}: {err}");
    }
    (app1, app2, app2_manifest)
}

/// `gc --config CONFIG --journal JOURNAL --format json EXTRA -- COMMAND`.
pub fn gc_with(
    config: &str,
    journal: &str,
    extra: &[&str],
    command: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "gc",
        "--config",
        config,
        "--journal",
        journal,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let (code, out, err) = run_tool(&args);
    (code, json_or_null(&out), err)
}

/// `check --root --redis --format json` of the scenario's registry, with `extra` flags.
pub fn check_fs(s: &Scenario, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let root = s.registry.root.display().to_string();
    let url = s.redis.url();
    let mut args = vec![
        "check", "--root", &root, "--redis", &url, "--format", "json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool(&args);
    (code, json(&out), err)
}

/// `purge --apply PLAN --config CONFIG --yes --journal JOURNAL --format json`.
pub fn purge_apply(config: &str, plan: &str, journal: &str) -> (i32, serde_json::Value, String) {
    let (code, out, err) = run_tool(&[
        "purge",
        "--apply",
        plan,
        "--config",
        config,
        "--yes",
        "--journal",
        journal,
        "--format",
        "json",
    ]);
    let report = json_or_null(&out);
    (code, report, err)
}

/// Whether `report` has a finding of `kind` for `digest`.
pub fn has_finding(report: &serde_json::Value, kind: &str, digest: &str) -> bool {
    report["findings"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f["kind"] == kind && f["digest"] == digest))
}

/// The phantom entries, computed independently of the tool: straight from Redis and the
/// filesystem, by the registry's key shapes.
pub fn expected_phantoms(s: &Scenario) -> BTreeSet<(String, Option<String>, Option<String>)> {
    let mut c = s.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).expect("keys");
    let mut out = BTreeSet::new();
    for k in keys {
        if let Some(d) = k.strip_prefix("blobs::") {
            if !s.registry.has_blob(d) {
                out.insert((
                    "phantom-blob-descriptor".to_string(),
                    None,
                    Some(d.to_string()),
                ));
            }
        } else if let Some(repo) = k
            .strip_prefix("repository::")
            .and_then(|r| r.strip_suffix("::blobs"))
        {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&k)
                .query(&mut c)
                .expect("smembers");
            for d in members {
                if !s.registry.has_blob(&d) {
                    out.insert((
                        "phantom-repository-blob".to_string(),
                        Some(repo.to_string()),
                        Some(d),
                    ));
                }
            }
        }
    }
    out
}

/// Uploads a blob through the registry's monolithic upload API (POST, then PUT with the
/// digest): the upload writes storage whatever the cache says.
pub fn upload_blob(reg: &Registry, repo: &str, content: &[u8]) -> String {
    let digest = sha256(content);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let resp = agent
        .post(&format!("{}/v2/{repo}/blobs/uploads/", reg.url()))
        .send_empty()
        .expect("POST upload");
    assert_eq!(resp.status().as_u16(), 202, "start upload");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    let location = if location.starts_with('/') {
        format!("{}{location}", reg.url())
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = agent
        .put(&format!("{location}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .send(content)
        .expect("PUT upload");
    assert_eq!(resp.status().as_u16(), 201, "finish upload");
    digest
}

/// The bytes of one of an image's blobs, from its OCI layout.
pub fn image_blob(image: &Image, digest: &str) -> Vec<u8> {
    fs::read(image.dir.join("blobs/sha256").join(&digest[7..])).expect("image blob")
}

/// `expected_phantoms` plus the `_layers` links to blobs that are gone, which the
/// registry's GC (2.8) leaves behind: what a default `check` reports after GC, computed
/// from Redis and the filesystem without the tool.
pub fn expected_after_gc(s: &Scenario) -> BTreeSet<(String, Option<String>, Option<String>)> {
    let mut out = expected_phantoms(s);
    let repos = s.registry.root.join("docker/registry/v2/repositories");
    for repo in ["team/app1", "mirror/app1", "team/app2"] {
        let layers = repos.join(repo).join("_layers/sha256");
        for entry in fs::read_dir(&layers).expect("layers").flatten() {
            let link = fs::read_to_string(entry.path().join("link")).expect("link");
            if !s.registry.has_blob(&link) {
                out.insert((
                    "dangling-layer-link".into(),
                    Some(repo.to_string()),
                    Some(link),
                ));
            }
        }
    }
    out
}

/// A storage root in the registry's layout, written by the test.
pub struct Store {
    pub dir: Scratch,
}

impl Store {
    pub fn new(tag: &str) -> Store {
        let dir = Scratch::new(tag);
        fs::create_dir_all(dir.path("docker/registry/v2/blobs")).expect("layout");
        fs::create_dir_all(dir.path("docker/registry/v2/repositories")).expect("layout");
        Store { dir }
    }
    pub fn root(&self) -> String {
        self.dir.0.display().to_string()
    }
    pub fn v2(&self) -> PathBuf {
        self.dir.path("docker/registry/v2")
    }
    /// Writes a blob and links it into `repo` as a layer; returns its digest.
    pub fn blob(&self, repo: &str, content: &[u8]) -> String {
        let d = sha256(content);
        self.write_data(&d, content);
        let link = self
            .v2()
            .join("repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(&d[7..]);
        fs::create_dir_all(&link).expect("mkdir");
        fs::write(link.join("link"), &d).expect("link");
        d
    }
    pub fn data_path(&self, d: &str) -> PathBuf {
        self.v2()
            .join("blobs/sha256")
            .join(&d[7..9])
            .join(&d[7..])
            .join("data")
    }
    pub fn write_data(&self, d: &str, content: &[u8]) {
        let p = self.data_path(d);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, content).expect("write");
    }
}

/// Writes the registry's three entries for `digest` in `repo`, as the registry does.
pub fn cache(c: &mut redis::Connection, repo: &str, digest: &str, size: usize) {
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

/// How the test registry authenticates.
pub enum Auth<'a> {
    None,
    Htpasswd,
    Token(&'a TokenServer),
}

pub const TOKEN_SERVICE: &str = "test-registry";
pub const TOKEN_ISSUER: &str = "test-issuer";

/// A token service as registries use one: it grants any scope asked for, signing ES256
/// JWTs whose `x5c` header carries its certificate (the registry trusts it through
/// `rootcertbundle`). Keys and certificate are made with openssl at start.
pub struct TokenServer {
    pub port: u16,
    pub cert: PathBuf,
    pub requests: std::sync::Arc<AtomicUsize>,
    _dir: Scratch,
}

impl TokenServer {
    pub fn start() -> TokenServer {
        let dir = Scratch::new("token");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "key.pem",
        ]);
        run(&[
            "req",
            "-x509",
            "-key",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=token-issuer",
        ]);
        run(&[
            "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
        ]);
        let cert_der = fs::read(dir.path("cert.der")).expect("cert");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let key = dir.path("key.pem");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = serve_token(stream, &cert_der, &key);
            }
        });
        TokenServer {
            port,
            cert: dir.path("cert.pem"),
            requests,
            _dir: dir,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

fn b64url(data: &[u8]) -> String {
    registry_audit::registry_client::base64_encode(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn serve_token(
    mut stream: std::net::TcpStream,
    cert_der: &[u8],
    key: &Path,
) -> std::io::Result<()> {
    use std::io::{BufRead, Write};
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = scope
                .replace("%3A", ":")
                .replace("%2C", ",")
                .replace("%2F", "/");
            let parts: Vec<&str> = scope.splitn(3, ':').collect();
            if parts.len() == 3 {
                access.push(serde_json::json!({"type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()}));
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [registry_audit::registry_client::base64_encode(cert_der)]});
    let claims = serde_json::json!({"iss": TOKEN_ISSUER, "sub": "audit", "aud": TOKEN_SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}"), "access": access});
    let signing = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(signing.as_bytes())?;
    let der = child.wait_with_output()?.stdout;
    let token = format!("{signing}.{}", b64url(&der_to_raw_signature(&der)));
    let body = serde_json::json!({"token": token}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// An ECDSA signature from DER (SEQUENCE of two INTEGERs) to the JWS form r || s.
fn der_to_raw_signature(der: &[u8]) -> Vec<u8> {
    let mut i = if der[1] & 0x80 != 0 {
        2 + (der[1] & 0x7f) as usize
    } else {
        2
    };
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 2, "INTEGER");
        let len = der[i + 1] as usize;
        let v = &der[i + 2..i + 2 + len];
        let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        out.extend(std::iter::repeat_n(0u8, 32 - v.len()));
        out.extend(v);
        i += 2 + len;
    }
    out
}

/// A token for `scope` from the token service.
pub fn fetch_token(realm: &str, scope: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let body = agent
        .get(&format!("{realm}?service={TOKEN_SERVICE}&scope={scope}"))
        .call()
        .expect("token")
        .body_mut()
        .read_to_string()
        .expect("token body");
    let v: serde_json::Value = serde_json::from_str(&body).expect("token json");
    v["token"].as_str().expect("token").to_string()
}

pub fn http_status_header(method: &str, url: &str, authorization: &str) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let resp = match method {
        "HEAD" => agent
            .head(url)
            .header("Authorization", authorization)
            .call(),
        "DELETE" => agent
            .delete(url)
            .header("Authorization", authorization)
            .call(),
        _ => agent.get(url).header("Authorization", authorization).call(),
    };
    resp.ok().map(|r| r.status().as_u16())
}

/// The key prefix (the s3 driver's rootdirectory) the tests use in buckets.
pub const S3_PREFIX: &str = "reg";

/// A local S3-compatible server: moto_server from PyPI's moto[server] (scripts/test
/// installs it in a virtual environment and names it in MOTO_SERVER).
pub struct Moto {
    pub port: u16,
    _proc: Proc,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_with_env(&[])
    }

    /// With authentication on: only the first request goes unchecked (the bucket's
    /// creation); later ones need credentials moto knows.
    pub fn start_authenticating() -> Moto {
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    pub fn create_bucket(&self, bucket: &str) {
        let r = Moto::agent()
            .put(&format!("{}/{bucket}", self.endpoint()))
            .send_empty()
            .expect("create bucket");
        assert_eq!(r.status().as_u16(), 200, "create bucket");
    }

    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        self.put_with_acl(bucket, key, body, "private");
    }

    /// With a canned ACL: `public-read` objects can be read without credentials.
    pub fn put_with_acl(&self, bucket: &str, key: &str, body: &[u8], acl: &str) {
        let r = Moto::agent()
            .put(&format!("{}/{bucket}/{key}", self.endpoint()))
            .header("x-amz-acl", acl)
            .send(body)
            .expect("put");
        assert_eq!(r.status().as_u16(), 200, "put {key}");
    }

    /// A signed PUT (object_store, test credentials): it may overwrite what the
    /// registry wrote.
    pub fn put_signed(&self, bucket: &str, key: &str, body: &[u8]) {
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

    pub fn exists(&self, bucket: &str, key: &str) -> bool {
        // Unsigned, moto answers 403 for an object that exists (private) and 404 for
        // one that does not.
        Moto::agent()
            .get(&format!("{}/{bucket}/{key}", self.endpoint()))
            .call()
            .map(|r| matches!(r.status().as_u16(), 200 | 403))
            .unwrap_or(false)
    }

    /// Uploads a storage tree (the registry's root directory) under `prefix`.
    pub fn upload_tree(&self, bucket: &str, root: &Path, prefix: &str) {
        self.upload_tree_with_acl(bucket, root, prefix, "private");
    }

    pub fn upload_tree_with_acl(&self, bucket: &str, root: &Path, prefix: &str, acl: &str) {
        for (key, body) in tree_objects(root, prefix) {
            self.put_with_acl(bucket, &key, &body, acl);
        }
    }
}

/// The object key of a blob in a registry in object storage under S3_PREFIX.
pub fn s3_blob_key(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').expect("digest");
    format!(
        "{S3_PREFIX}/docker/registry/v2/blobs/{alg}/{}/{hex}/data",
        &hex[..2]
    )
}

/// A proxy in front of a local S3 that misbehaves like a busy object store: the first
/// `throttle` requests get 503 SlowDown, the next one has its connection dropped
/// without an answer; every later request is passed through (one per connection).
pub struct FaultyProxy {
    pub port: u16,
    pub faults: std::sync::Arc<AtomicUsize>,
}

impl FaultyProxy {
    pub fn start(upstream_port: u16, throttle: usize) -> FaultyProxy {
        FaultyProxy::spawn(upstream_port, throttle, true, false)
    }

    /// No fault: every request passed on with the percent-escapes of its path decoded.
    /// GCS's XML API takes an object name as one escaped segment (`a%2Fb`), as
    /// object_store's GCS client sends it; moto, standing in for it, wants `a/b`.
    pub fn decoding(upstream_port: u16) -> FaultyProxy {
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

    pub fn endpoint(&self) -> String {
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

/// Runs openssl in `dir`; panics with its stderr when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and certificates it signed for 127.0.0.1, made with openssl:
/// `ca.crt`, and `<name>.crt` / `<name>.key` for each name asked for.
pub struct Pki {
    pub dir: Scratch,
}

impl Pki {
    pub fn new(names: &[&str]) -> Pki {
        let dir = Scratch::new("pki");
        let d = &dir.0;
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
            ],
        );
        fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext");
        for name in names {
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    "ext.cnf",
                ],
            );
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path(file)
    }
}

/// Azurite, Microsoft's Azure Storage emulator (npm's `azurite`; scripts/test installs it
/// under target/ and names its `azurite-blob` in AZURITE), blob service only, in memory.
pub struct Azurite {
    pub port: u16,
    _proc: Proc,
}

/// The emulator's well-known account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    pub fn start() -> Azurite {
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
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// Creates a container: a request signed with the account's shared key.
    pub fn create_container(&self, name: &str) {
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

    pub fn put(&self, container: &str, key: &str, body: &[u8]) {
        put_objects(&self.store(container), &[(key.to_string(), body.to_vec())]);
    }

    /// Uploads a storage tree (the registry's root directory) under `prefix`.
    pub fn upload_tree(&self, container: &str, root: &Path, prefix: &str) {
        put_objects(&self.store(container), &tree_objects(root, prefix));
    }
}

/// Every file below `root` as (object key under `prefix`, content).
pub fn tree_objects(root: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
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

/// An HTTP date (RFC 1123, GMT) for `t`.
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = registry_audit::report::civil_date(days as i64);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
