//! A JetStream cluster of real `nats-server` processes on `127.0.0.1`, for tests that lose a
//! node: [`NatsCluster`].
//!
//! Each node has its own client port, route port and store directory; every node lists every
//! route, so any two nodes find each other. A node is killed (SIGKILL) and restarted like a
//! single [`NatsServer`]; with three nodes, one may be down while the other two keep a quorum.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::{Duration, Instant};

use crate::{find_nats_server, free_port, render_config, unique_temp_dir, NatsServer};
use crate::{NatsServerOptions, PORT_ATTEMPTS};

/// How long a new cluster may take to elect its JetStream meta leader.
const META_LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster of `nats-server` processes with JetStream, named `n1`, `n2`, …
///
/// Dropping it kills every node and removes their directories (unless `KEEP_NATS_LOGS` is
/// set). A cluster of one node is a single server with no cluster block, so that code written
/// for a cluster runs unchanged against one server.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    names: Vec<String>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until each accepts clients. JetStream may still be
    /// electing its meta leader: see [`NatsCluster::wait_for_jetstream`].
    ///
    /// # Panics
    ///
    /// Panics if `nats-server` is not on `PATH`, `size` is 0, or a node does not become ready
    /// within about 20 seconds.
    pub fn start(size: usize) -> Self {
        assert!(size > 0, "a cluster needs at least one node");
        let binary = find_nats_server();
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = distinct_free_ports(2 * size);
            let (client_ports, route_ports) = ports.split_at(size);
            let routes: Vec<String> =
                route_ports.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
            let names: Vec<String> = (1..=size).map(|i| format!("n{i}")).collect();
            let mut nodes = Vec::with_capacity(size);
            for (i, name) in names.iter().enumerate() {
                let dir = unique_temp_dir();
                fs::create_dir_all(&dir)
                    .unwrap_or_else(|e| panic!("cannot create store dir {}: {e}", dir.display()));
                let mut extra = format!("server_name: {name}\n");
                if size > 1 {
                    extra.push_str(&format!(
                        "cluster {{\n  name: saga-test\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                        route_ports[i],
                        routes.join(", ")
                    ));
                }
                let opts = NatsServerOptions { extra_config: Some(extra), ..Default::default() };
                let config_path = dir.join("nats-server.conf");
                fs::write(&config_path, render_config(client_ports[i], &dir, &opts))
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
                nodes.push(NatsServer {
                    binary: binary.clone(),
                    port: client_ports[i],
                    log_path: dir.join("nats-server.log"),
                    config_path,
                    dir,
                    child: None,
                });
            }
            // All at once: a node of a cluster waits for its peers.
            let spawned: Result<Vec<u64>, String> =
                nodes.iter_mut().map(NatsServer::spawn).collect();
            let ready = spawned.and_then(|offsets| {
                nodes.iter_mut().zip(offsets).try_for_each(|(node, offset)| node.wait_ready(offset))
            });
            match ready {
                Ok(()) => return NatsCluster { nodes, names },
                // Lost the race for a port: drop these nodes (killed, dirs removed) and retry.
                Err(failure) if failure.contains("address already in use") => {
                    last_failure = failure;
                }
                Err(failure) => panic!("{failure}"),
            }
        }
        panic!("{last_failure}");
    }

    /// Every node's client URL, comma-separated: what a client connects with.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`NatsCluster::start`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (from 0).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i` (from 0), to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Node `i`'s server name (`n1` for node 0).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The node whose server name is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Waits until JetStream answers through `client` (the cluster has a meta leader).
    ///
    /// # Errors
    ///
    /// The last refusal, when JetStream did not answer within 30 seconds.
    pub async fn wait_for_jetstream(client: &async_nats::Client) -> Result<(), String> {
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        loop {
            match js.query_account().await {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("JetStream did not answer in 30 s: {e}")),
            }
        }
    }

    /// The server name of stream `stream`'s leader; `None` while it has none (or the request
    /// fails within 250 ms: a stream with no leader does not answer).
    pub async fn stream_leader(client: &async_nats::Client, stream: &str) -> Option<String> {
        let mut handle = quick(client, QUICK).get_stream(stream).await.ok()?;
        let info = handle.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    }

    /// Every stream (key-value buckets included) and the server name of its leader, for the
    /// streams that have one.
    pub async fn stream_leaders(client: &async_nats::Client) -> BTreeMap<String, String> {
        use futures::TryStreamExt;
        let js = quick(client, Duration::from_secs(2));
        let infos: Vec<_> = js.streams().try_collect().await.unwrap_or_default();
        infos
            .into_iter()
            .filter_map(|info| Some((info.config.name, info.cluster?.leader?)))
            .collect()
    }

    /// Waits until every stream has a leader and every follower is current (a restarted node
    /// has caught up), for at most `timeout`.
    ///
    /// # Errors
    ///
    /// The streams still electing or catching up when `timeout` ran out.
    pub async fn wait_for_streams(
        client: &async_nats::Client,
        timeout: Duration,
    ) -> Result<(), String> {
        use futures::TryStreamExt;
        let js = quick(client, Duration::from_secs(2));
        let deadline = Instant::now() + timeout;
        loop {
            let behind: Vec<String> = match js.streams().try_collect::<Vec<_>>().await {
                Ok(infos) => infos
                    .into_iter()
                    .filter(|info| {
                        info.cluster.as_ref().is_some_and(|c| {
                            c.leader.is_none() || c.replicas.iter().any(|r| !r.current)
                        })
                    })
                    .map(|info| info.config.name)
                    .collect(),
                Err(e) => vec![format!("(listing the streams failed: {e})")],
            };
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("streams without a leader or a current replica: {behind:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How long a request about one stream may take: a stream electing a leader does not answer.
const QUICK: Duration = Duration::from_millis(250);

/// A JetStream context whose requests give up after `timeout`.
fn quick(client: &async_nats::Client, timeout: Duration) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(timeout).build(client.clone())
}

/// `n` distinct TCP ports free on 127.0.0.1 now.
fn distinct_free_ports(n: usize) -> Vec<u16> {
    let mut seen = BTreeSet::new();
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port();
        if seen.insert(port) {
            ports.push(port);
        }
    }
    ports
}
