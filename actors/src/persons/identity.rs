//! Identify/alias (spec 1.5 step 1): which events ask to merge two distinct ids, which ids are
//! refused, and what the merge does given the people that already own the two ids.

use std::fmt;

use crate::event::Properties;
use crate::event::js::{is_truthy, to_js_string};

/// Ingestion warning for a merge refused because one side is a placeholder id.
pub const CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID: &str = "cannot_merge_with_illegal_distinct_id";
/// Ingestion warning for a merge refused because both people are already identified.
pub const CANNOT_MERGE_ALREADY_IDENTIFIED: &str = "cannot_merge_already_identified";

/// Compared after lowercasing: SDKs and customers send these in any case.
const CASE_INSENSITIVE_ILLEGAL_IDS: [&str; 10] = [
    "anonymous",
    "guest",
    "distinctid",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "true",
    "false",
];

/// Compared exactly: these are what JS and Python print for a missing or mistyped value, and
/// lowercasing them would also catch legitimate ids such as "nan".
const CASE_SENSITIVE_ILLEGAL_IDS: [&str; 7] = [
    "[object Object]",
    "NaN",
    "None",
    "none",
    "null",
    "0",
    "undefined",
];

/// Why a distinct id may not take part in a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IllegalIdReason {
    /// Empty or only whitespace.
    Blank,
    /// A generic word such as `anonymous` or `email`, in any case.
    ReservedWord,
    /// The text of a missing or mistyped value such as `null` or `[object Object]`.
    ReservedLiteral,
}

impl fmt::Display for IllegalIdReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Blank => "the id is blank",
            Self::ReservedWord => "the id is a reserved word",
            Self::ReservedLiteral => "the id is the text of a missing or mistyped value",
        })
    }
}

/// Why `id` is not allowed in a merge, or `None` if it is.
pub fn illegal_distinct_id_reason(id: &str) -> Option<IllegalIdReason> {
    if id.trim().is_empty() {
        return Some(IllegalIdReason::Blank);
    }
    // PostHog matches the lists against the untrimmed id, so " null" stays legal.
    let lowercase = id.to_lowercase();
    if CASE_INSENSITIVE_ILLEGAL_IDS.contains(&lowercase.as_str()) {
        return Some(IllegalIdReason::ReservedWord);
    }
    if CASE_SENSITIVE_ILLEGAL_IDS.contains(&id) {
        return Some(IllegalIdReason::ReservedLiteral);
    }
    None
}

/// Whether `id` is a placeholder that would glue unrelated users together if merged.
pub fn is_illegal_distinct_id(id: &str) -> bool {
    illegal_distinct_id_reason(id).is_some()
}

/// The event that asked for a merge; it decides whether two identified people may be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeKind {
    /// `$identify` with `$anon_distinct_id`.
    Identify,
    /// `$create_alias` with `alias`.
    Alias,
    /// `$merge_dangerously` with `alias`: merges even two identified people.
    MergeDangerously,
}

impl MergeKind {
    /// The event name that carries this kind of merge.
    pub fn event_name(self) -> &'static str {
        match self {
            Self::Identify => "$identify",
            Self::Alias => "$create_alias",
            Self::MergeDangerously => "$merge_dangerously",
        }
    }
}

/// What an event asks of the person store before its own person is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeIntent {
    /// Not a merging event, or a merge of an id with itself.
    None,
    /// Make `previous_distinct_id` and `distinct_id` belong to one person.
    Merge {
        /// The id being merged in: the alias or the anonymous id.
        previous_distinct_id: String,
        /// The event's own distinct id; its person is the merge target.
        distinct_id: String,
        /// The event that asked for it.
        kind: MergeKind,
    },
}

/// Which side of a merge holds the illegal id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IllegalIdSide {
    /// The event's own distinct id.
    DistinctId,
    /// The alias or `$anon_distinct_id`.
    PreviousDistinctId,
}

impl fmt::Display for IllegalIdSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DistinctId => "distinct id",
            Self::PreviousDistinctId => "previous distinct id",
        })
    }
}

/// A merge refused because one of its ids is illegal. The pipeline reports it as the
/// [`CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID`] warning and still stores the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot merge {side} `{illegal_distinct_id}` with `{other_distinct_id}`: {reason}")]
pub struct IllegalMerge {
    /// The id that was refused (the warning's `illegalDistinctId`).
    pub illegal_distinct_id: String,
    /// The id on the other side (the warning's `otherDistinctId`).
    pub other_distinct_id: String,
    /// Which side `illegal_distinct_id` came from.
    pub side: IllegalIdSide,
    /// Why it was refused.
    pub reason: IllegalIdReason,
    /// The event that asked for the merge.
    pub kind: MergeKind,
}

impl IllegalMerge {
    /// The ingestion warning type this error becomes.
    pub fn warning(&self) -> &'static str {
        CANNOT_MERGE_WITH_ILLEGAL_DISTINCT_ID
    }
}

/// Reads the merge an event asks for from its name, distinct id and properties.
///
/// Equal ids are a no-op even when illegal: posthog-node sends `$identify` with the same id
/// when it only updates properties, and that must not raise a warning.
pub fn merge_intent(
    event_name: &str,
    distinct_id: &str,
    properties: &Properties,
) -> Result<MergeIntent, IllegalMerge> {
    let (kind, previous) = match event_name {
        "$create_alias" | "$merge_dangerously" => {
            // PostHog tests `alias` for truthiness, so "", 0, false and null mean "no alias".
            match properties.get("alias").filter(|alias| is_truthy(alias)) {
                Some(alias) => {
                    let kind = if event_name == "$create_alias" {
                        MergeKind::Alias
                    } else {
                        MergeKind::MergeDangerously
                    };
                    (kind, alias)
                }
                None => return Ok(MergeIntent::None),
            }
        }
        // Here PostHog tests only that the key exists, so a null becomes the illegal "null".
        "$identify" => match properties.get("$anon_distinct_id") {
            Some(anon) => (MergeKind::Identify, anon),
            None => return Ok(MergeIntent::None),
        },
        _ => return Ok(MergeIntent::None),
    };
    let previous_distinct_id = to_js_string(previous);
    if previous_distinct_id == distinct_id {
        return Ok(MergeIntent::None);
    }
    // The event's own id is checked first, so it is the one reported when both are illegal.
    let refusal = [
        (
            IllegalIdSide::DistinctId,
            distinct_id,
            previous_distinct_id.as_str(),
        ),
        (
            IllegalIdSide::PreviousDistinctId,
            previous_distinct_id.as_str(),
            distinct_id,
        ),
    ]
    .into_iter()
    .find_map(|(side, id, other)| {
        illegal_distinct_id_reason(id).map(|reason| IllegalMerge {
            illegal_distinct_id: id.to_owned(),
            other_distinct_id: other.to_owned(),
            side,
            reason,
            kind,
        })
    });
    match refusal {
        Some(refusal) => Err(refusal),
        None => Ok(MergeIntent::Merge {
            previous_distinct_id,
            distinct_id: distinct_id.to_owned(),
            kind,
        }),
    }
}

/// A person as far as the merge decision cares: its row id and whether it is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonRef {
    /// `posthog_person.id`.
    pub id: i64,
    /// `posthog_person.is_identified`.
    pub is_identified: bool,
}

/// What to do with a legal merge, given which ids already have a person.
///
/// In every case, a refusal included, the person that ends up owning the event's distinct id is
/// marked identified: PostHog sets its "update is_identified" flag before looking people up.
/// [`MergeDecision::person_to_mark_identified`] names that person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDecision {
    /// Only the previous id has a person: add the event's distinct id to it.
    AddDistinctIdToOldPerson {
        /// The person owning the previous id.
        person_id: i64,
    },
    /// Only the event's distinct id has a person: add the previous id to it.
    AddPreviousDistinctIdToNewPerson {
        /// The person owning the event's distinct id.
        person_id: i64,
    },
    /// Neither id has a person: create one with both ids, already identified.
    CreateIdentifiedPerson,
    /// Both ids already belong to the same person.
    MarkIdentified {
        /// The person owning both ids.
        person_id: i64,
    },
    /// Merge the source person into the target and delete the source.
    MergePeople {
        /// The person owning the event's distinct id; it keeps its row.
        target_person_id: i64,
        /// The person owning the previous id; its ids move to the target.
        source_person_id: i64,
    },
    /// Both people are identified and the event is not `$merge_dangerously`: change nothing
    /// but report [`CANNOT_MERGE_ALREADY_IDENTIFIED`].
    RefuseAlreadyIdentified {
        /// The person owning the event's distinct id.
        target_person_id: i64,
        /// The already identified person owning the previous id.
        source_person_id: i64,
    },
}

impl MergeDecision {
    /// The ingestion warning this decision raises, if any.
    pub fn warning(&self) -> Option<&'static str> {
        match self {
            Self::RefuseAlreadyIdentified { .. } => Some(CANNOT_MERGE_ALREADY_IDENTIFIED),
            _ => None,
        }
    }

    /// The existing person whose `is_identified` must become true; `None` when the person is
    /// created identified.
    pub fn person_to_mark_identified(&self) -> Option<i64> {
        match *self {
            Self::AddDistinctIdToOldPerson { person_id }
            | Self::AddPreviousDistinctIdToNewPerson { person_id }
            | Self::MarkIdentified { person_id } => Some(person_id),
            Self::MergePeople {
                target_person_id, ..
            }
            | Self::RefuseAlreadyIdentified {
                target_person_id, ..
            } => Some(target_person_id),
            Self::CreateIdentifiedPerson => None,
        }
    }
}

/// Decides a legal merge. `old_person` owns the previous id (alias or anonymous id),
/// `new_person` owns the event's distinct id.
pub fn decide(
    kind: MergeKind,
    old_person: Option<PersonRef>,
    new_person: Option<PersonRef>,
) -> MergeDecision {
    match (old_person, new_person) {
        (Some(old), None) => MergeDecision::AddDistinctIdToOldPerson { person_id: old.id },
        (None, Some(new)) => MergeDecision::AddPreviousDistinctIdToNewPerson { person_id: new.id },
        (None, None) => MergeDecision::CreateIdentifiedPerson,
        (Some(old), Some(new)) if old.id == new.id => {
            MergeDecision::MarkIdentified { person_id: new.id }
        }
        // Only the source's flag matters: an anonymous visitor may always be folded into a
        // logged-in user, but two logged-in users are only merged when explicitly asked.
        (Some(old), Some(new)) if old.is_identified && kind != MergeKind::MergeDangerously => {
            MergeDecision::RefuseAlreadyIdentified {
                target_person_id: new.id,
                source_person_id: old.id,
            }
        }
        (Some(old), Some(new)) => MergeDecision::MergePeople {
            target_person_id: new.id,
            source_person_id: old.id,
        },
    }
}

#[cfg(test)]
mod tests;
