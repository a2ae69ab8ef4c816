use super::*;

fn load_with(env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load(&LoadOptions {
        env: Some(
            env.iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        ),
        ..LoadOptions::default()
    })
}

fn error_with(env: &[(&str, &str)]) -> String {
    load_with(env)
        .expect_err("the value must be refused")
        .to_string()
}

#[test]
fn defaults_are_posthogs() {
    let settings = load_with(&[]).expect("defaults load");
    assert_eq!(settings.database_url(), None, "embedded by default");
    assert_eq!(settings.redis_url(), None, "embedded by default");
    assert_eq!(settings.clickhouse_url(), None, "embedded by default");
    assert!(settings.kafka_brokers().expect("valid").is_empty());
    assert_eq!(settings.base_dir, PathBuf::from("."));
    assert_eq!(settings.worker_concurrency, 0);
    assert!(settings.worker_threads() >= 1);
    assert_eq!(settings.tasks_per_worker, 10);
    assert_eq!(settings.task_timeout, 30);
    assert_eq!(settings.redis_pool_min_size, 1);
    assert_eq!(settings.redis_pool_max_size, 3);
    assert_eq!(settings.schedule_lock_ttl, 60);
    assert_eq!(settings.plugins_reload_pubsub_channel, "reload-plugins");
    assert_eq!(settings.clickhouse_offline_cluster_host, "");
    assert_eq!(settings.clickhouse_database, "default");
    assert_eq!(settings.clickhouse_user, "default");
    assert_eq!(settings.clickhouse_password, "");
    assert_eq!(settings.clickhouse_ca, "");
    assert!(!settings.clickhouse_secure);
    assert_eq!(settings.kafka_consumption_topic, "events_plugin_ingestion");
    assert_eq!(settings.kafka_client_cert_b64, "");
    assert_eq!(settings.kafka_client_cert_key_b64, "");
    assert_eq!(settings.kafka_trusted_cert_b64, "");
    assert_eq!(settings.kafka_producer_max_queue_size, 20);
    assert_eq!(settings.kafka_flush_frequency_ms, 500);
    assert_eq!(settings.kafka_max_message_batch_size, 900_000);
    assert_eq!(settings.kafka_partitions_consumed_concurrently, 1);
    assert_eq!(settings.consumer_batch_size, 25_000);
    assert_eq!(settings.consumer_batch_max_bytes, 16 * 1024 * 1024);
    assert_eq!(settings.log_level, "info");
    assert_eq!(settings.log_filter().expect("valid"), "info");
    assert_eq!(settings.sentry_dsn, "");
    assert!(!settings.disable_mmdb);
    assert_eq!(settings.internal_mmdb_server_port, 0);
    assert_eq!(settings.distinct_id_lru_size, 10_000);
    assert_eq!(settings.healthcheck_max_stale_seconds, 7200);
    assert_eq!(settings.mode().expect("valid"), None);
    assert_eq!(settings.http_server_port, 6738);
    assert_eq!(settings.reload_plugin_jitter_max_ms, 60_000);
    assert_eq!(settings.external_request_timeout_ms, 10_000);
}

#[test]
fn every_variable_is_read_from_the_environment() {
    let settings = load_with(&[
        ("DATABASE_URL", "postgres://u:p@db:5432/posthog"),
        ("REDIS_URL", "redis://cache:6379/1"),
        ("BASE_DIR", "/srv/plugins"),
        ("WORKER_CONCURRENCY", "3"),
        ("TASKS_PER_WORKER", "7"),
        ("TASK_TIMEOUT", "12"),
        ("REDIS_POOL_MIN_SIZE", "2"),
        ("REDIS_POOL_MAX_SIZE", "5"),
        ("SCHEDULE_LOCK_TTL", "20"),
        ("PLUGINS_RELOAD_PUBSUB_CHANNEL", "reload-2"),
        ("CLICKHOUSE_HOST", "ch.internal"),
        ("CLICKHOUSE_OFFLINE_CLUSTER_HOST", "ch-offline"),
        ("CLICKHOUSE_DATABASE", "posthog_test"),
        ("CLICKHOUSE_USER", "writer"),
        ("CLICKHOUSE_PASSWORD", "0123"),
        ("CLICKHOUSE_CA", "/etc/hostname"),
        ("CLICKHOUSE_SECURE", "t"),
        ("KAFKA_HOSTS", "k1:9092, k2:9093"),
        ("KAFKA_CONSUMPTION_TOPIC", "events_in"),
        ("KAFKA_CLIENT_CERT_B64", "Y2VydA=="),
        ("KAFKA_CLIENT_CERT_KEY_B64", "a2V5"),
        ("KAFKA_TRUSTED_CERT_B64", "Y2E="),
        ("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "100"),
        ("KAFKA_FLUSH_FREQUENCY_MS", "50"),
        ("KAFKA_MAX_MESSAGE_BATCH_SIZE", "1000"),
        ("KAFKA_PARTITIONS_CONSUMED_CONCURRENTLY", "4"),
        ("CONSUMER_BATCH_SIZE", "500"),
        ("CONSUMER_BATCH_MAX_BYTES", "1048576"),
        ("LOG_LEVEL", "warn"),
        ("SENTRY_DSN", "https://key@sentry.example/1"),
        ("DISABLE_MMDB", "yes"),
        ("INTERNAL_MMDB_SERVER_PORT", "7000"),
        ("DISTINCT_ID_LRU_SIZE", "50"),
        ("HEALTHCHECK_MAX_STALE_SECONDS", "60"),
        ("PLUGIN_SERVER_MODE", "scheduler"),
        ("HTTP_SERVER_PORT", "0"),
    ])
    .expect("valid values load");
    assert_eq!(
        settings.database_url().as_deref(),
        Some("postgres://u:p@db:5432/posthog")
    );
    assert_eq!(
        settings.redis_url().as_deref(),
        Some("redis://cache:6379/1")
    );
    assert_eq!(settings.base_dir, PathBuf::from("/srv/plugins"));
    assert_eq!(settings.worker_threads(), 3);
    assert_eq!(settings.tasks_per_worker, 7);
    assert_eq!(settings.task_timeout(), Duration::from_secs(12));
    assert_eq!(settings.redis_pool_min_size, 2);
    assert_eq!(settings.redis_pool_max_size, 5);
    assert_eq!(settings.schedule_lock_ttl, 20);
    assert_eq!(settings.plugins_reload_pubsub_channel, "reload-2");
    assert_eq!(
        settings.clickhouse_url().as_deref(),
        Some("https://ch.internal:8443"),
        "CLICKHOUSE_SECURE picks https and 8443"
    );
    assert_eq!(settings.clickhouse_offline_cluster_host, "ch-offline");
    assert_eq!(settings.clickhouse_database, "posthog_test");
    assert_eq!(settings.clickhouse_user, "writer");
    assert_eq!(settings.clickhouse_password, "0123", "kept as text");
    assert_eq!(settings.clickhouse_ca, "/etc/hostname");
    assert!(settings.clickhouse_secure);
    assert_eq!(
        settings.kafka_brokers().expect("valid"),
        vec!["k1:9092".to_owned(), "k2:9093".to_owned()]
    );
    assert_eq!(settings.kafka_consumption_topic, "events_in");
    assert_eq!(settings.kafka_client_cert_b64, "Y2VydA==");
    assert_eq!(settings.kafka_client_cert_key_b64, "a2V5");
    assert_eq!(settings.kafka_trusted_cert_b64, "Y2E=");
    assert_eq!(settings.kafka_producer_max_queue_size, 100);
    assert_eq!(settings.kafka_flush_frequency_ms, 50);
    assert_eq!(settings.kafka_max_message_batch_size, 1000);
    assert_eq!(settings.kafka_partitions_consumed_concurrently, 4);
    assert_eq!(settings.consumer_batch_size, 500);
    assert_eq!(settings.consumer_batch_max_bytes, 1_048_576);
    assert_eq!(settings.log_filter().expect("valid"), "warn");
    assert_eq!(settings.sentry_dsn, "https://key@sentry.example/1");
    assert!(settings.disable_mmdb);
    assert_eq!(settings.internal_mmdb_server_port, 7000);
    assert_eq!(settings.distinct_id_lru_size, 50);
    assert_eq!(settings.healthcheck_max_stale(), Duration::from_secs(60));
    assert_eq!(
        settings.mode().expect("valid"),
        Some(PluginServerMode::Scheduler)
    );
    assert_eq!(settings.http_server_port, 0);
}

#[test]
fn booleans_accept_posthogs_words() {
    for word in ["y", "yes", "t", "true", "on", "1", "TRUE", "Yes"] {
        let settings = load_with(&[("DISABLE_MMDB", word)]).expect("truthy word");
        assert!(settings.disable_mmdb, "{word} is true");
    }
    for word in ["n", "no", "f", "false", "off", "0"] {
        let settings = load_with(&[("DISABLE_MMDB", word)]).expect("falsy word");
        assert!(!settings.disable_mmdb, "{word} is false");
    }
}

#[test]
fn database_and_redis_urls_can_be_built_from_parts() {
    let settings = load_with(&[
        ("POSTHOG_DB_NAME", "posthog"),
        ("POSTHOG_DB_PASSWORD", "pw"),
        ("POSTHOG_POSTGRES_HOST", "db"),
        ("POSTHOG_REDIS_HOST", "cache"),
    ])
    .expect("valid");
    assert_eq!(
        settings.database_url().as_deref(),
        Some("postgres://postgres:pw@db:5432/posthog")
    );
    assert_eq!(settings.redis_url().as_deref(), Some("redis://cache:6379"));
}

#[test]
fn clickhouse_host_takes_host_port_or_url() {
    let url = |host: &str| {
        load_with(&[("CLICKHOUSE_HOST", host)])
            .expect("valid")
            .clickhouse_url()
    };
    assert_eq!(url("localhost").as_deref(), Some("http://localhost:8123"));
    assert_eq!(
        url("127.0.0.1:18123").as_deref(),
        Some("http://127.0.0.1:18123")
    );
    assert_eq!(
        url("https://ch.example").as_deref(),
        Some("https://ch.example")
    );
}

#[test]
fn empty_env_values_mean_unset() {
    let settings = load_with(&[("TASKS_PER_WORKER", ""), ("HTTP_SERVER_PORT", "")])
        .expect("empty values fall back to defaults");
    assert_eq!(settings.tasks_per_worker, 10);
    assert_eq!(settings.http_server_port, 6738);
}

#[test]
fn a_number_that_is_not_one_names_the_variable() {
    let error = error_with(&[("WORKER_CONCURRENCY", "lots")]);
    assert!(error.starts_with("invalid WORKER_CONCURRENCY: "), "{error}");
    assert!(error.contains("lots"), "{error}");
}

#[test]
fn a_negative_or_out_of_range_number_is_refused() {
    let error = error_with(&[("TASK_TIMEOUT", "-5")]);
    assert!(error.starts_with("invalid TASK_TIMEOUT: "), "{error}");
    let error = error_with(&[("HTTP_SERVER_PORT", "70000")]);
    assert!(error.starts_with("invalid HTTP_SERVER_PORT: "), "{error}");
}

#[test]
fn settings_that_cannot_apply_are_named_when_set() {
    assert!(load_with(&[]).expect("defaults").inapplicable().is_empty());
    let settings = load_with(&[
        ("CLICKHOUSE_OFFLINE_CLUSTER_HOST", "ch-offline"),
        ("INTERNAL_MMDB_SERVER_PORT", "4000"),
        ("PISCINA_USE_ATOMICS", "false"),
    ])
    .expect("settings");
    let names: Vec<&str> = settings
        .inapplicable()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        names,
        [
            "CLICKHOUSE_OFFLINE_CLUSTER_HOST",
            "INTERNAL_MMDB_SERVER_PORT",
            "PISCINA_USE_ATOMICS / PISCINA_ATOMICS_TIMEOUT"
        ]
    );
}

#[test]
fn the_producer_queue_size_is_what_librdkafka_can_batch() {
    let error = error_with(&[("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "1000001")]);
    assert!(
        error.starts_with("invalid KAFKA_PRODUCER_MAX_QUEUE_SIZE"),
        "{error}"
    );
    let settings = load_with(&[("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "0")]).expect("settings");
    assert_eq!(settings.kafka_producer_max_queue_size, 0);
}

#[test]
fn zero_is_refused_where_it_makes_no_sense() {
    for var in [
        "TASKS_PER_WORKER",
        "TASK_TIMEOUT",
        "SCHEDULE_LOCK_TTL",
        "REDIS_POOL_MAX_SIZE",
        "KAFKA_PARTITIONS_CONSUMED_CONCURRENTLY",
        "HEALTHCHECK_MAX_STALE_SECONDS",
        "CONSUMER_BATCH_SIZE",
        "CONSUMER_BATCH_MAX_BYTES",
    ] {
        let error = error_with(&[(var, "0"), ("REDIS_POOL_MIN_SIZE", "0")]);
        assert_eq!(error, format!("invalid {var}: must be greater than 0"));
    }
}

#[test]
fn an_unknown_boolean_word_is_refused() {
    let error = error_with(&[("CLICKHOUSE_SECURE", "maybe")]);
    assert!(error.starts_with("invalid CLICKHOUSE_SECURE: "), "{error}");
    assert!(error.contains("maybe"), "{error}");
}

#[test]
fn an_unknown_mode_lists_the_valid_ones() {
    let error = error_with(&[("PLUGIN_SERVER_MODE", "everything")]);
    assert_eq!(
        error,
        "invalid PLUGIN_SERVER_MODE: unknown mode \"everything\"; valid modes: ingestion, \
         ingestion-overflow, analytics-ingestion, recordings-ingestion, async, exports, jobs, \
         scheduler (or unset for all)"
    );
}

#[test]
fn every_mode_parses_and_recordings_ingestion_is_refused() {
    for mode in PluginServerMode::ALL {
        if mode == PluginServerMode::RecordingsIngestion {
            let error = error_with(&[("PLUGIN_SERVER_MODE", mode.as_str())]);
            assert!(
                error.starts_with("invalid PLUGIN_SERVER_MODE: recordings-ingestion: ")
                    && error.contains("not supported yet"),
                "{error}"
            );
            continue;
        }
        let settings = load_with(&[("PLUGIN_SERVER_MODE", mode.as_str())]).expect("valid mode");
        assert_eq!(settings.mode().expect("valid"), Some(mode));
    }
}

#[test]
fn bad_urls_name_their_variable() {
    let cases = [
        ("DATABASE_URL", "mysql://db/posthog"),
        ("DATABASE_URL", "not a url"),
        ("REDIS_URL", "http://cache"),
        ("CLICKHOUSE_HOST", "ftp://ch"),
        ("SENTRY_DSN", "nope"),
    ];
    for (var, value) in cases {
        let error = error_with(&[(var, value)]);
        assert!(error.starts_with(&format!("invalid {var}: ")), "{error}");
    }
}

#[test]
fn other_bad_values_name_their_variable() {
    let cases = [
        ("KAFKA_HOSTS", "k1:9092,k2:notaport"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("LOG_LEVEL", "loud"),
        ("CLICKHOUSE_DATABASE", "drop table;"),
        ("CLICKHOUSE_CA", "/no/such/ca.pem"),
        ("HTTP_SERVER_HOST", "example.com"),
        ("KAFKA_CONSUMPTION_TOPIC", " "),
    ];
    for (var, value) in cases {
        let error = error_with(&[(var, value)]);
        assert!(error.starts_with(&format!("invalid {var}: ")), "{error}");
    }
    let error = error_with(&[("REDIS_POOL_MIN_SIZE", "4"), ("REDIS_POOL_MAX_SIZE", "2")]);
    assert!(
        error.starts_with("invalid REDIS_POOL_MIN_SIZE: "),
        "{error}"
    );
}

#[test]
fn errors_are_one_line() {
    let error = error_with(&[("PLUGIN_SERVER_MODE", "x")]);
    assert!(!error.contains('\n'));
}

#[test]
fn profiles_and_files_layer_under_the_environment() {
    let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("override.toml");
    std::fs::write(&file, "tasks_per_worker = 4\nlog_level = \"debug\"\n").expect("write");

    let settings = Settings::load(&LoadOptions {
        profile: Some("cluster".to_owned()),
        config_file: Some(file.clone()),
        env: Some(HashMap::from([(
            "LOG_LEVEL".to_owned(),
            "error".to_owned(),
        )])),
    })
    .expect("layers load");
    assert_eq!(
        settings.redis_url().as_deref(),
        Some("redis://127.0.0.1"),
        "the cluster profile fills PostHog's connection defaults"
    );
    assert_eq!(
        settings.tasks_per_worker, 4,
        "the file overrides the profile"
    );
    assert_eq!(
        settings.log_level, "error",
        "the environment overrides the file"
    );

    let missing = Settings::load(&LoadOptions {
        config_file: Some(dir.join("missing.toml")),
        env: Some(HashMap::new()),
        ..LoadOptions::default()
    })
    .expect_err("a missing file is an error");
    assert!(missing.to_string().contains("missing.toml"), "{missing}");

    std::fs::write(&file, "tasks_per_worker = [").expect("write");
    let broken = Settings::load(&LoadOptions {
        config_file: Some(file),
        env: Some(HashMap::new()),
        ..LoadOptions::default()
    })
    .expect_err("a broken file is an error");
    assert!(
        broken.to_string().starts_with("cannot load config file"),
        "{broken}"
    );

    let unknown = Settings::load(&LoadOptions {
        profile: Some("staging-x".to_owned()),
        env: Some(HashMap::new()),
        ..LoadOptions::default()
    })
    .expect_err("an unknown profile is an error");
    assert!(
        unknown.to_string().starts_with("unknown profile"),
        "{unknown}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_embedded_default_listens_on_loopback_and_a_deployment_everywhere() {
    let listen = |env: &[(&str, &str)]| {
        load_with(env)
            .expect("settings")
            .http_listen_addr()
            .expect("address")
            .to_string()
    };
    assert_eq!(listen(&[]), "127.0.0.1:6738", "nothing configured");
    for connection in [
        ("KAFKA_HOSTS", "kafka:9092"),
        ("DATABASE_URL", "postgres://db/posthog"),
        ("REDIS_URL", "redis://redis"),
        ("CLICKHOUSE_HOST", "clickhouse"),
    ] {
        assert_eq!(listen(&[connection]), "0.0.0.0:6738", "{connection:?}");
    }
    assert_eq!(listen(&[("HTTP_SERVER_HOST", "0.0.0.0")]), "0.0.0.0:6738");
    assert_eq!(
        listen(&[
            ("HTTP_SERVER_HOST", "127.0.0.1"),
            ("KAFKA_HOSTS", "kafka:9092")
        ]),
        "127.0.0.1:6738",
        "an explicit host wins"
    );
}

#[test]
fn plugin_vm_limits_default_to_a_budget_and_an_idle_time_and_zero_turns_them_off() {
    let settings = load_with(&[("WORKER_CONCURRENCY", "2")]).expect("defaults load");
    assert_eq!(settings.plugin_vm_memory_budget_mb, 1024);
    assert_eq!(
        settings.async_worker_threads(),
        2,
        "as many as processEvent's"
    );
    assert_eq!(settings.plugin_vm_budget_bytes(), Some(1024 * 1024 * 1024));
    let settings = load_with(&[
        ("WORKER_CONCURRENCY", "2"),
        ("ASYNC_WORKER_CONCURRENCY", "1"),
    ])
    .expect("valid");
    assert_eq!(settings.async_worker_threads(), 1);
    assert_eq!(settings.plugin_vm_idle(), Some(Duration::from_secs(3600)));

    let settings = load_with(&[
        ("PLUGIN_VM_MEMORY_BUDGET_MB", "0"),
        ("PLUGIN_VM_IDLE_TEARDOWN_SECONDS", "0"),
    ])
    .expect("zero is valid");
    assert_eq!(settings.plugin_vm_budget_bytes(), None);
    assert_eq!(settings.plugin_vm_idle(), None);
}
