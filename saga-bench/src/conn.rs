//! How the bench's connections reach their server: its URL and, with `--auth`, each role's
//! nkey and inbox prefix (the permissions of ours are the ones `saga-coordinator permissions`
//! generates; the floor's one user may do anything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use saga_core::SagaDefinition;
use saga_nats::permissions::{inbox_prefix, permissions, Access, UserPermissions};
use saga_nats::NatsOptions;
use saga_tests::auth::Bus;
use saga_tests::{NatsServer, NatsServerOptions};

/// The user of every connection of the floor, and of the stored-message counter for it.
pub(crate) const FLOOR_USER: &str = "floor";
/// Ours' coordinator replicas' user; it also counts the stored messages.
pub(crate) const COORDINATOR_USER: &str = "coordinator";
/// Ours' client: a starter of the bench saga.
pub(crate) const CLIENT_USER: &str = "bench";

/// A server the bench started: with authentication off, or on.
pub(crate) enum Server {
    Open(NatsServer),
    Auth(Bus),
}

impl Server {
    /// Starts a server with `options`; with `users`, authentication is on.
    pub(crate) fn start(options: NatsServerOptions, users: Option<Vec<UserPermissions>>) -> Self {
        match users {
            None => Server::Open(NatsServer::start_with(options)),
            Some(users) => Server::Auth(Bus::start_with(&users, options)),
        }
    }

    fn nats(&self) -> &NatsServer {
        match self {
            Server::Open(server) => server,
            Server::Auth(bus) => &bus.server,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.nats().pid()
    }

    /// How to connect to it.
    pub(crate) fn conn(&self) -> Conn {
        let url = self.nats().url();
        match self {
            Server::Open(_) => Conn { url, auth: None },
            Server::Auth(bus) => Conn { url, auth: Some(Arc::new(bus.seeds().clone())) },
        }
    }
}

/// The users of ours for a bench saga `def`: the generated permissions of its coordinator,
/// participants and client.
pub(crate) fn ours_users(def: &SagaDefinition) -> anyhow::Result<Vec<UserPermissions>> {
    let access = Access {
        coordinator: Some(COORDINATOR_USER.into()),
        starters: [(CLIENT_USER.to_owned(), BTreeSet::from([def.name.to_string()]))].into(),
        // The first step's service publishes the event an `--await-step` saga waits for.
        publishers: ["p0".to_owned()].into(),
        ..Access::default()
    };
    permissions(std::slice::from_ref(def), &access).context("generating ours' permissions")
}

/// The floor's one user, which may do anything.
pub(crate) fn floor_users() -> Vec<UserPermissions> {
    vec![UserPermissions {
        user: FLOOR_USER.into(),
        roles: vec!["floor".into()],
        publish: [">".to_owned()].into(),
        subscribe: [">".to_owned()].into(),
        allow_responses: false,
    }]
}

/// Where a connection goes, and as whom.
#[derive(Clone)]
pub(crate) struct Conn {
    url: String,
    /// With authentication on: each user's nkey seed file.
    auth: Option<Arc<BTreeMap<String, PathBuf>>>,
}

impl Conn {
    /// The server's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The connection options of `user` (who `user` is matters only with authentication on).
    pub(crate) fn options(&self, user: &str) -> NatsOptions {
        match &self.auth {
            None => NatsOptions::with_url(self.url.clone()),
            Some(seeds) => NatsOptions {
                nkey: seeds.get(user).cloned(),
                inbox_prefix: Some(inbox_prefix(user)),
                ..NatsOptions::with_url(self.url.clone())
            },
        }
    }

    /// Connects as `user`.
    pub(crate) async fn connect(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        self.options(user).connect(user).await.with_context(|| format!("connecting as {user}"))
    }

    /// The environment a child process connects as `user` with (nkey and inbox prefix).
    pub(crate) fn env(&self, user: &str) -> Vec<(&'static str, String)> {
        let options = self.options(user);
        let mut env = Vec::new();
        if let Some(nkey) = options.nkey {
            env.push(("NATS_NKEY", nkey.display().to_string()));
        }
        if let Some(prefix) = options.inbox_prefix {
            env.push(("NATS_INBOX_PREFIX", prefix));
        }
        env
    }
}
