//! `IngestionPipeline`: raw messages in, stored rows out (spec 1.3, in PostHog's order).
//!
//! For each batch: parse every envelope; find each event's team (one lookup per distinct token
//! or team id, cached); run the team's plugin chain on the event as it arrived (it passes
//! through unchanged when the team has no plugins); normalize it (`$set`/`$set_once` merged,
//! campaign and `$initial_*` person properties); parse timestamps and check uuids; resolve persons
//! (identify, alias, merges, `$set`/`$set_once`/`$unset`); build the rows; then hand rows,
//! person changes, dead letters and warnings to the `EventWriter` in one `WriteRows` and reply
//! once it has stored them. Bad events never fail the batch: they
//! are counted by reason, logged once per batch, and dead-lettered with their raw payload. A
//! batch fails only when a dependency is unavailable (team store, writer), so that the caller
//! retries it instead of losing events, as PostHog's `DependencyUnavailableError` does.
//!
//! The CPU-heavy steps run on tokio's blocking pool, so batches from several partitions use
//! every core while this actor's own thread stays free to accept more.
//!
//! Receives: `IngestBatch` from the Kafka consumer and from HTTP capture (embedded profile).

use std::borrow::Cow;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;
use lru::LruCache;
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::actions::ActionHooks;
use crate::definitions::DefinitionsManager;
use crate::event::PluginEvent;
use crate::event::envelope::normalize_event;
use crate::event::envelope::{EnvelopeLimits, parse_envelope};
use crate::event::{DeadLetter, DropReason, PipelineEvent, StampedEvent, Team};
use crate::groups::{EventGroups, GroupManager, GroupOutcome, GroupStoreError};
use crate::ingest::order::{BatchTurn, OrderKey};
use crate::ingest::payloads::Payloads;
use crate::ingest::prepare::{RowPerson, build_row, dead_letter_for_event, stamp_event};
use crate::ingest::sinks::{RecordingMessage, WriteBatch};
use crate::ingest::teams::TeamManager;
use crate::ingest::teams::TeamStoreError;
use crate::ingest::writer::{EventWriter, WriteError, WriteRows};
use crate::persons::{
    MergeIntent, PersonError, PersonEvent, PersonManager, PersonOutcome, PersonStoreError,
    merge_intent, person_updates,
};
use crate::plugins::chain::{ChainEvent, ChainOutput, LABEL_KEYS};
use crate::plugins::pool::PluginVmPool;
use crate::plugins::post_ingestion::{FollowUp, PostIngestionPublisher};
use crate::system::metrics::{Metrics, MetricsError};
use crate::system::stats::{ActorStats, ObservedAddr};

// ---------------------------------------------------------------------------------------------
// Messages

/// Ingest these messages (each a spec 1.1 envelope); the reply comes once every resulting row
/// is stored.
#[derive(Debug, Message)]
#[rtype(result = "Result<BatchOutcome, PipelineError>")]
pub struct IngestBatch {
    /// Shared so that a caller can retry the same batch without copying it.
    pub messages: Arc<Payloads>,
    /// The messages were rerouted to the overflow topic: each team and distinct id gets the
    /// `ingestion_capacity_overflow` warning (at most once an hour).
    pub overflow: bool,
    /// The batch's place among the batches its consumer has in flight: its person step waits
    /// for the earlier ones holding the same distinct ids. `None` for batches with no order
    /// among themselves (concurrent HTTP requests).
    pub turn: Option<Arc<BatchTurn>>,
}

/// What became of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub written: usize,
    pub dead_lettered: usize,
    pub dropped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Teams(#[from] TeamStoreError),
    #[error(transparent)]
    Writer(#[from] WriteError),
    #[error("the event writer is not running")]
    WriterGone,
    #[error("a pipeline step panicked: {0}")]
    Step(String),
    #[error("the person step failed: {0}")]
    Persons(#[from] PersonError),
    #[error("the group step failed: {0}")]
    Groups(#[from] GroupStoreError),
    #[error("stored events could not be queued for their plugins: {0}")]
    PostIngestion(#[from] crate::cluster::ClusterError),
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[derive(Clone)]
pub struct PipelineMetrics {
    received: IntCounter,
    written: IntCounter,
    dropped: IntCounterVec,
}

impl PipelineMetrics {
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let received = IntCounter::new(
            "ingestion_events_received_total",
            "Messages the ingestion pipeline received.",
        )?;
        let written = IntCounter::new(
            "ingestion_events_written_total",
            "Events the ingestion pipeline had stored.",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "ingestion_event_dropped_total",
                "Events not ingested, by cause; all but dropped_by_plugin are dead-lettered.",
            ),
            &["drop_cause"],
        )?;
        // Every cause shows from the start, so dashboards and alerts see zeros, not gaps.
        for reason in DropReason::ALL {
            dropped.with_label_values(&[reason.as_str()]);
        }
        let registry = metrics.registry();
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(written.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self {
            received,
            written,
            dropped,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Actor

#[derive(Debug, Clone, Default)]
pub struct PipelineConfig {
    pub limits: EnvelopeLimits,
    /// Whether session recordings have somewhere to go (the Kafka topic, or the embedded
    /// profile's file). Without, they are dead-lettered rather than dropped unseen.
    pub forward_recordings: bool,
}

pub struct IngestionPipeline {
    /// Shared with every batch in flight, so that batches run concurrently.
    run: Arc<Run>,
    stats: Arc<ActorStats>,
}

impl IngestionPipeline {
    pub fn new(
        config: PipelineConfig,
        teams: Arc<TeamManager>,
        writer: ObservedAddr<EventWriter>,
        stats: Arc<ActorStats>,
        metrics: &Metrics,
        pipeline_metrics: PipelineMetrics,
    ) -> Self {
        Self {
            run: Arc::new(Run {
                config,
                plugins: None,
                persons: None,
                groups: None,
                definitions: None,
                actions: None,
                post_ingestion: None,
                teams,
                writer,
                metrics: pipeline_metrics,
                step_duration: metrics.pipeline_step_duration.clone(),
                overflow_warned: Mutex::new(LruCache::new(OVERFLOW_WARNED_KEYS)),
            }),
            stats,
        }
    }
}

impl IngestionPipeline {
    /// Runs each team's processEvent chain on `pool` between team lookup and prepare.
    pub fn with_plugins(mut self, pool: PluginVmPool) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.plugins = Some(pool);
        }
        self
    }

    /// Resolves each event's person before its row is built (without it, rows carry no person).
    pub fn with_persons(mut self, persons: Arc<PersonManager>) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.persons = Some(persons);
        }
        self
    }

    /// Fills each event's `$group_N` properties and group columns, and applies
    /// `$groupidentify` (without it, rows name no groups).
    pub fn with_groups(mut self, groups: Arc<GroupManager>) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.groups = Some(groups);
        }
        self
    }

    /// Records the event and property definitions the batches add (in the background).
    pub fn with_definitions(mut self, definitions: Arc<DefinitionsManager>) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.definitions = Some(definitions);
        }
        self
    }

    /// Posts stored events that match a team's actions to its webhook (in the background).
    pub fn with_actions(mut self, actions: Arc<ActionHooks>) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.actions = Some(actions);
        }
        self
    }

    /// Queues stored events for onEvent, composeWebhook and exportEvents (with plugins).
    pub fn with_post_ingestion(mut self, publisher: PostIngestionPublisher) -> Self {
        if let Some(run) = Arc::get_mut(&mut self.run) {
            run.post_ingestion = Some(publisher);
        }
        self
    }
}

impl Actor for IngestionPipeline {
    type Context = Context<Self>;
}

/// The pipeline keeps no state between batches; a restart only loses batches in flight,
/// whose callers get an error and retry.
impl Supervised for IngestionPipeline {}

impl Handler<IngestBatch> for IngestionPipeline {
    type Result = ResponseFuture<Result<BatchOutcome, PipelineError>>;

    fn handle(&mut self, batch: IngestBatch, _: &mut Context<Self>) -> Self::Result {
        let timer = self.stats.message_received();
        let run = Arc::clone(&self.run);
        let stats = Arc::clone(&self.stats);
        Box::pin(async move {
            let _timer = timer;
            let outcome = run
                .ingest(batch.messages, batch.overflow, batch.turn.as_deref())
                .await;
            if outcome.is_err() {
                stats.record_error();
            }
            outcome
        })
    }
}

/// What a batch's trip through the steps needs.
struct Run {
    config: PipelineConfig,
    plugins: Option<PluginVmPool>,
    persons: Option<Arc<PersonManager>>,
    groups: Option<Arc<GroupManager>>,
    definitions: Option<Arc<DefinitionsManager>>,
    actions: Option<Arc<ActionHooks>>,
    post_ingestion: Option<PostIngestionPublisher>,
    teams: Arc<TeamManager>,
    writer: ObservedAddr<EventWriter>,
    metrics: PipelineMetrics,
    step_duration: prometheus::HistogramVec,
    /// When each (team, distinct id) last got the overflow warning.
    overflow_warned: Mutex<LruCache<(i64, String), Instant>>,
}

/// Session recording events: forwarded unchanged to `session_recording_events`, never stored
/// as events (spec 1.2), as PostHog's ingestion consumer does.
const RECORDING_EVENTS: [&str; 2] = ["$snapshot", "$performance_event"];

/// The dead letter of a session recording event that has no topic to go to, holding the
/// message as it came so that it can be replayed.
fn unforwarded_recording(recording: &PipelineEvent, raw: &[u8]) -> DeadLetter {
    let mut letter = dead_letter_for_event(
        &recording.event,
        DropReason::RecordingNotForwarded,
        "session recordings go to Kafka's session_recording_events topic, and this server has no KAFKA_HOSTS".to_owned(),
    );
    letter.raw_payload = String::from_utf8_lossy(raw).into_owned();
    letter.team_id = recording.team_id.unwrap_or(0);
    letter
}

/// PostHog's warning for events that arrive through the overflow topic.
pub const WARNING_INGESTION_CAPACITY_OVERFLOW: &str = "ingestion_capacity_overflow";

/// At most one overflow warning per team and distinct id this often.
const OVERFLOW_WARNING_EVERY: Duration = Duration::from_secs(3600);

const OVERFLOW_WARNED_KEYS: NonZeroUsize = NonZeroUsize::new(100_000).expect("non-zero");

impl Run {
    /// One `ingestion_capacity_overflow` warning per team and distinct id an hour, as PostHog's
    /// overflow consumer gives.
    fn warn_overflow(&self, resolved: &mut Resolved) {
        let now = Instant::now();
        let mut warned = self
            .overflow_warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ResolvedEvent { event, team, .. } in &resolved.events {
            let key = (team.id, event.distinct_id.clone());
            if warned
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < OVERFLOW_WARNING_EVERY)
            {
                continue;
            }
            warned.put(key, now);
            resolved.warnings.push(crate::event::IngestionWarning {
                team_id: team.id,
                kind: WARNING_INGESTION_CAPACITY_OVERFLOW,
                details: serde_json::json!({ "overflowDistinctId": event.distinct_id }),
                timestamp: Utc::now(),
            });
        }
    }

    async fn ingest(
        &self,
        messages: Arc<Payloads>,
        overflow: bool,
        turn: Option<&BatchTurn>,
    ) -> Result<BatchOutcome, PipelineError> {
        self.metrics.received.inc_by(messages.len() as u64);
        let limits = self.config.limits;
        let forward_recordings = self.config.forward_recordings;
        let (parsed, recordings) = self
            .step("parse", move || {
                let mut recordings = Vec::new();
                let mut parsed = Vec::with_capacity(messages.len());
                for raw in messages.iter() {
                    let event = parse_envelope(raw, &limits);
                    match &event {
                        Ok(recording)
                            if RECORDING_EVENTS.contains(&recording.event.event.as_str())
                                && !forward_recordings =>
                        {
                            parsed.push(Err(Box::new(unforwarded_recording(recording, raw))));
                        }
                        Ok(event) if RECORDING_EVENTS.contains(&event.event.event.as_str()) => {
                            recordings.push(RecordingMessage {
                                key: event
                                    .event
                                    .properties
                                    .get("$session_id")
                                    .and_then(serde_json::Value::as_str)
                                    .map(str::to_owned),
                                payload: raw.to_vec(),
                            });
                        }
                        _ => parsed.push(event),
                    }
                }
                (parsed, recordings)
            })
            .await?;

        let started = std::time::Instant::now();
        let teams = self.resolve_teams(&parsed).await?;
        self.step_duration
            .with_label_values(&["populate_team"])
            .observe(started.elapsed().as_secs_f64());

        let with_persons = self.persons.is_some();
        let mut resolved = self
            .step("resolve", move || {
                resolve_batch(parsed, &teams, with_persons)
            })
            .await?;
        if overflow {
            self.warn_overflow(&mut resolved);
        }
        let started = std::time::Instant::now();
        let (resolved, dropped_by_plugins) = self.run_plugins(resolved).await;
        self.step_duration
            .with_label_values(&["plugins"])
            .observe(started.elapsed().as_secs_f64());

        let mut stamped = self
            .step("stamp", move || stamp_batch(resolved, with_persons))
            .await?;
        let persons = self.person_step(&stamped, turn).await?;
        let groups = match &self.groups {
            Some(manager) => {
                let started = std::time::Instant::now();
                let mut events: Vec<&mut StampedEvent> =
                    stamped.events.iter_mut().map(|(event, _)| event).collect();
                let outcome = manager.resolve_batch(&mut events).await?;
                self.step_duration
                    .with_label_values(&["groups"])
                    .observe(started.elapsed().as_secs_f64());
                Some(outcome)
            }
            None => None,
        };
        let dropped_personless = stamped.dropped_personless;
        let definitions = self.definitions.clone();
        let (mut batch, new_definitions) = self
            .step("prepare", move || {
                // Before the rows are built, which takes the events apart.
                let new_definitions = definitions.map(|manager| {
                    let identified = groups.as_ref().map(|outcome| outcome.identified.as_slice());
                    manager.collect(stamped.events.iter().enumerate().map(|(n, (event, team))| {
                        let group_type_index =
                            identified.and_then(|identified| identified.get(n).copied().flatten());
                        (team.as_ref(), &*event.event, group_type_index)
                    }))
                });
                (build_batch(stamped, persons, groups), new_definitions)
            })
            .await?;
        if let (Some(manager), Some(new)) = (&self.definitions, new_definitions) {
            manager.record(new);
        }

        batch.recordings = recordings;
        let mut outcome = BatchOutcome {
            written: batch.events.len(),
            dead_lettered: batch.dead_letters.len(),
            dropped: 0,
        };
        self.count_dead_letters(&batch.dead_letters);
        if dropped_by_plugins > 0 {
            self.metrics
                .dropped
                .with_label_values(&[DropReason::DroppedByPlugin.as_str()])
                .inc_by(dropped_by_plugins as u64);
        }
        if dropped_personless > 0 {
            self.metrics
                .dropped
                .with_label_values(&[DropReason::InvalidWhenPersonless.as_str()])
                .inc_by(dropped_personless as u64);
        }
        outcome.dropped = outcome.dead_lettered + dropped_by_plugins + dropped_personless;

        let follow_up = match (&self.plugins, &self.post_ingestion) {
            (Some(pool), Some(_)) => PostIngestionPublisher::follow_up(pool, &batch.events),
            _ => FollowUp::default(),
        };
        // Only stored events reach the actions, as in PostHog.
        let action_rows = self
            .actions
            .as_ref()
            .map(|actions| actions.select(&batch.events))
            .unwrap_or_default();
        let started = std::time::Instant::now();
        self.writer
            .send(WriteRows(batch))
            .await
            .map_err(|_| PipelineError::WriterGone)??;
        self.step_duration
            .with_label_values(&["write"])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.written.inc_by(outcome.written as u64);
        if let Some(actions) = &self.actions {
            actions.fire(action_rows);
        }
        // Only stored events reach onEvent and the exports, as in PostHog.
        if let Some(publisher) = &self.post_ingestion
            && !follow_up.is_empty()
        {
            publisher.publish_stored(follow_up).await?;
        }
        Ok(outcome)
    }

    /// The person step in its batch's turn: claims the batch's distinct ids, applies its person
    /// changes, then keeps the answers in the turn and releases the ids, so that the next
    /// batch of the same users goes on while this one is written. A retry of the batch (its
    /// write failed) reuses the kept answers: applying its changes again could undo a later
    /// batch's. Without a turn (HTTP capture), the step just runs.
    async fn person_step(
        &self,
        stamped: &Stamped,
        turn: Option<&BatchTurn>,
    ) -> Result<Option<Arc<AppliedPersons>>, PipelineError> {
        let Some(manager) = &self.persons else {
            return Ok(None);
        };
        // Only a batch with a turn can be retried with what it kept.
        let fingerprint = turn.map(|_| stamped.fingerprint());
        if let Some(kept) = turn.and_then(BatchTurn::kept::<AppliedPersons>) {
            if kept.fingerprint == fingerprint {
                return Ok(Some(kept));
            }
            // Only a plugin that answers differently on a retry gets here.
            tracing::warn!(
                "a retried batch's events differ from its first attempt's; applying their person changes again"
            );
        }
        // Borrowed from the batch's events, which outlive the step.
        let person_events = stamped.person_events();
        if let Some(turn) = turn {
            let started = std::time::Instant::now();
            turn.claim(stamped.order_keys(&person_events)).await;
            self.step_duration
                .with_label_values(&["order"])
                .observe(started.elapsed().as_secs_f64());
        }
        let started = std::time::Instant::now();
        let outcomes = manager.resolve_batch(&person_events).await;
        self.step_duration
            .with_label_values(&["persons"])
            .observe(started.elapsed().as_secs_f64());
        let applied = Arc::new(AppliedPersons {
            fingerprint,
            answers: check_persons(outcomes)?,
        });
        if let Some(turn) = turn {
            turn.keep(Arc::clone(&applied));
            turn.release();
        }
        Ok(Some(applied))
    }

    /// Spec 1.3 step 3: each team's processEvent chain, teams in parallel. Returns the events
    /// that go on and how many plugins dropped. Output that is no longer an event is
    /// dead-lettered with the plugin's error.
    async fn run_plugins(&self, mut resolved: Resolved) -> (Resolved, usize) {
        let Some(pool) = &self.plugins else {
            return (resolved, 0);
        };
        // One look at the plugin set per batch, not one lock per event.
        let plugins = pool.plugins();
        let mut by_team: HashMap<i64, Vec<usize>> = HashMap::new();
        for (index, event) in resolved.events.iter().enumerate() {
            if plugins.chain(event.team.id).is_some() {
                by_team.entry(event.team.id).or_default().push(index);
            }
        }
        if by_team.is_empty() {
            return (resolved, 0);
        }
        let calls = by_team.into_iter().map(|(team_id, indices)| {
            let events: Vec<ChainEvent> = indices
                .iter()
                .map(|&i| chain_event(&resolved.events[i].event))
                .collect();
            async move { (indices, pool.process_events(team_id, events).await) }
        });
        let results = futures::future::join_all(calls).await;

        let mut keep = vec![true; resolved.events.len()];
        let mut dropped = 0;
        for (indices, outcomes) in results {
            for (index, outcome) in indices.into_iter().zip(outcomes) {
                let Some(output) = outcome.event else {
                    keep[index] = false;
                    dropped += 1;
                    continue;
                };
                let slot = &mut resolved.events[index];
                let result = match output {
                    ChainOutput::Text(text) => serde_json::from_str::<PluginEvent>(&text)
                        .map(|event| *slot.event = event)
                        .map_err(|error| error.to_string()),
                    ChainOutput::Changes(changes) => changes.apply(&mut slot.event),
                };
                match result {
                    Ok(()) => {}
                    Err(error) => {
                        keep[index] = false;
                        let mut letter = dead_letter_for_event(
                            &slot.event,
                            DropReason::InvalidJson,
                            format!("a plugin returned something that is not an event: {error}"),
                        );
                        letter.team_id = slot.team.id;
                        resolved.dead_letters.push(letter);
                    }
                }
            }
        }
        let mut flags = keep.into_iter();
        resolved.events.retain(|_| flags.next().unwrap_or(true));
        (resolved, dropped)
    }

    /// Runs a CPU-bound step on the blocking pool and times it.
    async fn step<T: Send + 'static>(
        &self,
        name: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PipelineError> {
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| PipelineError::Step(error.to_string()))?;
        self.step_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        Ok(result)
    }

    /// One store lookup per distinct team id or token in the batch (most batches have few).
    async fn resolve_teams(
        &self,
        parsed: &[Result<PipelineEvent, Box<DeadLetter>>],
    ) -> Result<Teams, PipelineError> {
        let mut teams = Teams::default();
        for event in parsed.iter().filter_map(|result| result.as_ref().ok()) {
            if let Some(id) = event.team_id {
                if let std::collections::hash_map::Entry::Vacant(entry) = teams.by_id.entry(id) {
                    entry.insert(self.teams.by_id(id).await?);
                }
            } else if let Some(token) = &event.token
                && !teams.by_token.contains_key(token)
            {
                let team = self.teams.by_token(token).await?;
                teams.by_token.insert(token.clone(), team);
            }
        }
        Ok(teams)
    }

    fn count_dead_letters(&self, letters: &[DeadLetter]) {
        if letters.is_empty() {
            return;
        }
        let mut by_reason: HashMap<DropReason, usize> = HashMap::new();
        for letter in letters {
            *by_reason.entry(letter.reason).or_default() += 1;
        }
        for (reason, count) in &by_reason {
            self.metrics
                .dropped
                .with_label_values(&[reason.as_str()])
                .inc_by(*count as u64);
        }
        // Once per batch, with the first error as an example: a flood of bad events must
        // not flood the log.
        let example = &letters[0];
        tracing::warn!(
            dead_lettered = letters.len(),
            reasons = ?by_reason,
            example = %example.error_message(),
            "events dead-lettered"
        );
    }
}

#[derive(Default)]
struct Teams {
    by_id: HashMap<i64, Option<Arc<Team>>>,
    by_token: HashMap<String, Option<Arc<Team>>>,
}

impl Teams {
    fn for_event(&self, event: &PipelineEvent) -> Result<Arc<Team>, (DropReason, String)> {
        if let Some(id) = event.team_id {
            return self.by_id.get(&id).and_then(Clone::clone).ok_or_else(|| {
                (
                    DropReason::InvalidToken,
                    format!("team {id} does not exist"),
                )
            });
        }
        let Some(token) = &event.token else {
            return Err((DropReason::NoToken, "no team_id and no token".to_owned()));
        };
        self.by_token
            .get(token)
            .and_then(Clone::clone)
            .ok_or_else(|| {
                (
                    DropReason::InvalidToken,
                    format!("no team has the token \"{token}\""),
                )
            })
    }
}

/// Events matched to their team, ready for plugins.
struct Resolved {
    events: Vec<ResolvedEvent>,
    dead_letters: Vec<DeadLetter>,
    warnings: Vec<crate::event::IngestionWarning>,
    /// Person-changing events sent with `$process_person_profile: false` (dropped).
    dropped_personless: usize,
}

struct ResolvedEvent {
    event: Box<PluginEvent>,
    team: Arc<Team>,
    /// Read from the event as it arrived, before plugins (as PostHog does): false for
    /// `$process_person_profile: false`.
    process_person: bool,
}

fn resolve_batch(
    parsed: Vec<Result<PipelineEvent, Box<DeadLetter>>>,
    teams: &Teams,
    with_persons: bool,
) -> Resolved {
    let mut resolved = Resolved {
        events: Vec::with_capacity(parsed.len()),
        dead_letters: Vec::new(),
        warnings: Vec::new(),
        dropped_personless: 0,
    };
    for result in parsed {
        let event = match result {
            Ok(event) => event,
            Err(letter) => {
                resolved.dead_letters.push(*letter);
                continue;
            }
        };
        let team = match teams.for_event(&event) {
            Ok(team) => team,
            Err((reason, error)) => {
                let mut letter = dead_letter_for_event(&event.event, reason, error);
                letter.team_id = event.team_id.unwrap_or(0);
                resolved.dead_letters.push(letter);
                continue;
            }
        };
        let mut plugin_event = event.event;
        plugin_event.team_id = team.id;
        if team.anonymize_ips {
            // Spec 1.3 step 1: the address is gone before plugins ever see the event.
            plugin_event.ip = None;
        }
        let process_person = !with_persons
            || plugin_event.properties.get("$process_person_profile")
                != Some(&serde_json::Value::Bool(false));
        if !process_person && PERSON_EVENTS.contains(&plugin_event.event.as_str()) {
            resolved.warnings.push(crate::event::IngestionWarning {
                team_id: team.id,
                kind: DropReason::InvalidWhenPersonless.as_str(),
                details: serde_json::json!({
                    "eventUuid": plugin_event.uuid,
                    "event": plugin_event.event,
                    "distinctId": plugin_event.distinct_id,
                }),
                timestamp: Utc::now(),
            });
            resolved.dropped_personless += 1;
            continue;
        }
        resolved.events.push(ResolvedEvent {
            event: plugin_event,
            team,
            process_person,
        });
    }
    resolved
}

/// Events with their timestamps parsed and uuids checked, ready for the person step.
struct Stamped {
    events: Vec<(StampedEvent, Arc<Team>)>,
    /// Whether the person step processes each event's person, in the same order; empty
    /// without a person step.
    process_person: Vec<bool>,
    dead_letters: Vec<DeadLetter>,
    warnings: Vec<crate::event::IngestionWarning>,
    /// Person-changing events sent with `$process_person_profile: false` (dropped).
    dropped_personless: usize,
}

/// What a batch's person step answered, one answer per event, and which events those were.
struct AppliedPersons {
    /// Of the events answered; `None` without a turn, when nothing reuses the answers.
    fingerprint: Option<u64>,
    answers: Vec<PersonAnswer>,
}

impl Stamped {
    /// Tells one batch's events from another's: the team, distinct id, uuid and name of each,
    /// in order. A retry parses the same messages into the same events unless a plugin answers
    /// differently.
    fn fingerprint(&self) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        // Fixed, so that a retry's fingerprint matches its first attempt's.
        let mut hasher =
            foldhash::fast::FixedState::with_seed(0x6261_7463_685f_6670).build_hasher();
        self.events.len().hash(&mut hasher);
        for (event, team) in &self.events {
            team.id.hash(&mut hasher);
            event.event.distinct_id.hash(&mut hasher);
            // The uuid as stamped, one to one with its text, which is twice as long to hash.
            event.uuid.as_u128().hash(&mut hasher);
            event.event.event.hash(&mut hasher);
        }
        hasher.finish()
    }

    /// What the person step reads of each event, borrowed from it.
    fn person_events(&self) -> Vec<PersonEvent<'_>> {
        self.events
            .iter()
            .zip(&self.process_person)
            .map(|((event, _), &process_person)| person_event(event, process_person))
            .collect()
    }

    /// The distinct ids whose persons and groups this batch changes: each event's own, and the
    /// other id an identify, alias or merge names (in `person_events`).
    fn order_keys<'a>(
        &'a self,
        person_events: &'a [PersonEvent<'a>],
    ) -> impl Iterator<Item = OrderKey> + 'a {
        let own = self
            .events
            .iter()
            .map(|(event, team)| OrderKey::new(team.id, &event.event.distinct_id));
        let merged = person_events
            .iter()
            .filter_map(|event| match &event.intent {
                Ok(MergeIntent::Merge {
                    previous_distinct_id,
                    ..
                }) => Some(OrderKey::new(event.team_id, previous_distinct_id)),
                _ => None,
            });
        own.chain(merged)
    }
}

/// The events that exist only to change persons, which PostHog drops when sent personless.
const PERSON_EVENTS: [&str; 4] = [
    "$identify",
    "$create_alias",
    "$merge_dangerously",
    "$groupidentify",
];

/// PostHog's `normalizeProcessPerson`, after plugins: without person processing the event's
/// `$set`, `$set_once` and `$unset` go and the flag stays (for debugging); with it, the flag
/// itself is removed.
fn normalize_process_person(event: &mut PluginEvent, process_person: bool) {
    if process_person {
        event.properties.remove("$process_person_profile");
    } else {
        event.properties.insert(
            "$process_person_profile".to_owned(),
            serde_json::Value::Bool(false),
        );
        for key in ["$set", "$set_once", "$unset"] {
            event.properties.remove(key);
        }
    }
}

fn stamp_batch(resolved: Resolved, with_persons: bool) -> Stamped {
    let mut stamped = Stamped {
        events: Vec::with_capacity(resolved.events.len()),
        process_person: Vec::with_capacity(if with_persons {
            resolved.events.len()
        } else {
            0
        }),
        dead_letters: resolved.dead_letters,
        warnings: resolved.warnings,
        dropped_personless: resolved.dropped_personless,
    };
    for ResolvedEvent {
        mut event,
        team,
        process_person,
    } in resolved.events
    {
        // After the plugins, as PostHog does: they see the properties that were sent.
        normalize_event(&mut event);
        if with_persons {
            normalize_process_person(&mut event, process_person);
        }
        match stamp_event(event, &team, &mut stamped.warnings) {
            Ok(event) => {
                if with_persons {
                    stamped.process_person.push(process_person);
                }
                stamped.events.push((event, team));
            }
            Err(letter) => stamped.dead_letters.push(*letter),
        }
    }
    stamped
}

/// An event as the plugin chain takes it: its JSON text (the properties' text as it
/// arrived, copied, not parsed) and what the chain reads before a plugin runs.
fn chain_event(event: &PluginEvent) -> ChainEvent {
    let ran = ChainEvent::labels_in(LABEL_KEYS.map(|key| event.properties.get(key)));
    ChainEvent {
        // Serializing an event cannot fail (string keys only); were it to, the chain would
        // report the text as unreadable and the event would be dead-lettered, not lost.
        json: serde_json::to_string(event).unwrap_or_default(),
        distinct_id: event.distinct_id.clone(),
        team_id: Some(serde_json::Value::from(event.team_id)),
        ran,
        // The pipeline keeps the event: only what the plugins changed comes back.
        answer_with_changes: true,
    }
}

/// What the person step reads of an event.
fn person_event(stamped: &StampedEvent, process_person: bool) -> PersonEvent<'_> {
    let event = &stamped.event;
    PersonEvent {
        team_id: event.team_id,
        distinct_id: Cow::Borrowed(&event.distinct_id),
        event_uuid: Cow::Borrowed(&event.uuid),
        timestamp: stamped.timestamp,
        intent: merge_intent(&event.event, &event.distinct_id, &event.properties),
        updates: person_updates(&event.properties),
        process_person,
    }
}

/// The person step's answer for one event: its person, or why it is dead-lettered (always
/// `PersonStoreError::Rejected`).
type PersonAnswer = Result<PersonOutcome, PersonStoreError>;

/// Fails the batch if the person store could not answer for some event, so that the whole
/// batch is retried rather than stored without persons; an event the store refused is only
/// that event's problem.
fn check_persons(
    outcomes: Vec<Result<PersonOutcome, PersonError>>,
) -> Result<Vec<PersonAnswer>, PipelineError> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok(outcome) => Ok(Ok(outcome)),
            Err(PersonError::Store(error @ PersonStoreError::Rejected(_))) => Ok(Err(error)),
            Err(error) => Err(PipelineError::Persons(error)),
        })
        .collect()
}

fn build_batch(
    stamped: Stamped,
    persons: Option<Arc<AppliedPersons>>,
    groups: Option<GroupOutcome>,
) -> WriteBatch {
    let created_at = Utc::now();
    let (mut event_groups, group_rows) = match groups {
        Some(outcome) => (Some(outcome.events.into_iter()), outcome.rows),
        None => (None, Vec::new()),
    };
    let mut batch = WriteBatch {
        events: Vec::with_capacity(stamped.events.len()),
        dead_letters: stamped.dead_letters,
        warnings: stamped.warnings,
        groups: group_rows,
        ..WriteBatch::default()
    };
    let mut persons = persons.as_ref().map(|applied| applied.answers.iter());
    for (event, team) in stamped.events {
        let answer = persons.as_mut().and_then(Iterator::next);
        let groups: Option<EventGroups> = event_groups.as_mut().and_then(Iterator::next);
        let outcome = match answer {
            Some(Ok(outcome)) => Some(outcome),
            Some(Err(error)) => {
                let letter = dead_letter_for_event(
                    &event.event,
                    DropReason::PersonRejected,
                    error.to_string(),
                );
                batch.dead_letters.push(letter);
                continue;
            }
            None => None,
        };
        // The person step committed this event's person changes whatever becomes of the
        // event, so ClickHouse gets them even when the row itself is dead-lettered.
        let (row_person, changes) = match outcome {
            Some(outcome) => (
                Some((outcome.person.clone(), outcome.mode)),
                outcome.changes.as_ref(),
            ),
            None => (None, None),
        };
        if let Some(changes) = changes {
            batch.persons.extend(changes.person_rows.iter().cloned());
            batch
                .person_distinct_ids
                .extend(changes.distinct_id_rows.iter().cloned());
            batch.warnings.extend(changes.warnings.iter().cloned());
        }
        let columns = match groups {
            Some(Err(error)) => {
                batch.dead_letters.push(dead_letter_for_event(
                    &event.event,
                    DropReason::GroupRejected,
                    error.to_string(),
                ));
                continue;
            }
            Some(Ok(columns)) => columns,
            None => Default::default(),
        };
        let row_person = row_person.map(|(person, mode)| RowPerson {
            uuid: person.uuid,
            properties: person.properties,
            created_at: person.created_at,
            mode,
        });
        match build_row(event, &team, created_at, row_person, &columns) {
            Ok(row) => batch.events.push(row),
            Err(letter) => batch.dead_letters.push(*letter),
        }
    }
    batch
}

/// HTTP capture's intake in the embedded profile: straight into the pipeline, answering once
/// the events are stored.
pub struct PipelineIntake {
    pipeline: ObservedAddr<IngestionPipeline>,
}

impl PipelineIntake {
    pub fn new(pipeline: ObservedAddr<IngestionPipeline>) -> Self {
        Self { pipeline }
    }
}

#[async_trait::async_trait]
impl crate::event::intake::EventIntake for PipelineIntake {
    async fn submit(
        &self,
        events: Vec<crate::event::intake::CapturedEvent>,
    ) -> Result<(), crate::event::intake::IntakeError> {
        let messages = events.iter().map(|event| &event.payload).collect();
        self.pipeline
            .send(IngestBatch {
                messages: Arc::new(messages),
                overflow: false,
                turn: None,
            })
            .await
            .map_err(|error| {
                crate::event::intake::IntakeError::Unavailable(format!(
                    "the pipeline is not running: {error}"
                ))
            })?
            .map(|_| ())
            .map_err(|error| crate::event::intake::IntakeError::Unavailable(error.to_string()))
    }
}

#[cfg(test)]
mod tests;
