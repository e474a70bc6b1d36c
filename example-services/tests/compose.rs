//! docker-compose.yml cannot be run here (no Docker), so this checks that everything it names
//! exists: each service's image or build (and the Dockerfile), each command's binary (built
//! into the image, and accepting the command's subcommand and flags), and each environment
//! variable (read by the program it is given to); and that authentication is on as in
//! `./scripts/demo`: the same permissions, NATS started with them, every service with its own
//! key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml parses");
    value.apply_merge().expect("merge keys resolve");
    value
}

/// The demo binaries built in this package, by name.
fn binary(name: &str) -> Option<PathBuf> {
    let path = match name {
        "orders" => env!("CARGO_BIN_EXE_orders"),
        "seller" => env!("CARGO_BIN_EXE_seller"),
        "logistics" => env!("CARGO_BIN_EXE_logistics"),
        "notification" => env!("CARGO_BIN_EXE_notification"),
        "payments" => env!("CARGO_BIN_EXE_payments"),
        _ => return None,
    };
    Some(PathBuf::from(path))
}

/// Every `env = "NAME"` a program in `dirs` declares.
fn declared_env(dirs: &[&str]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| repo().join(d)).collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split("env = \"").skip(1) {
                names.insert(part.split('"').next().unwrap().to_owned());
            }
        }
    }
    names
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().expect("a string").to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn every_service_image_command_and_variable_named_exists() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    let want: BTreeSet<&str> = [
        "auth",
        "nats",
        "coordinator",
        "seller",
        "logistics",
        "payments",
        "notification",
        "orders",
        "demo",
    ]
    .into();
    assert_eq!(names, want);
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let coordinator_env = declared_env(&["saga-coordinator/src", "saga-nats/src/connect.rs"]);
    let services_env = declared_env(&["example-services/src", "saga-nats/src/connect.rs"]);

    for (name, service) in services {
        let name = name.as_str().unwrap();
        let deps: Vec<String> = match &service["depends_on"] {
            Value::Mapping(m) => m.keys().map(|k| k.as_str().unwrap().to_owned()).collect(),
            other => strings(other),
        };
        if name == "auth" {
            assert!(deps.is_empty(), "auth runs before NATS: {deps:?}");
        } else if name == "nats" {
            let auth = &service["depends_on"]["auth"]["condition"];
            assert_eq!(auth.as_str(), Some("service_completed_successfully"));
        } else {
            let nats = &service["depends_on"]["nats"]["condition"];
            assert_eq!(nats.as_str(), Some("service_healthy"), "{name} waits for a healthy NATS");
            // Its own key, read from the volume auth wrote.
            let user = if name == "demo" { "orders" } else { name };
            let env = &service["environment"];
            assert_eq!(env["NATS_NKEY"].as_str(), Some(format!("/auth/keys/{user}.nk").as_str()));
            assert_eq!(env["NATS_INBOX_PREFIX"].as_str(), Some(format!("_INBOX.{user}").as_str()));
            assert!(strings(&service["volumes"]).contains(&"auth:/auth:ro".to_owned()), "{name}");
        }
        for dep in deps {
            assert!(names.contains(dep.as_str()), "{name} depends on unknown service {dep}");
        }
        let command = strings(&service["command"]);
        if name == "nats" {
            let image = service["image"].as_str().expect("nats has an image");
            assert!(image.starts_with("nats:2."), "the official nats image: {image}");
            assert_eq!(command, ["-c", "/etc/nats/nats.conf"]);
            let volumes = strings(&service["volumes"]);
            for volume in
                ["./example-services/nats.conf:/etc/nats/nats.conf:ro", "auth:/etc/nats/auth:ro"]
            {
                assert!(volumes.contains(&volume.to_owned()), "nats mounts {volume}: {volumes:?}");
            }
            let conf = std::fs::read_to_string(repo().join("example-services/nats.conf")).unwrap();
            for line in
                ["jetstream {", "store_dir: /data", "http_port: 8222", "include \"auth/auth.conf\""]
            {
                assert!(conf.contains(line), "nats.conf lacks {line:?}");
            }
            let probe = strings(&service["healthcheck"]["test"]).join(" ");
            assert!(
                probe.contains("8222/healthz"),
                "a health check on the monitoring port: {probe}"
            );
            continue;
        }
        let build = service["build"].as_str().expect("built from the repo");
        assert!(
            repo().join(build).join("Dockerfile").is_file(),
            "{name}: no Dockerfile in {build}"
        );
        let program = command.first().unwrap_or_else(|| panic!("{name} has a command"));
        assert!(
            dockerfile.contains(&format!("/src/target/release/{program}")),
            "{name}: the image does not contain {program}"
        );
        // The image's `cargo build` builds the package that holds the program.
        let package = if program == "saga-coordinator" { program } else { "example-services" };
        let build_line = dockerfile.lines().find(|l| l.contains("cargo build")).unwrap_or("");
        assert!(
            build_line
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w == ["-p", package]),
            "{name}: the Dockerfile does not build package {package}: {build_line:?}"
        );
        let declared = if program == "saga-coordinator" {
            assert!(repo().join("saga-coordinator/src/main.rs").is_file());
            &coordinator_env
        } else {
            // The binary accepts the subcommand and flags the compose file gives it.
            let exe = binary(program).unwrap_or_else(|| panic!("{name}: no program {program}"));
            let out = Command::new(&exe).args(&command[1..]).arg("--help").output().unwrap();
            assert!(
                out.status.success(),
                "{name}: `{} --help` fails: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            &services_env
        };
        let env = service["environment"].as_mapping().expect("environment");
        for key in env.keys() {
            let key = key.as_str().unwrap();
            assert!(
                key == "RUST_LOG" || declared.contains(key),
                "{name}: {program} reads no variable {key}"
            );
        }
    }
    // Paths the image copies exist.
    assert!(repo().join("example-services/sagas/place-order.yaml").is_file());
    assert!(dockerfile.contains("COPY example-services/sagas /etc/sagas"));
    let coordinator = strings(&services["coordinator"]["command"]);
    assert_eq!(coordinator[1..3], ["--definitions".to_owned(), "/etc/sagas".to_owned()]);
    // It creates the buckets the services own (they may not create streams).
    let owned: Vec<String> = strings(&services["auth"]["command"])
        .windows(2)
        .filter(|w| w[0] == "--bucket")
        .map(|w| w[1].split_once('=').unwrap().1.to_owned())
        .collect();
    assert_eq!(coordinator[3..], ["--kv-bucket".to_owned(), owned.join(",")]);
    let demo = std::fs::read_to_string(repo().join("scripts/demo")).unwrap();
    assert!(demo.contains(&format!("--kv-bucket {}", owned.join(","))), "scripts/demo");
    // The image can write the keys where the services read them.
    assert!(dockerfile.contains("mkdir /auth && chown saga /auth"));
}

/// `auth` writes the permissions `./scripts/demo` writes: the same policy, flag by flag.
#[test]
fn compose_and_the_demo_script_grant_the_same_permissions() {
    let compose = compose();
    let auth = strings(&compose["services"]["auth"]["command"]);
    assert_eq!(auth[..2], ["saga-coordinator".to_owned(), "permissions".to_owned()]);
    let demo = std::fs::read_to_string(repo().join("scripts/demo")).unwrap();
    let policy: Vec<(&String, &String)> = auth[2..]
        .chunks(2)
        .map(|pair| (&pair[0], &pair[1]))
        .filter(|(flag, _)| {
            ["--starts", "--follows", "--bucket", "--reads", "--events", "--operator"]
                .contains(&flag.as_str())
        })
        .collect();
    assert_eq!(policy.len(), 11, "{policy:?}");
    for (flag, value) in policy {
        assert!(demo.contains(&format!("{flag} {value}")), "scripts/demo lacks {flag} {value}");
    }
}

#[test]
fn the_services_read_the_variables_compose_sets() {
    // A mistyped variable in the source would make the test above vacuous; pin the names.
    let env = declared_env(&["example-services/src", "saga-nats/src/connect.rs"]);
    for name in ["NATS_URL", "SELLER_STOCK", "LOGISTICS_FAILURE_RATE", "ORDERS_LISTEN"] {
        assert!(env.contains(name), "{name} not declared: {env:?}");
    }
}
