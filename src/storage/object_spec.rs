//! Where a registry keeps its blobs in object storage - the s3, gcs and azure drivers'
//! settings (bucket or container, root prefix, region, endpoint, credentials) from the
//! registry's config or a `--storage` URL - and how to build a client for them. Secrets
//! never appear in its `Debug` or in a description. It opens no connection itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

/// Which service holds the blobs: the registry's storage driver of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Service {
    #[default]
    S3,
    Gcs,
    Azure,
}

impl Service {
    /// The driver's name in config.yml.
    pub(crate) fn driver(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Gcs => "gcs",
            Service::Azure => "azure",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Gcs => "gs",
            Service::Azure => "azure",
        }
    }

    /// What to check when the service refuses the credentials.
    pub(crate) fn credentials_hint(self) -> &'static str {
        match self {
            Service::S3 => {
                "check the s3 driver's accesskey and secretkey, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            }
            Service::Gcs => {
                "check the gcs driver's keyfile or credentials, or GOOGLE_APPLICATION_CREDENTIALS"
            }
            Service::Azure => {
                "check the azure driver's accountname and accountkey, or AZURE_STORAGE_ACCOUNT_KEY"
            }
        }
    }

    pub(crate) fn bucket_word(self) -> &'static str {
        match self {
            Service::Azure => "container",
            _ => "bucket",
        }
    }
}

/// How to reach the bucket (an Azure container); secrets never leave this struct except
/// to the service.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct ObjectSpec {
    pub service: Service,
    /// The bucket, or for Azure the container.
    pub bucket: String,
    /// The driver's `rootdirectory` in the bucket, without leading or trailing `/`.
    pub prefix: String,
    /// A server other than the service's own: the s3 driver's `regionendpoint`, the azure
    /// driver's `serviceurl` (or the one its `realm` gives).
    pub endpoint: Option<String>,
    /// S3: the bucket's region.
    pub region: Option<String>,
    /// S3: path-style requests (`forcepathstyle`, the default with an endpoint).
    pub path_style: bool,
    /// Azure: the storage account (`accountname`).
    pub account: Option<String>,
    /// S3: `accesskey`.
    pub access_key: Option<String>,
    /// S3: `secretkey`; Azure: `accountkey`.
    pub secret_key: Option<String>,
    /// GCS: the service-account key file (`keyfile`).
    pub keyfile: Option<PathBuf>,
    /// GCS: the service-account key given inline (`credentials`), as JSON.
    pub key_json: Option<String>,
    /// Azure: an application's client secret (`credentials.type: client_secret`).
    pub client: Option<AzureClient>,
}

/// An Azure application's credentials; the secret goes only to Azure's token service.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AzureClient {
    pub id: String,
    pub tenant: String,
    pub secret: String,
}

impl std::fmt::Debug for ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ObjectSpec {
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `azure://account/container/prefix`
    /// (and the endpoint), for reports.
    pub(crate) fn describe(&self) -> String {
        let mut s = format!("{}://", self.service.scheme());
        if self.service == Service::Azure {
            s.push_str(self.account.as_deref().unwrap_or("-"));
            s.push('/');
        }
        s.push_str(&self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(" at ");
            s.push_str(&without_secrets(e));
        }
        s
    }

    /// Parses `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or
    /// `azure://account/container[/prefix]`, and the ` at <endpoint>` that `describe` adds.
    pub(crate) fn from_url(text: &str) -> Result<ObjectSpec, String> {
        let (url, endpoint) = match text.split_once(" at ") {
            Some((u, e)) => (u, Some(e.trim().to_string())),
            None => (text, None),
        };
        let usage = || {
            format!(
                "--storage {url}: use s3://bucket/prefix, gs://bucket/prefix or azure://account/container/prefix"
            )
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(usage)?;
        let service = match scheme {
            "s3" => Service::S3,
            "gs" | "gcs" => Service::Gcs,
            "azure" | "az" => Service::Azure,
            _ => return Err(usage()),
        };
        let mut parts = rest.splitn(if service == Service::Azure { 3 } else { 2 }, '/');
        let account = match service {
            Service::Azure => Some(
                parts
                    .next()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| format!("--storage {url}: no storage account"))?
                    .to_string(),
            ),
            _ => None,
        };
        let bucket = parts.next().unwrap_or_default();
        if bucket.is_empty() {
            return Err(format!("--storage {url}: no {}", service.bucket_word()));
        }
        Ok(ObjectSpec {
            service,
            bucket: bucket.to_string(),
            prefix: parts
                .next()
                .unwrap_or_default()
                .trim_matches('/')
                .to_string(),
            path_style: service == Service::S3 && endpoint.is_some(),
            endpoint,
            account,
            ..ObjectSpec::default()
        })
    }

    fn retry() -> RetryConfig {
        RetryConfig {
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
            ..RetryConfig::default()
        }
    }

    /// The client for this spec: the given settings over the service's usual
    /// environment credentials.
    pub(crate) fn build(&self) -> object_store::Result<Arc<dyn ObjectStore>> {
        let http = self
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        Ok(match self.service {
            Service::S3 => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&self.bucket)
                    .with_retry(Self::retry());
                if let Some(r) = &self.region {
                    b = b.with_region(r);
                }
                if let Some(e) = &self.endpoint {
                    b = b
                        .with_endpoint(e)
                        .with_allow_http(http)
                        .with_virtual_hosted_style_request(!self.path_style);
                }
                if let (Some(a), Some(s)) = (&self.access_key, &self.secret_key) {
                    b = b.with_access_key_id(a).with_secret_access_key(s);
                }
                Arc::new(b.build()?)
            }
            Service::Gcs => {
                // The default server is https; only a key file's own `gcs_base_url`
                // (a test server) can name an http one.
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&self.bucket)
                    .with_client_options(ClientOptions::new().with_allow_http(true))
                    .with_retry(Self::retry());
                if let Some(k) = &self.keyfile {
                    b = b.with_service_account_path(k.display().to_string());
                } else if let Some(j) = &self.key_json {
                    b = b.with_service_account_key(j);
                }
                Arc::new(b.build()?)
            }
            Service::Azure => {
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&self.bucket)
                    .with_retry(Self::retry());
                if let Some(a) = &self.account {
                    b = b.with_account(a);
                }
                if let Some(k) = &self.secret_key {
                    b = b.with_access_key(k);
                }
                if let Some(c) = &self.client {
                    b = b.with_client_secret_authorization(&c.id, &c.secret, &c.tenant);
                }
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone()).with_allow_http(http);
                }
                Arc::new(b.build()?)
            }
        })
    }
}

/// An endpoint URL without what may carry a secret: a query (an Azure SAS token) and
/// user information.
fn without_secrets(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_storage_urls_and_hides_the_secret() {
        let s = ObjectSpec::from_url("s3://bucket/reg/root/").expect("url");
        assert_eq!(
            (s.service, s.bucket.as_str(), s.prefix.as_str()),
            (Service::S3, "bucket", "reg/root")
        );
        let s = ObjectSpec {
            secret_key: Some("hunter2".into()),
            key_json: Some("{\"private_key\": \"hunter3\"}".into()),
            ..s
        };
        assert!(!format!("{s:?}").contains("hunter"));
        let g = ObjectSpec::from_url("gs://b").expect("gs");
        assert_eq!(
            (g.service, g.bucket.as_str(), g.prefix.as_str()),
            (Service::Gcs, "b", "")
        );
        let a = ObjectSpec::from_url("azure://acct/regs/one/two at http://127.0.0.1:1/acct")
            .expect("azure");
        assert_eq!(
            (a.account.as_deref(), a.bucket.as_str(), a.prefix.as_str()),
            (Some("acct"), "regs", "one/two")
        );
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:1/acct"));
        // What describe prints, from_url reads back.
        for spec in [s, g, a] {
            let again = ObjectSpec::from_url(&spec.describe()).expect("round trip");
            assert_eq!(
                (
                    again.service,
                    again.bucket,
                    again.prefix,
                    again.account,
                    again.endpoint
                ),
                (
                    spec.service,
                    spec.bucket,
                    spec.prefix,
                    spec.account,
                    spec.endpoint
                )
            );
        }
        let sas = ObjectSpec {
            endpoint: Some("https://u:pw@acct.blob.core.windows.net/?sv=1&sig=SECRET".into()),
            ..ObjectSpec::from_url("azure://acct/c").expect("azure")
        };
        assert_eq!(
            sas.describe(),
            "azure://acct/c at https://acct.blob.core.windows.net/"
        );
        for bad in ["http://x", "s3:///x", "azure://acct", "azure:///c", "gs://"] {
            assert!(ObjectSpec::from_url(bad).is_err(), "{bad}");
        }
    }
}
