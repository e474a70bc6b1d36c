//! A nats-server whose only users are the ones `saga_nats::permissions` generates from
//! definitions and an access policy, each with an nkey seed on disk; connections as each user
//! that record the permission denials the server sends them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga_core::SagaDefinition;
use saga_nats::permissions::{inbox_prefix, permissions, server_config, Access, UserPermissions};
use saga_nats::NatsOptions;

use crate::{NatsServer, NatsServerOptions};

/// The server errors (permission violations) one connection was sent.
pub type Denials = Arc<Mutex<Vec<String>>>;

/// A server with authentication on: one user per role, with only its generated permissions.
pub struct Bus {
    /// The server.
    pub server: NatsServer,
    dir: PathBuf,
    seeds: BTreeMap<String, PathBuf>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bus {
    /// Starts a server whose users are the generated ones for `defs` and `access`.
    ///
    /// # Panics
    ///
    /// If the permissions cannot be generated or the server does not start.
    pub fn start(defs: &[SagaDefinition], access: &Access) -> Bus {
        let users = permissions(defs, access).expect("permissions");
        Bus::start_with(&users, NatsServerOptions::default())
    }

    /// Starts a server (with `options`) whose users are `users`.
    ///
    /// # Panics
    ///
    /// If the server does not start.
    pub fn start_with(users: &[UserPermissions], options: NatsServerOptions) -> Bus {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("saga-perms-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut seeds = BTreeMap::new();
        let mut public = BTreeMap::new();
        for u in users {
            let key = nkeys::KeyPair::new_user();
            let path = dir.join(format!("{}.nk", u.user));
            std::fs::write(&path, key.seed().unwrap()).unwrap();
            seeds.insert(u.user.clone(), path);
            public.insert(u.user.clone(), key.public_key());
        }
        let config = server_config(users, &public);
        let extra_config = Some(match options.extra_config {
            Some(more) => format!("{more}\n{config}"),
            None => config,
        });
        let server = NatsServer::start_with(NatsServerOptions { extra_config, ..options });
        Bus { server, dir, seeds }
    }

    /// Each user's nkey seed file.
    pub fn seeds(&self) -> &BTreeMap<String, PathBuf> {
        &self.seeds
    }

    /// The connection options of `user`: its nkey and inbox prefix.
    pub fn options(&self, user: &str) -> NatsOptions {
        NatsOptions {
            nkey: Some(self.seeds[user].clone()),
            inbox_prefix: Some(inbox_prefix(user)),
            ..NatsOptions::with_url(self.server.url())
        }
    }

    /// Connects as `user`, recording every server error the connection is sent.
    pub async fn connect(&self, user: &str) -> (async_nats::Client, Denials) {
        let options = self.options(user);
        let denials: Denials = Arc::default();
        let seen = denials.clone();
        let opts = options.connect_options(user).await.unwrap().event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        });
        let client = options.connect_with(opts).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        (client, denials)
    }
}

/// Waits until `denials` holds a permission violation naming `subject`.
///
/// # Panics
///
/// If none comes within 10 seconds.
pub async fn expect_denied(who: &str, denials: &Denials, subject: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let seen = denials.lock().unwrap();
            if seen.iter().any(|d| d.contains("Permissions Violation") && d.contains(subject)) {
                return;
            }
            assert!(Instant::now() < deadline, "{who}: no denial for {subject}; saw {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that a connection was refused nothing.
///
/// # Panics
///
/// If it was.
pub fn no_denials(who: &str, denials: &Denials) {
    let seen = denials.lock().unwrap();
    assert!(seen.is_empty(), "{who} was refused with its generated permissions: {seen:?}");
}
