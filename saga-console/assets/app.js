// The saga console: plain JavaScript, no dependencies, nothing fetched but this server's API.
"use strict";

const main = document.getElementById("main");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "-");
const pill = (status) => `<span class="pill status-${esc(status)}" data-status="${esc(status)}">${esc(status)}</span>`;

async function api(path, options) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function fail(e) {
  main.innerHTML = `<div class="error" data-testid="error">${esc(e.message || e)}</div>`;
}

// Routes: #/, #/sagas/<name>?status=, #/saga/<id>, #/queue, #/defs/<name>
async function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (parts[0] || "overview")));
  try {
    if (parts[0] === "sagas" && parts[1]) await sagas(parts[1], params);
    else if (parts[0] === "saga" && parts[1]) await saga(parts[1]);
    else if (parts[0] === "queue") await queue();
    else if (parts[0] === "defs" && parts[1]) await defs(parts[1]);
    else await overview();
  } catch (e) {
    fail(e);
  }
}

const FINISHED = ["completed", "compensated", "cancelled", "resolved"];

async function overview() {
  const o = await api("/api/overview");
  document.getElementById("operator").textContent = o.operator ? `operator: ${o.operator}` : "";
  const cards = o.definitions.map((d) => {
    const s = d.stats;
    const counts = [
      `<a href="#/sagas/${esc(d.name)}?status=running">${pill("running")} ${s.in_flight - s.parked}</a>`,
      `<a href="#/sagas/${esc(d.name)}?status=parked">${pill("needs_intervention")} ${s.parked}</a>`,
      ...FINISHED.map((f) => `<a href="#/sagas/${esc(d.name)}?status=${f}">${pill(f)} ${s.finished[f] ?? 0}</a>`),
    ].join(" ");
    const oldest = s.oldest_in_flight_at ? `oldest in flight since ${when(s.oldest_in_flight_at)}` : "nothing in flight";
    return `<div class="card" data-testid="definition" data-name="${esc(d.name)}">
      <h3><a href="#/sagas/${esc(d.name)}">${esc(d.name)}</a></h3>
      <div class="counts">${counts}</div>
      <p class="muted">${oldest} · dead letters (all): ${s.dead_letters} · <a href="#/defs/${esc(d.name)}">definition</a></p>
    </div>`;
  });
  main.innerHTML = `<h1>Sagas</h1><div class="cards">${cards.join("") || "<p>No saga definition is registered.</p>"}</div>`;
}

async function sagas(name, params) {
  const status = params.get("status") || "live";
  const step = params.get("step") || "";
  const since = params.get("since") || "";
  const q = new URLSearchParams({ status, limit: "200" });
  if (step) q.set("step", step);
  if (since) q.set("since", String(Date.now() - Number(since) * 60000));
  if (params.get("cursor")) q.set("cursor", params.get("cursor"));
  const [page, stats] = await Promise.all([api(`/api/sagas/${encodeURIComponent(name)}?${q}`), api("/api/overview")]);
  const mine = stats.definitions.find((d) => d.name === name);
  // The parked ones first: they are the ones waiting for someone.
  const rows = [...page.sagas].sort((a, b) => (b.status === "needs_intervention") - (a.status === "needs_intervention"));
  const options = ["live", "finished", "running", "compensating", "parked", "completed", "compensated", "cancelled", "resolved"]
    .map((s) => `<option ${s === status ? "selected" : ""}>${s}</option>`).join("");
  const counts = mine
    ? `<p class="counts" data-testid="counts">${pill("running")} ${mine.stats.in_flight - mine.stats.parked} ${pill("needs_intervention")} ${mine.stats.parked} ${FINISHED.map((f) => `${pill(f)} ${mine.stats.finished[f] ?? 0}`).join(" ")}</p>`
    : "";
  main.innerHTML = `<h1>${esc(name)}</h1>${counts}
    <form class="filters" id="filters">
      <label>Status <select name="status">${options}</select></label>
      <label>Step <input name="step" value="${esc(step)}" placeholder="any"></label>
      <label>Started within (minutes) <input name="since" value="${esc(since)}" size="6" placeholder="any"></label>
      <button>Filter</button>
    </form>
    <table data-testid="sagas"><thead><tr><th>Id</th><th>Status</th><th>Step</th><th>Started</th><th>Updated</th><th>Reason</th></tr></thead>
    <tbody>${rows.map((s) => `<tr data-id="${esc(s.id)}"><td class="mono"><a href="#/saga/${esc(s.id)}">${esc(s.id)}</a></td><td>${pill(s.status)}</td><td>${esc(s.step ?? "-")}</td><td>${when(s.started_at)}</td><td>${when(s.updated_at)}</td><td>${esc(s.reason ?? "")}</td></tr>`).join("")}</tbody></table>
    ${rows.length ? "" : `<p class="muted" data-testid="empty">No saga matches.</p>`}
    ${page.next && page.sagas.length >= 200 ? `<p><a href="#/sagas/${esc(name)}?${new URLSearchParams({ status, step, since, cursor: page.next })}">more…</a></p>` : ""}`;
  document.getElementById("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    location.hash = `#/sagas/${encodeURIComponent(name)}?${new URLSearchParams([...f.entries()].filter(([, v]) => v))}`;
  });
}

// One saga: what it is, what the operator may do, its timeline drawn per service lane, the
// choreography around it, and every timeline entry.
async function saga(id) {
  const s = await api(`/api/saga/${encodeURIComponent(id)}`);
  const snap = s.snapshot;
  const parked = snap.status === "needs_intervention";
  const actions = [];
  if (snap.status === "running") actions.push(["cancel", "Cancel", "compensates what is done; the saga ends cancelled"]);
  if (parked) {
    actions.push(["retry", "Retry", "sends the stuck compensations again"]);
    actions.push(["skip", "Skip", "marks the stuck compensations skipped; the saga goes on compensating"]);
    actions.push(["resolve", "Resolve", "ends the saga resolved: someone fixed it by hand"]);
  }
  const steps = snap.steps.map((st) => `<tr data-step="${esc(st.name)}"><td>${esc(st.name)}</td><td>${esc(st.status)}</td><td>${st.attempt}</td><td>${st.comp_attempt ?? 0}</td>
      <td>${s.outputs[st.name] !== undefined ? `<details><summary>output</summary><pre class="mono">${esc(JSON.stringify(s.outputs[st.name], null, 2))}</pre></details>` : "-"}</td>
      <td>${esc(st.last_error ?? "")}</td></tr>`).join("");
  main.innerHTML = `<h1>${esc(snap.saga)} <span class="mono">${esc(snap.id)}</span> ${pill(snap.status)}</h1>
    <dl class="meta">
      <dt>Version</dt><dd class="mono">${esc(snap.digest)}</dd>
      <dt>Started</dt><dd>${when(snap.started_at)}</dd><dt>Updated</dt><dd>${when(snap.updated_at)}</dd>
      ${snap.cause ? `<dt>Cause</dt><dd data-testid="cause">${esc(snap.cause.type === "step_failed" ? `step ${snap.cause.step} failed: ${snap.cause.reason}` : `cancelled: ${snap.cause.reason}`)}</dd>` : ""}
      <dt>Input</dt><dd><details><summary>input</summary><pre class="mono">${esc(JSON.stringify(s.input, null, 2))}</pre></details></dd>
    </dl>
    <div class="actions">${actions.map(([a, label]) => `<button class="danger" data-action="${a}">${label}…</button>`).join("")}</div>
    <h2>Timeline</h2>${chart(s.timeline, snap)}
    <h2>Steps</h2><table data-testid="steps"><thead><tr><th>Step</th><th>Status</th><th>Attempt</th><th>Compensation attempt</th><th>Output</th><th>Last error</th></tr></thead><tbody>${steps}</tbody></table>
    <h2>Choreography: lifecycle events and their followers</h2>${choreography(s.records, s.followers)}
    <h2>Domain events carrying this saga's id</h2>${domainEvents(s.domain)}
    <h2>History</h2>${history(s.timeline)}`;
  main.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", () => {
    const [action, label, what] = actions.find(([a]) => a === b.dataset.action);
    confirmAction(`${label} saga ${snap.id}?`, what, async (reason) => {
      await api(`/api/saga/${encodeURIComponent(snap.id)}/${action}`, {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ reason }),
      });
      notice(`${action}: applied`);
      setTimeout(route, 300);
    });
  }));
}

// Each attempt as a bar, from dispatch to outcome, in a row per step and phase grouped by
// the service that ran it; operator actions and the saga's compensation and end as markers.
function chart(timeline, snap) {
  if (!timeline.length) return `<p class="muted">Nothing logged yet: the first steps are under way.</p>`;
  const t0 = timeline[0].at;
  const last = Math.max(...timeline.map((e) => e.at), t0 + 1);
  // A running saga's attempts in flight run to now (this browser's clock, never before the
  // last entry), so the chart shows how long they have been going.
  const t1 = snap.status === "running" ? Math.max(last, Date.now()) : last;
  const open = new Map();
  const bars = [];
  const marks = [];
  const rows = [];
  for (const e of timeline) {
    const ev = e.event;
    const key = `${ev.step}/${ev.phase}/${ev.attempt}`;
    if (ev.type === "dispatched") {
      open.set(key, { at: e.at, service: ev.service, step: ev.step, phase: ev.phase, attempt: ev.attempt, command: ev.command });
      const row = `${ev.service}|${ev.step}|${ev.phase}`;
      if (!rows.includes(row)) rows.push(row);
    } else if (ev.type === "awaiting") {
      // An await step sends no command: its bar runs from the wait to what ended it.
      open.set(`${ev.step}/action/1`, { at: e.at, service: "(awaits)", step: ev.step, phase: "action", attempt: 1, command: ev.waits_for });
      const row = `(awaits)|${ev.step}|action`;
      if (!rows.includes(row)) rows.push(row);
    } else if (ev.type === "stopped_waiting" && open.has(`${ev.step}/action/1`)) {
      const b = open.get(`${ev.step}/action/1`);
      open.delete(`${ev.step}/action/1`);
      bars.push({ ...b, end: e.at, outcome: "failed", reason: "stopped waiting: the saga compensates" });
    } else if (["succeeded", "failed", "timed_out"].includes(ev.type) && open.has(key)) {
      const b = open.get(key);
      open.delete(key);
      bars.push({ ...b, end: e.at, outcome: ev.type, reason: ev.reason });
    } else if (["compensation_started", "cancel_requested", "operator_retry", "operator_skip", "operator_resolve", "parked", "finished"].includes(ev.type)) {
      marks.push({ at: e.at, type: ev.type, by: ev.by, reason: ev.reason || (ev.cause && ev.cause.reason) || ev.status });
    }
  }
  for (const b of open.values()) bars.push({ ...b, end: snap.status === "running" ? Math.max(t1, b.at) : b.at, outcome: "in_flight" });
  const took = (b) => `${b.end - b.at} ms${b.outcome === "in_flight" ? " so far" : ""}`;
  // Rows of one service together, in the order the service first appears.
  const services = [...new Set(rows.map((r) => r.split("|")[0]))];
  rows.sort((a, b) => services.indexOf(a.split("|")[0]) - services.indexOf(b.split("|")[0]));
  const W = 1100, left = 190, right = 150, rowH = 26, top = 26;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => left + ((t - t0) / span) * (W - left - right);
  const H = top + rows.length * rowH + 30;
  const color = { succeeded: "var(--ok)", failed: "var(--fail)", timed_out: "var(--timeout)", in_flight: "#94a3b8" };
  const svgBars = bars.map((b) => {
    const y = top + rows.indexOf(`${b.service}|${b.step}|${b.phase}`) * rowH + 4;
    const w = Math.max(x(b.end) - x(b.at), 3);
    const fill = b.phase === "compensation" && b.outcome === "succeeded" ? "var(--comp)" : color[b.outcome];
    const what = b.service === "(awaits)" ? `waits for ${b.command}` : `${b.service}.${b.command} (${b.phase}, attempt ${b.attempt})`;
    const title = `${what}: ${b.outcome}, ${took(b)}${b.reason ? ` — ${b.reason}` : ""}`;
    return `<g data-testid="bar" data-step="${esc(b.step)}" data-phase="${esc(b.phase)}" data-outcome="${esc(b.outcome)}" data-start="${b.at}"><title>${esc(title)}</title>
      <rect x="${x(b.at)}" y="${y}" width="${w}" height="${rowH - 8}" rx="3" fill="${fill}"></rect>
      <text x="${x(b.at) + w + 4}" y="${y + 13}">#${b.attempt} ${esc(b.outcome.replace("_", " "))} · ${took(b)}</text></g>`;
  }).join("");
  const svgMarks = marks.map((m, i) => `<g data-testid="mark" data-type="${esc(m.type)}"><title>${esc(`${m.type}${m.by ? ` by ${m.by}` : ""}: ${m.reason ?? ""}`)}</title>
      <line x1="${x(m.at)}" x2="${x(m.at)}" y1="${14}" y2="${H - 22}" stroke="var(--op)" stroke-dasharray="3 3"></line>
      <text x="${x(m.at) + 3}" y="${10 + (i % 2) * 10}">${esc(m.type.replaceAll("_", " "))}${m.by ? ` (${esc(m.by)})` : ""}</text></g>`).join("");
  let previous = null;
  const svgRows = rows.map((r, i) => {
    const [service, step, phase] = r.split("|");
    const first = service !== previous;
    previous = service;
    return `${first ? `<text x="8" y="${top + i * rowH + 17}" font-weight="600">${esc(service)}</text>` : ""}
      <text x="${left - 8}" y="${top + i * rowH + 17}" text-anchor="end">${phase === "compensation" ? "undo " : ""}${esc(step)}</text>
      <line x1="8" x2="${W - 10}" y1="${top + (i + 1) * rowH}" y2="${top + (i + 1) * rowH}" stroke="${rows[i + 1] && rows[i + 1].split("|")[0] !== service ? "#ccc" : "#f0f0f0"}"></line>`;
  }).join("");
  return `<div class="legend"><span><i style="background:var(--ok)"></i>succeeded</span><span><i style="background:var(--fail)"></i>failed</span>
    <span><i style="background:var(--timeout)"></i>timed out</span><span><i style="background:var(--comp)"></i>compensated</span><span><i style="background:#94a3b8"></i>in flight</span>
    <span>${span} ms from the first dispatch to the last entry</span></div>
    <div class="chart"><svg data-testid="timeline-chart" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${svgRows}${svgBars}${svgMarks}
    <text x="${left}" y="${H - 6}">${when(t0)}</text><text x="${W - right - 60}" y="${H - 6}">${when(t1)}</text></svg></div>`;
}

function choreography(records, followers) {
  const rows = records.filter((r) => r.events && r.events.length).map((r) => {
    const who = followers.filter((f) => f.filters.some((p) => matches(p, r.subject))).map((f) => {
      const state = f.acked_to >= r.seq ? "consumed" : f.delivered_to >= r.seq ? "delivered" : "pending";
      return `<span class="pill" data-follower="${esc(f.name)}" data-state="${state}">${esc(f.name)}: ${state}</span>`;
    });
    const steps = r.events.map((e) => e.step).filter(Boolean).join(", ");
    return `<tr><td>${when(r.at)}</td><td>${r.events.map((e) => esc(e.kind)).join(", ")}</td><td>${esc(steps)}</td><td>${who.join(" ") || '<span class="muted">no follower</span>'}</td></tr>`;
  });
  return `<table data-testid="choreography"><thead><tr><th>Published</th><th>Lifecycle events</th><th>Step</th><th>Followers</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// The services' own events tagged with this saga (published with `publish_saga_event`).
function domainEvents(d) {
  if (!d) return `<p class="muted">Not available.</p>`;
  const rows = d.events.map((e) => `<tr data-subject="${esc(e.subject)}"><td>${when(e.at)}</td><td class="mono">${esc(e.subject)}</td>
    <td><details><summary>body</summary><pre class="mono">${esc(JSON.stringify(e.body, null, 2))}</pre></details></td></tr>`);
  const scanned = `${d.scanned} domain event${d.scanned === 1 ? "" : "s"} looked at${d.complete ? "" : " (the saga's whole life was not covered: only the first ones)"}`;
  return `<table data-testid="domain-events"><thead><tr><th>Published</th><th>Subject</th><th>Body</th></tr></thead><tbody>${rows.join("")}</tbody></table>
    <p class="muted">${rows.length ? "" : "None. "}${scanned}.</p>`;
}

// NATS subject matching: `*` one token, `>` the rest.
function matches(filter, subject) {
  const f = filter.split("."), s = subject.split(".");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === ">") return s.length > i;
    if (i >= s.length || (f[i] !== "*" && f[i] !== s[i])) return false;
  }
  return f.length === s.length;
}

function history(timeline) {
  const rows = timeline.map((e) => {
    const ev = e.event;
    const rest = Object.entries(ev).filter(([k]) => k !== "type").map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
    return `<tr data-type="${esc(ev.type)}"><td>${when(e.at)}</td><td>${esc(ev.type)}</td><td>${esc(rest)}</td></tr>`;
  });
  return `<table data-testid="history"><thead><tr><th>When</th><th>Event</th><th>Details</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// The operator's queue: parked sagas of every definition, then the dead letters.
async function queue() {
  const o = await api("/api/overview");
  const parked = [];
  for (const d of o.definitions) {
    if (d.stats.parked > 0) {
      const page = await api(`/api/sagas/${encodeURIComponent(d.name)}?status=parked&limit=200`);
      parked.push(...page.sagas);
    }
  }
  const dlq = await api("/api/dlq");
  main.innerHTML = `<h1>Operator queue</h1>
    <h2>Parked sagas (${parked.length})</h2>
    <table data-testid="parked"><thead><tr><th>Id</th><th>Saga</th><th>Stuck at</th><th>Since</th><th>Why</th></tr></thead><tbody>
    ${parked.map((s) => `<tr data-id="${esc(s.id)}"><td class="mono"><a href="#/saga/${esc(s.id)}">${esc(s.id)}</a></td><td>${esc(s.saga)}</td><td>${esc(s.step ?? "-")}</td><td>${when(s.updated_at)}</td><td>${esc(s.reason ?? "")}</td></tr>`).join("")}</tbody></table>
    <h2>Dead letters (${dlq.letters.length}${dlq.next ? "+" : ""})</h2>
    <table data-testid="dead-letters"><thead><tr><th>Seq</th><th>When</th><th>Component</th><th>Subject</th><th>Reason</th><th></th></tr></thead><tbody>
    ${dlq.letters.map((l) => `<tr data-seq="${l.seq}"><td>${l.seq}</td><td>${when(l.at)}</td><td>${esc(l.component)}</td><td class="mono">${esc(l.subject)}</td><td>${esc(l.reason)}</td>
      <td><button data-dlq="redrive" data-seq="${l.seq}">Re-drive…</button> <button class="danger" data-dlq="discard" data-seq="${l.seq}">Discard…</button></td></tr>`).join("")}</tbody></table>`;
  main.querySelectorAll("[data-dlq]").forEach((b) => b.addEventListener("click", () => {
    const { dlq: op, seq } = b.dataset;
    confirmAction(`${op === "redrive" ? "Re-drive" : "Discard"} dead letter ${seq}?`,
      op === "redrive" ? "publishes it again on its subject (starts and operator actions only)" : "deletes it for good",
      async () => {
        await api(`/api/dlq/${seq}/${op}`, { method: "POST" });
        notice(`dead letter ${seq}: ${op === "redrive" ? "re-driven" : "discarded"}`);
        setTimeout(route, 300);
      });
  }));
}

// A definition's versions, and the latest drawn as a graph of its steps.
async function defs(name) {
  const d = await api(`/api/defs/${encodeURIComponent(name)}`);
  const latest = d.versions.find((v) => v.digest === d.latest);
  main.innerHTML = `<h1>${esc(name)}: definition</h1>${latest ? graph(latest.definition) : ""}
    <h2>Versions</h2><table data-testid="versions"><thead><tr><th>Digest</th><th>Version</th><th>Steps</th><th>Live sagas</th><th></th></tr></thead><tbody>
    ${d.versions.map((v) => `<tr><td class="mono">${esc(v.digest)}</td><td>${v.definition.version}</td><td>${v.definition.steps.length}</td><td>${v.live}</td><td>${v.digest === d.latest ? "latest" : ""}</td></tr>`).join("")}</tbody></table>`;
}

function graph(def) {
  const steps = def.steps;
  const index = new Map(steps.map((s, i) => [s.name, i]));
  // A step without `after` runs after the one written before it.
  const deps = steps.map((s, i) => (s.after ? s.after : i > 0 ? [steps[i - 1].name] : []));
  const level = [];
  steps.forEach((s, i) => { level[i] = Math.max(0, ...deps[i].map((d) => (level[index.get(d)] ?? 0) + 1)); });
  const rows = {};
  const pos = steps.map((s, i) => { const l = level[i]; rows[l] = (rows[l] ?? 0) + 1; return [l, rows[l] - 1]; });
  const bw = 170, bh = 58, gx = 60, gy = 20;
  const X = (l) => 20 + l * (bw + gx), Y = (r) => 20 + r * (bh + gy);
  const W = X(Math.max(...level) + 1), H = Y(Math.max(...Object.values(rows))) + 10;
  const edges = steps.flatMap((s, i) => deps[i].map((d) => {
    const [l0, r0] = pos[index.get(d)], [l1, r1] = pos[i];
    return `<path d="M${X(l0) + bw},${Y(r0) + bh / 2} C${X(l0) + bw + gx / 2},${Y(r0) + bh / 2} ${X(l1) - gx / 2},${Y(r1) + bh / 2} ${X(l1)},${Y(r1) + bh / 2}"></path>`;
  }));
  const boxes = steps.map((s, i) => {
    const [l, r] = pos[i];
    return `<g data-testid="graph-step" data-step="${esc(s.name)}"><rect class="${s.kind === "pivot" ? "pivot" : ""}" x="${X(l)}" y="${Y(r)}" width="${bw}" height="${bh}" rx="6"></rect>
      <text x="${X(l) + 8}" y="${Y(r) + 18}" font-weight="600">${esc(s.name)}${s.kind !== "compensatable" ? ` (${esc(s.kind)})` : ""}</text>
      <text x="${X(l) + 8}" y="${Y(r) + 34}">${esc(s.service)}.${esc(s.action)}</text>
      <text x="${X(l) + 8}" y="${Y(r) + 50}" fill="var(--comp)">${s.compensation ? `undo: ${esc(s.compensation)}` : "no compensation"}</text></g>`;
  });
  return `<div class="graph"><svg data-testid="graph" width="${W}" height="${H}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"></path></marker></defs>${edges.join("")}${boxes.join("")}</svg></div>
    <p class="muted">Arrows: what runs after what (branches run in parallel). Red border: the pivot (after it, no compensation).</p>`;
}

function confirmAction(title, text, run) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  const reason = document.getElementById("confirm-reason");
  reason.value = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "go") return;
    try {
      await run(reason.value);
    } catch (e) {
      notice(e.message, true);
    }
  };
  dialog.showModal();
}

function notice(text, error) {
  const div = document.createElement("div");
  div.className = error ? "error" : "notice";
  div.dataset.testid = "notice";
  div.textContent = text;
  main.prepend(div);
}

// Live updates: lifecycle events refresh the page that shows what they concern.
let refresh = null;
function live() {
  const dot = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.onopen = () => dot.classList.add("on");
  source.onerror = () => dot.classList.remove("on");
  source.onmessage = (m) => {
    const e = JSON.parse(m.data);
    const h = location.hash;
    const concerned = h === "" || h === "#/" || h.startsWith(`#/sagas/${e.saga}`) || h === `#/saga/${e.id}` || h === "#/queue";
    if (!concerned || document.querySelector("dialog[open]")) return;
    clearTimeout(refresh);
    refresh = setTimeout(route, 400);
  };
}

window.addEventListener("hashchange", route);
route();
live();
