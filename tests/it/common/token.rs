//! Test harness: a token server for the registry's token authentication (ES256 JWTs).

use super::*;

/// How the test registry authenticates.
pub(crate) enum Auth<'a> {
    None,
    Htpasswd,
    Token(&'a TokenServer),
}

pub(crate) const TOKEN_SERVICE: &str = "test-registry";
pub(crate) const TOKEN_ISSUER: &str = "test-issuer";

/// A token service as registries use one: it grants any scope asked for, signing ES256
/// JWTs whose `x5c` header carries its certificate (the registry trusts it through
/// `rootcertbundle`). Keys and certificate are made with openssl at start.
pub(crate) struct TokenServer {
    pub port: u16,
    pub cert: PathBuf,
    pub requests: std::sync::Arc<AtomicUsize>,
    _dir: Scratch,
}

impl TokenServer {
    pub(crate) fn start() -> TokenServer {
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

    pub(crate) fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

fn b64url(data: &[u8]) -> String {
    base64_encode(data)
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
    let header =
        serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [base64_encode(cert_der)]});
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
pub(crate) fn fetch_token(realm: &str, scope: &str) -> String {
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

pub(crate) fn http_status_header(method: &str, url: &str, authorization: &str) -> Option<u16> {
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
