//! Where a running registry listens and how to reach it: the address its config's
//! `http` section gives (TCP or a unix socket, TLS, prefix) or a URL given on the command
//! line, and the credentials to send (`--password-stdin`, a Docker `config.json`). It
//! makes clients; it sends no request itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::registry::client::{
    self as registry_client, ClientOptions, Credentials, RegistryClient,
};
use crate::registry_config::HttpConfig;

/// HEAD requests in flight at once when `check` probes.
pub(crate) const CHECK_CONCURRENCY: usize = 8;

/// Seconds before `check` gives one request up.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the registry's API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `http(s)://host:port[/prefix]`.
    Url(String),
    /// A unix socket (`http.net: unix`), the API under `prefix` (`""` or `/path`).
    Unix { socket: PathBuf, prefix: String },
}

impl Endpoint {
    /// `--registry-url`: `http://`, `https://`, or `unix:///path/to.sock`.
    pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "--registry-url {url}: a unix socket is unix:///absolute/path.sock"
                ));
            }
            return Ok(Endpoint::Unix {
                socket: PathBuf::from(path),
                prefix: String::new(),
            });
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "--registry-url {url} must start with http://, https:// or unix://"
            ));
        }
        Ok(Endpoint::Url(url.trim_end_matches('/').to_string()))
    }

    /// Where the registry listens by its `http:` section, asked from this machine: the
    /// local address (`http.addr`; an unspecified host such as `:5000` or `[::]:5000` is
    /// 127.0.0.1), https when TLS is on, under `http.prefix`; or its unix socket.
    /// `http.host`, the external URL, is not used: behind a load balancer it may reach
    /// another replica, whose in-memory cache is another one.
    pub(crate) fn from_config(http: &HttpConfig) -> Result<Endpoint, String> {
        let raw = http.prefix.as_deref().unwrap_or("");
        if raw
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(format!(
                "http.prefix '{}' is not a URL path",
                raw.escape_debug()
            ));
        }
        let trimmed = raw.trim_matches('/');
        let prefix = if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        };
        let addr = http.addr.as_deref().filter(|a| !a.is_empty()).ok_or(
            "its config gives no http.addr (the registry then listens on a random port), so where it listens is unknown: pass --registry-url URL, or --storage-only",
        )?;
        if addr.chars().any(|c| c.is_control()) {
            return Err(format!(
                "http.addr '{}' holds control characters",
                addr.escape_debug()
            ));
        }
        match http.net.as_deref().unwrap_or("tcp") {
            "unix" if http.tls => Err(format!(
                "it serves TLS on the unix socket {addr}, which registry-audit does not speak: pass --registry-url URL, or --storage-only"
            )),
            "unix" => Ok(Endpoint::Unix {
                socket: PathBuf::from(addr),
                prefix,
            }),
            "tcp" | "" => {
                let (host, port) = split_listen_addr(addr)?;
                let host = match host.parse::<IpAddr>() {
                    Ok(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
                    Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
                    _ if host.is_empty() => "127.0.0.1".to_string(),
                    _ => host.to_string(),
                };
                let scheme = if http.tls { "https" } else { "http" };
                Ok(Endpoint::Url(format!("{scheme}://{host}:{port}{prefix}")))
            }
            other => Err(format!(
                "http.net '{other}' is not a network the registry listens on (tcp or unix)"
            )),
        }
    }

    /// The address, for reports and messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Endpoint::Url(u) => u.clone(),
            Endpoint::Unix { socket, prefix } => format!("unix://{}{prefix}", socket.display()),
        }
    }

    pub(crate) fn client(&self, opts: &ClientOptions) -> Result<RegistryClient, String> {
        match self {
            Endpoint::Url(u) => RegistryClient::new(u, opts),
            Endpoint::Unix { socket, prefix } => RegistryClient::unix(socket, prefix, opts),
        }
    }
}

/// `host:port`, `:port` or `[v6]:port`, as Go's net.Listen takes them for tcp.
fn split_listen_addr(addr: &str) -> Result<(&str, u16), String> {
    let bad = || format!("http.addr '{addr}' is not host:port");
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':').ok_or_else(bad)?)
        }
        None => addr.rsplit_once(':').ok_or_else(bad)?,
    };
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// How `check` reaches the registry whose in-memory cache it probes.
#[derive(Debug, Clone)]
pub(crate) struct ProbeTarget {
    pub endpoint: Endpoint,
    pub options: ClientOptions,
    pub concurrency: usize,
}

/// Credentials from `--username` (the password from the first line of stdin) or, for
/// the first of `urls` it has any for, from a Docker `config.json`
/// (`--docker-config`, else `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
pub(crate) fn credentials(
    username: Option<&str>,
    docker_config: Option<&Path>,
    urls: &[String],
) -> Result<Option<Credentials>, String> {
    if let Some(user) = username {
        // One line, of at most MAX_PASSWORD_BYTES: stdin may be anything.
        let mut lines = crate::files::Lines::new(
            std::io::stdin().lock(),
            "--password-stdin",
            "(stdin)",
            crate::files::MAX_PASSWORD_BYTES as u64,
            crate::files::MAX_PASSWORD_BYTES,
        );
        let line = lines.next_line()?.unwrap_or_default();
        let password = String::from_utf8(line.to_vec())
            .map_err(|_| "--password-stdin: the password is not UTF-8")?
            .trim_end_matches('\r')
            .to_string();
        if password.is_empty() {
            return Err("--password-stdin: stdin held no password".into());
        }
        return Ok(Some(Credentials {
            username: user.to_string(),
            password,
        }));
    }
    let path = match docker_config {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(None),
            },
        },
    };
    for url in urls {
        if let Some(c) = registry_client::docker_config_credentials(&path, url)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(addr: &str) -> HttpConfig {
        HttpConfig {
            addr: Some(addr.into()),
            ..HttpConfig::default()
        }
    }

    fn url(h: &HttpConfig) -> String {
        Endpoint::from_config(h).expect("endpoint").describe()
    }

    #[test]
    fn the_local_address_of_a_config() {
        assert_eq!(url(&http(":5000")), "http://127.0.0.1:5000");
        assert_eq!(url(&http("0.0.0.0:5000")), "http://127.0.0.1:5000");
        assert_eq!(url(&http("[::]:5000")), "http://127.0.0.1:5000");
        assert_eq!(url(&http("[::1]:5000")), "http://[::1]:5000");
        assert_eq!(url(&http("10.1.2.3:443")), "http://10.1.2.3:443");
        assert_eq!(url(&http("reg.local:5000")), "http://reg.local:5000");
        let tls = HttpConfig {
            tls: true,
            prefix: Some("/registry/".into()),
            host: Some("https://reg.example".into()),
            ..http(":5443")
        };
        assert_eq!(url(&tls), "https://127.0.0.1:5443/registry");
        let unix = HttpConfig {
            net: Some("unix".into()),
            prefix: Some("/r".into()),
            ..http("/run/reg.sock")
        };
        assert_eq!(
            Endpoint::from_config(&unix),
            Ok(Endpoint::Unix {
                socket: PathBuf::from("/run/reg.sock"),
                prefix: "/r".into()
            })
        );
        assert_eq!(url(&unix), "unix:///run/reg.sock/r");
        for bad in [
            HttpConfig::default(),
            http("5000"),
            http("host:http"),
            http("[::1]5000"),
            HttpConfig {
                net: Some("udp".into()),
                ..http(":5000")
            },
            HttpConfig {
                tls: true,
                ..unix.clone()
            },
            HttpConfig {
                prefix: Some("/a b".into()),
                ..http(":5000")
            },
            http("re\u{1b}[2Jg:5000"),
        ] {
            assert!(Endpoint::from_config(&bad).is_err(), "{bad:?}");
        }
        let err = Endpoint::from_config(&HttpConfig::default()).expect_err("no addr");
        assert!(
            err.contains("http.addr") && err.contains("--registry-url"),
            "{err}"
        );
    }

    #[test]
    fn registry_urls() {
        assert_eq!(
            Endpoint::parse("https://reg.example/"),
            Ok(Endpoint::Url("https://reg.example".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:///run/reg.sock").map(|e| e.describe()),
            Ok("unix:///run/reg.sock".into())
        );
        assert!(Endpoint::parse("reg.example:5000").is_err());
        assert!(Endpoint::parse("unix://relative.sock").is_err());
    }
}
