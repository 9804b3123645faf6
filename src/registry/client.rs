//! A read-only client of a running registry's HTTP API: HEAD of blobs, and the token
//! endpoint when the registry asks for a bearer token. It authenticates as real
//! registries expect (anonymous, basic, bearer from a `WWW-Authenticate` challenge, with
//! credentials given or from a Docker `config.json`), over TCP (HTTP or HTTPS) or the
//! unix socket a registry with `http.net: unix` listens on, and never sends anything that
//! changes the registry: no GET of content, no DELETE, no upload, no mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ureq::Agent;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// Username and password; the password is never printed.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ClientOptions {
    pub timeout: Duration,
    pub ca_cert: Option<std::path::PathBuf>,
    pub insecure: bool,
    pub credentials: Option<Credentials>,
}

/// What a HEAD of a blob answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 2xx, or a redirect to storage: the registry says the blob exists.
    Exists(u16),
    /// 404.
    Unknown,
    /// 401/403 after trying the credentials there are.
    Denied(u16),
    /// Anything else, or no answer.
    Failed(String),
}

pub(crate) struct RegistryClient {
    /// `http(s)://host:port[/prefix]`, or only `[/prefix]` over a unix socket.
    base: String,
    /// The unix socket the registry listens on, when it does.
    socket: Option<PathBuf>,
    timeout: Duration,
    agent: Agent,
    credentials: Option<Credentials>,
    /// Authorization header per repository, once a challenge has been answered.
    auth: Mutex<HashMap<String, String>>,
}

impl RegistryClient {
    pub(crate) fn new(base_url: &str, opts: &ClientOptions) -> Result<RegistryClient, String> {
        let base = base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "--registry-url {base_url} must start with http:// or https://"
            ));
        }
        let mut tls = TlsConfig::builder().root_certs(RootCerts::PlatformVerifier);
        if let Some(ca) = &opts.ca_cert {
            let pem = crate::files::read("--ca-cert", ca, crate::files::MAX_PEM_BYTES)?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(format!(
                    "--ca-cert {} holds no PEM certificate",
                    ca.display()
                ));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        if opts.insecure {
            tls = tls.disable_verification(true);
        }
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(opts.timeout))
            .user_agent(concat!("registry-audit/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(RegistryClient {
            base,
            socket: None,
            timeout: opts.timeout,
            agent,
            credentials: opts.credentials.clone(),
            auth: Mutex::new(HashMap::new()),
        })
    }

    /// A client of the registry listening on the unix socket `socket` (plain HTTP), its
    /// API under `prefix` (`""` or `/path`). A token service, if the registry names one,
    /// is still asked over TCP with `opts`.
    pub(crate) fn unix(
        socket: &Path,
        prefix: &str,
        opts: &ClientOptions,
    ) -> Result<RegistryClient, String> {
        let prefix = prefix.trim_end_matches('/');
        if !(prefix.is_empty() || prefix.starts_with('/'))
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("http.prefix '{prefix}' is not a URL path"));
        }
        let mut client = RegistryClient::new("http://localhost", opts)?;
        client.base = prefix.to_string();
        client.socket = Some(socket.to_path_buf());
        Ok(client)
    }

    /// The registry's address, for messages: its base URL, or `unix://<socket>[prefix]`.
    pub(crate) fn describe(&self) -> String {
        match &self.socket {
            Some(s) => format!("unix://{}{}", s.display(), self.base),
            None => self.base.clone(),
        }
    }

    /// HEAD `/v2/`: that the registry answers at all (TLS and address right), before
    /// anything is probed. 200 and 401 both mean a registry is there - when the answer
    /// carries `Docker-Distribution-Api-Version: registry/2.0`, as the registry's does on
    /// both: any web server can answer 200 on `/v2/`, and its 404s would read as "no such
    /// blob".
    pub(crate) fn check_reachable(&self) -> Result<(), String> {
        let url = format!("{}/v2/", self.base);
        match self.head(&url, None) {
            Ok(h)
                if matches!(h.status, 200 | 401) && !is_registry_api(h.api_version.as_deref()) =>
            {
                Err(format!(
                    "{} answered {} to HEAD /v2/ without the header {API_VERSION_HEADER}: {API_VERSION}, so it is not a container registry: point --registry-url (or http.addr) at the registry",
                    self.describe(),
                    h.status
                ))
            }
            Ok(Head {
                status: 200 | 401, ..
            }) => Ok(()),
            Ok(Head { status, .. }) => Err(format!(
                "{} answered {status} to HEAD /v2/: is --registry-url the registry's base URL?",
                self.describe()
            )),
            Err(e) => Err(format!(
                "cannot reach the registry at {} ({e}): check --registry-url, and --ca-cert or --insecure for TLS",
                self.describe()
            )),
        }
    }

    /// HEAD `/v2/<repo>/blobs/<digest>`, answering an auth challenge once.
    pub(crate) fn head_blob(&self, repo: &str, digest: &str) -> Answer {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let known = self.auth.lock().ok().and_then(|m| m.get(repo).cloned());
        let first = match self.head(&url, known.as_deref()) {
            Ok(r) => r,
            Err(e) => return Answer::Failed(e),
        };
        let Head {
            status, challenge, ..
        } = first;
        if status != 401 {
            return classify(status);
        }
        let Some(challenge) = challenge else {
            return Answer::Denied(401);
        };
        let header = match self.answer_challenge(&challenge, repo) {
            Ok(Some(h)) => h,
            Ok(None) => return Answer::Denied(401),
            Err(e) => return Answer::Failed(e),
        };
        if let Ok(mut m) = self.auth.lock() {
            m.insert(repo.to_string(), header.clone());
        }
        match self.head(&url, Some(&header)) {
            Ok(h) => classify(h.status),
            Err(e) => Answer::Failed(e),
        }
    }

    fn head(&self, url: &str, auth: Option<&str>) -> Result<Head, String> {
        if let Some(socket) = &self.socket {
            return head_unix(socket, url, auth, self.timeout)
                .map_err(|e| format!("HEAD {url} on unix://{}: {e}", socket.display()));
        }
        let mut req = self.agent.head(url);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| format!("HEAD {url}: {e}"))?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Head {
            status: resp.status().as_u16(),
            challenge: header("www-authenticate"),
            api_version: header(API_VERSION_HEADER),
        })
    }

    /// The Authorization header that answers `challenge`, if there is one.
    fn answer_challenge(&self, challenge: &str, repo: &str) -> Result<Option<String>, String> {
        let parsed = parse_challenge(challenge);
        match parsed.scheme.as_str() {
            "basic" => Ok(self.credentials.as_ref().map(basic_header)),
            "bearer" => {
                let realm = parsed
                    .params
                    .get("realm")
                    .ok_or("bearer challenge without a realm")?;
                let mut url = format!("{realm}?scope=repository:{repo}:pull");
                if let Some(service) = parsed.params.get("service") {
                    url.push_str(&format!("&service={}", encode_query(service)));
                }
                let mut req = self.agent.get(&url);
                if let Some(c) = &self.credentials {
                    req = req.header("Authorization", &basic_header(c));
                }
                let mut resp = req
                    .call()
                    .map_err(|e| format!("token request to {realm}: {e}"))?;
                let status = resp.status().as_u16();
                if status == 401 || status == 403 {
                    return Ok(None);
                }
                if status != 200 {
                    return Err(format!("token request to {realm} answered {status}"));
                }
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(1024 * 1024)
                    .read_to_string()
                    .map_err(|e| format!("token response from {realm}: {e}"))?;
                let body: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("token response from {realm}: {e}"))?;
                let token = body["token"]
                    .as_str()
                    .or(body["access_token"].as_str())
                    .ok_or_else(|| format!("token response from {realm} holds no token"))?;
                Ok(Some(format!("Bearer {token}")))
            }
            _ => Ok(None),
        }
    }
}

/// The header the registry sets on every API answer, `/v2/` included (200 and 401).
const API_VERSION_HEADER: &str = "Docker-Distribution-Api-Version";
const API_VERSION: &str = "registry/2.0";

/// Whether an `API_VERSION_HEADER` value is the registry API's (`registry/2.0`; a later
/// `registry/2.x` too).
fn is_registry_api(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().starts_with("registry/2."))
}

/// What a HEAD answered: the status and the headers the client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    status: u16,
    /// `WWW-Authenticate`.
    challenge: Option<String>,
    /// `API_VERSION_HEADER`.
    api_version: Option<String>,
}

/// The most of an answer's head read from a unix socket.
const MAX_ANSWER_HEAD: usize = 64 * 1024;

/// One HEAD request over a unix socket (HTTP/1.1, one connection each): the status and
/// the headers `Head` keeps. A HEAD answer has no body, so its head is all there is.
fn head_unix(
    socket: &Path,
    path: &str,
    auth: Option<&str>,
    timeout: Duration,
) -> Result<Head, String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut request = format!(
        "HEAD {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: registry-audit/{}\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = auth {
        request.push_str(&format!("Authorization: {a}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if head.len() > MAX_ANSWER_HEAD {
            return Err(format!("the answer's head exceeds {MAX_ANSWER_HEAD} bytes"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("the connection closed before the answer's head ended".into()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    };
    parse_answer_head(&String::from_utf8_lossy(&head[..end]))
}

/// `HTTP/1.1 200 OK` and headers: the status, `WWW-Authenticate` and the API version.
fn parse_answer_head(head: &str) -> Result<Head, String> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: '{}'", status_line.escape_debug()))?;
    let (mut challenge, mut api_version) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("www-authenticate") && challenge.is_none() {
            challenge = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case(API_VERSION_HEADER) && api_version.is_none() {
            api_version = Some(value.trim().to_string());
        }
    }
    Ok(Head {
        status,
        challenge,
        api_version,
    })
}

fn classify(status: u16) -> Answer {
    match status {
        200..=399 => Answer::Exists(status),
        404 => Answer::Unknown,
        401 | 403 => Answer::Denied(status),
        other => Answer::Failed(format!("answered {other}")),
    }
}

fn basic_header(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{}:{}", c.username, c.password).as_bytes())
    )
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub(crate) fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((name, after)) = rest.split_once('=') else {
            break;
        };
        let name = name
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(name, value.to_string());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    }
}

/// Credentials for the registry's host from a Docker `config.json` (`auths.<host>.auth`,
/// or `username`/`password`). Credential helpers are not consulted.
pub(crate) fn docker_config_credentials(
    path: &Path,
    registry_url: &str,
) -> Result<Option<Credentials>, String> {
    let text = match crate::files::read_to_string(
        "Docker config",
        path,
        crate::files::MAX_DOCKER_CONFIG_BYTES,
    ) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    let host = host_of(registry_url);
    let Some(auths) = doc["auths"].as_object() else {
        return Ok(None);
    };
    for (key, entry) in auths {
        if host_of(key) != host {
            continue;
        }
        if let Some(encoded) = entry["auth"].as_str().filter(|s| !s.is_empty()) {
            let decoded = base64_decode(encoded)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    format!(
                        "{}: auths.{key}.auth is not base64 of user:password",
                        path.display()
                    )
                })?;
            let (u, p) = decoded.split_once(':').ok_or_else(|| {
                format!("{}: auths.{key}.auth is not user:password", path.display())
            })?;
            return Ok(Some(Credentials {
                username: u.into(),
                password: p.into(),
            }));
        }
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some(Credentials {
                username: u.into(),
                password: p.into(),
            }));
        }
    }
    Ok(None)
}

/// `https://reg.example:5000/v2/` -> `reg.example:5000`
pub(crate) fn host_of(url: &str) -> String {
    let s = url.split_once("://").map_or(url, |(_, rest)| rest);
    s.split('/').next().unwrap_or("").to_ascii_lowercase()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim().bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "audit:s3cret", "user:pä$$"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).as_deref(),
                Some(s.as_bytes())
            );
        }
        assert_eq!(base64_encode(b"audit:s3cret"), "YXVkaXQ6czNjcmV0");
        assert!(base64_decode("!!").is_none());
    }

    #[test]
    fn parses_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["service"], "registry.example");
        assert_eq!(c.params["scope"], "repository:a/b:pull");
        let c = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "basic-realm");
    }

    #[test]
    fn reads_docker_config_auths() {
        let dir = std::env::temp_dir().join(format!("ra-dockercfg-{}", std::process::id()));
        std::fs::write(
            &dir,
            r#"{"auths":{"https://reg.example:5000":{"auth":"YXVkaXQ6czNjcmV0"},"other":{"username":"u","password":"p"}}}"#,
        )
        .expect("write");
        let c = docker_config_credentials(&dir, "https://reg.example:5000")
            .expect("ok")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("audit", "s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = docker_config_credentials(&dir, "http://other/")
            .expect("ok")
            .expect("found");
        assert_eq!(c.username, "u");
        assert!(
            docker_config_credentials(&dir, "http://nowhere")
                .expect("ok")
                .is_none()
        );
        let _ = std::fs::remove_file(&dir);
        assert!(
            docker_config_credentials(Path::new("/nonexistent/config.json"), "x")
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn parses_answer_heads() {
        let status_and_challenge =
            |head: &str| parse_answer_head(head).map(|h| (h.status, h.challenge));
        assert_eq!(
            status_and_challenge("HTTP/1.1 200 OK\r\nContent-Length: 5"),
            Ok((200, None))
        );
        assert_eq!(
            status_and_challenge(
                "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"r\"\r\nX: y"
            ),
            Ok((401, Some("Basic realm=\"r\"".into())))
        );
        // The registry's API version, which tells the registry from any web server.
        let h = parse_answer_head(
            "HTTP/1.1 200 OK\r\ndocker-distribution-api-version: registry/2.0\r\nContent-Length: 2",
        )
        .expect("head");
        assert!(is_registry_api(h.api_version.as_deref()));
        let h = parse_answer_head("HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6").expect("head");
        assert_eq!(h.api_version, None);
        assert!(!is_registry_api(h.api_version.as_deref()));
        assert!(!is_registry_api(Some("nginx")));
        assert!(parse_answer_head("SSH-2.0-OpenSSH").is_err());
        assert!(parse_answer_head("HTTP/1.1 2x0 OK").is_err());
    }

    #[test]
    fn host_of_urls() {
        assert_eq!(host_of("https://Reg.example:5000/v2/"), "reg.example:5000");
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1:5000");
    }
}
