//! Spawns the actors bottom-up and wires them together; the only place that knows them all.
//!
//! Each actor gets its typed config and the addresses it sends to in its constructor. Actors
//! that hold in-flight work register for shutdown here, in start order, so that shutdown can
//! drain them in reverse: consumers first, then the workers they feed, then the writers.

use std::sync::Arc;

use actix::{Arbiter, MailboxError, Recipient};
use plugin_server_actors::Shutdown;
use plugin_server_actors::actions::{ActionHooks, ActionHooksConfig};
use plugin_server_actors::cluster::redis_pool::RedisPoolConfig;
use plugin_server_actors::cluster::{Cluster, ClusterConfig, InstanceId};
use plugin_server_actors::definitions::{
    DefinitionConfig, DefinitionsManager, PostgresDefinitionStore,
};
use plugin_server_actors::event::envelope::EnvelopeLimits;
use plugin_server_actors::event::intake::EventIntake;
use plugin_server_actors::geoip::{GeoIpActor, GeoIpConfig, GeoIpHandle, GeoIpSource};
use plugin_server_actors::groups::{
    GroupConfig, GroupManager, MemoryGroupStore, PostgresGroupStore, SharedGroupStore,
};
use plugin_server_actors::ingest::consumer::overflow::{OverflowConfig, OverflowRouter};
use plugin_server_actors::ingest::consumer::{ConsumerMetrics, KafkaConsumer, KafkaConsumerConfig};
use plugin_server_actors::ingest::pipeline::{
    IngestionPipeline, PipelineConfig, PipelineIntake, PipelineMetrics,
};
use plugin_server_actors::ingest::sinks::{
    ClickHouseSink, EventSink, FanOutSink, JsonLinesConfig, JsonLinesSink, KafkaSink,
    KafkaSinkConfig,
};
use plugin_server_actors::ingest::teams::TeamManager;
use plugin_server_actors::ingest::teams::{
    EmbeddedTeamStore, PostgresTeamStore, TeamCacheConfig, TeamStore,
};
use plugin_server_actors::ingest::writer::{EventWriter, EventWriterConfig, WriterMetrics};
use plugin_server_actors::kafka::{KafkaConnection, KafkaIntake, ensure_topics};
use plugin_server_actors::migrations::ClickHouseTarget;
use plugin_server_actors::persons::{
    MemoryPersonStore, PersonConfig, PersonManager, PersonMetrics, PostgresPersonStore,
    SharedPersonStore,
};
use plugin_server_actors::postgres::PostgresError;
use plugin_server_actors::system::health::ProgressReporter;
use plugin_server_actors::system::health::{
    BeginShutdown, Health, HealthConfig, ReportIdle, SetReady,
};
use plugin_server_actors::system::metrics::Metrics;
use plugin_server_actors::system::stats::{ActorRegistry, ObservedAddr};
use plugin_server_actors::system::supervisor::{
    SpawnOptions, spawn_supervised, spawn_supervised_in,
};

use plugin_server_actors::cluster::cache::CacheStore;
use plugin_server_actors::plugins::host_services::{
    PluginHttp, PluginStorage, ServerHost, ServerHostConfig,
};
use plugin_server_actors::plugins::job_queue::{JobQueueConfig, PluginJobQueue};
use plugin_server_actors::plugins::jobs::{JobStore, MemoryJobStore, PostgresJobStore};
use plugin_server_actors::plugins::outputs::{PluginOutputs, ServerOutputs};
use plugin_server_actors::plugins::pool::{
    HostFactory, PluginSet, PluginVmPool, PluginVmPoolConfig,
};
use plugin_server_actors::plugins::post_ingestion::{
    PostIngestionConsumer, PostIngestionPublisher,
};
use plugin_server_actors::plugins::registry::{PluginRegistry, RegistrySource};
use plugin_server_actors::plugins::reloader::{PluginReloader, PluginReloaderConfig};
use plugin_server_actors::plugins::runtime::natives::PluginHost;
use plugin_server_actors::plugins::runtime::vm::VmLimits;
use plugin_server_actors::plugins::scheduler::{PluginScheduler, SchedulerConfig};
use plugin_server_actors::plugins::telemetry::PluginTelemetry;
use plugin_server_actors::plugins::worker::SideEffects;
use std::rc::Rc;

use crate::error::ServerError;
use crate::settings::{Capabilities, Settings};

/// The running actors.
pub struct Topology {
    pub metrics: Metrics,
    pub registry: Arc<ActorRegistry>,
    pub health: ObservedAddr<Health>,
    /// Cache, pub/sub, sync messages, locks and event queue: Redis when `REDIS_URL` is set.
    pub cluster: Cluster,
    /// Where HTTP capture hands events: Kafka when `KAFKA_HOSTS` is set, else the pipeline.
    pub intake: Arc<dyn EventIntake>,
    pub pipeline: ObservedAddr<IngestionPipeline>,
    pub writer: ObservedAddr<EventWriter>,
    /// Kept so the arbiters' threads live as long as the topology.
    _arbiters: Vec<Arbiter>,
    /// Actors to drain on shutdown, in start order (dependencies first).
    drain_order: Vec<(String, Recipient<Shutdown>)>,
    pub plugins: PluginVmPool,
    /// Taken at shutdown, after ingestion drained.
    post_ingestion: std::sync::Mutex<Option<PostIngestionConsumer>>,
    /// Reloads plugins on `reload-plugins` for as long as the topology lives.
    _reloader: PluginReloader,
    /// runEveryMinute/Hour/Day, when this instance's mode runs them.
    pub scheduler: Option<PluginScheduler>,
    /// Plugin jobs, when this instance's mode runs them.
    pub job_queue: Option<PluginJobQueue>,
    /// What PLUGIN_SERVER_MODE asked this instance to run.
    pub capabilities: Capabilities,
}

impl Topology {
    /// Connects the cluster primitives and starts every actor this instance runs. Must be
    /// called inside an actix `System`.
    pub async fn start(settings: &Settings) -> Result<Self, ServerError> {
        let capabilities = settings.capabilities()?;
        let cluster = Cluster::connect(cluster_config(settings))
            .await
            .map_err(ServerError::Redis)?;
        let metrics = Metrics::new()?;
        let registry = Arc::new(ActorRegistry::new(metrics.clone()));
        let health_config = HealthConfig {
            max_stale: settings.healthcheck_max_stale(),
        };
        let health = spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
            Health::new(health_config, stats)
        });
        let mut drain_order: Vec<(String, Recipient<Shutdown>)> = Vec::new();
        let mut arbiters = Vec::new();

        let database = match settings.database_url() {
            Some(url) => Some(plugin_server_actors::postgres::connect(&url, 10).await?),
            None => None,
        };
        let team_store: Arc<dyn TeamStore> = match &database {
            Some(pool) => Arc::new(PostgresTeamStore::new(pool.clone())),
            None => Arc::new(EmbeddedTeamStore::new()),
        };
        let teams = Arc::new(TeamManager::new(team_store, TeamCacheConfig::default()));
        let person_store: SharedPersonStore = match &database {
            Some(pool) => Arc::new(PostgresPersonStore::new(pool.clone())),
            None => Arc::new(MemoryPersonStore::new()),
        };
        let persons = Arc::new(
            PersonManager::new(
                person_store,
                PersonConfig {
                    cache_size: settings.distinct_id_lru_size,
                    cache_ttl: std::time::Duration::from_secs(settings.person_info_cache_ttl),
                    ..PersonConfig::default()
                },
            )
            .with_metrics(PersonMetrics::register(&metrics)?),
        );
        let group_store: SharedGroupStore = match &database {
            Some(pool) => Arc::new(PostgresGroupStore::new(pool.clone())),
            None => Arc::new(MemoryGroupStore::new()),
        };
        // Definitions are PostHog UI data: recorded only where there is a PostHog database.
        let definitions = database.as_ref().map(|pool| {
            Arc::new(DefinitionsManager::new(
                Arc::new(PostgresDefinitionStore::new(pool.clone())),
                DefinitionConfig::default(),
            ))
        });
        let actions = match &database {
            Some(pool) => Some(
                ActionHooks::start(
                    pool.clone(),
                    &cluster.pubsub,
                    ActionHooksConfig {
                        site_url: settings.site_url.clone(),
                        reload_every: std::time::Duration::from_secs(300),
                        request_timeout: std::time::Duration::from_millis(
                            settings.external_request_timeout_ms,
                        ),
                    },
                    &metrics,
                )
                .await?,
            ),
            None => None,
        };
        let groups = Arc::new(GroupManager::new(
            group_store,
            GroupConfig {
                cache_ttl: std::time::Duration::from_secs(settings.person_info_cache_ttl),
                ..GroupConfig::default()
            },
        ));

        let kafka = kafka_connection(settings);
        let sink = event_sink(settings, kafka.as_ref()).await?;
        let writer_config = EventWriterConfig {
            max_batch_bytes: settings.kafka_max_message_batch_size as usize,
            flush_interval: std::time::Duration::from_millis(settings.kafka_flush_frequency_ms),
            ..EventWriterConfig::default()
        };
        let writer_metrics = WriterMetrics::register(&metrics)?;
        let health_addr = health.addr().clone();
        let writer = spawn_supervised(&registry, SpawnOptions::new("event_writer"), {
            let sink = Arc::clone(&sink);
            move |stats| {
                let progress =
                    ProgressReporter::new("event_writer", &health_addr, Arc::clone(&stats));
                EventWriter::new(
                    writer_config.clone(),
                    Arc::clone(&sink),
                    stats,
                    writer_metrics.clone(),
                    progress,
                )
            }
        });
        drain_order.push(("event_writer".to_owned(), writer.addr().clone().recipient()));
        name_check(&health, "event_writer").await;

        let telemetry = clickhouse_target(settings).map(|target| {
            PluginTelemetry::start(
                target.database_client(),
                uuid::Uuid::new_v4(),
                std::time::Duration::from_millis(settings.app_metrics_flush_frequency_ms),
            )
        });
        let plugin_outputs = Arc::new(ServerOutputs::new(database.clone(), telemetry));
        let geoip = GeoIpHandle::new();
        start_geoip(settings, database.as_ref(), &registry, &geoip).await?;
        let job_store: Arc<dyn JobStore> = match (&database, settings.database_url()) {
            (Some(pool), Some(url)) => Arc::new(PostgresJobStore::start(pool.clone(), url)),
            _ => Arc::new(MemoryJobStore::new()),
        };
        let (plugins, plugin_http, plugin_registry) = start_plugins(
            settings,
            database.as_ref(),
            Arc::clone(&cluster.cache),
            geoip,
            Arc::clone(&job_store),
            &metrics,
            plugin_outputs.clone(),
        )
        .await?;
        let job_queue = capabilities.process_plugin_jobs.then(|| {
            PluginJobQueue::start(
                JobQueueConfig {
                    instance: cluster.instance.to_string(),
                    concurrency: settings.worker_threads() * settings.tasks_per_worker.max(1),
                    poll_interval: std::time::Duration::from_millis(
                        settings.job_queue_poll_interval_ms,
                    ),
                    claim_timeout: settings.task_timeout() * 2 + std::time::Duration::from_secs(30),
                },
                Arc::clone(&job_store),
                plugins.clone(),
            )
        });
        let reloader = PluginReloader::start(
            PluginReloaderConfig {
                channel: settings.plugins_reload_pubsub_channel.clone(),
                jitter_max: std::time::Duration::from_millis(settings.reload_plugin_jitter_max_ms),
            },
            &cluster.pubsub,
            plugin_registry,
            plugins.clone(),
            plugin_outputs.clone(),
        )
        .await
        .map_err(ServerError::Redis)?;
        let scheduler = capabilities.plugin_scheduled_tasks.then(|| {
            PluginScheduler::start(
                SchedulerConfig {
                    lock_ttl: std::time::Duration::from_secs(settings.schedule_lock_ttl),
                    minute: std::time::Duration::from_millis(settings.schedule_minute_ms),
                    hour: std::time::Duration::from_millis(settings.schedule_hour_ms),
                    day: std::time::Duration::from_millis(settings.schedule_day_ms),
                },
                Arc::clone(&cluster.locks),
                plugins.clone(),
            )
        });
        let publisher = PostIngestionPublisher::new(Arc::clone(&cluster.queue), &metrics)?;
        plugin_outputs.set_delivery(publisher.clone(), plugin_http);
        let post_ingestion = if capabilities.process_async_handlers {
            let slots = settings.worker_threads() * settings.tasks_per_worker.max(1);
            Some(
                PostIngestionConsumer::start(&cluster.queue, plugins.clone(), slots)
                    .await
                    .map_err(ServerError::Redis)?,
            )
        } else {
            None
        };

        let pipeline_metrics = PipelineMetrics::register(&metrics)?;
        let pipeline = spawn_supervised(&registry, SpawnOptions::new("ingestion_pipeline"), {
            let writer = writer.clone();
            let plugins = plugins.clone();
            let metrics = metrics.clone();
            move |stats| {
                let pipeline = IngestionPipeline::new(
                    PipelineConfig {
                        limits: EnvelopeLimits::default(),
                    },
                    Arc::clone(&teams),
                    writer.clone(),
                    stats,
                    &metrics,
                    pipeline_metrics.clone(),
                )
                .with_plugins(plugins.clone())
                .with_persons(Arc::clone(&persons))
                .with_groups(Arc::clone(&groups))
                .with_post_ingestion(publisher.clone());
                let pipeline = match &definitions {
                    Some(definitions) => pipeline.with_definitions(Arc::clone(definitions)),
                    None => pipeline,
                };
                match &actions {
                    Some(actions) => pipeline.with_actions(Arc::clone(actions)),
                    None => pipeline,
                }
            }
        });

        let intake: Arc<dyn EventIntake> = match &kafka {
            Some(connection) => {
                Arc::new(KafkaIntake::new(connection, consumption_topic(settings))?)
            }
            None => Arc::new(PipelineIntake::new(pipeline.clone())),
        };
        plugin_outputs.set_intake(Arc::clone(&intake));

        if let Some(connection) = kafka {
            let consumer_metrics = ConsumerMetrics::register(&metrics)?;
            let prefix = &settings.kafka_prefix;
            let mut consumers = Vec::new();
            let overflow_topic = format!("{prefix}{}", settings.kafka_consumption_overflow_topic);
            if capabilities.ingestion {
                let overflow = if settings.ingestion_overflow_enabled {
                    ensure_topics(&connection, std::slice::from_ref(&overflow_topic)).await?;
                    let rerouted = OverflowRouter::register_metric(&metrics)?;
                    let config = OverflowConfig {
                        topic: overflow_topic.clone(),
                        bucket_capacity: settings.event_overflow_bucket_capacity,
                        replenish_rate: settings.event_overflow_bucket_replenish_rate,
                        tracked_keys: 1_000_000,
                    };
                    Some(Arc::new(OverflowRouter::new(
                        &connection,
                        config,
                        rerouted,
                    )?))
                } else {
                    None
                };
                consumers.push(ConsumerRole {
                    actor: "kafka_consumer",
                    health: "analytics-ingestion",
                    topic: consumption_topic(settings),
                    group: format!("{prefix}clickhouse-ingestion"),
                    metrics_group: "ingestion",
                    reads_overflow: false,
                    overflow,
                });
            }
            if capabilities.ingestion_overflow {
                let topic = overflow_topic;
                // Only this server's overflow producers (or PostHog's) write to it, so on a new
                // deployment it may not exist yet; reading a missing topic only logs errors.
                ensure_topics(&connection, std::slice::from_ref(&topic)).await?;
                consumers.push(ConsumerRole {
                    actor: "kafka_overflow_consumer",
                    health: "analytics-ingestion-overflow",
                    topic,
                    group: format!("{prefix}clickhouse-ingestion-overflow"),
                    metrics_group: "ingestion-overflow",
                    reads_overflow: true,
                    overflow: None,
                });
            }
            for role in consumers {
                let mut config =
                    consumer_config(settings, connection.clone(), role.topic, role.group);
                config.metrics_group = role.metrics_group;
                config.reads_overflow = role.reads_overflow;
                let overflow = role.overflow;
                // Consumer and batch runners on their own threads: the rebalance callback
                // blocks the consumer's thread until the runners have stored the in-flight
                // batches.
                let consumer_arbiter = Arbiter::new();
                let workers = Arbiter::new();
                let health_addr = health.addr().clone();
                let consumer = spawn_supervised_in(
                    &consumer_arbiter.handle(),
                    &registry,
                    SpawnOptions::new(role.actor),
                    {
                        let pipeline = pipeline.clone();
                        let workers = workers.handle();
                        let consumer_metrics = consumer_metrics.clone();
                        move |stats| {
                            let progress = ProgressReporter::new(
                                role.health,
                                &health_addr,
                                Arc::clone(&stats),
                            );
                            let consumer = KafkaConsumer::new(
                                config.clone(),
                                pipeline.clone(),
                                workers.clone(),
                                stats,
                                consumer_metrics.clone(),
                                progress,
                            );
                            match &overflow {
                                Some(router) => consumer.with_overflow(Arc::clone(router)),
                                None => consumer,
                            }
                        }
                    },
                );
                drain_order.push((role.actor.to_owned(), consumer.addr().clone().recipient()));
                name_check(&health, role.health).await;
                arbiters.push(consumer_arbiter);
                arbiters.push(workers);
            }
        }

        Ok(Self {
            metrics,
            registry,
            health,
            cluster,
            intake,
            pipeline,
            writer,
            _arbiters: arbiters,
            drain_order,
            plugins,
            post_ingestion: std::sync::Mutex::new(post_ingestion),
            _reloader: reloader,
            scheduler,
            job_queue,
            capabilities,
        })
    }

    /// Adds an actor to the shutdown sequence; actors added later are drained earlier.
    pub fn drain_on_shutdown(&mut self, name: impl Into<String>, actor: Recipient<Shutdown>) {
        self.drain_order.push((name.into(), actor));
    }

    /// Readiness turns green.
    pub fn mark_ready(&self) {
        self.health.do_send(SetReady);
    }

    /// Readiness turns red, then every registered actor drains, last started first.
    pub async fn shutdown(&self) {
        if let Err(error) = self.health.send(BeginShutdown).await {
            tracing::warn!(%error, "health did not take the shutdown notice");
        }
        for (name, actor) in self.drain_order.iter().rev() {
            tracing::info!(actor = %name, "draining");
            match actor.send(Shutdown).await {
                Ok(()) => tracing::info!(actor = %name, "drained"),
                Err(MailboxError::Closed) => tracing::warn!(actor = %name, "already stopped"),
                Err(MailboxError::Timeout) => tracing::warn!(actor = %name, "drain timed out"),
            }
        }
        // Ingestion has stopped: no more scheduled ticks, finish the post-ingestion work in
        // flight, export every buffer, then run teardownPlugin everywhere.
        if let Some(scheduler) = &self.scheduler {
            scheduler.stop();
        }
        if let Some(job_queue) = &self.job_queue {
            job_queue.stop();
        }
        let consumer = self.post_ingestion.lock().ok().and_then(|mut c| c.take());
        if let Some(consumer) = consumer {
            consumer.stop().await;
        }
        self.plugins.teardown().await;
    }
}

/// GeoIP for `meta.geoip`: the MaxMind City file at MMDB_FILE_LOCATION (reloaded when it
/// changes), else PostHog's Brotli-compressed `@posthog/mmdb` attachment in Postgres. Loaded off
/// the actor thread; lookups go straight to `handle` from the VM threads. With DISABLE_MMDB or
/// neither source, every lookup answers null.
async fn start_geoip(
    settings: &Settings,
    database: Option<&deadpool_postgres::Pool>,
    registry: &ActorRegistry,
    handle: &GeoIpHandle,
) -> Result<(), ServerError> {
    if settings.disable_mmdb {
        tracing::info!("DISABLE_MMDB is set: meta.geoip.locate answers null.");
        return Ok(());
    }
    let source = if !settings.mmdb_file_location.is_empty() {
        GeoIpSource::File(std::path::PathBuf::from(&settings.mmdb_file_location))
    } else if let Some(pool) = database {
        match mmdb_attachment(pool).await? {
            Some(compressed) => GeoIpSource::Brotli(compressed),
            None => {
                tracing::info!(
                    "No MMDB_FILE_LOCATION and no @posthog/mmdb attachment: meta.geoip.locate answers null."
                );
                return Ok(());
            }
        }
    } else {
        tracing::info!("MMDB_FILE_LOCATION is not set: meta.geoip.locate answers null.");
        return Ok(());
    };
    let handle = handle.clone();
    spawn_supervised(registry, SpawnOptions::new("geoip"), move |_| {
        GeoIpActor::new(
            GeoIpConfig {
                source,
                disabled: false,
                reload_check_interval: std::time::Duration::from_secs(60),
            },
            handle,
        )
    });
    Ok(())
}

/// PostHog's GeoIP database row: the largest global `@posthog/mmdb` attachment.
async fn mmdb_attachment(pool: &deadpool_postgres::Pool) -> Result<Option<Vec<u8>>, ServerError> {
    let client = pool.get().await.map_err(PostgresError::Connect)?;
    let row = client
        .query_opt(
            "SELECT contents FROM posthog_pluginattachment \
             WHERE key = '@posthog/mmdb' AND plugin_config_id IS NULL AND team_id IS NULL \
             ORDER BY file_size DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(PostgresError::Query)?;
    Ok(row.map(|row| row.get(0)))
}

/// Loads every active plugin config (Postgres when DATABASE_URL is set, else
/// `BASE_DIR/plugins` with `plugins_config_file`) and starts the VM pool that runs them.
/// A plugin that cannot be loaded is recorded and skipped; the others run.
async fn start_plugins(
    settings: &Settings,
    database: Option<&deadpool_postgres::Pool>,
    cache: Arc<dyn CacheStore>,
    geoip: GeoIpHandle,
    jobs: Arc<dyn JobStore>,
    metrics: &Metrics,
    outputs: Arc<ServerOutputs>,
) -> Result<(PluginVmPool, PluginHttp, PluginRegistry), ServerError> {
    let source = match database {
        Some(pool) => RegistrySource::Postgres {
            pool: pool.clone(),
            base_dir: settings.base_dir.clone(),
        },
        None => RegistrySource::Directory {
            plugins_dir: settings.base_dir.join("plugins"),
            configs_file: settings.plugins_config_file.clone(),
        },
    };
    let mut registry = PluginRegistry::new(source);
    let (configs, problems) = registry.load().await?;
    let host_config = ServerHostConfig {
        request_timeout: std::time::Duration::from_millis(settings.external_request_timeout_ms),
        refuse_private_addresses: settings.fetch_refuse_private_addresses,
    };
    let runtime = tokio::runtime::Handle::current();
    let http = PluginHttp::new(reqwest::Client::new(), host_config);
    let storage = match database {
        Some(pool) => PluginStorage::Postgres(pool.clone()),
        None => PluginStorage::InProcess(Arc::default()),
    };
    let host_factory: HostFactory = Arc::new({
        let http = http.clone();
        move || {
            Rc::new(ServerHost::new(
                runtime.clone(),
                http.clone(),
                Arc::clone(&cache),
                storage.clone(),
                geoip.clone(),
                Arc::clone(&jobs),
            )) as Rc<dyn PluginHost>
        }
    });
    let config = PluginVmPoolConfig {
        workers: settings.worker_threads(),
        tasks_per_worker: settings.tasks_per_worker,
        limits: VmLimits {
            task_timeout: settings.task_timeout(),
            ..VmLimits::default()
        },
        setup_retry_base: std::time::Duration::from_secs(5),
    };
    let pool = PluginVmPool::start(config, host_factory, outputs.clone(), metrics)?;
    tracing::info!(
        configs = configs.len(),
        failed = problems.len(),
        workers = settings.worker_threads(),
        "Plugins loaded."
    );
    if !problems.is_empty() {
        let mut side = SideEffects::default();
        for problem in problems {
            tracing::error!(plugin_config_id = problem.identity.plugin_config_id, plugin = %problem.identity.plugin_name, error = %problem.message, "A plugin could not be loaded; its config is skipped.");
            side.config_errors.push((problem.identity, problem.message));
        }
        outputs.side_effects(side);
    }
    pool.set_plugins(PluginSet::new(configs));
    Ok((pool, http, registry))
}

/// Where rows go:
/// - ClickHouse when `CLICKHOUSE_HOST` is set (checked with a query now, so a wrong host stops
///   startup);
/// - with Kafka, dead letters also go to the DLQ topic, and event rows and warnings to PostHog's
///   topics when ClickHouse is not set (PostHog's own way) or KAFKA_PRODUCE_CLICKHOUSE_ROWS;
/// - with neither, JSON-lines files under `BASE_DIR/data`.
async fn event_sink(
    settings: &Settings,
    kafka: Option<&KafkaConnection>,
) -> Result<Arc<dyn EventSink>, ServerError> {
    let clickhouse = clickhouse_sink(settings).await?;
    let Some(connection) = kafka else {
        return Ok(match clickhouse {
            Some(sink) => sink,
            None => Arc::new(JsonLinesSink::open(&JsonLinesConfig::under(
                &settings.base_dir,
            ))?),
        });
    };
    let prefix = &settings.kafka_prefix;
    let rows_to_kafka = clickhouse.is_none() || settings.kafka_produce_clickhouse_rows;
    let config = KafkaSinkConfig {
        dead_letter_topic: format!("{prefix}events_plugin_ingestion_dlq"),
        events_json_topic: rows_to_kafka
            .then(|| format!("{prefix}{}", settings.clickhouse_json_events_kafka_topic)),
        warnings_topic: rows_to_kafka.then(|| format!("{prefix}clickhouse_ingestion_warnings")),
        persons_topic: rows_to_kafka.then(|| format!("{prefix}clickhouse_person")),
        person_distinct_ids_topic: rows_to_kafka
            .then(|| format!("{prefix}clickhouse_person_distinct_id")),
        groups_topic: rows_to_kafka.then(|| format!("{prefix}clickhouse_groups")),
        recordings_topic: format!("{prefix}session_recording_events"),
    };
    let topics: Vec<String> = std::iter::once(config.dead_letter_topic.clone())
        .chain(config.events_json_topic.clone())
        .chain(config.warnings_topic.clone())
        .chain(config.persons_topic.clone())
        .chain(config.person_distinct_ids_topic.clone())
        .chain(config.groups_topic.clone())
        .chain(std::iter::once(config.recordings_topic.clone()))
        .collect();
    ensure_topics(connection, &topics).await?;
    let kafka_sink: Arc<dyn EventSink> = Arc::new(KafkaSink::new(connection, config)?);
    Ok(match clickhouse {
        Some(clickhouse) => Arc::new(FanOutSink::new(vec![clickhouse, kafka_sink])),
        None => kafka_sink,
    })
}

fn clickhouse_target(settings: &Settings) -> Option<ClickHouseTarget> {
    Some(ClickHouseTarget {
        url: settings.clickhouse_url()?,
        database: settings.clickhouse_database.clone(),
        user: settings.clickhouse_user.clone(),
        password: settings.clickhouse_password.clone(),
    })
}

async fn clickhouse_sink(settings: &Settings) -> Result<Option<Arc<dyn EventSink>>, ServerError> {
    let Some(target) = clickhouse_target(settings) else {
        return Ok(None);
    };
    target
        .database_client()
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .map_err(ServerError::ClickHouse)?;
    Ok(Some(Arc::new(ClickHouseSink::new(&target))))
}

fn kafka_connection(settings: &Settings) -> Option<KafkaConnection> {
    if settings.kafka_hosts.trim().is_empty() {
        return None;
    }
    Some(KafkaConnection {
        brokers: settings.kafka_hosts.clone(),
        security_protocol: settings.kafka_security_protocol.clone(),
        sasl_mechanism: settings.kafka_sasl_mechanism.clone(),
        sasl_user: settings.kafka_sasl_user.clone(),
        sasl_password: settings.kafka_sasl_password.clone(),
        client_cert_b64: settings.kafka_client_cert_b64.clone(),
        client_cert_key_b64: settings.kafka_client_cert_key_b64.clone(),
        trusted_cert_b64: settings.kafka_trusted_cert_b64.clone(),
    })
}

/// All topic names get `KAFKA_PREFIX` (spec 1.1).
fn consumption_topic(settings: &Settings) -> String {
    format!(
        "{}{}",
        settings.kafka_prefix, settings.kafka_consumption_topic
    )
}

/// Lists `component` in `/_health` (as idle) before the server answers its first request, so
/// that an operator sees every check an `ok` covers, traffic or not.
async fn name_check(health: &ObservedAddr<Health>, component: &str) {
    let named = health
        .send(ReportIdle {
            component: component.to_owned(),
        })
        .await;
    if let Err(error) = named {
        // Health was just started and is supervised; it only misses this while restarting.
        tracing::warn!(%error, component, "check not named in /_health");
    }
}

/// One Kafka consumer the mode asks for: the ingestion topic or its overflow.
struct ConsumerRole {
    actor: &'static str,
    /// Its name in `/_health`.
    health: &'static str,
    topic: String,
    group: String,
    metrics_group: &'static str,
    /// Its topic is the overflow topic.
    reads_overflow: bool,
    /// Reroutes hot keys away from it (INGESTION_OVERFLOW_ENABLED, main topic only).
    overflow: Option<Arc<OverflowRouter>>,
}

fn consumer_config(
    settings: &Settings,
    connection: KafkaConnection,
    topic: String,
    group: String,
) -> KafkaConsumerConfig {
    let mut config = KafkaConsumerConfig::new(connection, topic, group);
    // One batch per partition consumed concurrently, plus one being read.
    config.max_in_flight_batches = settings.kafka_partitions_consumed_concurrently as usize + 1;
    config.session_timeout = std::time::Duration::from_millis(settings.kafka_session_timeout_ms);
    config
}

/// The cluster primitives' settings: Redis when a URL is configured, in-process otherwise.
fn cluster_config(settings: &Settings) -> ClusterConfig {
    ClusterConfig {
        redis: settings.redis_url().map(|url| RedisPoolConfig {
            url,
            min_size: settings.redis_pool_min_size,
            max_size: settings.redis_pool_max_size,
        }),
        prefix: settings.cluster_prefix.clone(),
        instance: InstanceId::generate(),
    }
}
