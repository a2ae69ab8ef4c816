//! Starts actors under supervision: an actor that stops or panics is restarted in place, keeping
//! its address and mailbox, and the restart is counted in its stats.
//!
//! actix's own `Supervisor` restarts an actor that stops, but a panic in a handler unwinds
//! through the arbiter task and the actor silently disappears. So the actor's context future is
//! polled inside `catch_unwind` here; after a panic the message being handled is lost (its
//! sender sees `MailboxError::Closed`), `Supervised::restarting` resets the actor's state, and
//! polling resumes after an exponential backoff, so an actor that panics on every message cannot
//! spin a core.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::dev::ContextFut;
use actix::{Actor, ArbiterHandle, Context, Supervised};
use tokio::time::{Instant, Sleep};

use crate::system::stats::{ActorRegistry, ActorStats, ObservedAddr};

/// Restart delays: doubling from `INITIAL_BACKOFF`, capped at `MAX_BACKOFF`, back to the start
/// once the actor has run for `STABLE_AFTER` without a panic.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Makes a supervised actor panic in its handler: how tests show that it is restarted, counted,
/// and goes on working. Built only for tests.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Copy, actix::Message)]
#[rtype(result = "()")]
pub struct Crash;

#[cfg(any(test, feature = "test-util"))]
impl Crash {
    pub fn now(self) -> ! {
        panic!("crashed on purpose by a test")
    }
}

/// Default bounded mailbox for event-path actors: senders using `send().await` wait beyond it.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 64;

/// How to start one supervised actor.
pub struct SpawnOptions<'a> {
    pub name: &'a str,
    pub mailbox_capacity: usize,
}

impl<'a> SpawnOptions<'a> {
    pub fn new(name: &'a str) -> Self {
        Self {
            name,
            mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
        }
    }

    pub fn mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity;
        self
    }
}

/// Starts an actor on the current arbiter under supervision. The factory gets the actor's
/// stats so the actor can time its handlers and report errors.
pub fn spawn_supervised<A, F>(
    registry: &ActorRegistry,
    options: SpawnOptions<'_>,
    factory: F,
) -> ObservedAddr<A>
where
    A: Actor<Context = Context<A>> + Supervised,
    F: FnOnce(Arc<ActorStats>) -> A,
{
    let stats = registry.register(options.name);
    let mut ctx = Context::new();
    ctx.set_mailbox_capacity(options.mailbox_capacity);
    let actor = factory(Arc::clone(&stats));
    let future = ctx.into_future(actor);
    let addr = future.address();
    actix::spawn(SupervisedActor::new(future, Arc::clone(&stats)));
    ObservedAddr::new(addr, stats)
}

/// Starts an actor on another arbiter (its own thread) under supervision.
pub fn spawn_supervised_in<A, F>(
    arbiter: &ArbiterHandle,
    registry: &ActorRegistry,
    options: SpawnOptions<'_>,
    factory: F,
) -> ObservedAddr<A>
where
    A: Actor<Context = Context<A>> + Supervised,
    F: FnOnce(Arc<ActorStats>) -> A + Send + 'static,
{
    let stats = registry.register(options.name);
    let (sender, receiver) = actix::dev::channel::channel(options.mailbox_capacity);
    let addr = actix::Addr::new(sender);
    let actor_stats = Arc::clone(&stats);
    let spawned = arbiter.spawn_fn(move || {
        let ctx = Context::with_receiver(receiver);
        let actor = factory(Arc::clone(&actor_stats));
        let future = ctx.into_future(actor);
        actix::spawn(SupervisedActor::new(future, actor_stats));
    });
    if !spawned {
        tracing::error!(
            actor = options.name,
            "arbiter is stopped; the actor was not started"
        );
    }
    ObservedAddr::new(addr, stats)
}

/// The supervising future: polls the actor's context, restarting it when it stops or panics.
struct SupervisedActor<A>
where
    A: Actor<Context = Context<A>> + Supervised,
{
    future: ContextFut<A, Context<A>>,
    stats: Arc<ActorStats>,
    backoff: Duration,
    last_restart: Option<Instant>,
    /// Set after a panic: the actor is not polled until it elapses.
    delay: Option<Pin<Box<Sleep>>>,
}

impl<A> SupervisedActor<A>
where
    A: Actor<Context = Context<A>> + Supervised,
{
    fn new(future: ContextFut<A, Context<A>>, stats: Arc<ActorStats>) -> Self {
        Self {
            future,
            stats,
            backoff: INITIAL_BACKOFF,
            last_restart: None,
            delay: None,
        }
    }

    /// The delay before the next restart, growing while panics come in quick succession.
    fn next_backoff(&mut self) -> Duration {
        let now = Instant::now();
        let stable = self
            .last_restart
            .is_none_or(|last| now.duration_since(last) >= STABLE_AFTER);
        if stable {
            self.backoff = INITIAL_BACKOFF;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.last_restart = Some(now);
        delay
    }
}

impl<A> Future for SupervisedActor<A>
where
    A: Actor<Context = Context<A>> + Supervised,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if let Some(delay) = this.delay.as_mut() {
                if delay.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.delay = None;
            }
            let polled = catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.future).poll(cx)));
            let panicked = match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(())) => false,
                Err(payload) => {
                    tracing::error!(
                        actor = this.stats.name(),
                        panic = panic_message(payload.as_ref()),
                        "actor panicked; restarting it"
                    );
                    true
                }
            };
            // `restart` refuses when no address is left: nobody can send to the actor any more,
            // so it is done for good.
            if !this.future.restart() {
                tracing::debug!(actor = this.stats.name(), "actor stopped");
                return Poll::Ready(());
            }
            this.stats.record_restart();
            if panicked {
                this.stats.record_error();
                let delay = this.next_backoff();
                this.delay = Some(Box::pin(tokio::time::sleep(delay)));
            } else {
                tracing::warn!(actor = this.stats.name(), "actor stopped; restarted it");
            }
        }
    }
}

/// The text of a panic, when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "non-string panic payload"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::metrics::Metrics;
    use actix::{ActorContext, Handler, Message};

    /// Panics on `Explode`; counts `Ping`s since its last (re)start.
    struct Fragile {
        stats: Arc<ActorStats>,
        pings_since_start: u32,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;
    }

    impl Supervised for Fragile {
        fn restarting(&mut self, _ctx: &mut Context<Self>) {
            self.pings_since_start = 0;
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Ping;

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Explode;

    #[derive(Message)]
    #[rtype(result = "()")]
    struct StopYourself;

    impl Handler<Ping> for Fragile {
        type Result = u32;
        fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
            let _timer = self.stats.message_received();
            self.pings_since_start += 1;
            self.pings_since_start
        }
    }

    impl Handler<Explode> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Explode, _: &mut Context<Self>) {
            let _timer = self.stats.message_received();
            panic!("asked to explode");
        }
    }

    impl Handler<StopYourself> for Fragile {
        type Result = ();
        fn handle(&mut self, _: StopYourself, ctx: &mut Context<Self>) {
            let _timer = self.stats.message_received();
            ctx.stop();
        }
    }

    fn spawn_fragile(registry: &ActorRegistry) -> ObservedAddr<Fragile> {
        spawn_supervised(registry, SpawnOptions::new("fragile"), |stats| Fragile {
            stats,
            pings_since_start: 0,
        })
    }

    #[actix::test]
    async fn a_panicking_actor_is_restarted_with_its_address() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let addr = spawn_fragile(&registry);
        assert_eq!(addr.send(Ping).await.expect("alive"), 1);
        assert_eq!(addr.send(Ping).await.expect("alive"), 2);

        let lost = addr.send(Explode).await;
        assert!(matches!(lost, Err(actix::MailboxError::Closed)), "{lost:?}");

        assert_eq!(
            addr.send(Ping).await.expect("restarted"),
            1,
            "restarting() reset the state"
        );
        let snapshot = addr.stats().snapshot();
        assert_eq!(snapshot.restarts, 1);
        assert_eq!(snapshot.errors, 1);
        assert_eq!(snapshot.mailbox_len, 0);
        assert_eq!(snapshot.messages_handled, 4);
    }

    #[actix::test]
    async fn an_actor_that_stops_is_restarted() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let addr = spawn_fragile(&registry);
        assert_eq!(addr.send(Ping).await.expect("alive"), 1);
        addr.send(StopYourself).await.expect("handled");
        assert_eq!(addr.send(Ping).await.expect("restarted"), 1);
        assert_eq!(addr.stats().snapshot().restarts, 1);
        assert_eq!(addr.stats().snapshot().errors, 0);
    }

    #[actix::test]
    async fn repeated_panics_back_off() {
        tokio::time::pause();
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let addr = spawn_fragile(&registry);
        let started = Instant::now();
        for _ in 0..4 {
            assert!(addr.send(Explode).await.is_err());
        }
        assert_eq!(addr.send(Ping).await.expect("restarted"), 1);
        // 50 + 100 + 200 ms of backoff before the 2nd, 3rd and 4th Explode, then 400 ms
        // before the Ping.
        assert!(
            started.elapsed() >= Duration::from_millis(750),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(addr.stats().snapshot().restarts, 4);
    }

    #[actix::test]
    async fn an_actor_on_another_arbiter_is_supervised_too() {
        let registry = ActorRegistry::new(Metrics::new().expect("metrics"));
        let arbiter = actix::Arbiter::new();
        let addr = spawn_supervised_in(
            &arbiter.handle(),
            &registry,
            SpawnOptions::new("remote"),
            |stats| Fragile {
                stats,
                pings_since_start: 0,
            },
        );
        assert_eq!(addr.send(Ping).await.expect("alive"), 1);
        assert!(addr.send(Explode).await.is_err());
        assert_eq!(addr.send(Ping).await.expect("restarted"), 1);
        assert_eq!(addr.stats().snapshot().restarts, 1);
        arbiter.stop();
    }
}
