//! `CLICKHOUSE_CA` (issue 25): a ClickHouse serving HTTPS with a certificate from a private
//! CA is reached with `CLICKHOUSE_SECURE` and `CLICKHOUSE_CA`, by `--migrate` and by the
//! running server, and refused without the CA with the certificate problem named.

use crate::common::{postgres_server_url, run_binary};
use crate::ingestion::{Deployment, good_events, produce, wait_for};
use crate::private_stores::{PrivateStore, TestCertificates};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_over_https_with_a_private_ca_is_trusted_only_with_clickhouse_ca() {
    let tls = TestCertificates::create();
    let clickhouse = PrivateStore::start_clickhouse_https(&tls).await;
    // The test's own queries go over plain HTTP; the server's over HTTPS.
    let deployment = Deployment::create_on(&postgres_server_url(), &clickhouse.url()).await;
    let over_https = |ca: Option<&str>| {
        let mut env = deployment.env_pairs();
        env.push(("CLICKHOUSE_HOST", clickhouse.https_url()));
        env.push(("CLICKHOUSE_SECURE", "true".to_owned()));
        if let Some(ca) = ca {
            env.push(("CLICKHOUSE_CA", ca.to_owned()));
        }
        env
    };
    let migrate = |env: &[(&'static str, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_binary(&["--migrate"], &env)
    };

    let refused = migrate(&over_https(None));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "trusted without the CA: {stderr}"
    );
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    let ca = tls.ca.to_str().expect("utf-8 path");
    let migrated = migrate(&over_https(Some(ca)));
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let overrides = over_https(Some(ca)).split_off(deployment.env_pairs().len());
    let (_server, _) = deployment.start_server_with(&overrides);
    produce(
        &deployment.topic(),
        &good_events(&deployment.token, 50, "https"),
    )
    .await;
    wait_for("the events stored over HTTPS", async || {
        (deployment.counts().await.1 == 50).then_some(())
    })
    .await;
    deployment.teardown().await;
}
