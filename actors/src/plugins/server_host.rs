//! The host services plugin VMs use in the server: `fetch` over reqwest.
//!
//! VM calls block their worker thread (see `PluginHost`), so each request is driven to
//! completion on the server's tokio runtime from that thread.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::runtime::Handle;

use super::host::{FetchReply, FetchRequest, PluginHost};

#[derive(Debug, Clone)]
pub struct ServerHostConfig {
    /// EXTERNAL_REQUEST_TIMEOUT_MS: the longest a request may take, whatever the plugin asks.
    pub request_timeout: Duration,
    /// Refuse loopback, private and link-local destinations.
    pub refuse_private_addresses: bool,
}

pub struct ServerHost {
    runtime: Handle,
    client: reqwest::Client,
    config: ServerHostConfig,
}

impl ServerHost {
    pub fn new(runtime: Handle, client: reqwest::Client, config: ServerHostConfig) -> Self {
        Self {
            runtime,
            client,
            config,
        }
    }

    async fn send(&self, request: FetchRequest) -> Result<FetchReply, String> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| format!("invalid URL {:?}: {e}", request.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "only http and https URLs can be fetched, not {:?}",
                url.scheme()
            ));
        }
        if self.config.refuse_private_addresses {
            refuse_private(&url).await?;
        }
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|e| format!("invalid method: {e}"))?;
        let timeout = request.timeout.map_or(self.config.request_timeout, |t| {
            t.min(self.config.request_timeout)
        });
        let mut builder = self.client.request(method, url).timeout(timeout);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let response = builder.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let headers: BTreeMap<String, String> = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                value
                    .to_str()
                    .ok()
                    .map(|v| (name.as_str().to_string(), v.to_string()))
            })
            .collect();
        let body = response.text().await.map_err(|e| e.to_string())?;
        Ok(FetchReply {
            status: status.as_u16(),
            status_text: status.canonical_reason().unwrap_or("").to_string(),
            headers,
            body,
        })
    }
}

impl PluginHost for ServerHost {
    fn fetch(&self, request: FetchRequest) -> Result<FetchReply, String> {
        self.runtime.block_on(self.send(request))
    }
}

/// Resolves the host and refuses it if any address is internal. (A DNS answer that changes
/// between this check and the connection is not caught; this is a guard against plugins
/// probing the internal network by mistake or by config, not a hardened egress proxy.)
async fn refuse_private(url: &reqwest::Url) -> Result<(), String> {
    let host = url.host_str().ok_or("the URL has no host")?;
    let port = url.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("could not resolve {host}: {e}"))?
            .map(|a| a.ip())
            .collect(),
    };
    match addresses.into_iter().find(is_internal) {
        Some(ip) => Err(format!(
            "fetching internal addresses is not allowed ({host} is {ip})"
        )),
        None => Ok(()),
    }
}

fn is_internal(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal(&IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(&ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:4860:4860::8888"] {
            assert!(!is_internal(&ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_switch_refuses_loopback_before_connecting() {
        let host = ServerHost::new(
            Handle::current(),
            reqwest::Client::new(),
            ServerHostConfig {
                request_timeout: Duration::from_secs(1),
                refuse_private_addresses: true,
            },
        );
        let request = FetchRequest {
            url: "http://localhost:1/x".into(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            body: None,
            timeout: None,
        };
        let error = tokio::task::spawn_blocking(move || host.fetch(request))
            .await
            .expect("join");
        assert!(error.expect_err("refused").contains("not allowed"));
    }
}
