//! Loading saga definitions from YAML, TOML and JSON files, and their canonical form and digest.

use std::path::PathBuf;
use std::time::Duration;

use saga_core::{LoadError, RetryPolicy, SagaDefinition, StepKind};

/// The digest of the place-order definition, computed once (and checked independently: it is
/// the first 16 bytes of the SHA-256 of [`PLACE_ORDER_CANONICAL_JSON`]). If this changes, the
/// canonical form changed, and every running saga instance would stop matching its definition.
const PLACE_ORDER_DIGEST: &str = "2eb238173d2dae907dd69cd30305f0e6";

/// The canonical form of the place-order definition, as the digest hashes it.
const PLACE_ORDER_CANONICAL_JSON: &str = concat!(
    r#"{"name":"place-order","version":1,"steps":["#,
    r#"{"name":"reserve-items","service":"seller","action":"reserve","compensation":"release","#,
    r#""kind":"compensatable","after":[],"timeout":"5s","#,
    r#""retry":{"max_attempts":4,"initial_backoff":"100ms","max_backoff":"30s","multiplier":2.0,"jitter":0.2}},"#,
    r#"{"name":"schedule-shipment","service":"logistics","action":"schedule","compensation":"cancel","#,
    r#""kind":"compensatable","after":["reserve-items"],"timeout":"30s","#,
    r#""retry":{"max_attempts":3,"initial_backoff":"200ms","max_backoff":"30s","multiplier":2.0,"jitter":0.2}},"#,
    r#"{"name":"confirm-order","service":"orders","action":"confirm","#,
    r#""kind":"pivot","after":["schedule-shipment"],"timeout":"30s","#,
    r#""retry":{"max_attempts":3,"initial_backoff":"200ms","max_backoff":"30s","multiplier":2.0,"jitter":0.2}},"#,
    r#"{"name":"send-invoice","service":"billing","action":"send","#,
    r#""kind":"retriable","after":["confirm-order"],"timeout":"30s","#,
    r#""retry":{"max_attempts":3,"initial_backoff":"200ms","max_backoff":"30s","multiplier":2.0,"jitter":0.2}}"#,
    r#"]}"#,
);

fn data(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(file)
}

fn load(file: &str) -> SagaDefinition {
    let path = data(file);
    SagaDefinition::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// The place-order definition, built in Rust.
fn built() -> SagaDefinition {
    SagaDefinition::builder("place-order")
        .version(1)
        .step("reserve-items", "seller", "reserve", |s| {
            s.compensation("release").timeout(Duration::from_secs(5)).retry(RetryPolicy {
                max_attempts: 4,
                initial_backoff: Duration::from_millis(100),
                ..RetryPolicy::default()
            })
        })
        .step("schedule-shipment", "logistics", "schedule", |s| s.compensation("cancel"))
        .step("confirm-order", "orders", "confirm", |s| s.kind(StepKind::Pivot))
        .step("send-invoice", "billing", "send", |s| s.kind(StepKind::Retriable))
        .build()
}

const FORMATS: [&str; 3] = ["place-order.yaml", "place-order.toml", "place-order.json"];

#[test]
fn each_format_loads_and_validates() {
    for file in FORMATS {
        let def = load(file);
        assert_eq!(def.name.as_str(), "place-order", "{file}");
        assert_eq!(def.version, 1, "{file}");
        let names: Vec<&str> = def.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["reserve-items", "schedule-shipment", "confirm-order", "send-invoice"],
            "{file}"
        );
        let reserve = &def.steps[0];
        assert_eq!(reserve.service.as_str(), "seller", "{file}");
        assert_eq!(reserve.action.as_str(), "reserve", "{file}");
        assert_eq!(reserve.compensation.as_ref().map(|c| c.as_str()), Some("release"), "{file}");
        assert_eq!(reserve.timeout, Duration::from_secs(5), "{file}");
        assert_eq!(reserve.retry.max_attempts, 4, "{file}");
        assert_eq!(reserve.retry.initial_backoff, Duration::from_millis(100), "{file}");
        assert_eq!(reserve.retry.max_backoff, RetryPolicy::default().max_backoff, "{file}");
        assert_eq!(def.steps[1].timeout, saga_core::DEFAULT_STEP_TIMEOUT, "{file}");
        assert_eq!(def.steps[2].kind, StepKind::Pivot, "{file}");
        assert_eq!(def.steps[3].kind, StepKind::Retriable, "{file}");

        let plan = def.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(plan.pivot(), Some(2), "{file}");
        assert_eq!(plan.digest(), def.digest(), "{file}");
    }
}

#[test]
fn all_formats_mean_the_same_definition() {
    let yaml = load("place-order.yaml");
    let toml = load("place-order.toml");
    let json = load("place-order.json");

    // The JSON file writes out `after` and some defaults that the others leave implicit, so the
    // parsed values differ, but their canonical forms do not.
    assert_ne!(yaml, json);
    assert_eq!(yaml.canonical(), toml.canonical());
    assert_eq!(yaml.canonical(), json.canonical());

    assert_eq!(yaml.digest(), toml.digest());
    assert_eq!(yaml.digest(), json.digest());
}

#[test]
fn builder_means_the_same_definition() {
    let def = built();
    assert_eq!(def, load("place-order.yaml"));
    for file in FORMATS {
        let loaded = load(file);
        assert_eq!(def.canonical(), loaded.canonical(), "{file}");
        assert_eq!(def.digest(), loaded.digest(), "{file}");
    }
}

#[test]
fn canonical_is_idempotent() {
    let canonical = load("place-order.yaml").canonical();
    assert_eq!(canonical.canonical(), canonical);
    assert!(canonical.steps.iter().all(|s| s.after.is_some()));
}

#[test]
fn digest_is_stable() {
    let digest = load("place-order.yaml").digest();
    assert_eq!(digest.len(), 32, "{digest}");
    assert!(digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{digest}");
    assert_eq!(digest, PLACE_ORDER_DIGEST, "the canonical form changed");
    assert_eq!(built().digest(), PLACE_ORDER_DIGEST);
}

#[test]
fn digest_hashes_the_canonical_json() {
    use sha2::{Digest as _, Sha256};

    let canonical = load("place-order.yaml").canonical();
    assert_eq!(serde_json::to_string(&canonical).unwrap(), PLACE_ORDER_CANONICAL_JSON);
    let hash = Sha256::digest(PLACE_ORDER_CANONICAL_JSON.as_bytes());
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, PLACE_ORDER_DIGEST);
}

#[test]
fn changing_a_timeout_changes_the_digest() {
    let def = load("place-order.yaml");
    let mut changed = def.clone();
    changed.steps[1].timeout = Duration::from_secs(31);
    assert_ne!(changed.digest(), def.digest());
    // And changing it back restores it.
    changed.steps[1].timeout = Duration::from_secs(30);
    assert_eq!(changed.digest(), def.digest());
}

#[test]
fn other_changes_change_the_digest() {
    let def = load("place-order.yaml");
    let digest = def.digest();
    let variants: Vec<SagaDefinition> = vec![
        {
            let mut d = def.clone();
            d.version = 2;
            d
        },
        {
            let mut d = def.clone();
            d.steps[0].retry.max_attempts = 5;
            d
        },
        {
            let mut d = def.clone();
            d.steps[1].after = Some(vec![]);
            d
        },
        {
            let mut d = def.clone();
            d.steps[3].kind = StepKind::Compensatable;
            d
        },
        {
            let mut d = def.clone();
            d.steps[0].read_only = true;
            d
        },
    ];
    for (i, variant) in variants.iter().enumerate() {
        assert_ne!(variant.digest(), digest, "variant {i}");
    }
}

fn parse_error(file: &str) -> (String, &'static str, String, String) {
    let path = data(file);
    match SagaDefinition::load(&path) {
        Err(err @ LoadError::Parse { .. }) => {
            let text = err.to_string();
            let LoadError::Parse { origin, format, message } = err else { unreachable!() };
            (origin, format, message, text)
        }
        other => panic!("{file}: expected a parse error, got {other:?}"),
    }
}

#[test]
fn unknown_field_is_a_parse_error_naming_file_and_field() {
    for (file, want_format) in [
        ("typo-compensation.yaml", "YAML"),
        ("typo-compensation.toml", "TOML"),
        ("typo-compensation.json", "JSON"),
    ] {
        let shown = data(file).display().to_string();
        let (origin, format, message, text) = parse_error(file);
        assert_eq!(origin, shown, "{file}");
        assert_eq!(format, want_format, "{file}");
        assert!(message.contains("unknown field `compensaton`"), "{file}: {message}");
        assert!(text.contains(&shown), "{file}: {text}");
        assert!(text.contains("compensaton"), "{file}: {text}");
        assert!(text.contains(&format!("{want_format} error")), "{file}: {text}");
    }
}

#[test]
fn malformed_yaml_is_a_parse_error_naming_the_file() {
    let shown = data("malformed.yaml").display().to_string();
    let (origin, format, message, text) = parse_error("malformed.yaml");
    assert_eq!(origin, shown);
    assert_eq!(format, "YAML");
    assert!(message.contains("line"), "the message gives a position: {message}");
    assert!(text.starts_with(&format!("saga definition {shown}: YAML error: ")), "{text}");
}

#[test]
fn parse_error_from_a_string_names_the_string() {
    let err = SagaDefinition::from_yaml("name: x\nsteps: []\nextra: 1\n").unwrap_err();
    assert!(
        matches!(&err, LoadError::Parse { origin, format: "YAML", message }
            if origin == "<string>" && message.contains("unknown field `extra`")),
        "{err:?}"
    );
}

#[test]
fn unknown_extension_is_refused() {
    for file in ["place-order.ini", "place-order", "place-order.yaml.bak"] {
        let path = data(file);
        let err = SagaDefinition::load(&path).unwrap_err();
        let shown = path.display().to_string();
        assert!(
            matches!(&err, LoadError::UnknownFormat { path } if *path == shown),
            "{file}: {err:?}"
        );
        assert!(err.to_string().contains(&shown), "{err}");
    }
}

#[test]
fn uppercase_and_yml_extensions_are_accepted() {
    let dir = std::env::temp_dir().join(format!("saga-core-loading-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(data("place-order.yaml")).unwrap();
    for name in ["place-order.yml", "place-order.YAML"] {
        let path = dir.join(name);
        std::fs::write(&path, &text).unwrap();
        let def = SagaDefinition::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(def, load("place-order.yaml"), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let path = data("no-such-saga.yaml");
    let shown = path.display().to_string();
    let err = SagaDefinition::load(&path).unwrap_err();
    assert!(
        matches!(&err, LoadError::Io { path, source }
            if *path == shown && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with(&format!("cannot read saga definition {shown}: ")),
        "{err}"
    );
}
