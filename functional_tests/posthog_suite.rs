//! The scenarios of PostHog's own functional suite (`ingestion.test.ts`, `plugins.test.ts`,
//! `happy-path.test.ts`; spec section 7) against the built binary in the cluster profile:
//! envelopes produced to Kafka, rows read back from ClickHouse and Postgres. Events that must be
//! ordered are sent in phases, each stored before the next is produced, since the test's
//! messages land on different partitions.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, clickhouse_query};
use crate::ingestion::{Deployment, envelope, produce, wait_for};

/// Rows of the deployment's team with their person columns, in ClickHouse.
async fn rows(deployment: &Deployment) -> Vec<Value> {
    let text = clickhouse_query(&format!(
        "SELECT toString(uuid) AS uuid, event, distinct_id, properties, person_properties, \
         toString(person_id) AS person_id, toString(person_mode) AS person_mode, \
         toString(person_created_at) AS person_created_at \
         FROM {}.events WHERE team_id = {} FORMAT JSONEachRow",
        deployment.clickhouse_database, deployment.team_id
    ))
    .await;
    json_rows(&text, &["properties", "person_properties"])
}

/// JSONEachRow lines as objects, with the `json_columns` (JSON held in strings) parsed.
fn json_rows(text: &str, json_columns: &[&str]) -> Vec<Value> {
    text.lines()
        .map(|line| {
            let mut row: Value = serde_json::from_str(line).expect("row");
            for column in json_columns {
                row[*column] = row[*column]
                    .as_str()
                    .and_then(|text| serde_json::from_str::<Value>(text).ok())
                    .unwrap_or(Value::Null);
            }
            row
        })
        .collect()
}

/// Produces `events` (`{event, distinct_id, properties}`) and waits until the team has `total`
/// rows.
async fn send_phase(deployment: &Deployment, events: &[Value], total: usize) -> Vec<Value> {
    let messages: Vec<Vec<u8>> = events
        .iter()
        .map(|event| {
            let distinct_id = event["distinct_id"].as_str().expect("distinct_id");
            let body = json!({"event": event["event"], "properties": event["properties"]});
            envelope(&deployment.token, distinct_id, body, json!({}))
        })
        .collect();
    produce(&deployment.topic(), &messages).await;
    wait_for(&format!("{total} rows"), async || {
        let rows = rows(deployment).await;
        (rows.len() >= total).then_some(rows)
    })
    .await
}

/// Every distinct id that has a person in Postgres, sorted.
async fn distinct_ids(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT distinct_id FROM posthog_persondistinctid ORDER BY distinct_id",
            &[],
        )
        .await
        .expect("distinct ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn find<'a>(rows: &'a [Value], event: &str, distinct_id: &str) -> Vec<&'a Value> {
    rows.iter()
        .filter(|row| row["event"] == event && row["distinct_id"] == distinct_id)
        .collect()
}

/// 7.2: `$set` through `$identify` reaches later events and follows updates, an event keeps the
/// person properties of its time, `$set_once` holds exactly the first value, the login flow
/// joins the anonymous and identified ids, and an illegal alias is refused while its `$set`
/// still applies.
#[tokio::test]
async fn persons_behave_as_in_posthogs_ingestion_suite() {
    let deployment = Deployment::create().await;
    let (_server, addr) = deployment.start_server();
    send_phase(
        &deployment,
        &[
            json!({"event": "$identify", "distinct_id": "set-user", "properties": {"$set": {"prop": "value"}}}),
            json!({"event": "first", "distinct_id": "once-user", "properties": {"$set_once": {"prop": "value"}}}),
            json!({"event": "anonymous", "distinct_id": "anon-id", "properties": {}}),
            json!({"event": "custom", "distinct_id": "illegal-user", "properties": {}}),
            json!({"event": "custom", "distinct_id": "0", "properties": {}}),
        ],
        5,
    )
    .await;
    // PostHog's liveness check: the consumer's check is there and ok once it is consuming.
    wait_for("checks['analytics-ingestion'] ok", async || {
        let health: Value = reqwest::get(format!("http://{addr}/_health"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (health["checks"]["analytics-ingestion"] == "ok").then_some(())
    })
    .await;
    send_phase(
        &deployment,
        &[
            json!({"event": "before-update", "distinct_id": "set-user", "properties": {}}),
            json!({"event": "second", "distinct_id": "once-user", "properties": {"$set_once": {"prop": "new value"}}}),
            json!({"event": "$identify", "distinct_id": "known-id", "properties": {"$anon_distinct_id": "anon-id"}}),
            json!({"event": "$merge_dangerously", "distinct_id": "illegal-user", "properties": {"alias": "0", "$set": {"merged": "no"}}}),
        ],
        9,
    )
    .await;
    send_phase(
        &deployment,
        &[json!({"event": "$identify", "distinct_id": "set-user", "properties": {"$set": {"prop": "updated value"}}})],
        10,
    )
    .await;
    let rows = send_phase(
        &deployment,
        &[json!({"event": "after-update", "distinct_id": "set-user", "properties": {}})],
        11,
    )
    .await;

    // $set via $identify, followed by updates; each event keeps the properties of its time.
    assert_eq!(
        find(&rows, "before-update", "set-user")[0]["person_properties"]["prop"],
        "value"
    );
    assert_eq!(
        find(&rows, "after-update", "set-user")[0]["person_properties"]["prop"],
        "updated value"
    );
    // $set_once: exactly the first value and the creator event.
    let first = find(&rows, "first", "once-user")[0];
    let second = find(&rows, "second", "once-user")[0];
    assert_eq!(
        second["person_properties"],
        json!({"$creator_event_uuid": first["uuid"], "prop": "value"})
    );
    // Login flow: the anonymous event and the $identify share one non-zero person.
    let anonymous = find(&rows, "anonymous", "anon-id")[0];
    let identify = find(&rows, "$identify", "known-id")[0];
    assert_eq!(anonymous["person_id"], identify["person_id"]);
    assert_ne!(
        anonymous["person_id"],
        "00000000-0000-0000-0000-000000000000"
    );
    // Illegal alias: all three events stored, two persons, and the $set still applied.
    let illegal: Vec<&Value> = rows
        .iter()
        .filter(|row| row["distinct_id"] == "illegal-user" || row["distinct_id"] == "0")
        .collect();
    assert_eq!(illegal.len(), 3);
    let persons: std::collections::HashSet<&str> = illegal
        .iter()
        .filter_map(|row| row["person_id"].as_str())
        .collect();
    assert_eq!(persons.len(), 2, "{illegal:#?}");
    let merge = find(&rows, "$merge_dangerously", "illegal-user")[0];
    assert_eq!(merge["person_properties"]["merged"], "no");
    let client = deployment.postgres.client().await;
    let merged: Value = client
        .query_one(
            "SELECT p.properties FROM posthog_person p JOIN posthog_persondistinctid d ON d.person_id = p.id \
             WHERE d.distinct_id = 'illegal-user'",
            &[],
        )
        .await
        .expect("the person")
        .get(0);
    assert_eq!(merged["merged"], "no");
    deployment.teardown().await;
}

/// Each event's group columns, by event name and `$group_0` key: `[group0_properties,
/// group1_properties]` parsed, and `group0_created_at`.
async fn group_columns(deployment: &Deployment) -> Vec<Value> {
    let text = clickhouse_query(&format!(
        "SELECT event, distinct_id, properties, group0_properties, group1_properties, \
         toString(group0_created_at) AS group0_created_at \
         FROM {}.events WHERE team_id = {} FORMAT JSONEachRow",
        deployment.clickhouse_database, deployment.team_id
    ))
    .await;
    json_rows(
        &text,
        &["properties", "group0_properties", "group1_properties"],
    )
}

/// 7.2 groups: `$groupidentify` with `$group_set` shows in `group0_properties` of later events
/// and a second identify updates it; without `$group_set` the group is `{}`; `$groups` names
/// groups by type, each type taking the next index. Postgres and ClickHouse's `groups` keep
/// each group's newest version.
#[tokio::test]
async fn groups_behave_as_in_posthogs_ingestion_suite() {
    let deployment = Deployment::create().await;
    let (_server, _addr) = deployment.start_server();
    let identify = |key: &str, set: Option<Value>| {
        let mut properties = json!({"$group_type": "organization", "$group_key": key});
        if let Some(set) = set {
            properties["$group_set"] = set;
        }
        json!({"event": "$groupidentify", "distinct_id": "group-user", "properties": properties})
    };
    send_phase(
        &deployment,
        &[
            identify("posthog", Some(json!({"prop": "value"}))),
            identify("no-set", None),
        ],
        2,
    )
    .await;
    send_phase(
        &deployment,
        &[
            json!({"event": "with-group", "distinct_id": "group-user", "properties": {"$group_0": "posthog"}}),
            json!({"event": "without-set", "distinct_id": "group-user", "properties": {"$group_0": "no-set"}}),
            json!({"event": "by-type", "distinct_id": "other-user", "properties": {"$groups": {"organization": "posthog", "project": "p1"}}}),
        ],
        5,
    )
    .await;
    send_phase(
        &deployment,
        &[identify("posthog", Some(json!({"prop": "updated value"})))],
        6,
    )
    .await;
    send_phase(
        &deployment,
        &[json!({"event": "after-update", "distinct_id": "group-user", "properties": {"$group_0": "posthog"}})],
        7,
    )
    .await;

    let rows = group_columns(&deployment).await;
    let row = |event: &str| {
        rows.iter()
            .find(|row| row["event"] == event)
            .unwrap_or_else(|| panic!("no {event} row in {rows:#?}"))
    };
    assert_eq!(
        row("with-group")["group0_properties"],
        json!({"prop": "value"})
    );
    assert_ne!(
        row("with-group")["group0_created_at"],
        "1970-01-01 00:00:00"
    );
    assert_eq!(row("without-set")["group0_properties"], json!({}));
    assert_eq!(
        row("after-update")["group0_properties"],
        json!({"prop": "updated value"})
    );
    // $groups: organization was registered first (index 0), project next (index 1), whose
    // group was never identified.
    let by_type = row("by-type");
    assert_eq!(by_type["properties"]["$group_0"], "posthog");
    assert_eq!(by_type["properties"]["$group_1"], "p1");
    assert_eq!(by_type["group0_properties"], json!({"prop": "value"}));
    assert_eq!(by_type["group1_properties"], json!({}));

    let client = deployment.postgres.client().await;
    let types: Vec<(String, i32)> = client
        .query(
            "SELECT group_type, group_type_index FROM posthog_grouptypemapping \
             ORDER BY group_type_index",
            &[],
        )
        .await
        .expect("group types")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        types,
        [("organization".to_owned(), 0), ("project".to_owned(), 1)]
    );
    let group = client
        .query_one(
            "SELECT group_properties, version FROM posthog_group WHERE group_key = 'posthog'",
            &[],
        )
        .await
        .expect("the posthog group");
    assert_eq!(group.get::<_, Value>(0), json!({"prop": "updated value"}));
    assert_eq!(group.get::<_, i64>(1), 2);
    let stored = clickhouse_query(&format!(
        "SELECT group_key, group_properties, version FROM {}.groups FINAL \
         WHERE team_id = {} ORDER BY group_key FORMAT JSONEachRow",
        deployment.clickhouse_database, deployment.team_id
    ))
    .await;
    let stored: Vec<Value> = stored
        .lines()
        .map(|line| serde_json::from_str(line).expect("group row"))
        .collect();
    assert_eq!(
        stored,
        [
            json!({"group_key": "no-set", "group_properties": "{}", "version": "1"}),
            json!({"group_key": "posthog", "group_properties": "{\"prop\":\"updated value\"}", "version": "2"}),
        ]
    );
    deployment.teardown().await;
}

/// A stored property definition: `property_type`, `is_numerical`, `group_type_index`.
type Definition = (Option<String>, bool, Option<i16>);

/// 7.4: each property's type is decided by its first value, as PostHog's
/// `definitions.test.ts` checks; the event, its properties, person properties from `$set`,
/// group properties from `$group_set`, and the team's `ingested_event` flag are recorded.
#[tokio::test]
async fn definitions_behave_as_in_posthogs_definitions_suite() {
    let deployment = Deployment::create().await;
    let (_server, _addr) = deployment.start_server();
    let typed = json!({
        "string_prop": "hehe",
        "int_prop": 2, "float_prop": 2.1234, "int_text": "2", "float_text": "2.1234",
        "date_1": "01/01/2020 00:00:00", "date_2": "01-01-2020 00:00:00",
        "date_3": "2020/01/01 00:00:00", "date_4": "2020-01-01T00:00:00Z",
        "date_5": "2020-01-01 00:00:00", "date_6": "2020-01-01",
        "bool_prop": true, "bool_text": "true",
        "utm_abc": 1234, "utm_123": 1234,
        "$set": {"plan": "pro"},
    });
    send_phase(
        &deployment,
        &[
            json!({"event": "typed", "distinct_id": "definer", "properties": typed}),
            json!({"event": "$groupidentify", "distinct_id": "definer", "properties":
                {"$group_type": "company", "$group_key": "acme", "$group_set": {"seats": 10}}}),
        ],
        2,
    )
    .await;

    let client = deployment.postgres.client().await;
    let definitions: HashMap<(String, i16), Definition> =
        wait_for("property definitions written", async || {
            let rows = client
                .query(
                    "SELECT name, type, property_type, is_numerical, group_type_index \
                     FROM posthog_propertydefinition",
                    &[],
                )
                .await
                .ok()?;
            let definitions: HashMap<_, _> = rows
                .iter()
                .map(|row| {
                    (
                        (row.get(0), row.get(1)),
                        (row.get(2), row.get(3), row.get(4)),
                    )
                })
                .collect();
            definitions
                .contains_key(&("seats".to_owned(), 3))
                .then_some(definitions)
        })
        .await;
    let of = |name: &str, kind: i16| {
        definitions
            .get(&(name.to_owned(), kind))
            .unwrap_or_else(|| panic!("no definition of {name} ({kind}) in {definitions:#?}"))
            .clone()
    };
    assert_eq!(
        of("string_prop", 1),
        (Some("String".to_owned()), false, None)
    );
    for name in ["int_prop", "float_prop", "int_text", "float_text"] {
        assert_eq!(
            of(name, 1),
            (Some("Numeric".to_owned()), true, None),
            "{name}"
        );
    }
    for n in 1..=6 {
        assert_eq!(
            of(&format!("date_{n}"), 1).0.as_deref(),
            Some("DateTime"),
            "date_{n}"
        );
    }
    assert_eq!(of("bool_prop", 1).0.as_deref(), Some("Boolean"));
    assert_eq!(of("bool_text", 1).0.as_deref(), Some("Boolean"));
    assert_eq!(of("utm_abc", 1).0.as_deref(), Some("String"));
    assert_eq!(of("utm_123", 1).0.as_deref(), Some("String"));
    assert_eq!(
        of("plan", 2).0.as_deref(),
        Some("String"),
        "a person property"
    );
    assert!(!definitions.contains_key(&("$set".to_owned(), 1)));
    assert_eq!(of("seats", 3), (Some("Numeric".to_owned()), true, Some(0)));

    let events: Vec<String> = client
        .query(
            "SELECT name FROM posthog_eventdefinition ORDER BY name",
            &[],
        )
        .await
        .expect("event definitions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(events, ["$groupidentify", "typed"]);
    let on_typed: i64 = client
        .query_one(
            "SELECT count(*) FROM posthog_eventproperty WHERE event = 'typed' \
             AND property IN ('string_prop', 'utm_abc', 'plan')",
            &[],
        )
        .await
        .expect("event properties")
        .get(0);
    assert_eq!(
        on_typed, 2,
        "string_prop and utm_abc are on the event; plan is a person's"
    );
    let ingested: bool = client
        .query_one(
            "SELECT ingested_event FROM posthog_team WHERE id = $1",
            &[&(deployment.team_id as i32)],
        )
        .await
        .expect("team")
        .get(0);
    assert!(ingested, "the team's first event sets ingested_event");
    deployment.teardown().await;
}

/// The plugin of PostHog's `plugins.test.ts`, plus a distinct-id rewrite, a runtime throw and a
/// job queued from onEvent.
const SUITE_PLUGIN: &str = r#"
export async function processEvent(event) {
    if (event.event === 'drop me') return null
    if (event.event === 'throw me') throw new Error('thrown on purpose')
    if (event.event === 'rename me') event.distinct_id = `renamed-${event.distinct_id}`
    event.properties = event.properties || {}
    event.properties.processed = 'hell yes'
    event.properties.upperUuid = event.uuid ? event.uuid.toUpperCase() : null
    event.properties.runCount = (event.properties.runCount || 0) + 1
    return event
}
export async function onEvent(event, { jobs }) {
    if (event.event === 'run job') {
        await jobs.runMeAsync({ uuid: event.uuid }).runNow()
    }
}
export const jobs = {
    runMeAsync: async (payload, { config }) => {
        await fetch(config.url + '/job', { method: 'POST', body: JSON.stringify(payload) })
    },
}
"#;

/// 7.3: processEvent's changes are stored once, a rewritten distinct_id is the row's and has a
/// person, a dropped event is neither stored nor a person and is counted, an event whose
/// plugin threw is stored with `$plugins_failed`, and a job queued from onEvent runs.
#[tokio::test]
async fn plugins_behave_as_in_posthogs_plugins_suite() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = common::HttpRecorder::start().await;
    let deployment = Deployment::create().await;
    let client = deployment.postgres.client().await;
    deployment
        .insert_source_plugin(
            "suite",
            "index.ts",
            SUITE_PLUGIN,
            json!({"url": destination.url}),
        )
        .await;
    let (_server, addr) = deployment.start_server();

    let rows = send_phase(
        &deployment,
        &[
            json!({"event": "custom", "distinct_id": "plain", "properties": {}}),
            json!({"event": "drop me", "distinct_id": "dropped", "properties": {}}),
            json!({"event": "rename me", "distinct_id": "d1", "properties": {}}),
            json!({"event": "throw me", "distinct_id": "thrower", "properties": {"kept": true}}),
            json!({"event": "run job", "distinct_id": "jobber", "properties": {}}),
        ],
        4,
    )
    .await;
    let custom = find(&rows, "custom", "plain")[0];
    assert_eq!(custom["properties"]["processed"], "hell yes");
    assert_eq!(custom["properties"]["runCount"], 1);
    assert_eq!(
        custom["properties"]["upperUuid"],
        custom["uuid"].as_str().unwrap().to_uppercase()
    );
    assert_eq!(
        custom["properties"]["$plugins_succeeded"],
        json!(["suite (10)"])
    );
    let renamed = find(&rows, "rename me", "renamed-d1");
    assert_eq!(renamed.len(), 1, "{rows:#?}");
    let thrown = find(&rows, "throw me", "thrower")[0];
    assert_eq!(thrown["properties"]["kept"], true);
    assert_eq!(
        thrown["properties"]["$plugins_failed"],
        json!(["suite (10)"])
    );
    assert_eq!(thrown["properties"]["$plugins_succeeded"], json!([]));
    assert!(find(&rows, "drop me", "dropped").is_empty());

    let distinct_ids = distinct_ids(&client).await;
    assert_eq!(
        distinct_ids,
        ["jobber", "plain", "renamed-d1", "thrower"],
        "a person for each stored event's distinct id, none for the dropped one"
    );

    let (method, path, body) = destination
        .next(Duration::from_secs(30))
        .await
        .expect("the job queued from onEvent ran");
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/job"));
    let job_event = find(&rows, "run job", "jobber")[0];
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["uuid"],
        job_event["uuid"]
    );

    let metrics = common::scrape_metrics(&addr).await;
    let dropped = common::metric_value(
        &metrics,
        "ingestion_event_dropped_total",
        &["drop_cause=\"dropped_by_plugin\""],
    );
    assert_eq!(dropped, Some(1.0), "{metrics}");
    deployment.teardown().await;
}

/// 7.12 happy path: `$process_person_profile: false` stores the event without creating or
/// changing a person (`person_mode` propertyless, empty person properties, PostHog's id for the
/// distinct id), drops person-changing events, and lends an existing person's id.
#[tokio::test]
async fn personless_events_are_stored_without_persons() {
    let deployment = Deployment::create().await;
    let (_server, _addr) = deployment.start_server();
    send_phase(
        &deployment,
        &[json!({"event": "signup", "distinct_id": "member", "properties": {"$set": {"plan": "pro"}}})],
        1,
    )
    .await;
    let rows = send_phase(
        &deployment,
        &[
            json!({"event": "visit", "distinct_id": "ghost",
                   "properties": {"$process_person_profile": false, "$set": {"a": 1}, "$set_once": {"b": 2}}}),
            json!({"event": "$identify", "distinct_id": "ghost",
                   "properties": {"$process_person_profile": false, "$anon_distinct_id": "other"}}),
            json!({"event": "visit", "distinct_id": "member", "properties": {"$process_person_profile": false}}),
            json!({"event": "visit", "distinct_id": "full", "properties": {"$process_person_profile": true}}),
        ],
        4,
    )
    .await;
    let ghost = find(&rows, "visit", "ghost")[0];
    assert_eq!(ghost["person_mode"], "propertyless");
    assert_eq!(ghost["person_properties"], json!({}));
    assert_eq!(ghost["person_created_at"], "1970-01-01 00:00:05");
    let expected_id = uuid::Uuid::new_v5(
        &uuid::Uuid::parse_str("932979b4-65c3-4424-8467-0b66ec27bc22").unwrap(),
        format!("{}:ghost", deployment.team_id).as_bytes(),
    );
    assert_eq!(ghost["person_id"], expected_id.to_string());
    assert_eq!(ghost["properties"]["$process_person_profile"], false);
    assert!(ghost["properties"].get("$set").is_none(), "{ghost}");
    assert!(ghost["properties"].get("$set_once").is_none(), "{ghost}");
    assert!(
        find(&rows, "$identify", "ghost").is_empty(),
        "a personless $identify is dropped"
    );

    let member = find(&rows, "visit", "member")[0];
    let signup = find(&rows, "signup", "member")[0];
    assert_eq!(member["person_id"], signup["person_id"]);
    assert_eq!(member["person_mode"], "propertyless");
    assert_eq!(member["person_properties"], json!({}));
    let full = find(&rows, "visit", "full")[0];
    assert_eq!(full["person_mode"], "full");
    assert!(full["properties"].get("$process_person_profile").is_none());

    let client = deployment.postgres.client().await;
    let ids = distinct_ids(&client).await;
    assert_eq!(
        ids,
        ["full", "member"],
        "no person for the personless ghost"
    );
    // When the ghost later gets a person, it is the id its personless events carried.
    let rows = send_phase(
        &deployment,
        &[json!({"event": "signup", "distinct_id": "ghost", "properties": {}})],
        5,
    )
    .await;
    assert_eq!(
        find(&rows, "signup", "ghost")[0]["person_id"],
        expected_id.to_string()
    );
    wait_for("the personless $identify's warning", async || {
        let warnings = clickhouse_query(&format!(
            "SELECT type FROM {}.ingestion_warnings WHERE team_id = {} FORMAT TSV",
            deployment.clickhouse_database, deployment.team_id
        ))
        .await;
        warnings
            .contains("invalid_event_when_process_person_profile_is_false")
            .then_some(())
    })
    .await;
    deployment.teardown().await;
}

/// An action with `post_to_slack` and its steps, for the deployment's team.
async fn insert_action(
    client: &tokio_postgres::Client,
    team_id: i64,
    name: &str,
    format: &str,
    step: Value,
) {
    let team = i32::try_from(team_id).expect("team id");
    let action: i32 = client
        .query_one(
            "INSERT INTO posthog_action (name, team_id, post_to_slack, slack_message_format) \
             VALUES ($1, $2, true, $3) RETURNING id",
            &[&name, &team, &format],
        )
        .await
        .expect("action")
        .get(0);
    let text = |key: &str| step[key].as_str().map(str::to_owned);
    client
        .execute(
            "INSERT INTO posthog_actionstep (action_id, event, tag_name, text, url, url_matching) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &action,
                &text("event"),
                &text("tag_name"),
                &text("text"),
                &text("url"),
                &text("url_matching"),
            ],
        )
        .await
        .expect("action step");
}

/// 7.11: the team's `slack_incoming_webhook` gets exactly `{"text":"default"}` for an
/// `$autocapture` event matching an action with `post_to_slack` and `slack_message_format`
/// `default` (tag, text and url step), and nothing for events that do not match; an action
/// added later is loaded on `reload-action` and formats its tokens.
#[tokio::test]
async fn action_webhooks_behave_as_in_posthogs_webhooks_suite() {
    plugin_server::telemetry::install_tls_provider();
    let mut destination = common::HttpRecorder::start().await;
    let deployment = Deployment::create().await;
    let client = deployment.postgres.client().await;
    client
        .execute(
            "UPDATE posthog_team SET slack_incoming_webhook = $1 WHERE id = $2",
            &[
                &format!("{}/slack", destination.url),
                &(i32::try_from(deployment.team_id).expect("team id")),
            ],
        )
        .await
        .expect("webhook");
    insert_action(
        &client,
        deployment.team_id,
        "Clicked the docs",
        "default",
        json!({"event": "$autocapture", "tag_name": "div", "text": "text", "url": "posthog.com/docs"}),
    )
    .await;
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL: run functional_tests/run.sh");
    let (_server, _addr) = deployment.start_server_with(&[
        ("REDIS_URL", redis.clone()),
        ("CLUSTER_PREFIX", format!("{}:", deployment.kafka_prefix)),
        ("SITE_URL", "https://app.example.com".to_owned()),
    ]);
    let autocapture = |distinct_id: &str, url: &str| {
        json!({"event": "$autocapture", "distinct_id": distinct_id, "properties": {
            "$current_url": url,
            "$elements": [{"tag_name": "div", "$el_text": "text", "nth_child": 1, "nth_of_type": 1}],
        }})
    };
    send_phase(
        &deployment,
        &[
            autocapture("clicker", "https://posthog.com/docs/start"),
            autocapture("elsewhere", "https://posthog.com/blog"),
            json!({"event": "$pageview", "distinct_id": "viewer", "properties": {"$current_url": "https://posthog.com/docs"}}),
        ],
        3,
    )
    .await;
    let (method, path, body) = destination
        .next(Duration::from_secs(20))
        .await
        .expect("the webhook was posted");
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/slack"));
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"text": "default"})
    );
    assert!(
        destination.next(Duration::from_secs(2)).await.is_none(),
        "only the matching event posts"
    );

    insert_action(
        &client,
        deployment.team_id,
        "Signed up",
        "[action.name] by [person]: [event.properties.plan]",
        json!({"event": "signup"}),
    )
    .await;
    let redis = redis::Client::open(redis).expect("redis url");
    let mut connection = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let _: i64 = redis::cmd("PUBLISH")
        .arg("reload-action")
        .arg(json!({"teamId": deployment.team_id, "actionId": 2}).to_string())
        .query_async(&mut connection)
        .await
        .expect("published");
    // The reload runs in the background: a signup is sent until one arrives after it.
    let signup = envelope(
        &deployment.token,
        "new-user",
        json!({"event": "signup", "properties": {"plan": "pro"}}),
        json!({}),
    );
    let mut body = None;
    for _ in 0..10 {
        produce(&deployment.topic(), std::slice::from_ref(&signup)).await;
        if let Some((_, _, posted)) = destination.next(Duration::from_secs(2)).await {
            body = Some(posted);
            break;
        }
    }
    let body = body.expect("the reloaded action posted");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"text": "[Signed up](https://app.example.com/action/2) by \
                [new-user](https://app.example.com/person/new-user): pro"})
    );
    deployment.teardown().await;
}
