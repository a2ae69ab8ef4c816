//! Actions posting to webhooks (spec 1.11, PostHog's `webhooks.test.ts`): when a stored event
//! matches an action with `post_to_slack`, a message goes to the team's
//! `slack_incoming_webhook`.
//!
//! - [`matcher`]: whether an event matches an action's steps; [`selector`]: the steps' CSS;
//! - [`format`]: the message and the webhook's payload;
//! - [`hooks`]: loading the actions from Postgres and posting the matches.

pub mod format;
pub mod hooks;
pub mod matcher;
pub mod selector;

pub use hooks::{ActionHooks, ActionHooksConfig, ActionHooksError};
