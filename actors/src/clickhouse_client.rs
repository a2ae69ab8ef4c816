//! Where, as whom and how to reach ClickHouse: its HTTP(S) URL, database and user, and which
//! certificate authorities an HTTPS connection trusts.
//!
//! By default the `clickhouse` crate's own client, trusting the Web PKI roots. With
//! `CLICKHOUSE_CA` the CA in that file is trusted instead, as PostHog passes it to Node's TLS
//! as `ca`, which replaces the default roots: a ClickHouse behind a private CA, and nothing
//! else, is accepted. That client is built the way the crate builds its own (HTTP/1, TCP
//! keepalive 60 s, idle connections dropped after 2 s, under ClickHouse's 3 s keep-alive).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Where and as whom to reach ClickHouse.
#[derive(Debug, Clone)]
pub struct ClickHouseTarget {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    /// The TLS configuration trusting `CLICKHOUSE_CA`; `None` trusts the Web PKI roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub compression: BodyCompression,
}

/// Whether bodies to and from ClickHouse are compressed (`CLICKHOUSE_COMPRESSION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BodyCompression {
    /// LZ4 unless ClickHouse is reached over loopback. Compressing trades CPU on both ends for
    /// bytes on the network, and over loopback there is no network: it was 3.4 % of the
    /// server's CPU per event in bench/results/core-path.md, with ClickHouse on the same host.
    #[default]
    Auto,
    Lz4,
    None,
}

impl BodyCompression {
    /// The setting's values, as the settings check lists them.
    pub const NAMES: [&'static str; 3] = ["auto", "lz4", "none"];

    /// One of [`Self::NAMES`] (any case; empty is `auto`); `None` for anything else.
    pub fn parse(setting: &str) -> Option<Self> {
        match setting.to_ascii_lowercase().as_str() {
            "auto" | "" => Some(Self::Auto),
            "lz4" => Some(Self::Lz4),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Whether `url` names this host by a loopback address or `localhost`.
fn is_loopback(url: &str) -> bool {
    match url::Url::parse(url).ok().as_ref().and_then(url::Url::host) {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseTlsError {
    #[error("CLICKHOUSE_CA {}: cannot read a PEM certificate: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CLICKHOUSE_CA {}: no certificate in the file", path.display())]
    Empty { path: PathBuf },
    #[error("CLICKHOUSE_CA {}: certificate refused: {source}", path.display())]
    Refused {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

impl ClickHouseTarget {
    /// HTTPS connections trust the CA certificates in the PEM file at `path`, and only them.
    pub fn trusting_ca(mut self, path: &Path) -> Result<Self, ClickHouseTlsError> {
        self.tls = Some(Arc::new(tls_trusting(path)?));
        Ok(self)
    }

    /// Whether this target's bodies are compressed.
    pub fn compresses(&self) -> bool {
        match self.compression {
            BodyCompression::Auto => !is_loopback(&self.url),
            BodyCompression::Lz4 => true,
            BodyCompression::None => false,
        }
    }

    /// A client without a default database, for `CREATE DATABASE`.
    pub fn server_client(&self) -> clickhouse::Client {
        let client = match &self.tls {
            None => clickhouse::Client::default(),
            // Built here: its body type is one the crate keeps private, left to inference.
            Some(tls) => clickhouse::Client::with_http_client(
                HyperClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(2))
                    .build(https_connector(tls)),
            ),
        };
        // Validation off: it needs `RowBinaryWithNamesAndTypes` and settings that older
        // servers (such as the 18.16 in Debian) reject; RowBinary works everywhere.
        client
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_validation(false)
            .with_compression(if self.compresses() {
                clickhouse::Compression::Lz4
            } else {
                clickhouse::Compression::None
            })
    }

    pub fn database_client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }
}

fn tls_trusting(path: &Path) -> Result<rustls::ClientConfig, ClickHouseTlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| ClickHouseTlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(ClickHouseTlsError::Empty {
            path: path.to_owned(),
        });
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots
            .add(certificate)
            .map_err(|source| ClickHouseTlsError::Refused {
                path: path.to_owned(),
                source,
            })?;
    }
    // The provider named here rather than the process default, so a client built before
    // `main` installs it (tests, tools) works the same.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| ClickHouseTlsError::Refused {
        path: path.to_owned(),
        source,
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

/// The connector of the `clickhouse` crate's own client, with `tls` for HTTPS.
fn https_connector(tls: &rustls::ClientConfig) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut connector = HttpConnector::new();
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ClickHouseTarget {
        ClickHouseTarget {
            url: "https://127.0.0.1:8443".to_owned(),
            database: "default".to_owned(),
            user: "default".to_owned(),
            password: String::new(),
            tls: None,
            compression: BodyCompression::Auto,
        }
    }

    #[test]
    fn bodies_are_compressed_unless_clickhouse_is_on_this_host() {
        let at = |url: &str, compression| ClickHouseTarget {
            url: url.to_owned(),
            compression,
            ..target()
        };
        for url in [
            "http://127.0.0.1:8123",
            "http://127.3.2.1:8123",
            "http://localhost:8123",
            "https://LOCALHOST:8443",
            "http://[::1]:8123",
        ] {
            assert!(!at(url, BodyCompression::Auto).compresses(), "{url}");
            assert!(at(url, BodyCompression::Lz4).compresses(), "{url}");
        }
        for url in [
            "http://10.0.0.5:8123",
            "https://clickhouse.example.com:8443",
            "http://[2001:db8::1]:8123",
            "not a url",
        ] {
            assert!(at(url, BodyCompression::Auto).compresses(), "{url}");
            assert!(!at(url, BodyCompression::None).compresses(), "{url}");
        }
        assert_eq!(BodyCompression::parse("LZ4"), Some(BodyCompression::Lz4));
        assert_eq!(BodyCompression::parse(""), Some(BodyCompression::Auto));
        assert_eq!(BodyCompression::parse("zstd"), None);
    }

    #[test]
    fn a_file_without_a_certificate_names_the_setting_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let error = target().trusting_ca(&path).expect_err("no certificate");
        assert_eq!(
            error.to_string(),
            format!(
                "CLICKHOUSE_CA {}: no certificate in the file",
                path.display()
            )
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let error = target()
            .trusting_ca(Path::new("/no/such/ca.pem"))
            .expect_err("missing");
        assert!(
            error
                .to_string()
                .starts_with("CLICKHOUSE_CA /no/such/ca.pem: cannot read"),
            "{error}"
        );
    }
}
