//! Test harness: the real registry (`docker-registry serve`) on a free port, on its filesystem, S3, TLS or token-auth configuration, and plain HTTP requests to it.

use super::*;

/// Which blob-descriptor cache the registry uses.
pub(crate) enum Cache<'a> {
    Redis(&'a Redis),
    InMemory,
}

pub(crate) struct Registry {
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
pub(crate) const HTPASSWD_USER: &str = "audit";
pub(crate) const HTPASSWD_PASSWORD: &str = "s3cret-audit";

impl Registry {
    pub(crate) fn start(dir: &Scratch, cache: Cache<'_>) -> Registry {
        Registry::start_with(dir, cache, false)
    }

    /// Starts the registry; with `htpasswd`, behind basic auth (fixtures/htpasswd).
    pub(crate) fn start_with(dir: &Scratch, cache: Cache<'_>, htpasswd: bool) -> Registry {
        Registry::start_auth(
            dir,
            cache,
            if htpasswd { Auth::Htpasswd } else { Auth::None },
        )
    }

    /// Starts the registry behind the given authentication.
    pub(crate) fn start_auth(dir: &Scratch, cache: Cache<'_>, auth_kind: Auth<'_>) -> Registry {
        Registry::start_full(dir, cache, auth_kind, None)
    }

    /// Starts the registry over HTTPS with this certificate and key (PEM files).
    pub(crate) fn start_tls(dir: &Scratch, cache: Cache<'_>, cert: &Path, key: &Path) -> Registry {
        Registry::start_full(dir, cache, Auth::None, Some((cert, key)))
    }

    /// Starts the registry with its s3 driver, on a bucket of a local S3 server.
    pub(crate) fn start_s3(dir: &Scratch, cache: Cache<'_>, s3: &Moto, bucket: &str) -> Registry {
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
    pub(crate) fn restart(&mut self) {
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
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub(crate) fn docker_ref(&self, repo_tag: &str) -> String {
        format!("docker://127.0.0.1:{}/{repo_tag}", self.port)
    }

    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("digest");
        self.root
            .join("docker/registry/v2/blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub(crate) fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// An API request with the registry's credentials, if any.
    pub(crate) fn http(&self, method: &str, path: &str) -> Option<u16> {
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
    pub(crate) fn delete_manifest(&self, repo: &str, digest: &str) {
        let status = self.http("DELETE", &format!("/v2/{repo}/manifests/{digest}"));
        assert_eq!(status, Some(202), "DELETE manifest {repo}@{digest}");
    }

    /// HEAD of a blob in a repository: what a client asks before uploading.
    pub(crate) fn head_blob(&self, repo: &str, digest: &str) -> Option<u16> {
        self.http("HEAD", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// Runs the registry's own garbage collection.
    pub(crate) fn garbage_collect(&self) -> Output {
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
    pub(super) fn skopeo_creds(&self, flag: &str) -> Vec<String> {
        match &self.creds {
            Some((u, p)) => vec![format!("{flag}={u}:{p}")],
            None => Vec::new(),
        }
    }
}

pub(crate) fn http_status(method: &str, url: &str) -> Option<u16> {
    http_status_auth(method, url, None)
}

pub(crate) fn http_status_auth(
    method: &str,
    url: &str,
    creds: Option<&(String, String)>,
) -> Option<u16> {
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
    let auth =
        creds.map(|(u, p)| format!("Basic {}", base64_encode(format!("{u}:{p}").as_bytes())));
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
