//! `sagactl`: list, show, watch, start and manage sagas from a terminal, over the
//! coordinator's admin service and the saga streams. `sagactl --help` lists the commands.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use saga_core::wire::{LogRecord, PROTOCOL_VERSION};
use saga_core::{Codec, SagaDefinition, SagaId, SagaStatus, TimelineEntry, TimelineEvent};
use saga_nats::index::{ListPage, ListRequest, SagaSummary, Which};
use saga_nats::{ErrorKind, NatsOptions, SagaClient, SagaClientError, SagaView};

mod table;

use table::{at, Table};

/// Operate sagas: list them, show one's timeline, watch them live, start them, and cancel,
/// retry, skip or resolve them.
///
/// Reads go through the coordinator's admin service (`saga.admin.<endpoint>.<saga>`), so
/// `sagactl` needs an operator's NATS permissions (docs/SECURITY.md), and a coordinator
/// running. Output is a table for people; --json prints JSON for scripts.
///
/// Exit codes: 0 done; 1 refused (the action does not apply, or a conflict); 2 bad usage or
/// input; 3 no such saga or definition; 4 NATS or server error; 5 timed out.
///
/// Examples:
///
///   sagactl list place-order                      # live sagas, oldest first
///   sagactl list place-order --status parked      # the operator's queue
///   sagactl list place-order --status finished --since 1h --json
///   sagactl show 6f1c0e...                        # snapshot and timeline
///   sagactl watch place-order                     # lifecycle events as they happen
///   sagactl start place-order --input '{"id":"o-1","sku":"plum","quantity":2}' --key o-1 --wait
///   sagactl retry 6f1c0e... --reason "stock service fixed"
///   sagactl stats place-order
///   sagactl defs validate example-services/sagas/place-order.yaml
///   sagactl dlq ls                                # dead letters, with reasons
///   sagactl dlq redrive 42                        # a start, once its definition exists
#[derive(Debug, Parser)]
#[command(name = "sagactl", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,

    /// Print JSON instead of tables (one JSON document; `watch` prints one per line).
    #[arg(long, global = true)]
    json: bool,

    /// The operator name recorded with cancel, retry, skip and resolve (your NATS user may
    /// publish only under its own name) [default: $USER].
    #[arg(long, global = true, env = "SAGA_OPERATOR")]
    operator: Option<String>,

    #[command(flatten)]
    nats: NatsOptions,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List sagas of a definition: live ones (oldest first) unless --status says otherwise.
    List {
        /// The saga definition's name.
        saga: String,
        /// live, finished, running, compensating, parked (needs_intervention), completed,
        /// compensated, cancelled or resolved.
        #[arg(long, default_value = "live")]
        status: String,
        /// Only sagas at this step (live), or whose failure at this step compensated them.
        #[arg(long)]
        step: Option<String>,
        /// Only sagas started within this long (e.g. 30m, 2h, 1d).
        #[arg(long, value_parser = parse_age)]
        since: Option<Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Start after this cursor (printed when more remain).
        #[arg(long)]
        cursor: Option<u64>,
    },
    /// Show one saga: status, steps and its timeline.
    Show {
        /// The saga id.
        id: String,
    },
    /// Follow lifecycle events as they are logged (Ctrl-C stops).
    Watch {
        /// Only sagas of this definition.
        saga: Option<String>,
    },
    /// Start a saga of the latest version of a definition; prints its id.
    Start {
        /// The saga definition's name.
        saga: String,
        /// The input: JSON, or @FILE to read it from a file.
        #[arg(long)]
        input: String,
        /// Idempotency key: the same key starts the saga once (a different input is refused).
        #[arg(long)]
        key: Option<String>,
        /// Wait until the saga ends (or needs an operator) and print how it ended.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = parse_age)]
        timeout: Duration,
    },
    /// Send a signal to a saga: an await step waiting for it completes with the payload as
    /// its output (now, or when the saga gets there).
    Signal {
        /// The saga id.
        id: String,
        /// The signal's name (as the definition's `await: { signal: NAME }` says).
        name: String,
        /// The payload: JSON, or @FILE to read it from a file.
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// Cancel a running saga (what is done is compensated).
    Cancel(Action),
    /// Retry the stuck compensations of a parked saga.
    Retry(Action),
    /// Skip the stuck compensations of a parked saga.
    Skip(Action),
    /// Mark a parked saga resolved by hand.
    Resolve(Action),
    /// Counts of a definition's sagas: in flight, oldest, parked, finished, dead letters.
    Stats {
        /// The saga definition's name.
        saga: String,
    },
    /// Saga definitions.
    #[command(subcommand)]
    Defs(Defs),
    /// Dead letters: what a component could not handle, with the reason.
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// List dead letters, oldest first.
    Ls {
        /// Only those of this component (`coordinator`, or a service name).
        #[arg(long)]
        component: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Start after this sequence (printed when more remain).
        #[arg(long)]
        cursor: Option<u64>,
    },
    /// Show one dead letter, with its body.
    Show {
        /// Its sequence (from `dlq ls`).
        seq: u64,
    },
    /// Publish a dead-lettered start or operator action again (e.g. once its definition is
    /// registered), then discard the dead letter.
    Redrive {
        /// Its sequence.
        seq: u64,
    },
    /// Delete a dead letter.
    Discard {
        /// Its sequence.
        seq: u64,
    },
}

#[derive(Debug, clap::Args)]
struct Action {
    /// The saga id.
    id: String,
    /// Why (recorded in the saga's history with your operator name).
    #[arg(long)]
    reason: String,
}

#[derive(Debug, Subcommand)]
enum Defs {
    /// List the registered definitions with their latest version.
    Ls,
    /// Show a definition: its latest version's steps, and every registered version with
    /// how many live sagas run it.
    Show {
        /// The definition's name.
        name: String,
    },
    /// Check a definition file (YAML, TOML or JSON) offline, with the coordinator's errors.
    Validate {
        /// The file.
        file: PathBuf,
    },
}

/// How a command failed, and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<SagaClientError> for Failure {
    fn from(e: SagaClientError) -> Self {
        let code = match e.kind() {
            ErrorKind::NotApplicable | ErrorKind::Conflict => 1,
            ErrorKind::InvalidInput | ErrorKind::InvalidDefinition | ErrorKind::BadRequest => 2,
            ErrorKind::NotFound | ErrorKind::UnknownSaga => 3,
            ErrorKind::TimedOut => 5,
            _ => 4,
        };
        Failure { code, message: e.to_string() }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure { code: 2, message: message.into() }
}

/// Runs `sagactl` with the process's arguments; returns the exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sagactl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Defs(Defs::Validate { file }) = &cli.command {
        return validate(file, cli.json);
    }
    let nats = cli
        .nats
        .connect("sagactl")
        .await
        .map_err(|e| Failure { code: 4, message: format!("cannot connect to NATS: {e}") })?;
    let mut client = SagaClient::new(nats.clone()).await?;
    if let Some(operator) = &cli.operator {
        client = client.with_operator(operator.clone());
    }
    let json = cli.json;
    match cli.command {
        Cmd::List { saga, status, step, since, limit, cursor } => {
            let status = Which::parse(&status).ok_or_else(|| {
                usage(format!("--status {status}: not one of live, finished, running, compensating, parked, completed, compensated, cancelled, resolved"))
            })?;
            let step = step.as_deref().map(saga_core::StepName::from);
            let since = since.map(|age| saga_core::Timestamp(now_ms().saturating_sub(millis(age))));
            list(
                &client,
                &saga,
                ListRequest { status, step, since, until: None, limit: None, cursor },
                limit,
                json,
            )
            .await
        }
        Cmd::Show { id } => show(&client, &id, json).await,
        Cmd::Watch { saga } => watch(&nats, saga.as_deref(), json).await,
        Cmd::Start { saga, input, key, wait, timeout } => {
            let input = read_input(&input)?;
            let id = match &key {
                Some(key) => client.start_with_key(&saga, key, &input).await?,
                None => client.start(&saga, &input).await?,
            };
            if !wait {
                print_json_or(json, &serde_json::json!({ "id": id }), || println!("{id}"));
                return Ok(());
            }
            let view = client.wait(&id, timeout).await?;
            print_json_or(json, &serde_json::json!({ "id": id, "status": view.status() }), || {
                println!("{id} {}", view.status())
            });
            if view.status() == SagaStatus::Completed {
                Ok(())
            } else {
                Err(Failure { code: 1, message: format!("saga {id} ended {}", view.status()) })
            }
        }
        Cmd::Signal { id, name, payload } => {
            let id =
                SagaId::new(&id).map_err(|e| usage(format!("{id:?} is not a saga id: it {e}")))?;
            let payload = read_input(&payload)?;
            client.signal(&id, &name, &payload).await?;
            print_json_or(
                json,
                &serde_json::json!({ "id": id, "signal": name, "sent": true }),
                || println!("signal {name}: sent to saga {id}"),
            );
            Ok(())
        }
        Cmd::Cancel(a) => act(&client, &a, "cancel", json).await,
        Cmd::Retry(a) => act(&client, &a, "retry", json).await,
        Cmd::Skip(a) => act(&client, &a, "skip", json).await,
        Cmd::Resolve(a) => act(&client, &a, "resolve", json).await,
        Cmd::Stats { saga } => {
            let c = client.stats(&saga).await?;
            print_json_or(json, &c, || {
                let mut t = Table::new(["", ""]);
                t.row([String::from("in flight"), c.in_flight.to_string()]);
                let oldest = c.oldest_in_flight_at.map_or("-".into(), |t| {
                    format!("{} ({} ago)", at(t), age(now_ms().saturating_sub(t.0)))
                });
                t.row([String::from("oldest in flight"), oldest]);
                t.row([String::from("parked"), c.parked.to_string()]);
                for (status, n) in &c.finished {
                    t.row([status.clone(), n.to_string()]);
                }
                t.row([String::from("dead letters (all)"), c.dead_letters.to_string()]);
                t.print_plain();
            });
            Ok(())
        }
        Cmd::Defs(Defs::Ls) => {
            let mut rows = Vec::new();
            for name in client.definition_names().await? {
                let plan = client.definition(name.as_str()).await?;
                rows.push(serde_json::json!({
                    "name": name, "version": plan.definition().version,
                    "digest": plan.digest(), "steps": plan.steps().len(),
                }));
            }
            print_json_or(json, &rows, || {
                let mut t = Table::new(["NAME", "VERSION", "DIGEST", "STEPS"]);
                for r in &rows {
                    t.row(["name", "version", "digest", "steps"].map(|k| match &r[k] {
                        serde_json::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    }));
                }
                t.print();
            });
            Ok(())
        }
        Cmd::Defs(Defs::Show { name }) => {
            let defs = client.definitions(&name).await?;
            let latest = defs.versions.iter().find(|v| v.digest == defs.latest);
            print_json_or(json, &defs, || {
                if let Some(v) = latest {
                    println!(
                        "{} version {} (digest {})",
                        defs.saga, v.definition.version, v.digest
                    );
                    print_steps(&v.definition);
                }
                println!();
                let mut t = Table::new(["DIGEST", "VERSION", "STEPS", "LIVE SAGAS", ""]);
                for v in &defs.versions {
                    t.row([
                        v.digest.clone(),
                        v.definition.version.to_string(),
                        v.definition.steps.len().to_string(),
                        v.live.to_string(),
                        if v.digest == defs.latest { "latest".into() } else { String::new() },
                    ]);
                }
                t.print();
            });
            Ok(())
        }
        Cmd::Dlq(op) => dlq(&client, op, json).await,
        Cmd::Defs(Defs::Validate { .. }) => unreachable!("handled before connecting"),
    }
}

fn print_steps(def: &SagaDefinition) {
    let mut t = Table::new(["STEP", "SERVICE", "ACTION", "COMPENSATION", "AFTER", "KIND"]);
    for s in &def.steps {
        let (service, action) = match &s.awaits {
            Some(a) => ("(await)".to_owned(), a.describe()),
            None => (s.service.to_string(), s.action.to_string()),
        };
        t.row([
            s.name.to_string(),
            service,
            action,
            s.compensation.as_ref().map_or("-".into(), ToString::to_string),
            s.after.as_ref().map_or("(previous)".into(), |a| {
                a.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            }),
            format!("{:?}", s.kind).to_lowercase(),
        ]);
    }
    t.print();
}

async fn dlq(client: &SagaClient, op: Dlq, json: bool) -> Result<(), Failure> {
    match op {
        Dlq::Ls { component, limit, cursor } => {
            let request = saga_nats::dlq::DlqListRequest {
                component,
                limit: Some(limit.clamp(1, saga_nats::dlq::MAX_PAGE)),
                cursor,
            };
            let page = client.dead_letters(&request).await?;
            print_json_or(json, &page, || {
                let mut t = Table::new(["SEQ", "WHEN", "COMPONENT", "SUBJECT", "REASON"]);
                for l in &page.letters {
                    t.row([
                        l.seq.to_string(),
                        at(l.at),
                        l.component.clone(),
                        l.subject.clone(),
                        l.reason.clone(),
                    ]);
                }
                t.print();
                if let Some(next) = page.next {
                    println!("more: run the same command with --cursor {next}");
                }
            });
        }
        Dlq::Show { seq } => {
            let l = client.dead_letter(seq).await?;
            print_json_or(json, &l, || {
                println!("seq        {}", l.seq);
                println!("when       {}", at(l.at));
                println!("component  {}", l.component);
                println!("subject    {}", l.subject);
                println!("reason     {}", l.reason);
                println!("size       {} bytes", l.size);
                match &l.body {
                    Some(body) => println!("body       {body}"),
                    None => println!("body       (not MessagePack)"),
                }
            });
        }
        Dlq::Redrive { seq } => {
            let done = client.redrive(seq).await?;
            print_json_or(json, &done, || {
                println!("re-driven: dead letter {seq} published again on {}", done.subject)
            });
        }
        Dlq::Discard { seq } => {
            client.discard(seq).await?;
            print_json_or(json, &serde_json::json!({ "discarded": seq }), || {
                println!("discarded: dead letter {seq}")
            });
        }
    }
    Ok(())
}

async fn list(
    client: &SagaClient,
    saga: &str,
    mut request: ListRequest,
    limit: usize,
    json: bool,
) -> Result<(), Failure> {
    let mut all = ListPage::default();
    // Follow cursors until `limit` sagas or the end, showing progress on long scans.
    let mut pages = 0;
    loop {
        request.limit =
            Some(limit.saturating_sub(all.sagas.len()).clamp(1, saga_nats::index::MAX_PAGE));
        let page = client.list(saga, &request).await?;
        pages += 1;
        all.sagas.extend(page.sagas);
        all.next = page.next;
        if pages % 10 == 0 && !json {
            eprint!("\rsagactl: scanned {pages} pages, {} sagas so far…", all.sagas.len());
        }
        match page.next {
            Some(next) if all.sagas.len() < limit => request.cursor = Some(next),
            _ => break,
        }
    }
    if pages >= 10 && !json {
        eprintln!();
    }
    print_json_or(json, &all, || {
        let mut t = Table::new(["ID", "STATUS", "STEP", "STARTED", "UPDATED", "REASON"]);
        for s in &all.sagas {
            t.row(summary_row(s));
        }
        t.print();
        match all.next {
            Some(next) if all.sagas.len() >= limit => {
                println!("more: run the same command with --cursor {next}")
            }
            _ => {}
        }
    });
    Ok(())
}

fn summary_row(s: &SagaSummary) -> [String; 6] {
    [
        s.id.to_string(),
        s.status.to_string(),
        s.step.as_ref().map_or("-".into(), ToString::to_string),
        at(s.started_at),
        at(s.updated_at),
        s.reason.clone().unwrap_or_default(),
    ]
}

async fn show(client: &SagaClient, id: &str, json: bool) -> Result<(), Failure> {
    let id = SagaId::new(id).map_err(|e| usage(format!("{id:?} is not a saga id: it {e}")))?;
    let Some(view) = client.get(&id).await? else {
        return Err(Failure { code: 3, message: format!("no saga {id}") });
    };
    let page = if view.logged { client.whole_timeline(&id).await? } else { Default::default() };
    let (timeline, records) = (page.entries, page.records);
    // Who follows these lifecycle events, and how far each has consumed (an operator's
    // read: without it, the events are shown without their followers).
    let followers = client.followers(view.saga().as_str()).await;
    if json {
        let doc = serde_json::json!({
            "snapshot": view.snapshot,
            "input": decoded(view.snapshot.input.as_bytes()),
            "logged": view.logged,
            "timeline": timeline,
            "records": records,
            "followers": followers.as_ref().ok(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON encodes"));
        return Ok(());
    }
    print_view(&view);
    println!();
    print_timeline(&timeline);
    println!();
    print_lifecycle(&records, followers);
    Ok(())
}

/// The lifecycle events the saga's log records published, and which followers consumed each.
fn print_lifecycle(
    records: &[saga_nats::RecordMeta],
    followers: Result<Vec<saga_nats::Follower>, SagaClientError>,
) {
    let mut t = Table::new(["PUBLISHED", "LIFECYCLE EVENTS", "STEP", "FOLLOWERS"]);
    for r in records.iter().filter(|r| !r.events.is_empty()) {
        let kinds: Vec<&str> = r.events.iter().map(|e| e.kind.as_str()).collect();
        let steps: Vec<String> =
            r.events.iter().filter_map(|e| e.step.as_ref().map(ToString::to_string)).collect();
        let consumers = match &followers {
            Ok(all) => {
                let mut who: Vec<String> = all
                    .iter()
                    .filter(|f| f.follows(&r.subject))
                    .map(|f| {
                        let state = if f.acked_to >= r.seq {
                            "consumed"
                        } else if f.delivered_to >= r.seq {
                            "delivered"
                        } else {
                            "pending"
                        };
                        format!("{} ({state})", f.name)
                    })
                    .collect();
                if who.is_empty() {
                    who.push("-".into());
                }
                who.join(", ")
            }
            Err(_) => "?".into(),
        };
        t.row([at(r.at), kinds.join(", "), steps.join(", "), consumers]);
    }
    t.print();
    if let Err(e) = followers {
        println!("(followers not shown: {e})");
    }
}

fn print_view(view: &SagaView) {
    let s = &view.snapshot;
    println!("saga     {} ({} {})", s.id, s.saga, s.digest);
    println!("status   {}", s.status);
    println!("started  {}   updated {}", at(s.started_at), at(s.updated_at));
    if let Some(cause) = &s.cause {
        println!("cause    {}", serde_json::to_string(cause).unwrap_or_default());
    }
    println!("input    {}", decoded(s.input.as_bytes()));
    println!();
    let mut t = Table::new(["STEP", "STATUS", "ATTEMPT", "COMP", "OUTPUT", "LAST ERROR"]);
    for step in &s.steps {
        t.row([
            step.name.to_string(),
            format!("{:?}", step.status).to_lowercase(),
            step.attempt.to_string(),
            step.comp_attempt.to_string(),
            step.output.as_ref().map_or("-".into(), |o| decoded(o.as_bytes()).to_string()),
            step.last_error.clone().unwrap_or_default(),
        ]);
    }
    t.print();
}

/// The timeline as a table: when, which step and service, which command and attempt, how
/// long the attempt took, and how it ended.
fn print_timeline(entries: &[TimelineEntry]) {
    use std::collections::HashMap;
    let mut sent: HashMap<(String, String, u32), (u64, String, String)> = HashMap::new();
    let mut t =
        Table::new(["WHEN", "EVENT", "STEP", "SERVICE", "COMMAND", "ATTEMPT", "TOOK", "DETAIL"]);
    for e in entries {
        let mut row = [
            at(e.at),
            e.event.name().to_owned(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ];
        let ended = |step: &saga_core::StepName,
                     phase: &saga_core::Phase,
                     attempt: u32,
                     row: &mut [String; 8]| {
            row[2] = format!("{step}{}", phase_mark(phase));
            row[5] = attempt.to_string();
            if let Some((t0, service, command)) =
                sent.get(&(step.to_string(), format!("{phase:?}"), attempt))
            {
                row[3] = service.clone();
                row[4] = command.clone();
                row[6] = format!("{} ms", e.at.0.saturating_sub(*t0));
            }
        };
        match &e.event {
            TimelineEvent::Dispatched { step, phase, attempt, service, command, deadline } => {
                sent.insert(
                    (step.to_string(), format!("{phase:?}"), *attempt),
                    (e.at.0, service.to_string(), command.to_string()),
                );
                row[2] = format!("{step}{}", phase_mark(phase));
                row[3] = service.to_string();
                row[4] = command.to_string();
                row[5] = attempt.to_string();
                row[7] = format!("deadline {}", at(*deadline));
            }
            TimelineEvent::Succeeded { step, phase, attempt } => {
                ended(step, phase, *attempt, &mut row)
            }
            TimelineEvent::Failed { step, phase, attempt, reason, transient } => {
                ended(step, phase, *attempt, &mut row);
                row[7] = format!("{}{reason}", if *transient { "(transient) " } else { "" });
            }
            TimelineEvent::TimedOut { step, phase, attempt } => {
                ended(step, phase, *attempt, &mut row)
            }
            TimelineEvent::NotDelivered { step, phase, attempt, retry_at } => {
                ended(step, phase, *attempt, &mut row);
                row[7] = format!("no responders; again at {}", at(*retry_at));
            }
            TimelineEvent::RetryScheduled { step, phase, next_attempt, at: when } => {
                row[2] = format!("{step}{}", phase_mark(phase));
                row[5] = next_attempt.to_string();
                row[7] = format!("at {}", at(*when));
            }
            TimelineEvent::CompensationStarted { cause } => {
                row[7] = serde_json::to_string(cause).unwrap_or_default();
            }
            TimelineEvent::CancelRequested { reason, by }
            | TimelineEvent::OperatorRetry { reason, by }
            | TimelineEvent::OperatorSkip { reason, by }
            | TimelineEvent::OperatorResolve { reason, by } => {
                row[7] = format!("by {}: {reason}", by.as_deref().unwrap_or("?"));
            }
            TimelineEvent::Parked { step, reason } => {
                row[2] = step.to_string();
                row[7] = reason.clone();
            }
            TimelineEvent::Awaiting { step, waits_for, deadline } => {
                row[2] = step.to_string();
                row[7] = format!("waits for {waits_for}, until {}", at(*deadline));
            }
            TimelineEvent::StoppedWaiting { step } => {
                row[2] = step.to_string();
                row[7] = "the saga compensates".into();
            }
            TimelineEvent::Finished { status } => row[7] = status.to_string(),
            _ => {}
        }
        t.row(row);
    }
    t.print();
}

fn phase_mark(phase: &saga_core::Phase) -> &'static str {
    match phase {
        saga_core::Phase::Action => "",
        _ => " (undo)",
    }
}

/// Prints each log record's lifecycle events as they are logged.
async fn watch(nats: &async_nats::Client, saga: Option<&str>, json: bool) -> Result<(), Failure> {
    let filter = format!("saga.log.*.{}.*", saga.unwrap_or("*"));
    let mut sub = nats
        .subscribe(filter.clone())
        .await
        .map_err(|e| Failure { code: 4, message: format!("cannot subscribe to {filter}: {e}") })?;
    if !json {
        eprintln!("sagactl: watching {filter} (Ctrl-C stops)");
    }
    let codec = Codec::default();
    let mut out = std::io::stdout();
    loop {
        let msg = tokio::select! {
            msg = sub.next() => msg,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(msg) = msg else { return Ok(()) };
        let Ok(record) = codec.decode::<LogRecord>(&msg.payload) else { continue };
        if record.v != PROTOCOL_VERSION {
            continue;
        }
        let s = &record.snapshot;
        for e in &record.events {
            if json {
                let line = serde_json::json!({ "id": s.id, "saga": s.saga, "event": e.kind, "step": e.step, "reason": e.reason, "status": s.status, "at": s.updated_at });
                let _ = writeln!(out, "{line}");
            } else {
                let _ = writeln!(
                    out,
                    "{}  {}  {:<20} {}{}{}",
                    at(s.updated_at),
                    s.id,
                    e.kind.as_str(),
                    s.saga,
                    e.step.as_ref().map_or(String::new(), |st| format!(" step {st}")),
                    e.reason.as_ref().map_or(String::new(), |r| format!(": {r}")),
                );
            }
        }
        let _ = out.flush();
    }
}

async fn act(client: &SagaClient, a: &Action, what: &str, json: bool) -> Result<(), Failure> {
    let id =
        SagaId::new(&a.id).map_err(|e| usage(format!("{:?} is not a saga id: it {e}", a.id)))?;
    let action =
        saga_core::wire::OperatorAction::parse(what).expect("a subcommand names an action");
    client.act(&id, action, &a.reason).await?;
    print_json_or(json, &serde_json::json!({ "id": id, "action": what, "applied": true }), || {
        println!("{what}: applied to saga {id}")
    });
    Ok(())
}

fn validate(file: &PathBuf, json: bool) -> Result<(), Failure> {
    let def = SagaDefinition::load(file).map_err(|e| usage(e.to_string()))?;
    let plan = def.validate().map_err(|e| usage(format!("{}: {e}", file.display())))?;
    print_json_or(
        json,
        &serde_json::json!({ "name": plan.name(), "digest": plan.digest(), "steps": plan.steps().len() }),
        || {
            println!(
                "{}: valid; saga {} with {} steps, digest {}",
                file.display(),
                plan.name(),
                plan.steps().len(),
                plan.digest()
            )
        },
    );
    Ok(())
}

/// The input given on the command line: JSON, or `@FILE`.
fn read_input(arg: &str) -> Result<serde_json::Value, Failure> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read input file {path}: {e}")))?,
        None => arg.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| usage(format!("--input is not JSON: {e}")))
}

/// MessagePack bytes as JSON, for display (the raw bytes' length if they do not decode).
fn decoded(bytes: &[u8]) -> serde_json::Value {
    saga_nats::dlq::msgpack_json(bytes)
        .unwrap_or_else(|| serde_json::json!(format!("<{} bytes>", bytes.len())))
}

fn print_json_or<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("JSON encodes"));
    } else {
        table();
    }
}

/// `30s`, `15m`, `2h`, `1d`, or a number of seconds.
fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        n.parse().map_err(|_| format!("{s:?}: expected a number and a unit (30s, 15m, 2h, 1d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, millis)
}

/// A duration in ms, roughly, for people.
fn age(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_units() {
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_age("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_age("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_age("5w").unwrap_err().contains("unit"));
        assert!(parse_age("soon").unwrap_err().contains("expected a number"));
    }

    #[test]
    fn help_parses_and_every_command_is_listed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for cmd in [
            "list", "show", "watch", "start", "cancel", "retry", "skip", "resolve", "stats", "defs",
        ] {
            assert!(help.contains(cmd), "{cmd} missing from --help");
        }
    }

    #[test]
    fn input_is_json_or_a_file() {
        assert_eq!(read_input(r#"{"a":1}"#).ok().unwrap(), serde_json::json!({"a": 1}));
        let err = read_input("{nope").err().unwrap();
        assert_eq!(err.code, 2);
        assert!(err.message.contains("not JSON"), "{}", err.message);
        let err = read_input("@/nonexistent/input.json").err().unwrap();
        assert!(err.message.contains("cannot read input file"), "{}", err.message);
    }
}
