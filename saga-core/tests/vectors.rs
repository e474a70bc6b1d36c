//! Conformance vectors: recorded protocol v2 messages for each path of a saga, under
//! `docs/vectors/`, for implementations in other languages to test themselves against.
//!
//! Each vector file holds the message's subject, its bytes (hex) and its decoded form (JSON).
//! This test checks that every vector decodes and re-encodes byte for byte, that its decoded
//! form is the recorded one, and that running the same saga through the state machine today
//! produces exactly the recorded messages. `UPDATE_VECTORS=1 cargo test -p saga-core --test
//! vectors` rewrites the files after a deliberate protocol change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use saga_core::wire::{
    CommandMessage, EffectRecord, LifecycleNote, LogRecord, OperatorAction, OperatorMessage,
    ReplyMessage, ReplyOutcome, StartMessage, WireMessage, PROTOCOL_VERSION,
};
use saga_core::{
    Codec, Effect, Event, Payload, Phase, SagaDefinition, SagaId, SagaState, StepKind, Timestamp,
};
use serde::{Deserialize, Serialize};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// One recorded message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Vector {
    /// What this message is, in words.
    description: String,
    /// The message type: start, command, reply, operator, log_record, effect_record.
    kind: String,
    /// The NATS subject it travels on (or the KV key it is stored under).
    subject: String,
    /// The reply subject, for commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<String>,
    /// The MessagePack bytes.
    hex: String,
    /// The decoded message, as JSON (byte strings as arrays of numbers).
    decoded: serde_json::Value,
}

fn vector<T: Serialize>(
    description: &str,
    kind: &str,
    subject: String,
    reply: Option<String>,
    msg: &T,
) -> (String, Vector) {
    let bytes = rmp_serde::to_vec_named(msg).expect("encodes");
    let v = Vector {
        description: description.to_owned(),
        kind: kind.to_owned(),
        subject,
        reply,
        hex: hex(&bytes),
        decoded: serde_json::to_value(msg).expect("to json"),
    };
    (kind.to_owned(), v)
}

#[derive(Serialize)]
struct Order<'a> {
    id: &'a str,
    customer: &'a str,
    sku: &'a str,
    quantity: u32,
}

#[derive(Serialize)]
struct Reservation<'a> {
    reservation: &'a str,
}

/// The log record a coordinator writes for one transition of `state` (`h` handled it).
fn logged(
    description: &str,
    state: &SagaState,
    h: &saga_core::Handled,
    trace: &str,
) -> (String, Vector) {
    let record = LogRecord {
        v: PROTOCOL_VERSION,
        snapshot: state.snapshot(),
        timeline: h.timeline.clone(),
        events: LifecycleNote::of(h.result.as_ref().unwrap()),
        trace: Some(trace.to_owned()),
    };
    let subject = format!("saga.log.{}.{}.{}", state.id(), state.saga(), record.headline());
    vector(description, "log_record", subject, None, &record)
}

fn definition() -> SagaDefinition {
    SagaDefinition::builder("place-order")
        .step("reserve-items", "seller", "reserve", |s| s.compensation("release"))
        .step("schedule-shipment", "logistics", "schedule", |s| s.compensation("cancel"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .build()
}

fn dispatches(effects: &[Effect]) -> Vec<saga_core::Dispatch> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn reply_subject(d: &saga_core::Dispatch, id: &SagaId) -> String {
    format!("saga.reply.r1.{}.{id}.{}.{}.{}", d.service, d.step, d.phase.code(), d.attempt)
}

/// Runs one saga through the machine (reserve succeeds, shipment is refused, the reservation
/// is released) and records every message of it, in order.
fn record() -> Vec<(String, Vector)> {
    let plan = definition().validate().expect("valid");
    let id = SagaId::for_key(plan.name(), "o-42");
    let input = Payload::new(
        rmp_serde::to_vec_named(&Order { id: "o-42", customer: "ada", sku: "apple", quantity: 2 })
            .unwrap(),
    );
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
    let mut out = Vec::new();
    let mut t = 1_764_470_000_000u64;
    let mut tick = || {
        t += 7;
        Timestamp(t)
    };

    let start = StartMessage {
        v: PROTOCOL_VERSION,
        saga_id: id.clone(),
        saga: plan.name().clone(),
        digest: plan.digest().to_owned(),
        input: input.clone(),
        key: "o-42".into(),
    };
    out.push(vector(
        "a client starts place-order for order o-42 (JetStream publish, Nats-Msg-Id start.<id>, Nats-Expected-Last-Subject-Sequence 0)",
        "start",
        format!("saga.in.{id}.{}.start", plan.name()),
        None,
        &start,
    ));

    let mut state = SagaState::new(id.clone(), &plan);
    let h = state.handle(&plan, tick(), &Event::Start { input: input.clone() });
    out.push(logged(
        "the coordinator logs the start before it sends anything: started, reserve-items dispatched (Nats-Expected-Last-Subject-Sequence 0 over saga.log.<id>.>)",
        &state,
        &h,
        &trace,
    ));
    let d = dispatches(h.result.as_ref().unwrap()).remove(0);
    let cmd = CommandMessage::from_dispatch(&id, plan.name(), &d);
    out.push(vector(
        "the coordinator sends the first action (core NATS request)",
        "command",
        format!("saga.cmd.{}.{}", d.service, d.command),
        Some(reply_subject(&d, &id)),
        &cmd,
    ));
    let output =
        Payload::new(rmp_serde::to_vec_named(&Reservation { reservation: "r-1" }).unwrap());
    let ok = ReplyOutcome::Success { output: output.clone() };
    let reply = ReplyMessage::to(&cmd, ok.clone());
    out.push(vector(
        "seller replies: reserved (core publish on the reply subject)",
        "reply",
        reply_subject(&d, &id),
        None,
        &reply,
    ));
    out.push(vector(
        "seller records the effect as done, with its reply (KV update at revision 0: the first send of a first attempt runs unclaimed)",
        "effect_record",
        format!("$KV.saga_fx_seller.{}", cmd.effect_key()),
        None,
        &EffectRecord::Done { outcome: ok, attempt: 1 },
    ));

    let h = state.handle(&plan, tick(), &reply.to_event());
    out.push(logged(
        "the coordinator logs reserve-items succeeded and schedule-shipment dispatched (Nats-Expected-Last-Subject-Sequence: the first record's sequence)",
        &state,
        &h,
        &trace,
    ));
    let d = dispatches(h.result.as_ref().unwrap()).remove(0);
    let cmd = CommandMessage::from_dispatch(&id, plan.name(), &d);
    out.push(vector(
        "the coordinator sends the second action",
        "command",
        format!("saga.cmd.{}.{}", d.service, d.command),
        Some(reply_subject(&d, &id)),
        &cmd,
    ));
    let refused = ReplyOutcome::Failure { reason: "no courier available".into(), transient: false };
    let reply = ReplyMessage::to(&cmd, refused);
    out.push(vector(
        "logistics replies with a business failure",
        "reply",
        reply_subject(&d, &id),
        None,
        &reply,
    ));
    let h = state.handle(&plan, tick(), &reply.to_event());
    out.push(logged(
        "the coordinator logs the failure and the start of compensation",
        &state,
        &h,
        &trace,
    ));
    let d = dispatches(h.result.as_ref().unwrap()).remove(0);
    assert_eq!(d.phase, Phase::Compensation);
    let cmd = CommandMessage::from_dispatch(&id, plan.name(), &d);
    out.push(vector(
        "the coordinator sends the compensation, with the action's output",
        "command",
        format!("saga.cmd.{}.{}", d.service, d.command),
        Some(reply_subject(&d, &id)),
        &cmd,
    ));
    let claim = EffectRecord::InProgress { until: d.deadline.0 + 500, attempt: 1 };
    out.push(vector(
        "seller claims the compensation's effect until the command's deadline plus 500 ms (KV saga_fx_seller, update at revision 0): every delivery but the first send of an action's first attempt is claimed",
        "effect_record",
        format!("$KV.saga_fx_seller.{}", cmd.effect_key()),
        None,
        &claim,
    ));
    let reply = ReplyMessage::to(&cmd, ReplyOutcome::Success { output: Payload::default() });
    out.push(vector("seller replies: released", "reply", reply_subject(&d, &id), None, &reply));
    let h = state.handle(&plan, tick(), &reply.to_event());
    out.push(logged(
        "the coordinator logs the end: compensated (followers of compensated events read this record)",
        &state,
        &h,
        &trace,
    ));
    out.push(vector(
        "a compensation that found no record of its action blocks it for good",
        "effect_record",
        format!("$KV.saga_fx_logistics.{id}.schedule-shipment.a"),
        None,
        &EffectRecord::Barrier { lapsed: false },
    ));
    let op = OperatorMessage {
        v: PROTOCOL_VERSION,
        saga_id: id.clone(),
        action: OperatorAction::Cancel,
        reason: "customer changed their mind".into(),
    };
    out.push(vector(
        "operator ada cancels a saga (JetStream publish; the subject names the operator)",
        "operator",
        format!("saga.in.{id}.{}.op.ada", plan.name()),
        None,
        &op,
    ));
    out
}

/// Pretty JSON with arrays of numbers (byte strings) on one line each.
fn compact_byte_arrays(pretty: &str) -> String {
    let mut out = String::new();
    let mut in_numbers = false;
    for line in pretty.lines() {
        let t = line.trim();
        let number = t.trim_end_matches(',').parse::<u64>().is_ok();
        if in_numbers {
            if number {
                out.push_str(t);
                if t.ends_with(',') {
                    out.push(' ');
                }
                continue;
            }
            in_numbers = false;
            out.push_str(t);
            out.push('\n');
            continue;
        }
        if t.ends_with('[') {
            out.push_str(line);
            in_numbers = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn check<T: WireMessage + Serialize>(v: &Vector) {
    let bytes = unhex(&v.hex);
    let msg: T = Codec::default()
        .decode(&bytes)
        .unwrap_or_else(|e| panic!("vector {:?}: {e}", v.description));
    assert_eq!(
        rmp_serde::to_vec_named(&msg).unwrap(),
        bytes,
        "{}: re-encodes byte for byte",
        v.description
    );
    assert_eq!(serde_json::to_value(&msg).unwrap(), v.decoded, "{}: decoded form", v.description);
}

fn check_effect(v: &Vector) {
    let bytes = unhex(&v.hex);
    let msg: EffectRecord = rmp_serde::from_slice(&bytes).expect("effect record decodes");
    assert_eq!(rmp_serde::to_vec_named(&msg).unwrap(), bytes, "{}: re-encodes", v.description);
    assert_eq!(serde_json::to_value(&msg).unwrap(), v.decoded, "{}: decoded form", v.description);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct DefinitionVector {
    description: String,
    /// The definition as written (YAML).
    yaml: String,
    /// Its canonical JSON: the bytes the digest is computed over.
    canonical_json: String,
    /// Hex SHA-256 of the canonical JSON, first 16 bytes.
    digest: String,
}

fn definition_vector() -> DefinitionVector {
    let yaml = "name: place-order\nsteps:\n  - name: reserve-items\n    service: seller\n    action: reserve\n    compensation: release\n  - name: schedule-shipment\n    service: logistics\n    action: schedule\n    compensation: cancel\n  - name: charge\n    service: payments\n    action: charge\n    kind: pivot\n";
    let def = SagaDefinition::from_yaml(yaml).expect("parses");
    DefinitionVector {
        description: "a definition, its canonical JSON (what is stored under saga_definitions <name>.<digest>) and its digest".into(),
        yaml: yaml.into(),
        canonical_json: serde_json::to_string(&def.canonical()).unwrap(),
        digest: def.digest(),
    }
}

#[test]
fn conformance_vectors_decode_and_re_encode_byte_for_byte() {
    let recorded = record();
    let file = dir().join("saga-paths.json");
    let def_file = dir().join("definition.json");
    let vectors: Vec<Vector> = recorded.into_iter().map(|(_, v)| v).collect();
    if std::env::var_os("UPDATE_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(
            &file,
            compact_byte_arrays(&serde_json::to_string_pretty(&vectors).unwrap()),
        )
        .unwrap();
        std::fs::write(
            &def_file,
            serde_json::to_string_pretty(&definition_vector()).unwrap() + "\n",
        )
        .unwrap();
    }
    let stored: Vec<Vector> = serde_json::from_str(
        &std::fs::read_to_string(&file).expect("docs/vectors/saga-paths.json exists"),
    )
    .expect("vector file parses");
    assert_eq!(stored, vectors, "the machine still produces exactly the recorded messages");
    let kinds: BTreeMap<&str, usize> = stored.iter().fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v.kind.as_str()).or_default() += 1;
        m
    });
    for kind in ["start", "command", "reply", "log_record", "effect_record", "operator"] {
        assert!(kinds.contains_key(kind), "a vector of kind {kind}");
    }
    for v in &stored {
        match v.kind.as_str() {
            "start" => check::<StartMessage>(v),
            "command" => check::<CommandMessage>(v),
            "reply" => check::<ReplyMessage>(v),
            "operator" => check::<OperatorMessage>(v),
            "log_record" => check::<LogRecord>(v),
            "effect_record" => check_effect(v),
            other => panic!("unknown vector kind {other}"),
        }
    }
    let stored: DefinitionVector = serde_json::from_str(
        &std::fs::read_to_string(&def_file).expect("docs/vectors/definition.json exists"),
    )
    .unwrap();
    assert_eq!(stored, definition_vector());
    let def: SagaDefinition = serde_json::from_str(&stored.canonical_json).unwrap();
    assert_eq!(def.digest(), stored.digest, "the digest of the canonical JSON as stored");
}
