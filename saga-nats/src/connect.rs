//! How a process reaches NATS: [`NatsOptions`], the connection settings every binary shares
//! (the coordinator, the demo services, the tools) and SDK users may reuse — server URLs, one
//! way to authenticate, TLS.
//!
//! ```no_run
//! # async fn example() -> Result<(), saga_nats::connect::ConnectError> {
//! use saga_nats::NatsOptions;
//! let options = NatsOptions {
//!     url: Some("nats://a.example:4222,nats://b.example:4222".into()),
//!     creds: Some("/etc/saga/seller.creds".into()),
//!     ..NatsOptions::default()
//! };
//! let nats = options.connect("seller").await?;
//! # Ok(()) }
//! ```
//!
//! With the `cli` feature, `NatsOptions` is also a `clap::Args` group (`--nats-url`,
//! `--creds`, `--nkey`, `--user`, `--password`, `--token`, `--tls-ca`, `--tls-cert`,
//! `--tls-key`), each with the environment variable the `nats` command-line tool reads
//! (`NATS_URL`, `NATS_CREDS`, `NATS_NKEY`, `NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`,
//! `NATS_CA`, `NATS_CERT`, `NATS_KEY`).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ServerAddr};

/// The server a process connects to when no URL is given.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How long one connection attempt may take before it is reported as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Messages a subscription may hold before the client drops what comes next (async-nats'
/// default is 65,536). A coordinator holding 100,000 sagas at one step gets every reply at
/// once when that step's service catches up; a dropped reply costs its saga a whole step
/// timeout. The buffer grows only as it fills.
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// Connection settings: server URLs, at most one way to authenticate, and TLS.
///
/// Every field is optional. In a TOML or JSON configuration file they are the keys `url`,
/// `creds`, `nkey`, `user`, `password`, `token`, `tls_ca`, `tls_cert`, `tls_key` and
/// `inbox_prefix`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", command(next_help_heading = "Connecting to NATS"))]
#[serde(default, deny_unknown_fields)]
pub struct NatsOptions {
    /// NATS server URL(s), comma-separated. A URL may carry a user and password
    /// (nats://user:password@host:4222) or a token (nats://token@host:4222); tls:// requires
    /// TLS [default: nats://127.0.0.1:4222].
    #[cfg_attr(feature = "cli", arg(long = "nats-url", env = "NATS_URL", value_name = "URLS"))]
    pub url: Option<String>,

    /// Credentials file: a user JWT and its nkey seed, as `nsc` writes them.
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_CREDS", value_name = "FILE"))]
    pub creds: Option<PathBuf>,

    /// File holding an nkey seed (a line starting with SU).
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_NKEY", value_name = "FILE"))]
    pub nkey: Option<PathBuf>,

    /// User name (with --password).
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_USER", requires = "password"))]
    pub user: Option<String>,

    /// Password (with --user).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "NATS_PASSWORD", hide_env_values = true, requires = "user")
    )]
    pub password: Option<String>,

    /// Authentication token.
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_TOKEN", hide_env_values = true))]
    pub token: Option<String>,

    /// CA certificate (PEM) that signed the server's certificate; turns TLS on.
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_CA", value_name = "FILE"))]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS (with --tls-key).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "NATS_CERT", value_name = "FILE", requires = "tls_key")
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate (with --tls-cert).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "NATS_KEY", value_name = "FILE", requires = "tls_cert")
    )]
    pub tls_key: Option<PathBuf>,

    /// Prefix of this connection's reply inboxes (default _INBOX). With the permissions
    /// `saga-coordinator permissions` writes, each user's inboxes are `_INBOX.<user>`, so
    /// no other connection can read the replies it gets.
    #[cfg_attr(feature = "cli", arg(long, env = "NATS_INBOX_PREFIX", value_name = "PREFIX"))]
    pub inbox_prefix: Option<String>,

    /// At start, keep trying a server that cannot be reached for up to this many seconds (it
    /// may be starting or restarting), logging each failure; a refused login still fails at
    /// once [default: 0, one attempt].
    #[cfg_attr(
        feature = "cli",
        arg(long = "nats-wait-secs", env = "NATS_WAIT_SECS", value_name = "SECS")
    )]
    pub wait_secs: Option<u64>,
}

/// Secrets stay out of logs: `Debug` shows which settings are present, never a password, a
/// token or a password inside a URL.
impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsOptions")
            .field("url", &self.display_urls())
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("wait_secs", &self.wait_secs)
            .finish()
    }
}

/// Why a connection could not be made; each names the setting or the server at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The options contradict each other or a URL does not parse.
    #[error("NATS connection options: {0}")]
    Invalid(String),
    /// A credentials, nkey or certificate file could not be read.
    #[error("cannot read the {what} {path}: {reason}")]
    File {
        /// Which setting named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the credentials.
    #[error("NATS at {urls} refused {auth}: {reason}")]
    Refused {
        /// The servers tried (passwords removed).
        urls: String,
        /// How this process authenticated.
        auth: String,
        /// The server's answer.
        reason: String,
    },
    /// TLS could not be set up with the server.
    #[error("TLS with NATS at {urls} failed: {reason}")]
    Tls {
        /// The servers tried.
        urls: String,
        /// What went wrong.
        reason: String,
    },
    /// No server answered.
    #[error("cannot reach NATS at {urls}: {reason}")]
    Unreachable {
        /// The servers tried.
        urls: String,
        /// What went wrong.
        reason: String,
    },
}

impl NatsOptions {
    /// Options for the given server URL(s), with no authentication.
    pub fn with_url(url: impl Into<String>) -> Self {
        NatsOptions { url: Some(url.into()), ..Self::default() }
    }

    /// These options, with every setting they leave unset taken from `fallback` (flags and
    /// environment over a configuration file).
    #[must_use]
    pub fn or(self, fallback: NatsOptions) -> NatsOptions {
        NatsOptions {
            url: self.url.or(fallback.url),
            creds: self.creds.or(fallback.creds),
            nkey: self.nkey.or(fallback.nkey),
            user: self.user.or(fallback.user),
            password: self.password.or(fallback.password),
            token: self.token.or(fallback.token),
            tls_ca: self.tls_ca.or(fallback.tls_ca),
            tls_cert: self.tls_cert.or(fallback.tls_cert),
            tls_key: self.tls_key.or(fallback.tls_key),
            inbox_prefix: self.inbox_prefix.or(fallback.inbox_prefix),
            wait_secs: self.wait_secs.or(fallback.wait_secs),
        }
    }

    /// The server addresses, parsed from the comma-separated URL list.
    pub fn servers(&self) -> Result<Vec<ServerAddr>, ConnectError> {
        let list = self.url.as_deref().unwrap_or(DEFAULT_URL);
        let mut servers = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let addr = url.parse::<ServerAddr>().map_err(|e| {
                ConnectError::Invalid(format!("`{}` is not a NATS server URL: {e}", redact(url)))
            })?;
            servers.push(addr);
        }
        if servers.is_empty() {
            return Err(ConnectError::Invalid("the server URL list is empty".into()));
        }
        Ok(servers)
    }

    /// The server URLs with any password or token in them replaced by `***`: for logs.
    pub fn display_urls(&self) -> String {
        let list = self.url.as_deref().unwrap_or(DEFAULT_URL);
        list.split(',').map(|u| redact(u.trim())).collect::<Vec<_>>().join(",")
    }

    /// How these options authenticate, for logs and errors: `user "orders"`, `the credentials
    /// file /etc/x.creds`, `an nkey from /etc/x.nk`, `a token`, or `no credentials`.
    pub fn describe_auth(&self) -> String {
        if let Some(path) = &self.creds {
            return format!("the credentials file {}", path.display());
        }
        if let Some(path) = &self.nkey {
            return format!("an nkey from {}", path.display());
        }
        if let Some(user) = &self.user {
            return format!("user {user:?}");
        }
        if self.token.is_some() {
            return "a token".into();
        }
        if let Ok(servers) = self.servers() {
            if let Some(server) = servers.iter().find(|s| s.has_user_pass()) {
                return match (server.username(), server.password()) {
                    (Some(user), Some(_)) => format!("user {user:?} (from the URL)"),
                    _ => "a token (from the URL)".into(),
                };
            }
        }
        "no credentials".into()
    }

    /// Checks that the settings make sense together: at most one way to authenticate, a user
    /// with a password, a client certificate with its key, URLs that parse.
    pub fn check(&self) -> Result<(), ConnectError> {
        let servers = self.servers()?;
        let mut ways = Vec::new();
        if self.creds.is_some() {
            ways.push("creds");
        }
        if self.nkey.is_some() {
            ways.push("nkey");
        }
        if self.user.is_some() || self.password.is_some() {
            ways.push("user/password");
        }
        if self.token.is_some() {
            ways.push("token");
        }
        if servers.iter().any(ServerAddr::has_user_pass) {
            ways.push("credentials in the URL");
        }
        if ways.len() > 1 {
            return Err(ConnectError::Invalid(format!(
                "choose one way to authenticate, not {}",
                ways.join(" and ")
            )));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConnectError::Invalid(
                "a user needs a password, and a password a user".into(),
            ));
        }
        if let Some(prefix) = &self.inbox_prefix {
            let valid = !prefix.is_empty()
                && prefix.split('.').all(|t| {
                    !t.is_empty() && t != "*" && t != ">" && !t.contains(char::is_whitespace)
                });
            if !valid {
                return Err(ConnectError::Invalid(format!(
                    "the inbox prefix {prefix:?} is not a subject without wildcards"
                )));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConnectError::Invalid(
                "a client certificate (tls_cert) needs its key (tls_key), and the key its certificate"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The async-nats options these settings make, named `name` (the name shows in the
    /// server's connection list), for callers that add options of their own.
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, ConnectError> {
        self.check()?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(CONNECT_TIMEOUT)
            .subscription_capacity(SUBSCRIPTION_CAPACITY);
        if let Some(path) = &self.creds {
            let text = read("credentials file", path)?;
            opts = opts.credentials(&text).map_err(|e| ConnectError::File {
                what: "credentials file",
                path: path.clone(),
                reason: format!("not a NATS credentials file: {e}"),
            })?;
        }
        if let Some(path) = &self.nkey {
            let text = read("nkey seed file", path)?;
            let seed =
                text.lines().map(str::trim).find(|l| l.starts_with("SU")).ok_or_else(|| {
                    ConnectError::File {
                        what: "nkey seed file",
                        path: path.clone(),
                        reason: "it holds no nkey seed (a line starting with SU)".into(),
                    }
                })?;
            opts = opts.nkey(seed.to_owned());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        // async-nats does not read credentials from a URL itself.
        match url_credentials(&self.servers()?)? {
            Some((user, Some(password))) => opts = opts.user_and_password(user, password),
            Some((token, None)) => opts = opts.token(token),
            None => {}
        }
        if let Some(path) = &self.tls_ca {
            read("TLS CA certificate", path)?;
            opts = opts.add_root_certificates(path.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            read("TLS client certificate", cert)?;
            read("TLS client key", key)?;
            opts = opts.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        let name = name.to_owned();
        opts = opts.event_callback(move |event| {
            let name = name.clone();
            async move { on_event(&name, event) }
        });
        Ok(opts)
    }

    /// Connects, naming the connection `name`. One attempt of at most five seconds per
    /// server; the error says which server, which credentials and what went wrong.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        let opts = self.connect_options(name).await?;
        self.connect_with(opts).await
    }

    /// Connects with `opts` (made by [`NatsOptions::connect_options`], perhaps with more
    /// settings added) to these options' servers; an unreachable server is tried again for
    /// up to `wait_secs`.
    pub async fn connect_with(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, ConnectError> {
        let give_up =
            tokio::time::Instant::now() + Duration::from_secs(self.wait_secs.unwrap_or(0));
        loop {
            match self.connect_once(opts.clone()).await {
                Err(ConnectError::Unreachable { urls, reason })
                    if tokio::time::Instant::now() < give_up =>
                {
                    tracing::warn!("cannot reach NATS at {urls} ({reason}); trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                done => return done,
            }
        }
    }

    async fn connect_once(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, ConnectError> {
        let servers = self.servers()?;
        opts.connect(servers).await.map_err(|e| {
            let urls = self.display_urls();
            let reason = e.to_string();
            match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    ConnectError::Refused { urls, auth: self.describe_auth(), reason }
                }
                ConnectErrorKind::Tls => ConnectError::Tls { urls, reason },
                // rustls reports a handshake failure as an I/O error.
                ConnectErrorKind::Io if is_tls_failure(&reason) => {
                    ConnectError::Tls { urls, reason }
                }
                ConnectErrorKind::ServerParse => ConnectError::Invalid(reason),
                _ => ConnectError::Unreachable { urls, reason },
            }
        })
    }
}

/// Whether an I/O error's text is a TLS handshake failure (a certificate refused either way).
fn is_tls_failure(reason: &str) -> bool {
    ["certificate", "fatal alert", "handshake", "tls"]
        .iter()
        .any(|word| reason.to_ascii_lowercase().contains(word))
}

/// How long a permission denial is remembered to explain a failure.
const DENIAL_MEMORY: Duration = Duration::from_secs(60);

/// The most recent permission denials the server sent to connections made here.
static DENIALS: Mutex<VecDeque<(Instant, String)>> = Mutex::new(VecDeque::new());

/// Logs a connection event; remembers and loudly logs permission denials, which NATS
/// otherwise shows only as a request that times out.
fn on_event(name: &str, event: async_nats::Event) {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::Other(text))
            if text.to_ascii_lowercase().contains("permissions violation") =>
        {
            tracing::error!(connection = %name, denial = %text, "NATS refused an operation: this user's permissions do not allow it (docs/SECURITY.md lists what each role needs)");
            let mut denials = DENIALS.lock().expect("denials lock");
            if denials.len() >= 64 {
                denials.pop_front();
            }
            denials.push_back((Instant::now(), text));
        }
        async_nats::Event::ServerError(e) => {
            tracing::warn!(connection = %name, error = %e, "NATS server error")
        }
        async_nats::Event::SlowConsumer(sid) => {
            tracing::error!(connection = %name, subscription = sid, "messages dropped: a subscription fell more than {SUBSCRIPTION_CAPACITY} messages behind; sagas whose replies were dropped wait for their step timeout")
        }
        other => tracing::debug!(connection = %name, event = %other, "NATS connection event"),
    }
}

/// The newest permission denial (of the last minute) whose text contains `fragment`, sent
/// to a connection made with [`NatsOptions`]: what turns a timed-out request into "permission
/// denied for publish to …".
pub fn recent_denial(fragment: &str) -> Option<String> {
    let denials = DENIALS.lock().expect("denials lock");
    denials
        .iter()
        .rev()
        .take_while(|(at, _)| at.elapsed() < DENIAL_MEMORY)
        .find(|(_, text)| text.contains(fragment))
        .map(|(_, text)| text.clone())
}

/// `error`, or when the server recently refused this process something that names
/// `fragment`, a message that says so: "permission denied: <the server's words> (while
/// <what>: <error>)".
pub(crate) fn explain(what: &str, fragment: &str, error: impl fmt::Display) -> String {
    match recent_denial(fragment) {
        Some(denial) => format!(
            "permission denied: {denial} (while {what}: {error}); this user's NATS permissions lack it (see docs/SECURITY.md)"
        ),
        None => format!("{what}: {error}"),
    }
}

/// Reads a file the options name, with an error that names the setting and the file.
fn read(what: &'static str, path: &Path) -> Result<String, ConnectError> {
    std::fs::read_to_string(path).map_err(|e| ConnectError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The user and password (or the token, with no password) the URLs carry, percent-decoded;
/// an error if two URLs carry different ones.
fn url_credentials(
    servers: &[ServerAddr],
) -> Result<Option<(String, Option<String>)>, ConnectError> {
    let mut found: Option<(String, Option<String>)> = None;
    for server in servers.iter().filter(|s| s.has_user_pass()) {
        let user = percent_decode(server.username().unwrap_or_default());
        let these = (user, server.password().map(percent_decode));
        match &found {
            Some(earlier) if *earlier != these => {
                return Err(ConnectError::Invalid(
                    "the server URLs carry different credentials; give them once".into(),
                ));
            }
            _ => found = Some(these),
        }
    }
    Ok(found)
}

/// Decodes `%XX` escapes (a URL's user information is percent-encoded).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// A URL with the secret part of its user information replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{shown}@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_a_comma_separated_list_and_secrets_never_show() {
        let opts = NatsOptions::with_url("nats://a:1, nats://bob:s3cret@b:2,nats://tok@c:3");
        assert_eq!(opts.servers().unwrap().len(), 3);
        let shown = opts.display_urls();
        assert_eq!(shown, "nats://a:1,nats://bob:***@b:2,nats://***@c:3");
        assert!(!format!("{opts:?}").contains("s3cret"));
        assert!(!format!("{opts:?}").contains("tok@"));
        let with_password = NatsOptions {
            user: Some("u".into()),
            password: Some("hunter2".into()),
            ..NatsOptions::default()
        };
        assert!(!format!("{with_password:?}").contains("hunter2"));
        assert_eq!(NatsOptions::default().servers().unwrap()[0].port(), 4222);
    }

    #[test]
    fn contradictory_settings_are_refused_with_what_is_wrong() {
        let two = NatsOptions {
            token: Some("t".into()),
            creds: Some("x.creds".into()),
            ..NatsOptions::default()
        };
        let err = two.check().unwrap_err().to_string();
        assert!(err.contains("choose one way to authenticate, not creds and token"), "{err}");
        let url_and_user = NatsOptions {
            url: Some("nats://a:b@h:1".into()),
            user: Some("u".into()),
            password: Some("p".into()),
            ..NatsOptions::default()
        };
        let err = url_and_user.check().unwrap_err().to_string();
        assert!(err.contains("user/password and credentials in the URL"), "{err}");
        let lonely = NatsOptions { user: Some("u".into()), ..NatsOptions::default() };
        assert!(lonely.check().unwrap_err().to_string().contains("a user needs a password"));
        let cert = NatsOptions { tls_cert: Some("c.pem".into()), ..NatsOptions::default() };
        assert!(cert.check().unwrap_err().to_string().contains("needs its key"));
        let inbox = NatsOptions { inbox_prefix: Some("_INBOX.*".into()), ..NatsOptions::default() };
        assert!(inbox.check().unwrap_err().to_string().contains("not a subject without wildcards"));
        let bad = NatsOptions::with_url("nats://ok:1,http://nope:2");
        let err = bad.check().unwrap_err().to_string();
        assert!(err.contains("`http://nope:2` is not a NATS server URL"), "{err}");
        assert!(NatsOptions::with_url(" , ").check().unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn credentials_in_urls_are_decoded_and_must_agree() {
        let opts = NatsOptions::with_url("nats://bob:p%40ss%2Fw@a:1,nats://bob:p%40ss%2Fw@b:1");
        let creds = url_credentials(&opts.servers().unwrap()).unwrap();
        assert_eq!(creds, Some(("bob".into(), Some("p@ss/w".into()))));
        let token = NatsOptions::with_url("nats://t0k@a:1,nats://b:1");
        assert_eq!(url_credentials(&token.servers().unwrap()).unwrap(), Some(("t0k".into(), None)));
        let differ = NatsOptions::with_url("nats://bob:x@a:1,nats://ann:y@b:1");
        let err = url_credentials(&differ.servers().unwrap()).unwrap_err().to_string();
        assert!(err.contains("different credentials"), "{err}");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn authentication_is_described_without_secrets() {
        let cases = [
            (NatsOptions::default(), "no credentials"),
            (NatsOptions { token: Some("t".into()), ..NatsOptions::default() }, "a token"),
            (
                NatsOptions {
                    user: Some("orders".into()),
                    password: Some("p".into()),
                    ..NatsOptions::default()
                },
                "user \"orders\"",
            ),
            (NatsOptions::with_url("nats://seller:pw@h:1"), "user \"seller\" (from the URL)"),
            (NatsOptions::with_url("nats://tok@h:1"), "a token (from the URL)"),
        ];
        for (opts, expected) in cases {
            assert_eq!(opts.describe_auth(), expected);
        }
    }

    #[test]
    fn unset_settings_fall_back_and_set_ones_win() {
        let flags = NatsOptions::with_url("nats://flag:1");
        let file = NatsOptions {
            url: Some("nats://file:1".into()),
            token: Some("t".into()),
            ..NatsOptions::default()
        };
        let merged = flags.or(file);
        assert_eq!(merged.url.as_deref(), Some("nats://flag:1"));
        assert_eq!(merged.token.as_deref(), Some("t"));
    }

    #[tokio::test]
    async fn unreadable_files_are_named() {
        let opts =
            NatsOptions { creds: Some("/nonexistent/x.creds".into()), ..NatsOptions::default() };
        let err = opts.connect_options("t").await.unwrap_err().to_string();
        assert!(err.starts_with("cannot read the credentials file /nonexistent/x.creds"), "{err}");
        let dir = std::env::temp_dir().join(format!("saga-nkey-{}", std::process::id()));
        std::fs::write(&dir, "not a seed\n").unwrap();
        let opts = NatsOptions { nkey: Some(dir.clone()), ..NatsOptions::default() };
        let err = opts.connect_options("t").await.unwrap_err().to_string();
        let _ = std::fs::remove_file(&dir);
        assert!(err.contains("holds no nkey seed"), "{err}");
    }
}
