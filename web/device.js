// The device page: operations made here, kept here, answered exactly once.
//
// Each operation gets its UUID v7 op id on this device and is written to
// localStorage, with the exact body it will send, before anything goes
// out. It is sent with POST /api/ops (the same body on every try, so a
// resend is the same operation) and its life comes back pushed on one
// Server-Sent Events stream, /api/events, which first recovers every op it
// watches through the service's status endpoint: that is what a reload or
// a reconnect rests on. Nothing here polls.

import { newOpId } from "./opid.js";

const STORE = "amends.device.ops";
/** Ops that have reached an end keep showing; the list is capped. */
const KEPT_MAX = 200;
/** States after which nothing more can happen to an op. */
const FINAL = new Set(["confirmed", "rejected", "apologised", "refused"]);

let ops = load();
/** Ops that were still waiting when this page loaded: their answers are
 * recovered by op id, not seen live. */
const restored = new Set(ops.filter((op) => !["confirmed", "rejected", "apologised", "refused"].includes(op.state)).map((op) => op.op_id));
let source = null;
let watchedKey = "";
let flushing = false;
/** Ops whose POST is on its way (not kept: a reload has none). */
const sending = new Set();

function load() {
  try {
    return JSON.parse(localStorage.getItem(STORE) ?? "[]");
  } catch {
    return [];
  }
}

function save() {
  ops = ops.slice(-KEPT_MAX);
  localStorage.setItem(STORE, JSON.stringify(ops));
}

function find(opId) {
  return ops.find((op) => op.op_id === opId);
}

function note(op, text) {
  op.history.push({ t: Date.now(), text });
}

/** Whether the op still waits for something the stream will push. */
function watching(op) {
  if (op.state === "refused") return false;
  if (!FINAL.has(op.state)) return true;
  // A refused optimistic op waits for its apology too.
  if (op.state === "rejected" && op.optimistic && !op.apology) return true;
  return false;
}

/** Makes an operation: its op id and body, kept before it is sent. */
function create(label, command, { optimistic = false } = {}) {
  const op_id = newOpId();
  const request = { op_id, command };
  if (optimistic) request.apology_topic = "device.orders";
  const op = {
    op_id,
    label,
    kind: command.type,
    optimistic,
    body: JSON.stringify(request),
    state: "queued",
    sends: 0,
    created_ms: Date.now(),
    history: [],
    steps: {},
  };
  note(op, `made on this device, kept with its op id`);
  ops.push(op);
  save();
  render();
  // Watched before it is sent, so its answer is pushed, not recovered.
  watch();
  send(op);
}

/** Sends (or sends again) one op; the body is always the stored one. */
async function send(op) {
  // Any op may go again, answered or not: the same op id and body are
  // the same operation, applied once (only a body the service refused
  // to take is not sendable).
  if (op.state === "refused") return;
  if (!navigator.onLine) {
    if (op.state === "queued") note(op, "offline: queued, sent when the network is back");
    save();
    render();
    return;
  }
  op.sends += 1;
  note(op, op.sends === 1 ? "sent" : `sent again (try ${op.sends})`);
  save();
  render();
  let answer;
  sending.add(op.op_id);
  try {
    const response = await fetch("/api/ops", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: op.body,
    });
    answer = { status: response.status, body: await response.json() };
  } catch {
    note(op, "network down: queued, sent again on reconnect");
    save();
    render();
    return;
  } finally {
    sending.delete(op.op_id);
  }
  if (answer.status === 202) {
    const a = answer.body;
    op.partition = a.partition;
    op.sequence = a.sequence;
    if (op.state === "queued") op.state = "logged";
    note(op, `in the log: partition ${a.partition}, sequence ${a.sequence}${a.duplicate ? " (already there: the same operation)" : ""}`);
  } else if (answer.status >= 400 && answer.status < 500) {
    op.state = "refused";
    op.detail = answer.body.detail;
    note(op, `not sent: ${answer.body.detail}`);
  } else {
    note(op, `the service could not take it (${answer.body.detail ?? answer.status}): queued, sent again on reconnect`);
  }
  save();
  render();
  watch();
}

/** Sends every queued op, oldest first, one at a time. */
async function flush() {
  if (flushing || !navigator.onLine) return;
  flushing = true;
  try {
    for (const op of ops.filter((o) => o.state === "queued")) {
      await send(op);
    }
  } finally {
    flushing = false;
  }
}

/** (Re)opens the pushed stream for the ops still waiting. */
function watch(force = false) {
  const waiting = ops.filter(watching);
  // The same ops keep the same stream; a partition learned meanwhile only
  // narrows the next one's status lookups.
  const key = waiting.map((op) => op.op_id).join("&");
  const ids = waiting.map((op) => (op.partition === undefined ? op.op_id : `${op.op_id}.${op.partition}`));
  if (!force && key === watchedKey && source) return;
  watchedKey = key;
  if (source) source.close();
  source = null;
  if (ids.length === 0) {
    setStream("idle");
    return;
  }
  const query = ids.map((id) => `op=${id}`).join("&");
  source = new EventSource(`/api/events?${query}`);
  source.onopen = () => setStream("live");
  source.onerror = () => setStream("reconnecting");
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
}

function onEvent(event) {
  if (event.kind === "hello") return;
  const op = find(event.op_id ?? event.decision?.op_id ?? event.apology?.decision?.op_id);
  if (!op) return;
  switch (event.kind) {
    case "status":
      // No partition knows it: it never reached the log (or its answer
      // was refused to its sender only). Same op id, same body: safe.
      if (op.state === "queued" && !sending.has(op.op_id)) send(op);
      break;
    case "decision":
      onDecision(op, event.decision, restored.has(op.op_id));
      break;
    case "apology":
      if (!op.apology) {
        op.apology = event.apology;
        op.state = "apologised";
        note(op, `apologised for on ${event.apology.topic}: ${reasonText(event.apology.decision.reason)}`);
      }
      break;
    case "step":
      if (!op.steps[`${event.index}/${event.phase}`]) {
        op.steps[`${event.index}/${event.phase}`] = { partition: event.partition };
        note(op, `step ${event.index} ${event.phase} → partition ${event.partition}'s log`);
      }
      break;
    case "step_outcome": {
      const key = `${event.index}/outcome`;
      if (!op.steps[key]) {
        op.steps[key] = event.outcome;
        note(op, `step ${event.index} try ${event.outcome.outcome}${event.outcome.reason ? `: ${reasonText(event.outcome.reason)}` : ""}`);
      }
      break;
    }
  }
  save();
  render();
  watch();
}

function onDecision(op, decision, recovered) {
  if (decision.outcome === "in_flight") {
    if (op.state !== "in_flight" || op.step !== decision.step) {
      op.state = "in_flight";
      op.step = decision.step;
      if (op.partition === undefined) op.partition = decision.partition;
      note(op, `in flight: trying step ${decision.step}`);
    }
    return;
  }
  if (op.decision) return; // Already answered: the same decision, again.
  op.decision = decision;
  op.partition = decision.partition;
  const from = recovered ? " (recovered by its op id after a reload)" : "";
  if (decision.outcome === "confirmed") {
    op.state = "confirmed";
    note(op, `confirmed${from}${decision.balance !== undefined ? `: balance ${decision.balance}, available ${decision.available}` : ""}`);
  } else {
    op.state = op.apology ? "apologised" : "rejected";
    note(op, `refused${from}: ${reasonText(decision.reason)}`);
  }
  if (op.kind === "transfer" || op.kind === "saga") loadSteps(op);
}

/** A finished saga's steps, each phase's recorded decision (one fetch). */
async function loadSteps(op) {
  try {
    const trace = await (await fetch(`/api/trace/${op.op_id}`)).json();
    op.trace = trace.steps ?? [];
    save();
    render();
  } catch {
    // Shown without the steps; the next reload asks again.
  }
}

function reasonText(reason) {
  if (!reason) return "";
  const { code, ...data } = reason;
  if (code === "step_refused") return `step ${data.step} refused: ${reasonText(data.reason)}`;
  const fields = Object.entries(data).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`);
  return fields.length ? `${code} (${fields.join(", ")})` : code;
}

function setStream(state) {
  const el = document.getElementById("stream");
  el.textContent = state;
  el.className = `badge ${state === "live" ? "online" : state === "idle" ? "" : "offline"}`;
}

function setNet() {
  const el = document.getElementById("net");
  el.textContent = navigator.onLine ? "online" : "offline";
  el.className = `badge ${navigator.onLine ? "online" : "offline"}`;
}

const STATE_TEXT = {
  queued: "queued",
  logged: "in the log",
  in_flight: "in flight",
  confirmed: "confirmed",
  rejected: "refused",
  apologised: "apologised",
  refused: "not sent",
};

function render() {
  const list = document.getElementById("ops");
  list.replaceChildren(
    ...ops
      .slice()
      .reverse()
      .map((op) => {
        const card = el("div", { class: "op", "data-op-id": op.op_id, "data-state": op.state, "data-kind": op.kind });
        const head = el("div", { class: "head" });
        head.append(
          el("span", { class: "label" }, op.label),
          el("span", { class: `badge ${op.state}`, "data-role": "state" }, STATE_TEXT[op.state] ?? op.state),
          el("span", { class: "mono muted", title: "op id, made on this device" }, op.op_id),
        );
        const again = el("button", { "data-role": "resend", title: "the same op id and body: applied once whatever happens" }, "send again");
        again.onclick = () => send(op);
        head.append(again);
        card.append(head);
        const steps = el("ol", {});
        for (const h of op.history) {
          steps.append(el("li", {}, `${new Date(h.t).toLocaleTimeString()} ${h.text}`));
        }
        card.append(steps);
        if (op.trace?.length) card.append(stepsTable(op.trace));
        return card;
      }),
  );
  const pending = ops.filter((op) => !FINAL.has(op.state)).length;
  document.getElementById("counts").textContent = `${ops.length} kept here, ${pending} waiting`;
}

/** A saga's steps: each phase's recorded decision on the step's partition. */
function stepsTable(trace) {
  const table = el("table", { "data-role": "steps" });
  table.append(el("tr", {}, ...["step", "partition", "try", "confirm", "cancel (compensation)"].map((h) => el("th", {}, h))));
  for (const step of trace) {
    const cell = (d) => el("td", {}, d ? (d.outcome === "confirmed" ? "confirmed" : `refused: ${reasonText(d.reason)}`) : "—");
    table.append(
      el(
        "tr",
        {},
        el("td", {}, `${step.index}: ${step.command.type} ${step.command.account ?? step.command.key ?? ""}`),
        el("td", {}, String(step.partition)),
        cell(step.phases.try),
        cell(step.phases.confirm),
        cell(step.phases.cancel),
      ),
    );
  }
  return table;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function form(id, build) {
  document.getElementById(id).addEventListener("submit", (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(e.target));
    const [label, command, options] = build(data);
    create(label, command, options);
  });
}

const amount = (v) => Number.parseInt(v, 10);

form("open", (d) => [`open ${d.account}`, { type: "open_account", account: d.account }]);
form("credit", (d) => [`add ${d.amount} to ${d.account}`, { type: "credit", account: d.account, amount: amount(d.amount) }]);
form("pay", (d) => [
  `pay ${d.amount} from ${d.account}${d.optimistic ? " (going ahead)" : ""}`,
  { type: "debit", account: d.account, amount: amount(d.amount) },
  { optimistic: Boolean(d.optimistic) },
]);
form("claim", (d) => [`reserve username ${d.key} for ${d.owner}`, { type: "claim", namespace: "username", key: d.key, owner: d.owner }]);
form("transfer", (d) => [`transfer ${d.amount} from ${d.from} to ${d.to}`, { type: "transfer", from: d.from, to: d.to, amount: amount(d.amount) }]);
form("order", (d) => [
  `order seat ${d.seat} for ${d.price} from ${d.account}`,
  {
    type: "saga",
    steps: [
      { command: { type: "debit", account: d.account, amount: amount(d.price) } },
      { command: { type: "claim", namespace: "seat", key: d.seat, owner: d.account } },
    ],
  },
]);

window.addEventListener("online", () => {
  setNet();
  watch(true);
  flush();
});
window.addEventListener("offline", () => {
  setNet();
  render();
});

// For the browser tests and the curious: the ops as kept here.
window.amendsDevice = { ops: () => ops, send: (opId) => send(find(opId)) };

setNet();
render();
watch(true);
flush();
