//! `saga-coordinator permissions`: writes the NATS permissions of every role from the saga
//! definitions and who starts, follows and operates them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use saga_nats::permissions::{inbox_prefix, nsc_json, permissions, server_config, Access};

/// The flags of `saga-coordinator permissions`.
#[derive(Debug, clap::Args)]
pub(crate) struct PermissionsArgs {
    /// The directory of saga definitions (as for the coordinator).
    #[arg(long, env = "SAGA_DEFINITIONS", value_name = "DIR")]
    definitions: PathBuf,

    /// SERVICE=SAGA[,SAGA…]: SERVICE starts (and reads) sagas of these definitions.
    #[arg(long, value_name = "SERVICE=SAGAS")]
    starts: Vec<String>,

    /// SERVICE=SAGA[,SAGA…]: SERVICE follows these definitions' lifecycle events with a
    /// durable consumer named SERVICE (or SERVICE-SAGA).
    #[arg(long, value_name = "SERVICE=SAGAS")]
    follows: Vec<String>,

    /// SERVICE=SAGA[,SAGA…]: SERVICE sends signals to (and reads) sagas of these
    /// definitions, for their await steps that wait for a signal.
    #[arg(long, value_name = "SERVICE=SAGAS")]
    signals: Vec<String>,

    /// An operator's name: may cancel, retry, skip and resolve any saga, read every saga and
    /// register definitions; the history records this name. Repeat for each operator.
    #[arg(long, value_name = "NAME")]
    operator: Vec<String>,

    /// SERVICE: publishes its own domain events, on `domain.SERVICE.>` only (stored in
    /// DOMAIN_EVENTS). Repeat for each, or comma-separate.
    #[arg(long = "events", value_name = "SERVICE", value_delimiter = ',')]
    events: Vec<String>,

    /// SERVICE=BUCKET[,BUCKET…]: key-value buckets of the service's own (application state).
    #[arg(long, value_name = "SERVICE=BUCKETS")]
    bucket: Vec<String>,

    /// SERVICE=BUCKET[,BUCKET…]: other services' key-value buckets SERVICE may read (an
    /// auditor's view, as the demo's report needs).
    #[arg(long, value_name = "SERVICE=BUCKETS")]
    reads: Vec<String>,

    /// Write the configuration to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// The coordinator replicas' user name.
    #[arg(long, default_value = "coordinator", value_name = "NAME")]
    coordinator_user: String,

    /// A directory for the users' nkey seeds (created if missing; existing seeds are kept).
    #[arg(long, value_name = "DIR")]
    keys: Option<PathBuf>,

    /// Write the permissions as JSON (for `nsc`) instead of a nats-server config block.
    #[arg(long)]
    json: bool,
}

/// Parses `SERVICE=A,B` pairs into a map, naming the flag in errors.
fn pairs(flag: &str, values: &[String]) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for value in values {
        let (service, list) = value
            .split_once('=')
            .ok_or_else(|| format!("--{flag} {value:?}: expected SERVICE=NAME[,NAME…]"))?;
        let names: BTreeSet<String> =
            list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if service.is_empty() || names.is_empty() {
            return Err(format!("--{flag} {value:?}: expected SERVICE=NAME[,NAME…]"));
        }
        map.entry(service.to_owned()).or_default().extend(names);
    }
    Ok(map)
}

/// The seed of `user` in `dir`, made if missing; returns its public key.
fn nkey(dir: &Path, user: &str) -> Result<String, String> {
    let path = dir.join(format!("{user}.nk"));
    let pair = match std::fs::read_to_string(&path) {
        Ok(text) => nkeys::KeyPair::from_seed(text.trim())
            .map_err(|e| format!("{}: not an nkey seed: {e}", path.display()))?,
        Err(_) => {
            let pair = nkeys::KeyPair::new_user();
            let seed = pair.seed().map_err(|e| format!("cannot make an nkey: {e}"))?;
            write_secret(&path, &seed)?;
            pair
        }
    };
    Ok(pair.public_key())
}

/// Writes a file only its owner can read.
fn write_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file =
        options.open(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Runs the subcommand: the configuration on stdout, what was done on stderr.
pub(crate) fn run(args: PermissionsArgs) -> Result<(), String> {
    let definitions = crate::load_definitions(&args.definitions).map_err(|e| e.to_string())?;
    if definitions.is_empty() {
        return Err(format!("no saga definitions in {}", args.definitions.display()));
    }
    let access = Access {
        coordinator: Some(args.coordinator_user.clone()),
        starters: pairs("starts", &args.starts)?,
        followers: pairs("follows", &args.follows)?,
        signallers: pairs("signals", &args.signals)?,
        operators: args.operator.iter().cloned().collect(),
        buckets: pairs("bucket", &args.bucket)?,
        readers: pairs("reads", &args.reads)?,
        publishers: args.events.iter().cloned().collect(),
    };
    let users = permissions(&definitions, &access).map_err(|e| e.to_string())?;
    let write = |text: String| match &args.out {
        Some(path) => {
            std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    };
    if args.json {
        return write(format!("{}\n", nsc_json(&users)));
    }
    let mut keys = BTreeMap::new();
    if let Some(dir) = &args.keys {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for u in &users {
            keys.insert(u.user.clone(), nkey(dir, &u.user)?);
        }
    }
    write(server_config(&users, &keys))?;
    for u in &users {
        let connect = match &args.keys {
            Some(dir) => format!(
                "--nkey {} --inbox-prefix {}",
                dir.join(format!("{}.nk", u.user)).display(),
                inbox_prefix(&u.user)
            ),
            None => format!("--inbox-prefix {}", inbox_prefix(&u.user)),
        };
        eprintln!("{:<14} {:<50} {connect}", u.user, u.roles.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pairs;

    #[test]
    fn service_lists_parse_and_bad_ones_are_named() {
        let map = pairs("starts", &["orders=a,b".into(), "orders=c".into(), "x=y".into()]).unwrap();
        assert_eq!(map["orders"].len(), 3);
        assert_eq!(map["x"].iter().next().unwrap(), "y");
        for bad in ["orders", "=a", "orders="] {
            let err = pairs("starts", &[bad.into()]).unwrap_err();
            assert!(err.starts_with(&format!("--starts {bad:?}")), "{err}");
        }
    }
}
