//! Least privilege on the bus: the NATS permissions of every role, computed from the saga
//! definitions and an [`Access`] policy (who starts, follows and operates which sagas).
//!
//! One NATS user per service (its roles' permissions combined), one for the coordinator
//! replicas and one per operator. Each user's reply inboxes are `_INBOX.<user>` (connect with
//! that inbox prefix), so no user can read another's JetStream answers. docs/SECURITY.md
//! explains what each role may and may not do; [`server_config`] writes the nats-server
//! `authorization` block and [`nsc_json`] the same permissions for decentralized auth.
//!
//! Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use saga_core::{check_token, SagaDefinition, ServiceName};
use serde::Serialize;

use crate::subjects;

/// Who may do what beyond what the definitions say (their participant services are implied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The coordinator replicas' user (default `coordinator`).
    pub coordinator: Option<String>,
    /// Service → the definitions whose sagas it starts (and reads).
    pub starters: BTreeMap<String, BTreeSet<String>>,
    /// Service → the definitions whose lifecycle events it follows, with a durable consumer
    /// named after the service (or `<service>-<saga>`, one per definition).
    pub followers: BTreeMap<String, BTreeSet<String>>,
    /// Operators: people or tools that act on sagas (cancel, retry, skip, resolve) and read
    /// every saga. Each acts under its own name.
    pub operators: BTreeSet<String>,
    /// Service → key-value buckets of its own that it creates and uses (application state,
    /// not saga state).
    pub buckets: BTreeMap<String, BTreeSet<String>>,
    /// Service → other services' key-value buckets it may read (an auditor's view).
    pub readers: BTreeMap<String, BTreeSet<String>>,
    /// Services that publish their own domain events, on `domain.<service>.>` only.
    pub publishers: BTreeSet<String>,
    /// Service → the definitions whose sagas it may send signals to (and read).
    pub signallers: BTreeMap<String, BTreeSet<String>>,
}

/// One NATS user's permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserPermissions {
    /// The user name (a token).
    pub user: String,
    /// Its roles, for people: `coordinator`, `participant`, `starter of place-order`, …
    pub roles: Vec<String>,
    /// Subjects it may publish to.
    pub publish: BTreeSet<String>,
    /// Subjects it may subscribe to (`subject queue` confines a subscription to a queue
    /// group).
    pub subscribe: BTreeSet<String>,
    /// Whether it may answer requests it received (on the requester's inbox) without a
    /// publish permission there: the coordinator, for its admin service.
    pub allow_responses: bool,
}

/// Why the permissions cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionsError {
    /// A name is not a token.
    #[error(
        "{what} {value:?} {reason}: names must be tokens (letters, digits, '_' and '-', 1 to 64)"
    )]
    BadName {
        /// What the name is.
        what: &'static str,
        /// The name.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The policy names a definition that is not among the definitions.
    #[error("{service} is to {role} saga {saga:?}, but no definition has that name (definitions: {known})")]
    UnknownSaga {
        /// The service.
        service: String,
        /// `start` or `follow`.
        role: &'static str,
        /// The unknown name.
        saga: String,
        /// The definitions there are.
        known: String,
    },
    /// Two roles would share one user in a way that breaks confinement.
    #[error("{0}")]
    Clash(String),
}

/// The inbox prefix of `user`: connect with it (`--inbox-prefix`).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

/// The JetStream API prefix.
const API: &str = "$JS.API";

fn token(what: &'static str, value: &str) -> Result<(), PermissionsError> {
    check_token(value).map_err(|e| PermissionsError::BadName {
        what,
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

/// Checks that `bucket` may hold a service's own state: a token, and not one of the saga
/// framework's buckets (`saga_…`); `what` says whose it is, for the error.
fn app_bucket(bucket: &str, what: impl Fn() -> String) -> Result<(), PermissionsError> {
    token("bucket", bucket)?;
    if bucket.starts_with("saga_") {
        return Err(PermissionsError::Clash(format!(
            "{}: names starting with saga_ are the saga framework's, not a service's to use",
            what()
        )));
    }
    Ok(())
}

/// Builds one user's permission sets.
#[derive(Default)]
struct Grants {
    roles: Vec<String>,
    publish: BTreeSet<String>,
    subscribe: BTreeSet<String>,
    allow_responses: bool,
}

impl Grants {
    fn publish(&mut self, subjects: impl IntoIterator<Item = String>) {
        self.publish.extend(subjects);
    }
    fn subscribe(&mut self, subjects: impl IntoIterator<Item = String>) {
        self.subscribe.extend(subjects);
    }
    /// Reading key-value bucket `bucket` entry by entry (direct gets).
    fn get_bucket(&mut self, bucket: &str) {
        self.publish([
            format!("{API}.STREAM.INFO.KV_{bucket}"),
            format!("{API}.DIRECT.GET.KV_{bucket}.>"),
        ]);
    }
    /// Reading key-value bucket `bucket` whole: its entries, and its keys and history (which
    /// async-nats reads with an ephemeral consumer of the bucket's stream). Only for users
    /// who cannot write the bucket: a consumer delivers to a subject its creator names, so
    /// whoever can write a stream and create consumers on it can make the server publish
    /// anything anywhere (docs/SECURITY.md, "Relayed messages").
    fn list_bucket(&mut self, bucket: &str) {
        self.get_bucket(bucket);
        self.publish([
            format!("{API}.CONSUMER.CREATE.KV_{bucket}"),
            format!("{API}.CONSUMER.CREATE.KV_{bucket}.>"),
            format!("{API}.CONSUMER.DELETE.KV_{bucket}.>"),
            format!("$JS.FC.KV_{bucket}.>"),
        ]);
    }
    /// Reading (entry by entry) and writing key-value bucket `bucket`.
    fn write_bucket(&mut self, bucket: &str) {
        self.get_bucket(bucket);
        self.publish([format!("$KV.{bucket}.>")]);
    }
}

/// The permissions of every user: the coordinator, each service (participant, starter,
/// follower, owner of its buckets), each operator.
pub fn permissions(
    definitions: &[SagaDefinition],
    access: &Access,
) -> Result<Vec<UserPermissions>, PermissionsError> {
    let known: BTreeSet<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
    let known_list = known.iter().copied().collect::<Vec<_>>().join(", ");
    let check_saga = |service: &str, role: &'static str, saga: &str| {
        if known.contains(saga) {
            Ok(())
        } else {
            Err(PermissionsError::UnknownSaga {
                service: service.to_owned(),
                role,
                saga: saga.to_owned(),
                known: known_list.clone(),
            })
        }
    };
    let coordinator = access.coordinator.clone().unwrap_or_else(|| "coordinator".into());
    token("coordinator user", &coordinator)?;
    // The coordinator's user may do everything: no service may share it.
    let named = access
        .starters
        .keys()
        .chain(access.followers.keys())
        .chain(access.buckets.keys())
        .chain(access.readers.keys())
        .chain(access.operators.iter());
    for name in named {
        if *name == coordinator {
            return Err(PermissionsError::Clash(format!(
                "{name} is the coordinator's user name: a service or operator named so would share its rights"
            )));
        }
    }

    let mut users: BTreeMap<String, Grants> = BTreeMap::new();

    // The coordinator: trusted. It provisions every saga stream, bucket and consumer, so it
    // has the JetStream API; it sends every command and keeps every log.
    let c = users.entry(coordinator.clone()).or_default();
    c.roles.push("coordinator".into());
    c.publish([
        format!("{API}.>"),
        "$JS.ACK.SAGA_IN.>".into(),
        "saga.cmd.>".into(),
        "saga.log.>".into(),
        // What await steps wait for, kept under its correlation, and the matchers' acks and
        // dead letters.
        "saga.await.>".into(),
        format!("$JS.ACK.{}.saga-await-*.>", subjects::DOMAIN_STREAM),
        // Flow control of the ordered consumer that delivers what await steps wait for.
        format!("$JS.FC.{}.>", subjects::AWAIT_STREAM),
        "saga.dlq.saga-await-*".into(),
        subjects::dlq("coordinator"),
        format!("$KV.{}.>", subjects::DEFINITIONS_BUCKET),
        // Verdicts on operator actions, to the inbox the operator named.
        "_INBOX.>".into(),
    ]);
    // Its admin service answers on the requesters' inboxes.
    c.subscribe(["saga.reply.>".into(), "saga.admin.>".into(), "$SRV.>".into()]);
    c.allow_responses = true;

    // Participants: every service a definition names.
    let mut services: BTreeSet<ServiceName> = BTreeSet::new();
    for def in definitions {
        // Await steps send no command: they have no service.
        for step in def.steps.iter().filter(|s| s.awaits.is_none()) {
            services.insert(step.service.clone());
        }
    }
    for service in &services {
        let s = service.as_str();
        if s == coordinator {
            return Err(PermissionsError::Clash(format!(
                "service {s} has the coordinator's user name; name the coordinator's user otherwise"
            )));
        }
        let g = users.entry(s.to_owned()).or_default();
        g.roles.push("participant".into());
        g.subscribe([format!(
            "{} {}",
            subjects::commands_of(service),
            subjects::participant_group(service)
        )]);
        g.publish([format!("saga.reply.*.{s}.>"), subjects::dlq(s)]);
        g.write_bucket(&subjects::effects_bucket(service));
    }

    for (service, sagas) in &access.starters {
        token("starter service", service)?;
        let g = users.entry(service.clone()).or_default();
        for saga in sagas {
            token("saga name", saga)?;
            check_saga(service, "start", saga)?;
            g.roles.push(format!("starter of {saga}"));
            g.publish([
                format!("saga.in.*.{saga}.start"),
                format!("{API}.DIRECT.GET.SAGA_LOG.saga.log.*.{saga}.*"),
                format!("{API}.DIRECT.GET.SAGA_IN.saga.in.*.{saga}.start"),
                format!("saga.admin.timeline.{saga}"),
                format!("saga.admin.get.{saga}"),
            ]);
            g.subscribe([format!("saga.log.*.{saga}.*")]);
        }
        g.get_bucket(subjects::DEFINITIONS_BUCKET);
    }

    for (service, sagas) in &access.signallers {
        token("signaller service", service)?;
        let g = users.entry(service.clone()).or_default();
        for saga in sagas {
            token("saga name", saga)?;
            check_saga(service, "signal", saga)?;
            g.roles.push(format!("signaller of {saga}"));
            g.publish([
                format!("saga.signal.*.{saga}.*"),
                format!("{API}.DIRECT.GET.SAGA_LOG.saga.log.*.{saga}.*"),
                format!("{API}.DIRECT.GET.SAGA_IN.saga.in.*.{saga}.start"),
            ]);
        }
        g.get_bucket(subjects::DEFINITIONS_BUCKET);
    }

    let mut durables: BTreeMap<String, String> = BTreeMap::new();
    for (service, sagas) in &access.followers {
        token("follower service", service)?;
        let g = users.entry(service.clone()).or_default();
        for saga in sagas {
            token("saga name", saga)?;
            check_saga(service, "follow", saga)?;
            g.roles.push(format!("follower of {saga}"));
            for durable in [service.clone(), format!("{service}-{saga}")] {
                if check_token(&durable).is_err() {
                    continue;
                }
                // Two followers may not share a durable name (`a` of `b-c` and `a-b` of `c`
                // would both own `a-b-c`).
                if let Some(other) = durables.insert(durable.clone(), service.clone()) {
                    if other != *service {
                        return Err(PermissionsError::Clash(format!(
                            "followers {other} and {service} would both own the durable consumer {durable}: rename one"
                        )));
                    }
                }
                let log = subjects::LOG_STREAM;
                g.publish([
                    format!("{API}.CONSUMER.CREATE.{log}.{durable}.saga.log.*.{saga}.*"),
                    format!("{API}.CONSUMER.INFO.{log}.{durable}"),
                    format!("{API}.CONSUMER.MSG.NEXT.{log}.{durable}"),
                    format!("$JS.ACK.{log}.{durable}.>"),
                    subjects::dlq(&durable),
                ]);
            }
        }
    }

    for (service, buckets) in &access.buckets {
        token("service", service)?;
        let g = users.entry(service.clone()).or_default();
        for bucket in buckets {
            app_bucket(bucket, || format!("bucket {bucket} of {service}"))?;
            // The coordinator creates it (`--kv-bucket`): a user allowed to create a stream
            // could give it any subjects or sources, and capture other services' messages.
            g.roles.push(format!("owner of bucket {bucket}"));
            g.write_bucket(bucket);
        }
    }

    for (service, buckets) in &access.readers {
        token("service", service)?;
        let g = users.entry(service.clone()).or_default();
        for bucket in buckets {
            app_bucket(bucket, || format!("{service} is to read bucket {bucket}"))?;
            let owners = access.buckets.iter().filter(|(_, b)| b.contains(bucket));
            if owners.map(|(owner, _)| owner).any(|owner| owner == service) {
                return Err(PermissionsError::Clash(format!(
                    "{service} owns bucket {bucket}: it cannot also list it (docs/SECURITY.md, \"Relayed messages\")"
                )));
            }
            g.roles.push(format!("reader of bucket {bucket}"));
            g.list_bucket(bucket);
        }
    }

    for service in &access.publishers {
        token("service", service)?;
        if *service == coordinator || access.operators.contains(service) {
            return Err(PermissionsError::Clash(format!(
                "{service} publishes domain events: give it a service name of its own"
            )));
        }
        let g = users.entry(service.clone()).or_default();
        g.roles.push(format!("publisher of domain.{service}.>"));
        g.publish([format!("domain.{service}.>")]);
    }

    for operator in &access.operators {
        token("operator", operator)?;
        if users.contains_key(operator) {
            return Err(PermissionsError::Clash(format!(
                "operator {operator} has the user name of a service or the coordinator: give operators names of their own"
            )));
        }
        let g = users.entry(operator.clone()).or_default();
        g.roles.push("operator".into());
        g.publish([
            format!("saga.in.*.*.op.{operator}"),
            format!("{API}.DIRECT.GET.SAGA_LOG"),
            format!("{API}.DIRECT.GET.SAGA_LOG.>"),
            format!("{API}.DIRECT.GET.SAGA_IN.>"),
            format!("{API}.STREAM.INFO.SAGA_LOG"),
            format!("{API}.STREAM.INFO.SAGA_DLQ"),
            format!("{API}.DIRECT.GET.SAGA_DLQ"),
            format!("{API}.DIRECT.GET.SAGA_DLQ.>"),
            "saga.admin.>".into(),
            "$SRV.>".into(),
        ]);
        g.write_bucket(subjects::DEFINITIONS_BUCKET);
        g.subscribe(["saga.log.>".into()]);
    }

    // Every user: its own inboxes, and JetStream account information.
    Ok(users
        .into_iter()
        .map(|(user, mut g)| {
            g.subscribe([format!("{}.>", inbox_prefix(&user))]);
            g.publish([format!("{API}.INFO")]);
            UserPermissions {
                user,
                roles: g.roles,
                publish: g.publish,
                subscribe: g.subscribe,
                allow_responses: g.allow_responses,
            }
        })
        .collect())
}

/// The nats-server `authorization` block: one user per entry, authenticated by the nkey
/// (public key, `U…`) `nkeys` gives for its name.
pub fn server_config(users: &[UserPermissions], nkeys: &BTreeMap<String, String>) -> String {
    let list = |set: &BTreeSet<String>| {
        set.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
    };
    let mut out = String::from(
        "# Written by `saga-coordinator permissions`: one user per role, least privilege.\n\
         # Each user connects with its nkey seed and inbox prefix _INBOX.<user>.\n\
         authorization {\n  users = [\n",
    );
    for u in users {
        let key = nkeys.get(&u.user).map_or("<nkey of this user>", String::as_str);
        out.push_str(&format!("    # {}: {}\n", u.user, u.roles.join(", ")));
        out.push_str(&format!("    {{\n      nkey: {key:?}\n      permissions: {{\n"));
        out.push_str(&format!("        publish: {{ allow: [{}] }}\n", list(&u.publish)));
        out.push_str(&format!("        subscribe: {{ allow: [{}] }}\n", list(&u.subscribe)));
        if u.allow_responses {
            out.push_str("        allow_responses: true\n");
        }
        out.push_str("      }\n    }\n");
    }
    out.push_str("  ]\n}\n");
    out
}

/// The same permissions as JSON (`[{"user", "roles", "publish", "subscribe",
/// "allow_responses"}]`): with `nsc`, `nsc add user <user> --allow-pub … --allow-sub …` (and
/// `--allow-pub-response` where `allow_responses`) for each.
pub fn nsc_json(users: &[UserPermissions]) -> String {
    serde_json::to_string_pretty(users).expect("permissions serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga_core::SagaDefinition;

    fn demo() -> (Vec<SagaDefinition>, Access) {
        let def = SagaDefinition::builder("place-order")
            .step("reserve-items", "seller", "reserve", |s| s.compensation("release"))
            .step("schedule-shipment", "logistics", "schedule", |s| s.compensation("cancel"))
            .build();
        let access = Access {
            starters: [("orders".into(), ["place-order".into()].into())].into(),
            followers: [("notification".into(), ["place-order".into()].into())].into(),
            operators: ["alice".into()].into(),
            buckets: [("seller".into(), ["demo_stock".into()].into())].into(),
            ..Access::default()
        };
        (vec![def], access)
    }

    fn user<'a>(users: &'a [UserPermissions], name: &str) -> &'a UserPermissions {
        users.iter().find(|u| u.user == name).unwrap_or_else(|| panic!("no user {name}"))
    }

    #[test]
    fn each_role_gets_its_own_subjects_only() {
        let (defs, access) = demo();
        let users = permissions(&defs, &access).unwrap();
        let names: Vec<&str> = users.iter().map(|u| u.user.as_str()).collect();
        assert_eq!(
            names,
            ["alice", "coordinator", "logistics", "notification", "orders", "seller"]
        );

        let seller = user(&users, "seller");
        assert!(seller.subscribe.contains("saga.cmd.seller.> saga-seller"));
        assert!(seller.publish.contains("saga.reply.*.seller.>"));
        assert!(seller.publish.contains("$KV.saga_fx_seller.>"));
        assert!(seller.publish.contains("$KV.demo_stock.>"));
        // Writers of a stream never get to create consumers on it, nor to create streams.
        assert!(!seller
            .publish
            .iter()
            .any(|s| s.contains("CONSUMER") || s.contains("STREAM.CREATE")));
        assert!(seller.subscribe.contains("_INBOX.seller.>"));
        // Nothing of another service, no saga log, no commands of its own to send.
        let everything =
            seller.publish.iter().chain(&seller.subscribe).cloned().collect::<Vec<_>>();
        for forbidden in ["logistics", "saga.log", "SAGA_LOG", "saga.cmd.seller.> ", "saga.in."] {
            assert!(
                !everything.iter().any(|s| s.contains(forbidden) && !s.ends_with(" saga-seller")),
                "seller may touch {forbidden}: {everything:?}"
            );
        }

        let coordinator = user(&users, "coordinator");
        assert!(coordinator.allow_responses);
        assert!(users.iter().filter(|u| u.allow_responses).count() == 1);

        let orders = user(&users, "orders");
        assert!(orders.publish.contains("saga.admin.timeline.place-order"));
        assert!(orders.publish.contains("saga.in.*.place-order.start"));
        assert!(!orders.publish.iter().any(|s| s.contains(".op.")));
        assert!(orders.subscribe.contains("saga.log.*.place-order.*"));

        let notification = user(&users, "notification");
        assert!(notification
            .publish
            .contains("$JS.API.CONSUMER.CREATE.SAGA_LOG.notification.saga.log.*.place-order.*"));
        assert!(!notification.publish.iter().any(|s| s.starts_with("saga.log")));

        let alice = user(&users, "alice");
        assert!(alice.publish.contains("saga.in.*.*.op.alice"));
        assert!(!alice.publish.iter().any(|s| s.contains("saga.cmd") || s.contains(".start")));
    }

    #[test]
    fn a_publisher_of_domain_events_publishes_under_its_own_name_only() {
        let (defs, mut access) = demo();
        access.publishers.insert("seller".into());
        let users = permissions(&defs, &access).unwrap();
        let seller = user(&users, "seller");
        assert!(seller.publish.contains("domain.seller.>"));
        assert!(seller.roles.contains(&"publisher of domain.seller.>".to_owned()));
        assert!(!user(&users, "logistics").publish.iter().any(|s| s.starts_with("domain.")));
        access.publishers.insert("coordinator".into());
        assert!(permissions(&defs, &access).unwrap_err().to_string().contains("service name"));
    }

    #[test]
    fn a_policy_naming_what_is_not_there_is_refused() {
        let (defs, mut access) = demo();
        access.starters.insert("orders".into(), ["refund".into()].into());
        let err = permissions(&defs, &access).unwrap_err().to_string();
        assert_eq!(
            err,
            "orders is to start saga \"refund\", but no definition has that name (definitions: place-order)"
        );
        let (defs, mut access) = demo();
        access.operators.insert("seller".into());
        assert!(permissions(&defs, &access).unwrap_err().to_string().contains("operator seller"));
        let (defs, mut access) = demo();
        access.operators.insert("a.b".into());
        assert!(permissions(&defs, &access).unwrap_err().to_string().contains("operator \"a.b\""));
        let (defs, mut access) = demo();
        access.buckets.insert("orders".into(), ["saga_fx_seller".into()].into());
        assert!(permissions(&defs, &access).unwrap_err().to_string().contains("saga_"));
        let (defs, mut access) = demo();
        access.readers.insert("orders".into(), ["saga_fx_seller".into()].into());
        let err = permissions(&defs, &access).unwrap_err().to_string();
        assert!(
            err.starts_with("orders is to read bucket saga_fx_seller: names starting"),
            "{err}"
        );
        let (defs, mut access) = demo();
        access.readers.insert("seller".into(), ["demo_stock".into()].into());
        assert!(permissions(&defs, &access).unwrap_err().to_string().contains("owns bucket"));
        let (defs, mut access) = demo();
        access.starters.insert("coordinator".into(), ["place-order".into()].into());
        assert!(permissions(&defs, &access)
            .unwrap_err()
            .to_string()
            .contains("coordinator's user"));
        let (defs, mut access) = demo();
        access.followers.insert("a".into(), ["b-c".into()].into());
        access.followers.insert("a-b".into(), ["c".into()].into());
        let defs: Vec<SagaDefinition> =
            defs.into_iter()
                .chain(["b-c", "c"].map(|n| {
                    SagaDefinition::builder(n).step("s", "seller", "reserve", |s| s).build()
                }))
                .collect();
        let err = permissions(&defs, &access).unwrap_err().to_string();
        assert!(err.contains("would both own the durable consumer a-b-c"), "{err}");
    }

    #[test]
    fn the_server_config_lists_every_user_with_its_nkey() {
        let (defs, access) = demo();
        let users = permissions(&defs, &access).unwrap();
        let keys = [("seller".to_owned(), "UABC".to_owned())].into();
        let conf = server_config(&users, &keys);
        assert!(conf.contains("nkey: \"UABC\""));
        assert!(conf.contains("# seller: participant, owner of bucket demo_stock"));
        assert_eq!(conf.matches("nkey:").count(), users.len());
        let json: serde_json::Value = serde_json::from_str(&nsc_json(&users)).unwrap();
        assert_eq!(json.as_array().unwrap().len(), users.len());
    }
}
