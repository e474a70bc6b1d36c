// Drives the saga console in Debian's headless Chromium, as an operator would, and checks
// what the pages show. Run by tests/tests/console.rs against a real stack:
//
//   node tests/browser/console.mjs <console url> <screenshot dir> <expectations json>
//
// Expectations: {"saga": name, "finished": n, "completed": n, "compensated": id,
// "compensated_reason": text, "compensations": [step, ...], "parked": id, "waiting": id (at
// an await step, waiting for "waits_for"), "operator": name}.
// Exits non-zero, naming what was wrong, at the first check that fails.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [url, outDir, json] = process.argv.slice(2);
const want = JSON.parse(json);
mkdirSync(outDir, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  page.on("pageerror", (e) => { throw new Error(`page error: ${e.message}`); });
  const shot = (name) => page.screenshot({ path: join(outDir, `${name}.png`), fullPage: true });

  // 1. The list: the sagas the test ran, with the right counts.
  await page.goto(`${url}/#/sagas/${want.saga}?status=finished`);
  await page.waitForSelector('[data-testid="sagas"] tbody tr');
  const rows = await page.locator('[data-testid="sagas"] tbody tr').count();
  check(rows === want.finished, `the finished list shows ${want.finished} sagas (shows ${rows})`);
  const counts = (await page.locator('[data-testid="counts"]').textContent()).replace(/\s+/g, " ");
  check(counts.includes(`completed ${want.completed}`), `the counts say completed ${want.completed} (${counts})`);
  check(counts.includes(`needs_intervention 1`), `the counts show the parked saga (${counts})`);
  await shot("list");

  // 2. A compensated saga: its steps, the failure's reason, the compensations in order.
  await page.goto(`${url}/#/saga/${want.compensated}`);
  await page.waitForSelector('[data-testid="timeline-chart"]');
  const cause = await page.locator('[data-testid="cause"]').innerText();
  check(cause.includes(want.compensated_reason), `the cause names the failure (${cause})`);
  const steps = await page.locator('[data-testid="steps"] tbody tr').count();
  check(steps === want.steps, `the steps table has ${want.steps} steps (${steps})`);
  const undo = await page.locator('[data-testid="bar"][data-phase="compensation"]').evaluateAll((bars) =>
    bars.map((b) => [b.dataset.step, Number(b.dataset.start)]).sort((a, b) => a[1] - b[1]).map((b) => b[0]));
  check(JSON.stringify(undo) === JSON.stringify(want.compensations),
    `the compensations are drawn in order ${want.compensations} (drawn: ${undo})`);
  const failedBar = await page.locator('[data-testid="bar"][data-outcome="failed"]').count();
  check(failedBar >= 1, "the failed attempt is drawn");
  const history = await page.locator('[data-testid="history"]').innerText();
  check(history.includes("compensation_started") && history.includes(want.compensated_reason),
    "the history lists the compensation and the reason");
  const choreo = await page.locator('[data-testid="choreography"]').innerText();
  check(choreo.includes("compensated"), `the choreography lists the lifecycle events (${choreo.slice(0, 200)})`);
  await page.waitForSelector('[data-testid="domain-events"] tr[data-subject="domain.shop.refund_requested"]');
  const domain = await page.locator('[data-testid="domain-events"] tbody tr').count();
  check(domain === 1, `the domain event tagged with the saga is shown, and only it (${domain})`);
  await shot("saga-timeline");

  // 2b. A saga waiting at an await step: the wait is drawn as a bar still in flight.
  await page.goto(`${url}/#/saga/${want.waiting}`);
  await page.waitForSelector('[data-testid="bar"][data-step="approval"]');
  const wait = page.locator('[data-testid="bar"][data-step="approval"]');
  const outcome = await wait.getAttribute("data-outcome");
  check(outcome === "in_flight", `the await step's bar is in flight (${outcome})`);
  const title = await wait.locator("title").textContent();
  check(title.includes(`waits for ${want.waits_for}`), `the await step's bar says what it waits for (${title})`);
  // The wait began before this page was opened: its bar runs to now, not to the wait itself.
  const sofar = Number((title.match(/(\d+) ms so far/) || [])[1]);
  check(sofar > 0, `the await step's bar runs from the wait to now (${title})`);
  await shot("saga-waiting");

  // 3. An operator action from the page: retry the parked saga, with a reason.
  await page.goto(`${url}/#/queue`);
  await page.waitForSelector(`[data-testid="parked"] tr[data-id="${want.parked}"]`);
  await shot("queue");
  await page.goto(`${url}/#/saga/${want.parked}`);
  await page.waitForSelector('button[data-action="retry"]');
  await page.click('button[data-action="retry"]');
  await page.fill("#confirm-reason", "fixed by the browser test");
  await page.click("#confirm-go");
  await page.waitForSelector('[data-testid="notice"]');
  const notice = await page.locator('[data-testid="notice"]').first().innerText();
  check(notice.includes("applied"), `the retry is applied (${notice})`);
  let recorded = false;
  for (let i = 0; i < 100 && !recorded; i++) {
    const s = await (await fetch(`${url}/api/saga/${want.parked}`)).json();
    recorded = s.timeline.some((e) => e.event.type === "operator_retry" && e.event.by === want.operator
      && e.event.reason === "fixed by the browser test");
    if (!recorded) await new Promise((r) => setTimeout(r, 100));
  }
  check(recorded, `the saga's history names the operator ${want.operator}`);
  await page.reload();
  await page.waitForFunction(
    () => document.querySelector('[data-testid="history"]')?.innerText.includes("operator_retry"),
    null, { timeout: 10000 });
  const after = await page.locator('[data-testid="history"]').innerText();
  check(after.includes("operator_retry") && after.includes(want.operator), "the page shows the retry and its operator in the history");
  await shot("after-retry");

  // 4. The definition, drawn.
  await page.goto(`${url}/#/defs/${want.saga}`);
  await page.waitForSelector('[data-testid="graph-step"]');
  const boxes = await page.locator('[data-testid="graph-step"]').count();
  check(boxes === want.steps, `the definition graph draws ${want.steps} steps (${boxes})`);
  await shot("definition");

  const foreign = requests.filter((r) => !r.startsWith(url));
  check(foreign.length === 0, `nothing is fetched from elsewhere (${foreign})`);
} catch (e) {
  console.error(e.message);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
