//! `Health`: knows whether every actor with work is making progress, and whether the server is
//! ready for traffic.
//!
//! Actors send `ReportProgress` after real work (not on a timer), each report carrying a
//! deadline: "expect my next report within this". A component whose deadline (capped by
//! `HEALTHCHECK_MAX_STALE_SECONDS`) has passed is stale; one that reported `ReportStopped` is
//! stopped. Either makes `/_health` answer 503 naming it. Readiness is separate: false until the
//! topology has started, and false again once shutdown begins, so load balancers drain first.
//!
//! Receives: `ReportProgress`, `ReportIdle`, `ReportStopped`, `ReportDegraded`, `Deregister` from
//! every actor with work;
//! `SetReady`, `BeginShutdown` from the topology; `GetHealth`, `GetReadiness` from HTTP.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message, MessageResult, Supervised};
use serde::Serialize;
use tokio::time::Instant;

use crate::system::stats::ActorStats;

// ---------------------------------------------------------------------------------------------
// Messages

/// "I did real work; expect my next report within `deadline`." The first report registers the
/// component.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReportProgress {
    pub component: String,
    pub deadline: Duration,
}

/// The component keeps working but a dependency is failing (it retries). Shown in `/_health`
/// until its next `ReportProgress`; does not fail liveness by itself, because restarting the
/// process would not bring the dependency back. If it lasts past the component's deadline,
/// the component turns stale as usual.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReportDegraded {
    pub component: String,
    pub reason: String,
}

/// The component has stopped working and will not recover by itself.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReportStopped {
    pub component: String,
    pub reason: String,
}

/// The component has no work right now: it is listed as `idle` and cannot turn stale until its
/// next `ReportProgress`. Also how a component names itself at start, before any work, so that
/// `/_health` shows every check it covers from the first request.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReportIdle {
    pub component: String,
}

/// The component has finished on purpose (its work is done): stop checking it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Deregister {
    pub component: String,
}

/// The topology has started: readiness may turn green.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct SetReady;

/// A Kafka consumer that readiness waits for: `/_ready` answers 200 only once it has joined
/// its group (see [`Joined`]). Sent by the topology before readiness can turn green.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct AwaitJoin {
    pub component: String,
}

/// The consumer joined its group (it got its partitions, possibly none).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Joined {
    pub component: String,
}

/// Shutdown has begun: readiness turns red for good.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct BeginShutdown;

#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HealthReport")]
pub struct GetHealth;

#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Readiness")]
pub struct GetReadiness;

/// The state of one check, as `/_health` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckStatus {
    Ok,
    /// Registered, with nothing to do (no traffic yet, or none lately).
    Idle,
    Stale {
        silent_for: Duration,
        deadline: Duration,
    },
    Stopped {
        reason: String,
    },
    Degraded {
        reason: String,
    },
}

impl CheckStatus {
    /// Working, or idle: nothing for an operator to look at.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok | Self::Idle)
    }

    /// Whether liveness fails: stale or stopped. Degraded components are alive.
    pub fn is_failing(&self) -> bool {
        matches!(self, Self::Stale { .. } | Self::Stopped { .. })
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("ok"),
            Self::Idle => f.write_str("idle"),
            Self::Stale {
                silent_for,
                deadline,
            } => write!(
                f,
                "stale: no progress for {}s (deadline {}s)",
                silent_for.as_secs(),
                deadline.as_secs()
            ),
            Self::Stopped { reason } => write!(f, "stopped: {reason}"),
            Self::Degraded { reason } => write!(f, "degraded: {reason}"),
        }
    }
}

impl Serialize for CheckStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The answer to `GetHealth`; serializes to PostHog's `/_health` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub checks: BTreeMap<String, CheckStatus>,
}

impl HealthReport {
    /// Liveness: no check is stale or stopped (degraded ones still count as alive).
    pub fn is_healthy(&self) -> bool {
        !self.checks.values().any(CheckStatus::is_failing)
    }

    /// `ok`, `degraded` (alive, a dependency failing) or `error`.
    pub fn status(&self) -> &'static str {
        if !self.is_healthy() {
            "error"
        } else if self.checks.values().all(CheckStatus::is_ok) {
            "ok"
        } else {
            "degraded"
        }
    }
}

impl Serialize for HealthReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("status", self.status())?;
        map.serialize_entry("checks", &self.checks)?;
        map.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Starting,
    /// Started, but a Kafka consumer has not joined its group yet.
    Joining,
    Ready,
    ShuttingDown,
}

// ---------------------------------------------------------------------------------------------
// Config and actor

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// `HEALTHCHECK_MAX_STALE_SECONDS`: no component may stay silent longer, whatever deadline
    /// it asked for.
    pub max_stale: Duration,
}

struct Component {
    last_progress: Instant,
    deadline: Duration,
    stopped: Option<String>,
    degraded: Option<String>,
    /// No work since its last report: not checked for staleness.
    idle: bool,
    /// Whether the last check found it stale, so the transition is logged once.
    reported_stale: bool,
}

impl Component {
    fn new(now: Instant, deadline: Duration) -> Self {
        Self {
            last_progress: now,
            deadline,
            stopped: None,
            degraded: None,
            idle: false,
            reported_stale: false,
        }
    }
}

pub struct Health {
    config: HealthConfig,
    stats: Arc<ActorStats>,
    components: BTreeMap<String, Component>,
    readiness: Readiness,
    /// Consumers that have not joined their group yet.
    awaiting_join: std::collections::BTreeSet<String>,
}

impl Health {
    pub fn new(config: HealthConfig, stats: Arc<ActorStats>) -> Self {
        Self {
            config,
            stats,
            components: BTreeMap::new(),
            readiness: Readiness::Starting,
            awaiting_join: std::collections::BTreeSet::new(),
        }
    }

    fn check(&mut self, now: Instant) -> HealthReport {
        let max_stale = self.config.max_stale;
        let mut checks = BTreeMap::new();
        for (name, component) in &mut self.components {
            let status = if let Some(reason) = &component.stopped {
                CheckStatus::Stopped {
                    reason: reason.clone(),
                }
            } else {
                let deadline = component.deadline.min(max_stale);
                let silent_for = now.saturating_duration_since(component.last_progress);
                if silent_for > deadline && !component.idle {
                    CheckStatus::Stale {
                        silent_for,
                        deadline,
                    }
                } else if let Some(reason) = &component.degraded {
                    CheckStatus::Degraded {
                        reason: reason.clone(),
                    }
                } else if component.idle {
                    CheckStatus::Idle
                } else {
                    CheckStatus::Ok
                }
            };
            let stale = status.is_failing();
            if stale && !component.reported_stale {
                tracing::warn!(component = %name, status = %status, "component is unhealthy");
            }
            component.reported_stale = stale;
            checks.insert(name.clone(), status);
        }
        HealthReport { checks }
    }
}

impl Actor for Health {
    type Context = Context<Self>;
}

/// Health holds no state a panic could corrupt; a restart keeps the reports it has.
impl Supervised for Health {}

impl Handler<ReportProgress> for Health {
    type Result = ();

    fn handle(&mut self, message: ReportProgress, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        let now = Instant::now();
        let component = self
            .components
            .entry(message.component)
            .or_insert_with(|| Component::new(now, message.deadline));
        component.last_progress = now;
        component.deadline = message.deadline;
        component.stopped = None;
        component.degraded = None;
        component.idle = false;
        self.stats.record_progress();
    }
}

impl Handler<ReportStopped> for Health {
    type Result = ();

    fn handle(&mut self, message: ReportStopped, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        tracing::warn!(component = %message.component, reason = %message.reason, "component stopped");
        let now = Instant::now();
        let component = self
            .components
            .entry(message.component)
            .or_insert_with(|| Component::new(now, Duration::ZERO));
        component.stopped = Some(message.reason);
    }
}

impl Handler<ReportDegraded> for Health {
    type Result = ();

    fn handle(&mut self, message: ReportDegraded, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        let Some(component) = self.components.get_mut(&message.component) else {
            // Degraded before any work was reported: register it with the longest deadline,
            // so it shows as degraded now and turns stale only if it never recovers.
            let max_stale = self.config.max_stale;
            let mut component = Component::new(Instant::now(), max_stale);
            component.degraded = Some(message.reason);
            self.components.insert(message.component, component);
            return;
        };
        if component.degraded.is_none() {
            tracing::warn!(component = %message.component, reason = %message.reason, "component degraded");
        }
        component.degraded = Some(message.reason);
    }
}

impl Handler<ReportIdle> for Health {
    type Result = ();

    fn handle(&mut self, message: ReportIdle, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        let now = Instant::now();
        let component = self
            .components
            .entry(message.component)
            .or_insert_with(|| Component::new(now, Duration::ZERO));
        // A stopped component stays stopped: idling does not bring it back.
        component.idle = true;
        component.degraded = None;
        component.reported_stale = false;
    }
}

impl Handler<Deregister> for Health {
    type Result = ();

    fn handle(&mut self, message: Deregister, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.components.remove(&message.component);
    }
}

impl Handler<SetReady> for Health {
    type Result = ();

    fn handle(&mut self, _: SetReady, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        if self.readiness == Readiness::Starting {
            self.readiness = Readiness::Ready;
        }
    }
}

impl Handler<AwaitJoin> for Health {
    type Result = ();

    fn handle(&mut self, message: AwaitJoin, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.awaiting_join.insert(message.component);
    }
}

impl Handler<Joined> for Health {
    type Result = ();

    fn handle(&mut self, message: Joined, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.awaiting_join.remove(&message.component);
    }
}

impl Handler<BeginShutdown> for Health {
    type Result = ();

    fn handle(&mut self, _: BeginShutdown, _: &mut Context<Self>) {
        let _timer = self.stats.message_received();
        self.readiness = Readiness::ShuttingDown;
    }
}

impl Handler<GetHealth> for Health {
    type Result = MessageResult<GetHealth>;

    fn handle(&mut self, _: GetHealth, _: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        MessageResult(self.check(Instant::now()))
    }
}

impl Handler<GetReadiness> for Health {
    type Result = MessageResult<GetReadiness>;

    fn handle(&mut self, _: GetReadiness, _: &mut Context<Self>) -> Self::Result {
        let _timer = self.stats.message_received();
        MessageResult(match self.readiness {
            Readiness::Ready if !self.awaiting_join.is_empty() => Readiness::Joining,
            readiness => readiness,
        })
    }
}

/// What an actor with work holds to report its progress: one `do_send` per report (control
/// traffic, never blocks the event path) plus its own stats for `/_actors`.
#[derive(Clone)]
pub struct ProgressReporter {
    component: String,
    health: actix::Recipient<ReportProgress>,
    stopped: actix::Recipient<ReportStopped>,
    degraded: actix::Recipient<ReportDegraded>,
    idle: actix::Recipient<ReportIdle>,
    joined: actix::Recipient<Joined>,
    stats: Arc<ActorStats>,
}

impl ProgressReporter {
    pub fn new(
        component: impl Into<String>,
        health: &actix::Addr<Health>,
        stats: Arc<ActorStats>,
    ) -> Self {
        Self {
            component: component.into(),
            health: health.clone().recipient(),
            stopped: health.clone().recipient(),
            degraded: health.clone().recipient(),
            idle: health.clone().recipient(),
            joined: health.clone().recipient(),
            stats,
        }
    }

    pub fn report(&self, deadline: Duration) {
        self.stats.record_progress();
        self.health.do_send(ReportProgress {
            component: self.component.clone(),
            deadline,
        });
    }

    pub fn report_stopped(&self, reason: impl Into<String>) {
        self.stopped.do_send(ReportStopped {
            component: self.component.clone(),
            reason: reason.into(),
        });
    }

    pub fn report_degraded(&self, reason: impl Into<String>) {
        self.degraded.do_send(ReportDegraded {
            component: self.component.clone(),
            reason: reason.into(),
        });
    }

    /// The consumer joined its group: readiness no longer waits for it.
    pub fn report_joined(&self) {
        self.joined.do_send(Joined {
            component: self.component.clone(),
        });
    }

    /// No work left: the component is listed as idle and cannot be stale while it has nothing
    /// to do. Components also call it once at start, so `/_health` names them before any work.
    pub fn report_idle(&self) {
        self.idle.do_send(ReportIdle {
            component: self.component.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::metrics::Metrics;
    use crate::system::stats::{ActorRegistry, ObservedAddr};
    use crate::system::supervisor::{SpawnOptions, spawn_supervised};

    fn start(max_stale: Duration) -> ObservedAddr<Health> {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
            Health::new(HealthConfig { max_stale }, stats)
        })
    }

    fn progress(component: &str, deadline_secs: u64) -> ReportProgress {
        ReportProgress {
            component: component.to_owned(),
            deadline: Duration::from_secs(deadline_secs),
        }
    }

    #[actix::test]
    async fn a_component_that_stops_reporting_turns_stale() {
        tokio::time::pause();
        let health = start(Duration::from_secs(7200));
        health.send(progress("ingestion", 30)).await.expect("sent");
        health.send(progress("scheduler", 300)).await.expect("sent");
        let report = health.send(GetHealth).await.expect("answered");
        assert!(report.is_healthy(), "{report:?}");

        tokio::time::advance(Duration::from_secs(31)).await;
        let report = health.send(GetHealth).await.expect("answered");
        assert!(!report.is_healthy());
        assert_eq!(
            report.checks["ingestion"].to_string(),
            "stale: no progress for 31s (deadline 30s)"
        );
        assert!(report.checks["scheduler"].is_ok());

        health.send(progress("ingestion", 30)).await.expect("sent");
        let report = health.send(GetHealth).await.expect("answered");
        assert!(report.is_healthy(), "progress makes it healthy again");
    }

    #[actix::test]
    async fn max_stale_caps_every_deadline() {
        tokio::time::pause();
        let health = start(Duration::from_secs(60));
        health.send(progress("jobs", 3600)).await.expect("sent");
        tokio::time::advance(Duration::from_secs(61)).await;
        let report = health.send(GetHealth).await.expect("answered");
        assert_eq!(
            report.checks["jobs"].to_string(),
            "stale: no progress for 61s (deadline 60s)"
        );
    }

    #[actix::test]
    async fn a_stopped_component_is_unhealthy_until_it_reports_again() {
        let health = start(Duration::from_secs(7200));
        health.send(progress("writer", 30)).await.expect("sent");
        health
            .send(ReportStopped {
                component: "writer".to_owned(),
                reason: "clickhouse unreachable".to_owned(),
            })
            .await
            .expect("sent");
        let report = health.send(GetHealth).await.expect("answered");
        assert_eq!(
            serde_json::to_value(&report).expect("serializes"),
            serde_json::json!({
                "status": "error",
                "checks": {"writer": "stopped: clickhouse unreachable"}
            })
        );
        health
            .send(Deregister {
                component: "writer".to_owned(),
            })
            .await
            .expect("sent");
        let report = health.send(GetHealth).await.expect("answered");
        assert_eq!(
            serde_json::to_value(&report).expect("serializes"),
            serde_json::json!({"status": "ok", "checks": {}})
        );
    }

    #[actix::test]
    async fn an_idle_component_is_named_and_never_stale() {
        tokio::time::pause();
        let health = start(Duration::from_secs(7200));
        let idle = |component: &str| ReportIdle {
            component: component.to_owned(),
        };
        health.send(idle("event_writer")).await.expect("sent");
        let report = health.send(GetHealth).await.expect("answered");
        assert_eq!(
            serde_json::to_value(&report).expect("serializes"),
            serde_json::json!({"status": "ok", "checks": {"event_writer": "idle"}})
        );
        // Work makes it checked: silent past its deadline, it is stale.
        health
            .send(progress("event_writer", 30))
            .await
            .expect("sent");
        assert_eq!(
            health.send(GetHealth).await.expect("answered").checks["event_writer"],
            CheckStatus::Ok
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!health.send(GetHealth).await.expect("answered").is_healthy());
        // Idle again (its work is done), it stays listed and healthy however long it waits.
        health.send(idle("event_writer")).await.expect("sent");
        tokio::time::advance(Duration::from_secs(10_000)).await;
        let report = health.send(GetHealth).await.expect("answered");
        assert!(report.is_healthy(), "{report:?}");
        assert_eq!(report.checks["event_writer"], CheckStatus::Idle);
    }

    #[actix::test]
    async fn readiness_waits_for_every_consumer_to_join_its_group() {
        let health = start(Duration::from_secs(7200));
        for component in ["analytics-ingestion", "analytics-ingestion-overflow"] {
            health
                .send(AwaitJoin {
                    component: component.to_owned(),
                })
                .await
                .expect("sent");
        }
        health.send(SetReady).await.expect("sent");
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::Joining
        );
        health
            .send(Joined {
                component: "analytics-ingestion".to_owned(),
            })
            .await
            .expect("sent");
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::Joining,
            "one consumer is still joining"
        );
        health
            .send(Joined {
                component: "analytics-ingestion-overflow".to_owned(),
            })
            .await
            .expect("sent");
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::Ready
        );
    }

    #[actix::test]
    async fn readiness_goes_starting_ready_shutting_down() {
        let health = start(Duration::from_secs(7200));
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::Starting
        );
        health.send(SetReady).await.expect("sent");
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::Ready
        );
        health.send(BeginShutdown).await.expect("sent");
        health.send(SetReady).await.expect("sent");
        assert_eq!(
            health.send(GetReadiness).await.expect("answered"),
            Readiness::ShuttingDown,
            "shutdown is final"
        );
    }

    #[actix::test]
    async fn the_progress_reporter_feeds_health_and_stats() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let health = spawn_supervised(&registry, SpawnOptions::new("health"), |stats| {
            Health::new(
                HealthConfig {
                    max_stale: Duration::from_secs(60),
                },
                stats,
            )
        });
        let worker_stats = registry.register("worker");
        let reporter = ProgressReporter::new("worker", health.addr(), Arc::clone(&worker_stats));
        reporter.report(Duration::from_secs(10));
        let report = health.send(GetHealth).await.expect("answered");
        assert!(report.checks["worker"].is_ok());
        assert!(worker_stats.snapshot().last_progress_unix_ms.is_some());
        reporter.report_stopped("gave up");
        let report = health.send(GetHealth).await.expect("answered");
        assert_eq!(report.checks["worker"].to_string(), "stopped: gave up");
    }
}
