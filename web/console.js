// The operator console: one pushed snapshot a second on
// /api/console/events (derived by the service from the streams and its
// endpoints, never from its store), and a search box that traces any op
// id through /api/trace/<op id>.

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children.map((c) => (c instanceof Node ? c : String(c ?? "—"))));
  return node;
}

function rows(table, head, items, row) {
  table.replaceChildren(el("tr", {}, ...head.map((h) => el("th", {}, h))), ...items.map((i) => el("tr", {}, ...row(i).map((c) => el("td", {}, c)))));
}

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;

function show(s) {
  $("summary").textContent = `${s.partitions} partitions · counting since ${new Date(s.since_ms).toLocaleTimeString()}`;
  rows($("partitions"), ["partition", "owner", "epoch", "state", "applied", "last sequence", "lag", "restarts"], s.partition_stats, (p) => [
    p.partition,
    p.owner ? `${p.owner.host} pid ${p.owner.pid}` : "—",
    p.owner?.epoch,
    el("span", { class: `badge ${p.state}`, "data-role": "state" }, p.state + (p.detail ? `: ${p.detail}` : "")),
    p.applied_position,
    p.last_sequence,
    p.lag,
    p.restarts,
  ]);
  $("partitions").querySelectorAll("tr").forEach((tr, i) => i && tr.setAttribute("data-partition", s.partition_stats[i - 1].partition));
  $("rate").textContent = s.decisions_per_second.toFixed(1);
  $("decisions").textContent = s.decisions_total;
  $("confirmed").textContent = s.confirmed_total;
  $("rejected").textContent = s.rejected_total;
  spark(s.decisions_series);
  rows($("refusals"), ["reason", "count"], Object.entries(s.refusals).sort((a, b) => b[1] - a[1]), ([code, n]) => [code, n]);
  $("apology-rate").textContent = `${(100 * s.apology_rate).toFixed(0)} %`;
  $("apologies").textContent = s.apologies_total;
  $("optimistic").textContent = s.optimistic_total;
  $("dead-letters").textContent = s.dead_letters_total;
  rows($("dlq"), ["partition", "id", "error"], s.dead_letters, (d) => [d.partition, d.id, d.error]);
  $("holds-pending").textContent = `(${s.holds_pending} pending with a timeout)`;
  rows($("holds"), ["hold", "account", "amount", "partition", "expires in"], s.holds_expiring, (h) => [
    el("code", {}, h.hold),
    h.account,
    h.amount,
    h.partition,
    h.expires_in_ms > 0 ? seconds(h.expires_in_ms) : "due",
  ]);
  $("sagas-count").textContent = `(${s.sagas_in_flight})`;
  $("by-step").textContent = Object.entries(s.sagas_by_step)
    .map(([step, n]) => `step ${step}: ${n}`)
    .join(" · ");
  rows($("sagas"), ["saga", "kind", "partition", "step", "age"], s.sagas, (g) => [el("code", {}, g.op_id), g.kind, g.partition, `${g.step} of ${g.steps}`, seconds(g.age_ms)]);
}

function spark(series) {
  const max = Math.max(1, ...series);
  const points = series.map((n, i) => `${i},${48 - (44 * n) / max}`).join(" ");
  $("spark").innerHTML = `<polyline fill="none" stroke="#175cd3" stroke-width="1" vector-effect="non-scaling-stroke" points="${points}"/>`;
}

const reason = (r) => (r ? JSON.stringify(r) : "");

async function trace(opId) {
  const box = $("trace");
  box.replaceChildren(el("p", { class: "muted" }, "tracing…"));
  const response = await fetch(`/api/trace/${encodeURIComponent(opId.trim())}`);
  const t = await response.json();
  if (!response.ok || t.status === "unknown") {
    box.replaceChildren(el("p", { "data-role": "trace-status" }, t.detail ?? t.status));
    return;
  }
  const life = el("ol", { "data-role": "trace" });
  if (t.request) life.append(el("li", {}, `request on partition ${t.partition}'s log at position ${t.decision.position}, ${t.request_time}: `, el("code", {}, JSON.stringify(t.request.command))));
  for (const step of t.steps) {
    for (const [phase, d] of Object.entries(step.phases)) {
      if (d) life.append(el("li", {}, `step ${step.index} ${phase} on partition ${step.partition}: ${d.outcome} ${reason(d.reason)}`));
    }
  }
  life.append(el("li", { "data-role": "trace-decision" }, `decision: ${t.decision.outcome} ${reason(t.decision.reason)} (log time ${new Date(t.decision.log_time_ms).toISOString()})`));
  if (t.apology) life.append(el("li", {}, `apology published on ${t.apology.subject}`));
  box.replaceChildren(life, el("pre", {}, JSON.stringify(t.decision)));
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  trace(new FormData(e.target).get("op"));
});

const source = new EventSource("/api/console/events");
source.onopen = () => {
  $("stream").textContent = "live";
  $("stream").className = "badge online";
};
source.onerror = () => {
  $("stream").textContent = "reconnecting";
  $("stream").className = "badge offline";
};
source.onmessage = (m) => show(JSON.parse(m.data));
