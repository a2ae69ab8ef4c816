//! Spawns the actors bottom-up and wires them together; the only place that knows them all.
//!
//! Each actor gets its typed config and the addresses it sends to in its constructor. Actors
//! that hold in-flight work register for shutdown here, in start order, so that shutdown can
//! drain them in reverse: consumers first, then the workers they feed, then the writers.

use std::sync::Arc;

use actix::{Addr, Arbiter, MailboxError, Recipient};
use plugin_server_actors::Shutdown;
use plugin_server_actors::actions::{ActionHooks, ActionHooksConfig};
use plugin_server_actors::clickhouse_client::{BodyCompression, ClickHouseTarget};
use plugin_server_actors::cluster::redis_pool::RedisPoolConfig;
use plugin_server_actors::cluster::{Cluster, ClusterConfig, InstanceId};
use plugin_server_actors::definitions::{
    DefinitionConfig, DefinitionStore, DefinitionsManager, PostgresDefinitionStore,
    SqliteDefinitionStore,
};
use plugin_server_actors::event::envelope::EnvelopeLimits;
use plugin_server_actors::event::intake::EventIntake;
use plugin_server_actors::geoip::{GeoIpActor, GeoIpConfig, GeoIpHandle, GeoIpSource};
use plugin_server_actors::groups::{
    GroupConfig, GroupManager, MemoryGroupStore, PostgresGroupStore, SharedGroupStore,
    SqliteGroupStore,
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
use plugin_server_actors::persons::{
    MemoryPersonStore, PersonConfig, PersonManager, PersonMetrics, PostgresPersonStore,
    SharedPersonStore, SqlitePersonStore,
};
use plugin_server_actors::postgres::PostgresError;
use plugin_server_actors::system::health::{AwaitJoin, ProgressReporter};
use plugin_server_actors::system::health::{
    BeginShutdown, Health, HealthConfig, ReportIdle, SetReady,
};
use plugin_server_actors::system::metrics::Metrics;
use plugin_server_actors::system::stats::{ActorRegistry, ActorStats, ObservedAddr};
use plugin_server_actors::system::supervisor::{
    SpawnOptions, spawn_supervised, spawn_supervised_in,
};

use plugin_server_actors::ingest::teams::sqlite::{SqliteTeamStore, UnknownTokens, named_teams};
use plugin_server_actors::plugins::api_keys::PluginApiKeys;
use plugin_server_actors::plugins::host_services::{
    PluginHttp, PluginStorage, ServerHost, ServerHostConfig,
};
use plugin_server_actors::plugins::isolation::{WorkerCommand, WorkerIsolation};
use plugin_server_actors::plugins::job_queue::{JobQueueConfig, JobQueueStats, PluginJobQueue};
use plugin_server_actors::plugins::jobs::{
    JobStore, MemoryJobStore, PostgresJobStore, SqliteJobStore,
};
use plugin_server_actors::plugins::outputs::{PluginOutputs, ServerOutputs};
use plugin_server_actors::plugins::pool::{
    HostFactory, PluginSet, PluginVmPool, PluginVmPoolConfig,
};
use plugin_server_actors::plugins::post_ingestion::{
    PostIngestionConsumer, PostIngestionPublisher,
};
use plugin_server_actors::plugins::registry::{LoadProblem, PluginRegistry, RegistrySource};
use plugin_server_actors::plugins::reloader::{
    PluginReloader, PluginReloaderConfig, ReloadSubscriptions,
};
use plugin_server_actors::plugins::runtime::natives::PluginHost;
use plugin_server_actors::plugins::runtime::vm::VmLimits;
use plugin_server_actors::plugins::scheduler::{PluginScheduler, SchedulerConfig, SchedulerStats};
use plugin_server_actors::plugins::telemetry::{PluginTelemetry, TelemetryDestination};
use plugin_server_actors::plugins::worker::VmRetention;
use plugin_server_actors::sqlite::Sqlite;
use std::rc::Rc;

use crate::error::ServerError;
use crate::settings::{Capabilities, PluginWorkerIsolation, Settings};

/// The running actors.
pub struct Topology {
    pub metrics: Metrics,
    pub registry: Arc<ActorRegistry>,
    pub health: ObservedAddr<Health>,
    /// Cache, pub/sub, sync messages, locks and event queue: Redis when `REDIS_URL` is set.
    pub cluster: Cluster,
    /// Where HTTP capture hands events: Kafka when `KAFKA_HOSTS` is set, else the pipeline.
    pub intake: Arc<dyn EventIntake>,
    /// Capture refuses tokens without a team (embedded, `EMBEDDED_UNKNOWN_TOKENS=refuse`).
    pub known_tokens: Option<Arc<TeamManager>>,
    pub pipeline: ObservedAddr<IngestionPipeline>,
    pub writer: ObservedAddr<EventWriter>,
    /// Kept so the arbiters' threads live as long as the topology.
    _arbiters: Vec<Arbiter>,
    /// Actors to drain on shutdown, in start order (dependencies first).
    drain_order: Vec<(String, Recipient<Shutdown>)>,
    pub plugins: PluginVmPool,
    /// Taken at shutdown, after ingestion drained.
    post_ingestion: std::sync::Mutex<Option<PostIngestionConsumer>>,
    /// Stopped after ingestion drained, before the plugins are torn down.
    plugin_actors: PluginActors,
    /// What PLUGIN_SERVER_MODE asked this instance to run.
    pub capabilities: Capabilities,
}

/// What every part is started with: metrics, the actor registry, health, the cluster
/// primitives, and Postgres when `DATABASE_URL` is set.
struct Base {
    capabilities: Capabilities,
    metrics: Metrics,
    registry: Arc<ActorRegistry>,
    health: ObservedAddr<Health>,
    cluster: Cluster,
    database: Option<deadpool_postgres::Pool>,
    /// The embedded profile's SQLite database, when there is no Postgres.
    embedded: Option<Sqlite>,
    /// Actors to drain on shutdown, in start order.
    drain_order: Vec<(String, Recipient<Shutdown>)>,
}

/// The pipeline's per-batch steps, each on its store.
struct Steps {
    teams: Arc<TeamManager>,
    persons: Arc<PersonManager>,
    groups: Arc<GroupManager>,
    definitions: Option<Arc<DefinitionsManager>>,
    actions: Option<Arc<ActionHooks>>,
}

/// The plugin side: the VM pool and what runs on it besides ingestion.
struct Plugins {
    pool: PluginVmPool,
    outputs: Arc<ServerOutputs>,
    publisher: PostIngestionPublisher,
    post_ingestion: Option<PostIngestionConsumer>,
    actors: PluginActors,
}

/// The plugin actors of the design besides the pool: the reload subscriber (PubSub), and the
/// scheduler and job queue where this instance's mode runs them, with their `/_actors` views.
pub struct PluginActors {
    reloader: ObservedAddr<PluginReloader>,
    pub scheduler: Option<(ObservedAddr<PluginScheduler>, SchedulerStats)>,
    pub job_queue: Option<(ObservedAddr<PluginJobQueue>, JobQueueStats)>,
}

impl Topology {
    /// Connects the cluster primitives and starts every actor this instance runs: stores, then
    /// the writer, then plugins, then ingestion. Must be called inside an actix `System`.
    pub async fn start(settings: &Settings) -> Result<Self, ServerError> {
        let mut base = Base::start(settings).await?;
        let steps = start_steps(settings, &base).await?;
        let kafka = kafka_connection(settings);
        let writer = start_writer(settings, &mut base, kafka.as_ref()).await?;
        let plugins = start_plugin_side(settings, &base, kafka.as_ref()).await?;
        // Recordings go to Kafka's topic, or to the embedded profile's file; ClickHouse alone
        // has nowhere for them.
        let forward_recordings = kafka.is_some() || settings.clickhouse_url().is_none();
        let pipeline = start_pipeline(&base, &steps, &writer, &plugins, forward_recordings)?;
        let intake: Arc<dyn EventIntake> = match &kafka {
            Some(connection) => {
                Arc::new(KafkaIntake::new(connection, consumption_topic(settings))?)
            }
            None => Arc::new(PipelineIntake::new(pipeline.clone())),
        };
        plugins.outputs.set_intake(Arc::clone(&intake));
        let mut arbiters = Vec::new();
        if let Some(connection) = kafka {
            let consumer_metrics = ConsumerMetrics::register(&base.metrics)?;
            for role in consumer_roles(settings, &base, &connection).await? {
                let started = start_consumer(
                    settings,
                    &mut base,
                    (&connection, &consumer_metrics),
                    role,
                    &pipeline,
                )
                .await;
                arbiters.extend(started);
            }
        }
        let known_tokens = (base.embedded.is_some()
            && unknown_tokens(settings) == UnknownTokens::Refuse)
            .then(|| Arc::clone(&steps.teams));
        Ok(Self {
            metrics: base.metrics,
            registry: base.registry,
            health: base.health,
            cluster: base.cluster,
            intake,
            known_tokens,
            pipeline,
            writer,
            _arbiters: arbiters,
            drain_order: base.drain_order,
            plugins: plugins.pool,
            post_ingestion: std::sync::Mutex::new(plugins.post_ingestion),
            plugin_actors: plugins.actors,
            capabilities: base.capabilities,
        })
    }

    /// The scheduler's `/_actors` view, when this instance runs scheduled tasks.
    pub fn scheduler_stats(&self) -> Option<SchedulerStats> {
        let (_, stats) = self.plugin_actors.scheduler.as_ref()?;
        Some(stats.clone())
    }

    /// The job queue's `/_actors` view, when this instance runs plugin jobs.
    pub fn job_queue_stats(&self) -> Option<JobQueueStats> {
        let (_, stats) = self.plugin_actors.job_queue.as_ref()?;
        Some(stats.clone())
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
        self.plugin_actors.stop().await;
        let consumer = self.post_ingestion.lock().ok().and_then(|mut c| c.take());
        if let Some(consumer) = consumer {
            consumer.stop().await;
        }
        self.plugins.teardown().await;
    }
}

impl Base {
    async fn start(settings: &Settings) -> Result<Self, ServerError> {
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
        let database = match settings.database_url() {
            Some(url) => {
                let pool = plugin_server_actors::postgres::connect(&url, 10).await?;
                plugin_server_actors::postgres::check_tables(&pool).await?;
                Some(pool)
            }
            None => None,
        };
        let embedded = match database {
            Some(_) => None,
            None => Some(Sqlite::open(&embedded_database_path(settings))?),
        };
        Ok(Self {
            capabilities,
            metrics,
            registry,
            health,
            cluster,
            database,
            embedded,
            drain_order: Vec::new(),
        })
    }

    /// Lists `component` in `/_health` (as idle) before the server answers its first request,
    /// so that an operator sees every check an `ok` covers, traffic or not.
    async fn name_check(&self, component: &str) {
        let named = self
            .health
            .send(ReportIdle {
                component: component.to_owned(),
            })
            .await;
        if let Err(error) = named {
            // Health was just started and is supervised; it only misses this while restarting.
            tracing::warn!(%error, component, "check not named in /_health");
        }
    }
}

/// Teams, persons, groups, definitions and actions, each on Postgres when `DATABASE_URL` is
/// set and in the embedded SQLite database otherwise (actions only exist with a PostHog
/// database).
async fn start_steps(settings: &Settings, base: &Base) -> Result<Steps, ServerError> {
    let database = base.database.as_ref();
    let team_store: Arc<dyn TeamStore> = match (database, &base.embedded) {
        (Some(pool), _) => Arc::new(PostgresTeamStore::new(pool.clone())),
        (None, Some(embedded)) => {
            let path = &settings.plugins_config_file;
            let named = named_teams(path)?;
            let unknown = unknown_tokens(settings);
            Arc::new(SqliteTeamStore::new(embedded.clone(), &named, path, unknown).await?)
        }
        (None, None) => Arc::new(EmbeddedTeamStore::new()),
    };
    let person_store: SharedPersonStore = match (database, &base.embedded) {
        (Some(pool), _) => Arc::new(PostgresPersonStore::new(pool.clone())),
        (None, Some(embedded)) => Arc::new(SqlitePersonStore::new(embedded.clone())),
        (None, None) => Arc::new(MemoryPersonStore::new()),
    };
    let persons = PersonManager::new(
        person_store,
        PersonConfig {
            cache_size: settings.distinct_id_lru_size,
            cache_ttl: std::time::Duration::from_secs(settings.person_info_cache_ttl),
            ..PersonConfig::default()
        },
    )
    .with_metrics(PersonMetrics::register(&base.metrics)?);
    let group_store: SharedGroupStore = match (database, &base.embedded) {
        (Some(pool), _) => Arc::new(PostgresGroupStore::new(pool.clone())),
        (None, Some(embedded)) => Arc::new(SqliteGroupStore::new(embedded.clone())),
        (None, None) => Arc::new(MemoryGroupStore::new()),
    };
    let definition_store: Option<Arc<dyn DefinitionStore>> = match (database, &base.embedded) {
        (Some(pool), _) => Some(Arc::new(PostgresDefinitionStore::new(pool.clone()))),
        (None, Some(embedded)) => Some(Arc::new(SqliteDefinitionStore::new(embedded.clone()))),
        (None, None) => None,
    };
    let definitions = definition_store
        .map(|store| Arc::new(DefinitionsManager::new(store, DefinitionConfig::default())));
    let actions = match database {
        Some(pool) => Some(
            ActionHooks::start(
                pool.clone(),
                &base.cluster.pubsub,
                ActionHooksConfig {
                    site_url: settings.site_url.clone(),
                    reload_every: std::time::Duration::from_secs(300),
                    request_timeout: std::time::Duration::from_millis(
                        settings.external_request_timeout_ms,
                    ),
                },
                &base.metrics,
            )
            .await?,
        ),
        None => None,
    };
    Ok(Steps {
        teams: Arc::new(TeamManager::new(team_store, TeamCacheConfig::default())),
        persons: Arc::new(persons),
        groups: Arc::new(GroupManager::new(
            group_store,
            GroupConfig {
                cache_ttl: std::time::Duration::from_secs(settings.person_info_cache_ttl),
                ..GroupConfig::default()
            },
        )),
        definitions,
        actions,
    })
}

/// The `EventWriter` on the configured sinks, named in `/_health` and drained last.
async fn start_writer(
    settings: &Settings,
    base: &mut Base,
    kafka: Option<&KafkaConnection>,
) -> Result<ObservedAddr<EventWriter>, ServerError> {
    let sink = event_sink(settings, kafka).await?;
    let writer_config = EventWriterConfig {
        max_batch_bytes: settings.kafka_max_message_batch_size as usize,
        flush_interval: std::time::Duration::from_millis(settings.kafka_flush_frequency_ms),
        // Without Kafka, capture requests wait for their rows' write: no timer between them
        // (KAFKA_FLUSH_FREQUENCY_MS batches Kafka's consumption, which is not there).
        cut_when_free: kafka.is_none(),
        ..EventWriterConfig::default()
    };
    let writer_metrics = WriterMetrics::register(&base.metrics)?;
    let health = base.health.addr().clone();
    let writer = spawn_supervised(&base.registry, SpawnOptions::new("event_writer"), {
        move |stats| {
            let progress = ProgressReporter::new("event_writer", &health, Arc::clone(&stats));
            EventWriter::new(writer_config, sink, stats, writer_metrics, progress)
        }
    });
    base.drain_order
        .push(("event_writer".to_owned(), writer.addr().clone().recipient()));
    base.name_check("event_writer").await;
    Ok(writer)
}

/// The VM pool and its plugins, GeoIP, the post-ingestion publisher and consumer, and the
/// plugin actors (reload subscriber, scheduler, job queue).
async fn start_plugin_side(
    settings: &Settings,
    base: &Base,
    kafka: Option<&KafkaConnection>,
) -> Result<Plugins, ServerError> {
    let telemetry = telemetry_destination(settings, kafka)
        .await?
        .map(|destination| {
            PluginTelemetry::start(
                destination,
                uuid::Uuid::new_v4(),
                std::time::Duration::from_millis(settings.app_metrics_flush_frequency_ms),
            )
        });
    let outputs = Arc::new(ServerOutputs::new(base.database.clone(), telemetry));
    let geoip = GeoIpHandle::new();
    start_geoip(settings, base.database.as_ref(), &base.registry, &geoip).await?;
    let job_store: Arc<dyn JobStore> =
        match (&base.database, settings.database_url(), &base.embedded) {
            (Some(pool), Some(url), _) => Arc::new(PostgresJobStore::start(pool.clone(), url)),
            (None, _, Some(embedded)) => Arc::new(SqliteJobStore::new(embedded.clone())),
            _ => Arc::new(MemoryJobStore::new()),
        };
    let (pool, plugin_http, plugin_registry) = start_plugins(
        settings,
        base,
        geoip,
        Arc::clone(&job_store),
        outputs.clone(),
    )
    .await?;
    let actors = start_plugin_actors(
        settings,
        base,
        &pool,
        job_store,
        plugin_registry,
        outputs.clone(),
    )
    .await?;
    let publisher = PostIngestionPublisher::new(Arc::clone(&base.cluster.queue), &base.metrics)?;
    outputs.set_delivery(publisher.clone(), plugin_http);
    let post_ingestion = if base.capabilities.process_async_handlers {
        let slots = settings.worker_threads() * settings.tasks_per_worker.max(1);
        Some(
            PostIngestionConsumer::start(&base.cluster.queue, pool.clone(), slots)
                .await
                .map_err(ServerError::Redis)?,
        )
    } else {
        None
    };
    Ok(Plugins {
        pool,
        outputs,
        publisher,
        post_ingestion,
        actors,
    })
}

/// The reload subscriber always; the job queue and the scheduler where the mode runs them.
async fn start_plugin_actors(
    settings: &Settings,
    base: &Base,
    pool: &PluginVmPool,
    job_store: Arc<dyn JobStore>,
    plugin_registry: PluginRegistry,
    outputs: Arc<ServerOutputs>,
) -> Result<PluginActors, ServerError> {
    let job_queue = base.capabilities.process_plugin_jobs.then(|| {
        let config = JobQueueConfig {
            instance: base.cluster.instance.to_string(),
            concurrency: settings.worker_threads() * settings.tasks_per_worker.max(1),
            poll_interval: std::time::Duration::from_millis(settings.job_queue_poll_interval_ms),
            claim_timeout: settings.task_timeout() * 2 + std::time::Duration::from_secs(30),
            shutdown_timeout: settings.task_timeout(),
        };
        let mut view = None;
        let addr = spawn_supervised(&base.registry, SpawnOptions::new("job_queue"), |stats| {
            let queue = PluginJobQueue::new(config, job_store, pool.clone(), stats);
            view = Some(queue.stats());
            queue
        });
        view.map(|view| (addr, view))
    });
    let subscriptions = ReloadSubscriptions::subscribe(
        &base.cluster.pubsub,
        &settings.plugins_reload_pubsub_channel,
    )
    .await
    .map_err(ServerError::Redis)?;
    let reloader = spawn_supervised(&base.registry, SpawnOptions::new("pubsub"), |stats| {
        PluginReloader::new(
            PluginReloaderConfig {
                channel: settings.plugins_reload_pubsub_channel.clone(),
                jitter_max: std::time::Duration::from_millis(settings.reload_plugin_jitter_max_ms),
            },
            base.cluster.pubsub.clone(),
            subscriptions,
            plugin_registry,
            pool.clone(),
            outputs,
            stats,
        )
    });
    let scheduler = base.capabilities.plugin_scheduled_tasks.then(|| {
        let config = SchedulerConfig {
            lock_ttl: std::time::Duration::from_secs(settings.schedule_lock_ttl),
            minute: std::time::Duration::from_millis(settings.schedule_minute_ms),
            hour: std::time::Duration::from_millis(settings.schedule_hour_ms),
            day: std::time::Duration::from_millis(settings.schedule_day_ms),
        };
        let mut view = None;
        let addr = spawn_supervised(&base.registry, SpawnOptions::new("scheduler"), |stats| {
            let scheduler =
                PluginScheduler::new(config, Arc::clone(&base.cluster.locks), pool.clone(), stats);
            view = Some(scheduler.stats());
            scheduler
        });
        view.map(|view| (addr, view))
    });
    Ok(PluginActors {
        reloader,
        scheduler: scheduler.flatten(),
        job_queue: job_queue.flatten(),
    })
}

impl PluginActors {
    /// No more scheduled ticks, claimed jobs or reloads; running jobs finish first.
    async fn stop(&self) {
        let scheduler = self.scheduler.as_ref().map(|(addr, _)| addr.addr().clone());
        let job_queue = self.job_queue.as_ref().map(|(addr, _)| addr.addr().clone());
        let stops: [(&str, Option<Recipient<Shutdown>>); 3] = [
            ("scheduler", scheduler.map(Addr::recipient)),
            ("job_queue", job_queue.map(Addr::recipient)),
            ("pubsub", Some(self.reloader.addr().clone().recipient())),
        ];
        for (name, actor) in stops {
            let Some(actor) = actor else { continue };
            if let Err(error) = actor.send(Shutdown).await {
                tracing::warn!(actor = name, %error, "did not stop cleanly");
            }
        }
    }
}

/// The `IngestionPipeline` with every step this deployment has.
fn start_pipeline(
    base: &Base,
    steps: &Steps,
    writer: &ObservedAddr<EventWriter>,
    plugins: &Plugins,
    forward_recordings: bool,
) -> Result<ObservedAddr<IngestionPipeline>, ServerError> {
    let pipeline_metrics = PipelineMetrics::register(&base.metrics)?;
    let metrics = base.metrics.clone();
    Ok(spawn_supervised(
        &base.registry,
        SpawnOptions::new("ingestion_pipeline"),
        |stats| {
            let pipeline = IngestionPipeline::new(
                PipelineConfig {
                    limits: EnvelopeLimits::default(),
                    forward_recordings,
                },
                Arc::clone(&steps.teams),
                writer.clone(),
                stats,
                &metrics,
                pipeline_metrics,
            )
            .with_plugins(plugins.pool.clone())
            .with_persons(Arc::clone(&steps.persons))
            .with_groups(Arc::clone(&steps.groups))
            .with_post_ingestion(plugins.publisher.clone());
            let pipeline = match &steps.definitions {
                Some(definitions) => pipeline.with_definitions(Arc::clone(definitions)),
                None => pipeline,
            };
            match &steps.actions {
                Some(actions) => pipeline.with_actions(Arc::clone(actions)),
                None => pipeline,
            }
        },
    ))
}

/// The Kafka consumers the mode asks for: the ingestion topic (with its overflow router when
/// INGESTION_OVERFLOW_ENABLED) and the overflow topic.
async fn consumer_roles(
    settings: &Settings,
    base: &Base,
    connection: &KafkaConnection,
) -> Result<Vec<ConsumerRole>, ServerError> {
    let prefix = &settings.kafka_prefix;
    let overflow_topic = format!("{prefix}{}", settings.kafka_consumption_overflow_topic);
    let mut roles = Vec::new();
    if base.capabilities.ingestion {
        let overflow = if settings.ingestion_overflow_enabled {
            ensure_topics(connection, std::slice::from_ref(&overflow_topic)).await?;
            let rerouted = OverflowRouter::register_metric(&base.metrics)?;
            let config = OverflowConfig {
                topic: overflow_topic.clone(),
                bucket_capacity: settings.event_overflow_bucket_capacity,
                replenish_rate: settings.event_overflow_bucket_replenish_rate,
                tracked_keys: 1_000_000,
            };
            Some(Arc::new(OverflowRouter::new(connection, config, rerouted)?))
        } else {
            None
        };
        roles.push(ConsumerRole {
            actor: "kafka_consumer",
            health: "analytics-ingestion",
            topic: consumption_topic(settings),
            group: format!("{prefix}clickhouse-ingestion"),
            metrics_group: "ingestion",
            reads_overflow: false,
            overflow,
        });
    }
    if base.capabilities.ingestion_overflow {
        // Only this server's overflow producers (or PostHog's) write to it, so on a new
        // deployment it may not exist yet; reading a missing topic only logs errors.
        ensure_topics(connection, std::slice::from_ref(&overflow_topic)).await?;
        roles.push(ConsumerRole {
            actor: "kafka_overflow_consumer",
            health: "analytics-ingestion-overflow",
            topic: overflow_topic,
            group: format!("{prefix}clickhouse-ingestion-overflow"),
            metrics_group: "ingestion-overflow",
            reads_overflow: true,
            overflow: None,
        });
    }
    Ok(roles)
}

/// One `KafkaConsumer` and its batch runners, each on its own thread: the rebalance callback
/// blocks the consumer's thread until the runners have stored the in-flight batches. Returns
/// the two arbiters, which must live as long as the topology.
async fn start_consumer(
    settings: &Settings,
    base: &mut Base,
    (connection, consumer_metrics): (&KafkaConnection, &ConsumerMetrics),
    role: ConsumerRole,
    pipeline: &ObservedAddr<IngestionPipeline>,
) -> [Arbiter; 2] {
    let mut config = consumer_config(settings, connection.clone(), role.topic, role.group);
    config.metrics_group = role.metrics_group;
    config.reads_overflow = role.reads_overflow;
    let consumer_arbiter = Arbiter::new();
    let workers = Arbiter::new();
    let health = base.health.addr().clone();
    // Before readiness can turn green (the topology marks it ready after this, from the same
    // task): `/_ready` then waits until this consumer has joined its group.
    health.do_send(AwaitJoin {
        component: role.health.to_owned(),
    });
    let factory = {
        let pipeline = pipeline.clone();
        let workers = workers.handle();
        let consumer_metrics = consumer_metrics.clone();
        let overflow = role.overflow;
        move |stats: Arc<ActorStats>| {
            let progress = ProgressReporter::new(role.health, &health, Arc::clone(&stats));
            let consumer =
                KafkaConsumer::new(config, pipeline, workers, stats, consumer_metrics, progress);
            match overflow {
                Some(router) => consumer.with_overflow(router),
                None => consumer,
            }
        }
    };
    let consumer = spawn_supervised_in(
        &consumer_arbiter.handle(),
        &base.registry,
        SpawnOptions::new(role.actor),
        factory,
    );
    base.drain_order
        .push((role.actor.to_owned(), consumer.addr().clone().recipient()));
    base.name_check(role.health).await;
    [consumer_arbiter, workers]
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
/// PLUGIN_WORKER_ISOLATION as the pool takes it: worker processes are this executable, told
/// how the server logs.
fn worker_isolation(settings: &Settings) -> Result<WorkerIsolation, ServerError> {
    Ok(match settings.worker_isolation()? {
        PluginWorkerIsolation::Thread => WorkerIsolation::Thread,
        PluginWorkerIsolation::Process => {
            let env = vec![
                ("LOG_LEVEL".to_owned(), settings.log_level.clone()),
                ("LOG_FORMAT".to_owned(), settings.log_format.clone()),
            ];
            WorkerIsolation::Process(
                WorkerCommand::this_executable(env).map_err(ServerError::WorkerExecutable)?,
            )
        }
    })
}

async fn start_plugins(
    settings: &Settings,
    base: &Base,
    geoip: GeoIpHandle,
    jobs: Arc<dyn JobStore>,
    outputs: Arc<ServerOutputs>,
) -> Result<(PluginVmPool, PluginHttp, PluginRegistry), ServerError> {
    let (database, embedded) = (base.database.as_ref(), base.embedded.as_ref());
    let (cache, metrics) = (Arc::clone(&base.cluster.cache), &base.metrics);
    let source = match database {
        Some(pool) => RegistrySource::Postgres {
            pool: pool.clone(),
            base_dir: settings.base_dir.clone(),
        },
        None => RegistrySource::Directory {
            plugins_dir: settings.base_dir.join("plugins"),
            configs_file: settings.plugins_config_file.clone(),
            ids: embedded.cloned(),
        },
    };
    let mut registry = PluginRegistry::new(source);
    let (configs, problems) = registry.load().await?;
    let host_config = ServerHostConfig {
        request_timeout: std::time::Duration::from_millis(settings.external_request_timeout_ms),
        refuse_private_addresses: settings.fetch_refuse_private_addresses,
        site_url: settings.site_url.clone(),
    };
    let runtime = tokio::runtime::Handle::current();
    let http = PluginHttp::new(reqwest::Client::new(), host_config);
    let storage = match (database, embedded) {
        (Some(pool), _) => PluginStorage::Postgres(pool.clone()),
        (None, Some(embedded)) => PluginStorage::Sqlite(embedded.clone()),
        (None, None) => PluginStorage::InProcess(Arc::default()),
    };
    // posthog.api's bot keys live where PostHog's users do.
    let api_keys =
        database.map(|pool| Arc::new(PluginApiKeys::new(pool.clone(), Arc::clone(&cache))));
    let host_factory: HostFactory = Arc::new({
        let http = http.clone();
        move || {
            let host = ServerHost::new(
                runtime.clone(),
                http.clone(),
                Arc::clone(&cache),
                storage.clone(),
                geoip.clone(),
                Arc::clone(&jobs),
            );
            let host = match &api_keys {
                Some(keys) => host.with_api_keys(Arc::clone(keys)),
                None => host,
            };
            Rc::new(host) as Rc<dyn PluginHost>
        }
    });
    let config = PluginVmPoolConfig {
        workers: settings.worker_threads(),
        async_workers: settings.async_worker_threads(),
        tasks_per_worker: settings.tasks_per_worker,
        limits: VmLimits {
            task_timeout: settings.task_timeout(),
            ..VmLimits::default()
        },
        setup_retry_base: std::time::Duration::from_secs(5),
        retention: VmRetention {
            budget_bytes: settings.plugin_vm_budget_bytes(),
            idle: settings.plugin_vm_idle(),
        },
        isolation: worker_isolation(settings)?,
    };
    let pool = PluginVmPool::start(config, host_factory, outputs.clone(), metrics)?;
    tracing::info!(
        configs = configs.len(),
        failed = problems.len(),
        workers = settings.worker_threads(),
        "Plugins loaded."
    );
    if !problems.is_empty() {
        outputs.side_effects(LoadProblem::report_all(problems));
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

/// Where plugin log entries and app metrics go: ClickHouse when it is configured, else
/// PostHog's Kafka topics when events go to Kafka (for ClickHouse's Kafka-engine tables),
/// else nowhere but the server's own log (the embedded profile).
async fn telemetry_destination(
    settings: &Settings,
    kafka: Option<&KafkaConnection>,
) -> Result<Option<TelemetryDestination>, ServerError> {
    if let Some(target) = clickhouse_target(settings)? {
        return Ok(Some(TelemetryDestination::ClickHouse(Box::new(
            target.database_client(),
        ))));
    }
    let Some(connection) = kafka else {
        return Ok(None);
    };
    let prefix = &settings.kafka_prefix;
    let logs_topic = format!("{prefix}plugin_log_entries");
    let metrics_topic = format!("{prefix}clickhouse_app_metrics");
    ensure_topics(connection, &[logs_topic.clone(), metrics_topic.clone()]).await?;
    Ok(Some(TelemetryDestination::Kafka {
        producer: connection.acknowledged_producer()?,
        logs_topic,
        metrics_topic,
    }))
}

/// EMBEDDED_UNKNOWN_TOKENS (validated by the settings: `create` or `refuse`).
fn unknown_tokens(settings: &Settings) -> UnknownTokens {
    match settings.embedded_unknown_tokens.as_str() {
        "refuse" => UnknownTokens::Refuse,
        _ => UnknownTokens::Create,
    }
}

/// Where the embedded profile keeps its state: `BASE_DIR/data/plugin-server.db`.
pub fn embedded_database_path(settings: &Settings) -> std::path::PathBuf {
    settings.base_dir.join("data").join("plugin-server.db")
}

/// ClickHouse as CLICKHOUSE_* say, if CLICKHOUSE_HOST is set.
pub fn clickhouse_target(settings: &Settings) -> Result<Option<ClickHouseTarget>, ServerError> {
    let Some(url) = settings.clickhouse_url() else {
        return Ok(None);
    };
    let target = ClickHouseTarget {
        url,
        database: settings.clickhouse_database.clone(),
        user: settings.clickhouse_user.clone(),
        password: settings.clickhouse_password.clone(),
        tls: None,
        // Checked with the other settings.
        compression: BodyCompression::parse(&settings.clickhouse_compression).unwrap_or_default(),
    };
    Ok(Some(match settings.clickhouse_ca.as_str() {
        "" => target,
        ca => target.trusting_ca(std::path::Path::new(ca))?,
    }))
}

async fn clickhouse_sink(settings: &Settings) -> Result<Option<Arc<dyn EventSink>>, ServerError> {
    let Some(target) = clickhouse_target(settings)? else {
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
        producer_max_queue_size: settings.kafka_producer_max_queue_size,
        start_probe: Default::default(),
        acknowledged: Default::default(),
    })
}

/// All topic names get `KAFKA_PREFIX` (spec 1.1).
fn consumption_topic(settings: &Settings) -> String {
    format!(
        "{}{}",
        settings.kafka_prefix, settings.kafka_consumption_topic
    )
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
    config.max_batch_messages = settings.consumer_batch_size;
    config.max_batch_bytes = settings.consumer_batch_max_bytes;
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
