//! The registry's own `config.yml`, read the way the registry reads it: the storage
//! driver and its root, the blob-descriptor cache kind (`blobdescriptor`, else the older
//! `layerinfo`), where the registry listens (`http:`), and the `redis:` section in both
//! dialects (v2.8 `addr`/`password`/`db`, v3 `addrs`/`username`/`password`/`db`/`tls`),
//! with the registry's `REGISTRY_<SECTION>_<KEY>` environment overrides applied on top.
//! It only reads the file and the environment given to it; it decides nothing about
//! which source wins over command-line flags - that is `settings`.
//!
//! Scalars are read as the registry reads them. The `redis:` and `http:` sections are Go
//! structs with string fields, which yaml.v2 fills with a scalar's source text: `password:
//! 0x1F` is the password `0x1F`, not `31`, and `True`, `1e3`, `.5`, `+1`, `0o17` stay as
//! written. Those settings come from a second reading of the document (`raw_parse`) that
//! keeps every plain scalar's text. Storage driver options are a `map[string]interface{}`
//! in the registry, formatted with `fmt.Sprint` after YAML typing, so they keep the typed
//! reading; `redis.db` is an integer field and must be one.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use yaml_serde::{Mapping, Value};

use crate::storage::object_spec::{AzureClient, ObjectSpec, Service};

/// The filesystem driver's default root in the registry.
pub(crate) const DEFAULT_ROOT: &str = "/var/lib/registry";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegistryConfig {
    /// The storage driver named in `storage:` (`filesystem`, `s3`, ...).
    pub driver: Option<String>,
    /// `storage.filesystem.rootdirectory`, defaulted as the registry does.
    pub root: PathBuf,
    /// The cache kind as the registry takes it: `storage.cache.blobdescriptor` when that
    /// key is there at all (an empty value then means no cache), else the older
    /// `storage.cache.layerinfo` (Harbor's configs use it). `None`: no cache.
    pub cache: Option<String>,
    /// The key `cache` came from, for messages.
    pub cache_key: &'static str,
    /// Where the registry listens.
    pub http: HttpConfig,
    pub redis: Option<RedisConfig>,
    /// `storage.s3`, `storage.gcs` or `storage.azure`, when the registry uses that driver.
    pub objects: Option<ObjectSpec>,
}

/// The `http:` section: where the registry listens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct HttpConfig {
    /// `http.addr`: `host:port`, `:port`, or a socket path when `net` is `unix`.
    pub addr: Option<String>,
    /// `http.net`: `tcp` (the default) or `unix`.
    pub net: Option<String>,
    /// `http.prefix`: the path before `/v2/`.
    pub prefix: Option<String>,
    /// `http.host`: the registry's external URL (it builds redirect URLs from it).
    pub host: Option<String>,
    /// TLS is on: `http.tls.certificate` or `http.tls.letsencrypt.cachefile` is set.
    pub tls: bool,
}

#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct RedisConfig {
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
pub(crate) struct RedisTls {
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub root_cas: Vec<PathBuf>,
}

/// Sections of `storage:` that are options, not drivers.
const STORAGE_OPTIONS: [&str; 5] = ["cache", "delete", "maintenance", "redirect", "tag"];

/// Reads `path` (a regular file of at most `files::MAX_CONFIG_BYTES`) and applies the
/// `REGISTRY_*` variables of `env`.
pub(crate) fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RegistryConfig, String> {
    let text =
        crate::files::read_to_string("registry config", path, crate::files::MAX_CONFIG_BYTES)?;
    parse(&text, env).map_err(|e| format!("registry config {}: {e}", path.display()))
}

pub(crate) fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RegistryConfig, String> {
    let mut doc: Value = yaml_serde::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut raw = raw_parse(text, &doc).map_err(|e| format!("not valid YAML: {e}"))?;
    for d in [&mut doc, &mut raw] {
        if d.is_null() {
            *d = Value::Mapping(Mapping::new());
        }
        if !d.is_mapping() {
            return Err("the document is not a mapping".into());
        }
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("REGISTRY_") && k != "REGISTRY_CONFIGURATION_PATH")
        .collect();
    // Shorter paths first, so REGISTRY_STORAGE=s3 replaces the driver before its options land.
    overrides.sort_by_key(|(k, _)| k.len());
    for (name, value) in overrides {
        let parsed: Value =
            yaml_serde::from_str(&value).unwrap_or_else(|_| Value::String(value.clone()));
        let parsed_raw = raw_parse(&value, &parsed).unwrap_or_else(|_| parsed.clone());
        apply_override(&mut doc, &name, parsed)?;
        apply_override(&mut raw, &name, parsed_raw)?;
    }
    interpret(&doc, &raw)
}

/// The document again, with every number and boolean replaced by its source text: what
/// yaml.v2 puts in a string field. `typed` is the same text's ordinary reading; it guides
/// the second pass (a scalar it typed is read as a string, everything else as before).
fn raw_parse(text: &str, typed: &Value) -> Result<Value, String> {
    Guided(typed)
        .deserialize(yaml_serde::Deserializer::from_str(text))
        .map_err(|e| e.to_string())
}

struct Guided<'a>(&'a Value);

impl<'de> DeserializeSeed<'de> for Guided<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        match self.0 {
            Value::Number(_) | Value::Bool(_) => String::deserialize(d).map(Value::String),
            Value::Mapping(m) => d.deserialize_map(GuidedMap(m)),
            Value::Sequence(s) => d.deserialize_seq(GuidedSeq(s)),
            _ => Value::deserialize(d),
        }
    }
}

struct GuidedMap<'a>(&'a Mapping);

impl<'de> Visitor<'de> for GuidedMap<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Mapping::new();
        while let Some(key) = map.next_key::<Value>()? {
            let value = match self.0.get(&key) {
                Some(guide) => map.next_value_seed(Guided(guide))?,
                None => map.next_value::<Value>()?,
            };
            out.insert(key, value);
        }
        Ok(Value::Mapping(out))
    }
}

struct GuidedSeq<'a>(&'a [Value]);

impl<'de> Visitor<'de> for GuidedSeq<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let next = match self.0.get(out.len()) {
                Some(guide) => seq.next_element_seed(Guided(guide))?,
                None => seq.next_element::<Value>()?,
            };
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Sequence(out)),
            }
        }
    }
}

/// `REGISTRY_A_B_C=v` sets `a.b.c` to `v` (already parsed as YAML, as the registry does).
fn apply_override(doc: &mut Value, name: &str, parsed: Value) -> Result<(), String> {
    let path: Vec<String> = name["REGISTRY_".len()..]
        .split('_')
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Ok(());
    }
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

fn interpret(doc: &Value, raw: &Value) -> Result<RegistryConfig, String> {
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
    // As the registry does: the blobdescriptor key, when present, decides even if empty.
    let (cache, cache_key) = match get(doc, &["storage", "cache", "blobdescriptor"]) {
        Some(v) => (scalar_string(v), "blobdescriptor"),
        None => (
            opt_string(doc, &["storage", "cache", "layerinfo"]),
            "layerinfo",
        ),
    };
    let cache = cache.filter(|s| !s.is_empty());
    let http = HttpConfig {
        addr: opt_string(raw, &["http", "addr"]),
        net: opt_string(raw, &["http", "net"]),
        prefix: opt_string(raw, &["http", "prefix"]),
        host: opt_string(raw, &["http", "host"]),
        tls: opt_string(raw, &["http", "tls", "certificate"]).is_some()
            || opt_string(raw, &["http", "tls", "letsencrypt", "cachefile"]).is_some(),
    };
    let objects = match driver.as_deref() {
        Some(name @ ("s3" | "gcs" | "azure")) => match get(doc, &["storage", name]) {
            Some(v) if v.is_mapping() => Some(object_section(name, v)?),
            _ => return Err(format!("storage.{name} has no settings")),
        },
        _ => None,
    };
    let redis = match (get(doc, &["redis"]), get(raw, &["redis"])) {
        (Some(r), Some(text)) if r.is_mapping() => Some(redis_section(r, text)?),
        _ => None,
    };
    Ok(RegistryConfig {
        driver,
        root,
        cache,
        cache_key,
        http,
        redis,
        objects,
    })
}

/// The s3, gcs or azure driver's settings, as the registry reads them.
fn object_section(driver: &str, v: &Value) -> Result<ObjectSpec, String> {
    let prefix = opt_string(v, &["rootdirectory"])
        .unwrap_or_default()
        .trim_matches('/')
        .to_string();
    let required =
        |key: &str| opt_string(v, &[key]).ok_or_else(|| format!("storage.{driver} has no {key}"));
    Ok(match driver {
        "s3" => {
            let endpoint = opt_string(v, &["regionendpoint"]);
            let force = get(v, &["forcepathstyle"]).and_then(Value::as_bool);
            ObjectSpec {
                service: Service::S3,
                bucket: required("bucket")?,
                prefix,
                region: opt_string(v, &["region"]),
                path_style: force.unwrap_or(endpoint.is_some()),
                endpoint,
                access_key: opt_string(v, &["accesskey"]),
                secret_key: opt_string(v, &["secretkey"]),
                ..ObjectSpec::default()
            }
        }
        "gcs" => ObjectSpec {
            service: Service::Gcs,
            bucket: required("bucket")?,
            prefix,
            keyfile: opt_string(v, &["keyfile"]).map(PathBuf::from),
            // Inline service-account credentials: the key file's JSON, as a mapping.
            key_json: match get(v, &["credentials"]) {
                Some(c) if c.is_mapping() => Some(
                    serde_json::to_string(c)
                        .map_err(|e| format!("storage.gcs.credentials: {e}"))?,
                ),
                _ => None,
            },
            ..ObjectSpec::default()
        },
        _ => {
            // azure: v2.8 has accountname, accountkey, container, realm; v3 adds
            // serviceurl, rootdirectory, connectionstring and credentials.
            let mut spec = ObjectSpec {
                service: Service::Azure,
                bucket: required("container")?,
                prefix,
                account: opt_string(v, &["accountname"]),
                secret_key: opt_string(v, &["accountkey"]),
                endpoint: opt_string(v, &["serviceurl"]),
                ..ObjectSpec::default()
            };
            if let Some(conn) = opt_string(v, &["connectionstring"]) {
                for (k, val) in conn.split(';').filter_map(|kv| kv.split_once('=')) {
                    let val = Some(val.trim().to_string());
                    match k.trim() {
                        "AccountName" => spec.account = spec.account.take().or(val),
                        "AccountKey" => spec.secret_key = spec.secret_key.take().or(val),
                        "BlobEndpoint" => spec.endpoint = spec.endpoint.take().or(val),
                        _ => {}
                    }
                }
            }
            let account = spec
                .account
                .clone()
                .ok_or("storage.azure has no accountname")?;
            if spec.endpoint.is_none()
                && let Some(realm) = opt_string(v, &["realm"])
                && realm != "core.windows.net"
            {
                spec.endpoint = Some(format!("https://{account}.blob.{realm}"));
            }
            if opt_string(v, &["credentials", "type"]).as_deref() == Some("client_secret") {
                spec.client = Some(AzureClient {
                    id: opt_string(v, &["credentials", "clientid"]).unwrap_or_default(),
                    tenant: opt_string(v, &["credentials", "tenantid"]).unwrap_or_default(),
                    secret: opt_string(v, &["credentials", "secret"]).unwrap_or_default(),
                });
            }
            spec
        }
    })
}

/// `r` is the section as typed YAML (for `db` and `tls.enabled`), `text` the same section
/// with scalars as written (for every string field).
fn redis_section(r: &Value, text: &Value) -> Result<RedisConfig, String> {
    let mut addrs = Vec::new();
    match get(text, &["addrs"]) {
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
        && let Some(a) = opt_string(text, &["addr"])
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
    let tls = match (get(r, &["tls"]), get(text, &["tls"])) {
        (Some(typed), Some(t)) if t.is_mapping() => {
            let enabled = get(typed, &["enabled"]).and_then(Value::as_bool);
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
        username: opt_string(text, &["username"]),
        password: opt_string(text, &["password"]),
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
        let o = c.objects.expect("s3 settings");
        assert_eq!((o.service, o.bucket.as_str()), (Service::S3, "b"));
    }

    #[test]
    fn reads_the_gcs_and_azure_drivers() {
        let c = parse(
            "storage:\n  gcs:\n    bucket: regs\n    keyfile: /etc/gcs.json\n    rootdirectory: /prod/\n",
            env(&[]),
        )
        .expect("gcs");
        let o = c.objects.expect("gcs settings");
        assert_eq!(o.describe(), "gs://regs/prod");
        assert_eq!(o.keyfile, Some(PathBuf::from("/etc/gcs.json")));
        let c = parse(
            "storage:\n  gcs:\n    bucket: regs\n    credentials:\n      type: service_account\n      private_key: PEM\n",
            env(&[]),
        )
        .expect("gcs inline");
        let json: serde_json::Value =
            serde_json::from_str(c.objects.and_then(|o| o.key_json).as_deref().unwrap_or(""))
                .expect("json");
        assert_eq!(json["private_key"], "PEM");
        // v2.8: realm gives the endpoint; the account key comes from the environment.
        let c = parse(
            "storage:\n  azure:\n    accountname: acct\n    container: regs\n    realm: core.chinacloudapi.cn\n",
            env(&[("REGISTRY_STORAGE_AZURE_ACCOUNTKEY", "a2V5")]),
        )
        .expect("azure");
        let o = c.objects.expect("azure settings");
        assert_eq!(
            o.describe(),
            "azure://acct/regs at https://acct.blob.core.chinacloudapi.cn"
        );
        assert_eq!(o.secret_key.as_deref(), Some("a2V5"));
        // v3: a connection string and a root directory.
        let c = parse(
            "storage:\n  azure:\n    container: regs\n    rootdirectory: /r\n    connectionstring: \"DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/dev;\"\n",
            env(&[]),
        )
        .expect("azure v3");
        let o = c.objects.expect("azure settings");
        assert_eq!(
            o.describe(),
            "azure://dev/regs/r at http://127.0.0.1:10000/dev"
        );
        assert!(!format!("{o:?}").contains("a2V5"));
        for bad in [
            "storage:\n  gcs:\n    keyfile: /k\n",
            "storage:\n  azure:\n    container: c\n",
            "storage:\n  azure:\n    accountname: a\n",
            "storage:\n  s3:\n    region: x\n",
        ] {
            assert!(parse(bad, env(&[])).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_cache_kind_as_the_registry_does() {
        let kind = |text: &str, vars: &[(&str, &str)]| {
            let c = parse(text, env(vars)).expect("parse");
            (c.cache, c.cache_key)
        };
        // Harbor's older key.
        assert_eq!(
            kind("storage:\n  cache:\n    layerinfo: redis\n", &[]),
            (Some("redis".into()), "layerinfo")
        );
        // blobdescriptor wins over layerinfo; present but empty, it means no cache.
        assert_eq!(
            kind(
                "storage:\n  cache:\n    layerinfo: redis\n    blobdescriptor: inmemory\n",
                &[]
            ),
            (Some("inmemory".into()), "blobdescriptor")
        );
        for empty in ["\"\"", ""] {
            let text =
                format!("storage:\n  cache:\n    layerinfo: redis\n    blobdescriptor: {empty}\n");
            assert_eq!(kind(&text, &[]), (None, "blobdescriptor"), "{text}");
        }
        // No cache section: no cache at all.
        assert_eq!(
            kind("storage:\n  filesystem: {}\n", &[]),
            (None, "layerinfo")
        );
        // The environment sets either key; the precedence stays the registry's.
        assert_eq!(
            kind(
                "storage:\n  filesystem: {}\n",
                &[("REGISTRY_STORAGE_CACHE_LAYERINFO", "redis")]
            ),
            (Some("redis".into()), "layerinfo")
        );
        assert_eq!(
            kind(
                "storage:\n  cache:\n    blobdescriptor: inmemory\n",
                &[("REGISTRY_STORAGE_CACHE_LAYERINFO", "redis")]
            ),
            (Some("inmemory".into()), "blobdescriptor")
        );
        assert_eq!(
            kind(
                "storage:\n  cache:\n    layerinfo: inmemory\n",
                &[("REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR", "redis")]
            ),
            (Some("redis".into()), "blobdescriptor")
        );
    }

    #[test]
    fn reads_where_the_registry_listens() {
        let c = parse(
            "http:\n  addr: :5000\n  prefix: /reg/\n  host: https://reg.example\n  tls:\n    certificate: /c.pem\n    key: /k.pem\n",
            env(&[("REGISTRY_HTTP_ADDR", "0.0.0.0:5443")]),
        )
        .expect("parse");
        assert_eq!(
            c.http,
            HttpConfig {
                addr: Some("0.0.0.0:5443".into()),
                net: None,
                prefix: Some("/reg/".into()),
                host: Some("https://reg.example".into()),
                tls: true,
            }
        );
        let c = parse("http:\n  net: unix\n  addr: /run/reg.sock\n", env(&[])).expect("parse");
        assert_eq!(c.http.net.as_deref(), Some("unix"));
        assert!(!c.http.tls);
    }

    #[test]
    fn string_settings_keep_the_scalar_as_written() {
        for written in [
            "0x1F", "True", "1e3", ".5", "+1", "0o17", "yes", "12345", "0.50",
        ] {
            let c = parse(
                &format!(
                    "redis:\n  addr: {written}\n  username: {written}\n  password: {written}\n  db: 0x1F\nhttp:\n  addr: {written}\n  prefix: {written}\n"
                ),
                env(&[]),
            )
            .expect("parse");
            let r = c.redis.expect("redis");
            assert_eq!(r.password.as_deref(), Some(written), "{written}");
            assert_eq!(r.username.as_deref(), Some(written), "{written}");
            assert_eq!(r.addrs, vec![written.to_string()], "{written}");
            assert_eq!(r.db, 31);
            assert_eq!(c.http.addr.as_deref(), Some(written), "{written}");
            assert_eq!(c.http.prefix.as_deref(), Some(written), "{written}");
            // v3's list form, TLS paths, and the environment (parsed as YAML, then read
            // as a string field: the text again).
            let c = parse(
                &format!("redis:\n  addrs: [{written}, b:2]\n  tls:\n    enabled: true\n    rootcas: [{written}]\n"),
                env(&[("REGISTRY_REDIS_PASSWORD", written), ("REGISTRY_REDIS_DB", "2")]),
            )
            .expect("parse");
            let r = c.redis.expect("redis");
            assert_eq!(r.addrs, vec![written.to_string(), "b:2".to_string()]);
            assert_eq!(r.password.as_deref(), Some(written), "{written}");
            assert_eq!(r.db, 2);
            let tls = r.tls.expect("tls");
            assert_eq!(tls.root_cas, vec![PathBuf::from(written)]);
        }
        // Quoted, null and empty values read as before; db must still be an integer.
        let c = parse(
            "redis:\n  addr: \"0x1F\"\n  password: ~\n  username: ''\n  db: 3\n",
            env(&[]),
        )
        .expect("parse");
        let r = c.redis.expect("redis");
        assert_eq!(r.addrs, vec!["0x1F"]);
        assert_eq!((r.password, r.username, r.db), (None, None, 3));
        // An alias to a number is its text too.
        let c = parse("x: &pw 0x1F\nredis:\n  password: *pw\n", env(&[])).expect("alias");
        assert_eq!(c.redis.expect("redis").password.as_deref(), Some("0x1F"));
    }

    #[test]
    fn broken_configs_are_errors() {
        assert!(parse("storage: [unclosed", env(&[])).is_err());
        assert!(parse("- a\n- b\n", env(&[])).is_err());
        assert!(parse("redis:\n  db: minus\n", env(&[])).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Lines of YAML the registry's configs are made of, and some that break them.
        fn config_text() -> impl Strategy<Value = String> {
            let line = proptest::sample::select(vec![
                "storage:",
                "  filesystem:",
                "    rootdirectory: /srv",
                "  s3: {bucket: b}",
                "  azure:",
                "    connectionstring: \"AccountName=a;AccountKey\"",
                "  gcs: [1, 2]",
                "  cache: {blobdescriptor: redis}",
                "redis:",
                "  addrs: [a:1, \"[::1]:2\"]",
                "  addrs: a,,b",
                "  addr: ~",
                "  db: -3",
                "  db: 99999999999999999999",
                "  tls: {enabled: yes, rootcas: [1, {x: y}]}",
                "  password: &p x",
                "  username: *p",
                "<<: {storage: 5}",
                "- item",
                "  : :",
                "\t bad indent",
                "'",
            ]);
            proptest::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
        }

        fn environment() -> impl Strategy<Value = Vec<(String, String)>> {
            let name = proptest::sample::select(vec![
                "REGISTRY_STORAGE",
                "REGISTRY_STORAGE_S3_BUCKET",
                "REGISTRY_REDIS_ADDRS",
                "REGISTRY_REDIS_DB",
                "REGISTRY__",
                "REGISTRY_",
                "REGISTRY_REDIS_TLS_ROOTCAS",
            ]);
            let value =
                proptest::sample::select(vec!["s3", "", "[1,2]", "{a: b}", "-1", "~", "gcs", ":"]);
            proptest::collection::vec((name, value), 0..4).prop_map(|v| {
                v.into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Arbitrary bytes are a config or an error, never a panic.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = parse(&String::from_utf8_lossy(&bytes), env(&[]));
            }

            /// Config-shaped text with overrides: a config or a one-line error.
            #[test]
            fn config_shaped_text_never_panics(text in config_text(), vars in environment()) {
                if let Err(e) = parse(&text, vars) {
                    prop_assert!(!e.is_empty());
                }
            }
        }
    }
}
