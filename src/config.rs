//! The registry's own `config.yml`, read the way the registry reads it: the storage
//! driver and its root, the blob-descriptor cache kind, and the `redis:` section in both
//! dialects (v2.8 `addr`/`password`/`db`, v3 `addrs`/`username`/`password`/`db`/`tls`),
//! with the registry's `REGISTRY_<SECTION>_<KEY>` environment overrides applied on top.
//! It only reads the file and the environment given to it; it decides nothing about
//! which source wins over command-line flags - that is `settings`.

use std::path::{Path, PathBuf};

use yaml_serde::{Mapping, Value};

/// The filesystem driver's default root in the registry.
pub const DEFAULT_ROOT: &str = "/var/lib/registry";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// The storage driver named in `storage:` (`filesystem`, `s3`, ...).
    pub driver: Option<String>,
    /// `storage.filesystem.rootdirectory`, defaulted as the registry does.
    pub root: PathBuf,
    /// `storage.cache.blobdescriptor`, if set.
    pub cache: Option<String>,
    pub redis: Option<RedisConfig>,
    /// `storage.s3`, when the registry uses the s3 driver.
    pub s3: Option<crate::object_storage::S3Spec>,
}

#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisConfig {
    pub addrs: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
    pub tls: Option<RedisTls>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("addrs", &self.addrs)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub root_cas: Vec<PathBuf>,
}

/// Sections of `storage:` that are options, not drivers.
const STORAGE_OPTIONS: [&str; 5] = ["cache", "delete", "maintenance", "redirect", "tag"];

/// Reads `path` and applies the `REGISTRY_*` variables of `env`.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RegistryConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read registry config {}: {e}", path.display()))?;
    parse(&text, env).map_err(|e| format!("registry config {}: {e}", path.display()))
}

pub fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RegistryConfig, String> {
    let mut doc: Value = yaml_serde::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    if !doc.is_mapping() {
        return Err("the document is not a mapping".into());
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("REGISTRY_") && k != "REGISTRY_CONFIGURATION_PATH")
        .collect();
    // Shorter paths first, so REGISTRY_STORAGE=s3 replaces the driver before its options land.
    overrides.sort_by_key(|(k, _)| k.len());
    for (name, value) in overrides {
        apply_override(&mut doc, &name, &value)?;
    }
    interpret(&doc)
}

/// `REGISTRY_A_B_C=v` sets `a.b.c` to `v` parsed as YAML, as the registry does.
fn apply_override(doc: &mut Value, name: &str, value: &str) -> Result<(), String> {
    let path: Vec<String> = name["REGISTRY_".len()..]
        .split('_')
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Ok(());
    }
    let parsed: Value = yaml_serde::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
    // REGISTRY_STORAGE=<driver> selects a driver: keep the options, drop the other drivers.
    if path.len() == 1 && path[0] == "storage" {
        if let Some(driver) = scalar_string(&parsed) {
            let storage = child_mapping(doc, "storage");
            let keep: Vec<Value> = storage
                .keys()
                .filter(|k| {
                    k.as_str()
                        .is_some_and(|s| STORAGE_OPTIONS.contains(&s) || s == driver)
                })
                .cloned()
                .collect();
            storage.retain(|k, _| keep.contains(k));
            if !storage.contains_key(driver.as_str()) {
                storage.insert(Value::String(driver), Value::Mapping(Mapping::new()));
            }
        }
        return Ok(());
    }
    let mut node = doc;
    for (i, part) in path.iter().enumerate() {
        let map = match node {
            Value::Mapping(m) => m,
            other => {
                *other = Value::Mapping(Mapping::new());
                match other {
                    Value::Mapping(m) => m,
                    _ => return Err(format!("cannot apply {name}")),
                }
            }
        };
        let key = Value::String(part.clone());
        if i == path.len() - 1 {
            map.insert(key, parsed);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Mapping(Mapping::new()));
    }
    Ok(())
}

fn child_mapping<'a>(doc: &'a mut Value, key: &str) -> &'a mut Mapping {
    let Value::Mapping(top) = doc else {
        unreachable!("checked to be a mapping")
    };
    let entry = top
        .entry(Value::String(key.into()))
        .or_insert(Value::Mapping(Mapping::new()));
    if !entry.is_mapping() {
        *entry = Value::Mapping(Mapping::new());
    }
    match entry {
        Value::Mapping(m) => m,
        _ => unreachable!("just made a mapping"),
    }
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(v, |node, key| node.as_mapping()?.get(*key))
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn opt_string(v: &Value, path: &[&str]) -> Option<String> {
    get(v, path)
        .and_then(scalar_string)
        .filter(|s| !s.is_empty())
}

fn interpret(doc: &Value) -> Result<RegistryConfig, String> {
    let storage = get(doc, &["storage"]);
    let driver = storage.and_then(Value::as_mapping).and_then(|m| {
        m.keys()
            .filter_map(Value::as_str)
            .find(|k| !STORAGE_OPTIONS.contains(k))
            .map(str::to_string)
    });
    let root = opt_string(doc, &["storage", "filesystem", "rootdirectory"])
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let cache = opt_string(doc, &["storage", "cache", "blobdescriptor"]);
    let s3 = match get(doc, &["storage", "s3"]) {
        Some(v) if v.is_mapping() => {
            let bucket = opt_string(v, &["bucket"]).ok_or("storage.s3 has no bucket")?;
            let endpoint = opt_string(v, &["regionendpoint"]);
            let force = get(v, &["forcepathstyle"]).and_then(Value::as_bool);
            Some(crate::object_storage::S3Spec {
                bucket,
                prefix: opt_string(v, &["rootdirectory"])
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_string(),
                region: opt_string(v, &["region"]),
                path_style: force.unwrap_or(endpoint.is_some()),
                endpoint,
                access_key: opt_string(v, &["accesskey"]),
                secret_key: opt_string(v, &["secretkey"]),
            })
        }
        _ => None,
    };
    let redis = match get(doc, &["redis"]) {
        Some(r) if r.is_mapping() => Some(redis_section(r)?),
        _ => None,
    };
    Ok(RegistryConfig {
        driver,
        root,
        cache,
        redis,
        s3,
    })
}

fn redis_section(r: &Value) -> Result<RedisConfig, String> {
    let mut addrs = Vec::new();
    match get(r, &["addrs"]) {
        Some(Value::Sequence(items)) => addrs.extend(items.iter().filter_map(scalar_string)),
        Some(v) => {
            if let Some(s) = scalar_string(v) {
                addrs.extend(
                    s.split(',')
                        .map(|a| a.trim().to_string())
                        .filter(|a| !a.is_empty()),
                );
            }
        }
        None => {}
    }
    if addrs.is_empty()
        && let Some(a) = opt_string(r, &["addr"])
    {
        addrs.push(a);
    }
    let db = match get(r, &["db"]) {
        None | Some(Value::Null) => 0,
        Some(v) => scalar_string(v)
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or("redis.db must be a non-negative integer")?,
    };
    let tls = match get(r, &["tls"]) {
        Some(t) if t.is_mapping() => {
            let enabled = get(t, &["enabled"]).and_then(Value::as_bool);
            let mut root_cas: Vec<PathBuf> = Vec::new();
            for key in ["rootcas", "clientcas"] {
                match get(t, &[key]) {
                    Some(Value::Sequence(items)) => {
                        root_cas.extend(items.iter().filter_map(scalar_string).map(PathBuf::from))
                    }
                    Some(v) => root_cas.extend(scalar_string(v).map(PathBuf::from)),
                    None => {}
                }
            }
            let tls = RedisTls {
                certificate: opt_string(t, &["certificate"]).map(PathBuf::from),
                key: opt_string(t, &["key"]).map(PathBuf::from),
                root_cas,
            };
            let configured = tls != RedisTls::default();
            match enabled {
                Some(false) => None,
                Some(true) => Some(tls),
                None if configured => Some(tls),
                None => None,
            }
        }
        _ => None,
    };
    Ok(RedisConfig {
        addrs,
        username: opt_string(r, &["username"]),
        password: opt_string(r, &["password"]),
        db,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_a_v2_8_config() {
        let c = parse(
            "version: 0.1\nstorage:\n  cache:\n    blobdescriptor: redis\n  filesystem:\n    rootdirectory: /srv/reg\n  delete:\n    enabled: true\nredis:\n  addr: 10.0.0.5:6379\n  password: secret\n  db: 2\n",
            env(&[]),
        )
        .expect("parse");
        assert_eq!(c.driver.as_deref(), Some("filesystem"));
        assert_eq!(c.root, PathBuf::from("/srv/reg"));
        assert_eq!(c.cache.as_deref(), Some("redis"));
        let r = c.redis.expect("redis");
        assert_eq!(r.addrs, vec!["10.0.0.5:6379"]);
        assert_eq!(r.password.as_deref(), Some("secret"));
        assert_eq!(r.db, 2);
        assert!(!format!("{r:?}").contains("secret"));
    }

    #[test]
    fn reads_a_v3_config() {
        let c = parse(
            "storage:\n  filesystem: {}\n  cache: {blobdescriptor: redis}\nredis:\n  addrs: [r1:6379]\n  username: reg\n  password: pw\n  db: 1\n  tls:\n    certificate: /c.pem\n    key: /k.pem\n    rootcas: [/ca.pem]\n",
            env(&[]),
        )
        .expect("parse");
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        let r = c.redis.expect("redis");
        assert_eq!(r.addrs, vec!["r1:6379"]);
        assert_eq!(r.username.as_deref(), Some("reg"));
        let tls = r.tls.expect("tls");
        assert_eq!(tls.root_cas, vec![PathBuf::from("/ca.pem")]);
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = parse(
            "storage:\n  filesystem:\n    rootdirectory: /a\n  cache:\n    blobdescriptor: inmemory\nredis:\n  addr: x:1\n",
            env(&[
                ("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", "/b"),
                ("REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR", "redis"),
                ("REGISTRY_REDIS_ADDR", "y:2"),
                ("REGISTRY_REDIS_PASSWORD", "12345"),
                ("REGISTRY_REDIS_DB", "3"),
                ("HOME", "/root"),
            ]),
        )
        .expect("parse");
        assert_eq!(c.root, PathBuf::from("/b"));
        assert_eq!(c.cache.as_deref(), Some("redis"));
        let r = c.redis.expect("redis");
        assert_eq!(r.addrs, vec!["y:2"]);
        assert_eq!(r.password.as_deref(), Some("12345"));
        assert_eq!(r.db, 3);
    }

    #[test]
    fn environment_can_switch_the_driver() {
        let c = parse(
            "storage:\n  filesystem:\n    rootdirectory: /a\n  cache:\n    blobdescriptor: redis\n",
            env(&[
                ("REGISTRY_STORAGE", "s3"),
                ("REGISTRY_STORAGE_S3_BUCKET", "b"),
            ]),
        )
        .expect("parse");
        assert_eq!(c.driver.as_deref(), Some("s3"));
        assert_eq!(c.cache.as_deref(), Some("redis"));
    }

    #[test]
    fn broken_configs_are_errors() {
        assert!(parse("storage: [unclosed", env(&[])).is_err());
        assert!(parse("- a\n- b\n", env(&[])).is_err());
        assert!(parse("redis:\n  db: minus\n", env(&[])).is_err());
    }
}
