//! One distinct id's events of a batch applied in memory, in order, for the person step's
//! batched writes; and the answer for personless events. No store is involved here.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{EventPerson, Known, PersonOutcome};
use crate::event::PersonMode;
use crate::persons::state::{PersonEvent, new_person, uuid_from_distinct_id};
use crate::persons::store::{NewPerson, Person, PersonWrite};

/// A personless event's `person_created_at` when the distinct id has no person: 5 s after the
/// epoch, as PostHog writes it (distinct from a real zero, to help debugging).
fn personless_created_at() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(5)
}

/// An existing person gets a personless event as its own (`force_upgrade`) once it is older
/// than this at the event's time.
const FORCE_UPGRADE_AFTER: chrono::Duration = chrono::Duration::minutes(1);

/// One distinct id's events applied in memory, in order: the answer for each, and the one
/// write that stores the result.
pub(super) struct Plan {
    pub(super) answers: Vec<PersonOutcome>,
    pub(super) write: Option<PersonWrite>,
    /// The position of the last event that created or changed the person: its answer carries
    /// the rows for ClickHouse once the write is stored.
    pub(super) last_change: Option<usize>,
    pub(super) created: bool,
}

impl Plan {
    /// The same rules as the transaction path ([`resolve`](crate::persons::state::resolve)): the first event of an id without
    /// a person creates it (PostHog's v5 id, `$set_once` then `$set`, the creator event's
    /// uuid); later events apply `$set_once`, `$set` and `$unset` in order. Each event's
    /// answer is the person as it left it; the version moves once for the batch.
    pub(super) fn new(
        events: &[PersonEvent<'_>],
        indices: &[usize],
        known: Option<&Known>,
    ) -> Self {
        let mut state: Option<(Person, EventPerson)> =
            known.map(|known| ((*known.person).clone(), known.event_person.clone()));
        let mut plan = Plan {
            answers: Vec::with_capacity(indices.len()),
            write: None,
            last_change: None,
            created: false,
        };
        let mut created_person: Option<NewPerson> = None;
        let distinct_id = indices
            .first()
            .map(|&index| events[index].distinct_id.to_string())
            .unwrap_or_default();
        for (position, &index) in indices.iter().enumerate() {
            let event = &events[index];
            if !event.process_person {
                let existing = state.as_ref().map(|(_, event_person)| event_person);
                plan.answers.push(personless(event, existing));
                continue;
            }
            let event_person = if let Some((person, event_person)) = state.as_mut() {
                if event.updates.apply_to(&mut person.properties) {
                    *event_person = EventPerson::of(person);
                    plan.last_change = Some(position);
                }
                event_person.clone()
            } else {
                let created = new_person(event, &event.distinct_id, false);
                let person = created.clone().stored(0);
                let event_person = EventPerson::of(&person);
                created_person = Some(created);
                plan.created = true;
                plan.last_change = Some(position);
                state = Some((person, event_person.clone()));
                event_person
            };
            plan.answers.push(PersonOutcome {
                person: event_person,
                mode: PersonMode::Full,
                changes: None,
            });
        }
        plan.write = match (created_person, state) {
            (Some(mut created), Some((person, _))) => {
                // Created and then changed within the batch: created as it ends.
                created.properties = person.properties;
                Some(PersonWrite::Create {
                    distinct_id,
                    person: created,
                })
            }
            (None, Some((person, _))) if plan.last_change.is_some() => Some(PersonWrite::Update {
                distinct_id,
                person,
            }),
            _ => None,
        };
        plan
    }
}

/// `$process_person_profile: false` (PostHog's personless events): nothing is created or
/// changed. An existing person (cached or in the batch's snapshot) lends its id with empty
/// properties, and takes the event as its own once it is older than a minute; otherwise the
/// id is the one PostHog derives from the distinct id.
pub(super) fn personless(event: &PersonEvent<'_>, existing: Option<&EventPerson>) -> PersonOutcome {
    let empty: Arc<str> = Arc::from("{}");
    match existing {
        Some(person) => PersonOutcome {
            mode: if event.timestamp > person.created_at + FORCE_UPGRADE_AFTER {
                PersonMode::ForceUpgrade
            } else {
                PersonMode::Propertyless
            },
            person: EventPerson {
                uuid: person.uuid,
                properties: empty,
                created_at: person.created_at,
            },
            changes: None,
        },
        None => PersonOutcome {
            person: EventPerson {
                uuid: uuid_from_distinct_id(event.team_id, &event.distinct_id),
                properties: empty,
                created_at: personless_created_at(),
            },
            mode: PersonMode::Propertyless,
            changes: None,
        },
    }
}

#[cfg(test)]
mod tests;
