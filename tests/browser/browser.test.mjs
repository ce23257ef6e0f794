// The device page and the operator console in headless Chromium, against a
// real `amends dev` (its own nats-server, the service in-process, the
// pages on a free port). Run by tests/e2e/browser.rs, which passes:
//   AMENDS_BIN           the built amends binary
//   AMENDS_NATS_SERVER   the pinned nats-server
//   AMENDS_CHROMIUM      Chromium (default /usr/bin/chromium)
//   AMENDS_SCREENSHOTS   where the screenshots go (docs/screenshots)
// Every answer the page shows is checked against the decisions stream too
// (`amends tail --json`), and `amends audit` re-derives the whole log at
// the end.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BIN = process.env.AMENDS_BIN;
const CHROMIUM = process.env.AMENDS_CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.AMENDS_SCREENSHOTS;
const RUN = Date.now().toString(36).slice(-5);
const STATE_TIMEOUT = 15_000;

let dev, dataDir, http, natsUrl, context, page;

before(async () => {
  assert.ok(BIN && existsSync(BIN), `AMENDS_BIN must name the built amends binary (got ${BIN})`);
  assert.ok(existsSync(CHROMIUM), `Chromium not found at ${CHROMIUM}: run scripts/setup (apt-get install chromium)`);
  dataDir = mkdtempSync(join(tmpdir(), "amends-browser-"));
  dev = spawn(BIN, ["dev", "--data-dir", join(dataDir, "dev"), "--http", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  dev.stderr.on("data", (d) => (err += d));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`amends dev did not finish its demo within 60 s\nstdout:\n${out}\nstderr:\n${err}`)), 60_000);
    dev.on("exit", (code) => reject(new Error(`amends dev exited (${code})\nstdout:\n${out}\nstderr:\n${err}`)));
    dev.stdout.on("data", (d) => {
      out += d;
      if (out.includes("amends dev is running")) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  http = out.match(/device page: (http:\S+)/)[1];
  natsUrl = out.match(/NATS URL: (nats:\S+)/)[1];
  assert.match(out, /operator console: http:\S+\/console/);
  // A fresh profile of its own (launchPersistentContext passes it as
  // --user-data-dir).
  context = await chromium.launchPersistentContext(join(dataDir, "chromium"), {
    executablePath: CHROMIUM,
    viewport: { width: 1280, height: 900 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  page = context.pages()[0] ?? (await context.newPage());
  await page.goto(http);
  await page.waitForSelector("#stream");
});

after(async () => {
  await context?.close();
  if (dev && dev.exitCode === null) {
    dev.kill("SIGINT");
    await new Promise((r) => dev.once("exit", r));
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

/** Fills and submits one of the page's forms; returns the new op's id. */
async function act(formId, fields) {
  const before = await page.evaluate(() => window.amendsDevice.ops().length);
  for (const [name, value] of Object.entries(fields)) {
    const input = page.locator(`#${formId} [name=${name}]`);
    if (typeof value === "boolean") await input.setChecked(value);
    else await input.fill(String(value));
  }
  await page.locator(`#${formId} button`).click();
  await page.waitForFunction((n) => window.amendsDevice.ops().length > n, before);
  return page.evaluate(() => window.amendsDevice.ops().at(-1).op_id);
}

/** Waits until the op's card shows `state`; returns its card's text. */
async function shows(opId, state, on = page) {
  const card = on.locator(`[data-op-id="${opId}"]`);
  try {
    await on.waitForSelector(`[data-op-id="${opId}"][data-state="${state}"]`, { timeout: STATE_TIMEOUT });
  } catch (e) {
    const got = await card.getAttribute("data-state").catch(() => "no card");
    throw new Error(`op ${opId}: expected state ${state}, shows ${got}\n${await card.innerText().catch(() => "")}`, { cause: e });
  }
  return card.innerText();
}

/** Every decision the decisions stream holds for `opId` (amends tail). */
function published(opId) {
  const out = execFileSync(BIN, ["tail", "--nats-url", natsUrl, "--decisions", "--since", "all", "--json", "--idle-exit-ms", "1500", "--op-id", opId], { encoding: "utf8" });
  return out
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === "decision");
}

function onlyDecision(opId) {
  const decisions = published(opId);
  assert.equal(decisions.length, 1, `op ${opId}: ${decisions.length} decisions on the stream: ${JSON.stringify(decisions)}`);
  return decisions[0];
}

function balance(account) {
  return JSON.parse(execFileSync(BIN, ["balance", "--nats-url", natsUrl, account], { encoding: "utf8" })).balance;
}

const ann = `ann-${RUN}`;
const bob = `bob-${RUN}`;

test("a confirmed payment: the page shows it confirmed, the stream holds one decision", async () => {
  await shows(await act("open", { account: ann }), "confirmed");
  await shows(await act("credit", { account: ann, amount: 100 }), "confirmed");
  const pay = await act("pay", { account: ann, amount: 30 });
  const text = await shows(pay, "confirmed");
  assert.match(text, /in the log: partition \d+, sequence \d+/);
  assert.match(text, /confirmed: balance 70, available 70/);
  const d = onlyDecision(pay);
  assert.equal(d.outcome, "confirmed");
  assert.equal(d.balance, 70);
});

test("a refused payment shows its reason", async () => {
  const pay = await act("pay", { account: ann, amount: 1000 });
  const text = await shows(pay, "rejected");
  assert.match(text, /refused: insufficient_funds \(available 70, floor 0, requested 1000\)/);
  assert.equal(onlyDecision(pay).reason.code, "insufficient_funds");
});

test("an optimistic payment that is refused is apologised for", async () => {
  const pay = await act("pay", { account: ann, amount: 5000, optimistic: true });
  const text = await shows(pay, "apologised");
  assert.match(text, /apologised for on device\.orders: insufficient_funds/);
  assert.equal(onlyDecision(pay).outcome, "rejected");
  await page.locator("#pay [name=optimistic]").setChecked(false);
});

test("a saga shows each step; a refused one shows its compensation", async () => {
  await shows(await act("open", { account: bob }), "confirmed");
  await shows(await act("credit", { account: bob, amount: 50 }), "confirmed");
  const transfer = await act("transfer", { from: ann, to: bob, amount: 20 });
  await shows(transfer, "confirmed");
  const seat = `A${RUN}`;
  const order = await act("order", { account: bob, seat, price: 25 });
  await shows(order, "confirmed");
  const steps = page.locator(`[data-op-id="${order}"] [data-role=steps]`);
  await steps.waitFor({ timeout: STATE_TIMEOUT });
  assert.match(await steps.innerText(), /0: debit[\s\S]*confirmed[\s\S]*1: claim[\s\S]*confirmed/);
  // The same seat again: step 1 is refused, step 0's hold is cancelled.
  const again = await act("order", { account: ann, seat, price: 10 });
  const text = await shows(again, "rejected");
  assert.match(text, /step 1 refused: already_claimed/);
  const refusedSteps = page.locator(`[data-op-id="${again}"] [data-role=steps]`);
  await refusedSteps.waitFor({ timeout: STATE_TIMEOUT });
  const table = await refusedSteps.innerText();
  assert.match(table, /0: debit[^\n]*\s+\d+\s+confirmed\s+—\s+confirmed/, table);
  assert.match(table, /1: claim[^\n]*\s+\d+\s+refused: already_claimed/, table);
  assert.equal(onlyDecision(again).reason.code, "step_refused");
  assert.equal(balance(ann), 50, "ann paid 30, sent 20; the refused order took nothing");
});

test("offline: operations queue with their op ids and drain on reconnect, each applied once", async () => {
  await context.setOffline(true);
  await page.waitForSelector("#net.offline");
  const queued = [];
  for (const amount of [1, 2, 3]) {
    const op = await act("credit", { account: ann, amount });
    await shows(op, "queued");
    queued.push(op);
  }
  const kept = await page.evaluate(() => JSON.parse(localStorage.getItem("amends.device.ops")).filter((o) => o.state === "queued").map((o) => o.op_id));
  assert.deepEqual(kept.slice(-3), queued, "the queued ops are kept with their op ids");
  await context.setOffline(false);
  for (const op of queued) await shows(op, "confirmed");
  for (const op of queued) onlyDecision(op);
  assert.equal(balance(ann), 56);
});

test("an operation sent ten times is applied once", async () => {
  const op = await act("credit", { account: bob, amount: 7 });
  await shows(op, "confirmed");
  const button = page.locator(`[data-op-id="${op}"] [data-role=resend]`);
  for (let i = 0; i < 10; i++) {
    await button.click();
    await page.waitForFunction(([id, n]) => window.amendsDevice.ops().find((o) => o.op_id === id).history.filter((h) => h.text.startsWith("in the log")).length >= n, [op, i + 2]);
    if (i === 4) await page.waitForTimeout(1200); // past dev's 1 s duplicate window: amends itself answers
  }
  const sends = await page.evaluate((id) => window.amendsDevice.ops().find((o) => o.op_id === id).sends, op);
  assert.equal(sends, 11);
  // bob: 50, +20 from ann, -25 for the seat, +7 once.
  assert.equal(onlyDecision(op).balance, 52);
  assert.equal(balance(bob), 52);
});

test("a page reloaded mid-flight recovers every pending operation by its op id", async () => {
  // A: in the log, its answer not yet seen (the pushed stream is cut).
  await page.route("**/api/events*", (route) => route.abort());
  const a = await act("credit", { account: ann, amount: 4 });
  await shows(a, "logged");
  // B: it reached the service, but the page never heard back.
  await page.unroute("**/api/events*");
  await page.route("**/api/events*", (route) => route.abort());
  await page.route("**/api/ops", async (route) => {
    await route.fetch();
    await route.abort();
  });
  const b = await act("credit", { account: ann, amount: 5 });
  await page.waitForFunction((id) => window.amendsDevice.ops().find((o) => o.op_id === id).history.some((h) => h.text.startsWith("network down")), b);
  await page.unrouteAll({ behavior: "ignoreErrors" });
  await page.reload();
  const textA = await shows(a, "confirmed");
  assert.match(textA, /confirmed \(recovered by its op id after a reload\)/);
  await shows(b, "confirmed");
  onlyDecision(a);
  onlyDecision(b);
  assert.equal(balance(ann), 65);
});

test("the device may not send amends's own messages", async () => {
  const step = {
    op_id: "5d5d6531-f52e-5ede-b643-116ab64883fe",
    command: { type: "step", saga: "018bcff4-aa40-705a-8000-000000000101", index: 0, phase: "try", step: { command: { type: "debit", account: ann, amount: 30 } } },
  };
  const r = await fetch(`${http}api/ops`, { method: "POST", body: JSON.stringify(step) });
  assert.equal(r.status, 403);
  assert.match((await r.json()).detail, /step, step_outcome and tick messages are amends's own/);
});

test("the console's numbers move as operations are decided, and it traces an op id", async () => {
  const consolePage = await context.newPage();
  await consolePage.goto(`${http}console`);
  await consolePage.waitForSelector("#stream.online");
  await consolePage.waitForFunction(() => document.querySelectorAll("#partitions tr[data-partition]").length === 4);
  const states = await consolePage.locator("#partitions [data-role=state]").allInnerTexts();
  assert.deepEqual(states, ["running", "running", "running", "running"]);
  await consolePage.waitForFunction(() => Number(document.getElementById("decisions").textContent) > 0);
  const before = Number(await consolePage.locator("#decisions").innerText());
  const refusedBefore = Number(await consolePage.locator("#rejected").innerText());
  await shows(await act("credit", { account: bob, amount: 1 }), "confirmed");
  await shows(await act("pay", { account: bob, amount: 100000 }), "rejected");
  await consolePage.waitForFunction(([n, r]) => Number(document.getElementById("decisions").textContent) >= n + 2 && Number(document.getElementById("rejected").textContent) >= r + 1, [before, refusedBefore]);
  const refusals = await consolePage.locator("#refusals").innerText();
  assert.match(refusals, /insufficient_funds\s+\d+/);
  assert.match(refusals, /step_refused\s+\d+/);
  assert.notEqual(await consolePage.locator("#apology-rate").innerText(), "0 %");
  assert.notEqual(await consolePage.locator("#rate").innerText(), "0.0");
  // The search box: the refused order's whole life.
  const order = await page.evaluate(() => window.amendsDevice.ops().filter((o) => o.kind === "saga").at(-1).op_id);
  await consolePage.fill("#search [name=op]", order);
  await consolePage.click("#search button");
  const life = await consolePage.locator("[data-role=trace]").innerText();
  assert.match(life, /request on partition \d+'s log/);
  assert.match(life, /step 0 try on partition \d+: confirmed/);
  assert.match(life, /step 0 cancel on partition \d+: confirmed/);
  assert.match(life, /decision: rejected .*step_refused/);
  if (SHOTS) {
    mkdirSync(SHOTS, { recursive: true });
    await consolePage.screenshot({ path: join(SHOTS, "console.png"), fullPage: true });
    await page.screenshot({ path: join(SHOTS, "device.png") });
  }
  await consolePage.close();
});

test("the log re-derives every decision the pages showed (amends audit)", () => {
  const out = execFileSync(BIN, ["audit", "--nats-url", natsUrl], { encoding: "utf8" });
  assert.match(out, /audit passed/, out);
});
