// potluck dashboard: everything comes from one server-sent-events stream (/api/events).
// No framework, no build step: the node serves this file as is, so the page works offline.
"use strict";

const state = { node: null, cluster: null, models: null, tp: [], audit: null, throughput: null, pulls: [], log: [] };
const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.setAttribute("class", v);
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const short = (id) => (id ? (id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id) : "?");
const gib = (b) => (b / 2 ** 30).toFixed(1);
const bytes = (b) => (b == null ? "?" : b >= 2 ** 30 ? gib(b) + " GiB" : b >= 2 ** 20 ? (b / 2 ** 20).toFixed(1) + " MiB" : (b / 1024).toFixed(0) + " KiB");
const tierName = (t) => ["this device", "own device", "community", "cloud"][t] ?? String(t);
const entities = (m) => Object.entries(m || {}).map(([k, v]) => `${k}×${v}`).join(", ") || "none";
function bar(frac, title) {
  const b = el("div", { class: "bar", title });
  b.append(el("span", { style: `width:${Math.max(0, Math.min(1, frac)) * 100}%` }));
  return b;
}
function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c)))));
}

// ------------------------------------------------------------------ the event stream
function connect() {
  const es = new EventSource("/api/events");
  const conn = $("#conn");
  es.onopen = () => { conn.textContent = "live"; conn.className = "badge ok"; };
  es.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "badge warn"; };
  const on = (kind, fn) => es.addEventListener(kind, (e) => { state[kind] = JSON.parse(e.data); fn(); });
  on("node", () => { renderHeader(); renderSwarm(); });
  on("cluster", () => { renderHeader(); renderSwarm(); });
  on("models", renderModels);
  on("tp", renderTP);
  on("audit", renderAudit);
  on("throughput", renderThroughput);
  on("pulls", renderPulls);
  on("log", renderLog);
  es.addEventListener("activity", (e) => { state.log.push(JSON.parse(e.data)); renderLog(); });
}

// ------------------------------------------------------------------ header
function renderHeader() {
  const n = state.node;
  if (!n) return;
  $("#me").textContent = short(n.peer_id);
  $("#me").title = n.peer_id;
  const nat = state.cluster?.nat;
  const b = [
    el("span", { class: "badge", text: `swarm ${n.swarm}` }),
    el("span", { class: "badge " + (n.private_swarm ? "ok" : "off"), text: n.private_swarm ? "private swarm" : "open swarm" }),
    el("span", { class: "badge", text: `privacy ${n.privacy}` }),
  ];
  if (!n.p2p) b.push(el("span", { class: "badge off", text: "p2p off" }));
  if (nat) {
    const cls = nat.reachability === "public" ? "ok" : nat.reachability === "private" ? "warn" : "off";
    b.push(el("span", { class: "badge " + cls, text: `NAT: ${nat.reachability}` }));
    if (nat.relays?.length) b.push(el("span", { class: "badge", text: `relays ${nat.relays.map(short).join(", ")}` }));
  }
  $("#badges").replaceChildren(...b);
}

// ------------------------------------------------------------------ swarm graph
function devices() {
  const n = state.node;
  const peers = state.cluster?.peers ?? [];
  const list = peers.map((p) => ({
    id: p.peer_id, self: p.self, models: (p.models || []).map((m) => m.id),
    ramTotal: p.hardware.ram_total, ramUsed: p.hardware.ram_total - p.hardware.ram_free, cores: p.hardware.cores,
    tps: p.hardware.decode_tps, queue: p.load.queue_depth, active: p.load.active, tier: p.trust_tier,
    admitted: p.self || p.admitted, rtt: p.rtt_ms, conn: p.connection, expires: p.expires_in_s,
    verification: p.verification,
  }));
  if (n && !list.some((d) => d.self)) {
    list.unshift({ id: n.peer_id, self: true, models: n.models, ramTotal: n.ram_total, ramUsed: n.ram_used, cores: n.cores,
      tps: n.decode_tps, queue: n.queue_depth, active: n.active_requests, tier: 0, admitted: true, rtt: null, conn: null });
  }
  if (n) {  // this node's own numbers are fresher than its last signed record
    const me = list.find((d) => d.self);
    Object.assign(me, { ramTotal: n.ram_total, ramUsed: n.ram_used, queue: n.queue_depth, active: n.active_requests });
  }
  list.sort((a, b) => (b.self - a.self) || a.id.localeCompare(b.id));
  return list;
}
function pathOf(d) {
  if (d.self) return { kind: "self", text: "this node" };
  const c = d.conn;
  if (!c) return { kind: "direct", text: "direct" };  // connected without NAT traversal data
  if (c.kind === "relayed") return { kind: "relayed", text: `relayed via ${short(c.relay)}` };
  return { kind: c.kind, text: c.kind };
}
// Serving-quality standing (issue 14): why a peer is excluded, else its reputation and last verdict.
function verificationText(d) {
  const v = d.verification;
  if (d.self || !v) return "—";
  if (v.excluded) return el("span", { class: "verification-excluded", style: "color:#b91c1c", text: `excluded: ${v.excluded}` });
  const last = v.last ? ` · last ${v.last.method} ${v.last.verdict}` : "";
  return `rep ${v.reputation.toFixed(2)} (${v.passes}✓ ${v.fails}✗)${last}`;
}
const rttText = (d) => (d.rtt == null ? "RTT …" : `${d.rtt < 10 ? d.rtt.toFixed(2) : d.rtt.toFixed(0)} ms`);

function renderSwarm() {
  const svg = $("#graph");
  const list = devices();
  const W = 900, H = 340, cx = W / 2, cy = H / 2, CW = 210, CH = 104;
  const others = list.filter((d) => !d.self);
  const pos = new Map();
  list.filter((d) => d.self).forEach((d) => pos.set(d.id, [cx, cy]));
  others.forEach((d, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(others.length, 1) + (others.length === 2 ? Math.PI / 2 : 0);
    pos.set(d.id, [cx + Math.cos(a) * (W / 2 - CW / 2 - 10), cy + Math.sin(a) * (H / 2 - CH / 2 - 6)]);
  });
  const links = others.map((d) => {
    const [x1, y1] = pos.get(list.find((x) => x.self)?.id) ?? [cx, cy];
    const [x2, y2] = pos.get(d.id);
    const p = pathOf(d);
    const label = `${p.text} · ${rttText(d)}`;
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2, w = label.length * 6.2 + 10;
    return el("svg:g", { class: `link ${p.kind}`, "data-peer-id": d.id, "data-path": p.kind },
      el("svg:line", { x1, y1, x2, y2 }),
      el("svg:rect", { x: mx - w / 2, y: my - 9, width: w, height: 18, rx: 4 }),
      el("svg:text", { x: mx, y: my + 4, "text-anchor": "middle", class: "link-label", text: label }));
  });
  const cards = list.map((d) => {
    const [x, y] = pos.get(d.id);
    const frac = d.ramTotal ? d.ramUsed / d.ramTotal : 0;
    const g = el("svg:g", { class: "device" + (d.self ? " self" : ""), "data-peer-id": d.id,
      transform: `translate(${x - CW / 2},${y - CH / 2})` });
    g.append(
      el("svg:title", { text: d.id }),
      el("svg:rect", { class: "card", width: CW, height: CH, rx: 8 }),
      el("svg:text", { x: 10, y: 18, "font-weight": 600, "font-size": 12, text: (d.self ? "● " : "") + short(d.id) }),
      el("svg:rect", { x: 10, y: 26, width: CW - 20, height: 7, rx: 3, fill: "#e5e7eb" }),
      el("svg:rect", { x: 10, y: 26, width: (CW - 20) * Math.min(1, frac), height: 7, rx: 3, fill: "#c2410c" }),
      el("svg:text", { x: 10, y: 48, "font-size": 11, text: `RAM ${gib(d.ramUsed)}/${gib(d.ramTotal)} GiB · ${d.cores} cores` }),
      el("svg:text", { x: 10, y: 63, "font-size": 11, text: `queue ${d.queue} · active ${d.active} · ${d.tps ? d.tps.toFixed(1) : "–"} tok/s` }),
      el("svg:text", { x: 10, y: 79, "font-size": 11, fill: "#6b7280", text: (d.models.join(", ") || "no model").slice(0, 34) }),
      el("svg:text", { x: 10, y: 95, "font-size": 11, fill: d.admitted ? "#15803d" : "#b91c1c",
        text: `tier ${d.tier}: ${tierName(d.tier)} · ${d.admitted ? "admitted" : "refused"}` }),
    );
    return g;
  });
  svg.replaceChildren(...links, ...cards);

  fill($("#devices tbody"), list.map((d) => [
    el("span", { class: "mono", title: d.id, "data-peer-id": d.id, text: (d.self ? "● " : "") + short(d.id) }),
    d.self ? "—" : `${pathOf(d).text} · ${rttText(d)}`,
    el("div", {}, bar(d.ramTotal ? d.ramUsed / d.ramTotal : 0, "RAM used"), `${gib(d.ramUsed)} / ${gib(d.ramTotal)} GiB`),
    String(d.cores), `${d.queue} / ${d.active}`, d.models.join(", ") || "—", d.tps ? d.tps.toFixed(1) : "–",
    tierName(d.tier), d.admitted ? "yes" : "refused", verificationText(d),
  ]));
  const refused = Object.entries(state.cluster?.refused ?? {}).map(([k, v]) => `${k} ×${v}`).join(", ");
  $("#swarm-note").textContent = !state.node?.p2p ? "This node runs without the swarm (p2p disabled)." :
    `${list.length} device${list.length === 1 ? "" : "s"}; links as this node measures them. ` +
    `Refused by admission: ${refused || "none"}.`;
}

// ------------------------------------------------------------------ models and pulls
function renderModels() {
  const m = state.models;
  if (!m) return;
  fill($("#models tbody"), m.reachable.map((r) => [
    el("code", { text: r.id }),
    r.owned_by === "cloud" ? "cloud" : (r.runs_on.length ? r.runs_on : [r.owned_by]).map((p) => p === "local" || p === state.node?.peer_id ? "this node" : short(p)).join(", "),
  ]));
  fill($("#local-models tbody"), m.local.map((i) => [
    el("code", { text: i.model_id }), i.architecture, i.n_params ? (i.n_params / 1e6).toFixed(1) + " M" : "?", i.quantization,
    String(i.n_ctx) + (i.extra?.world_size ? ` · TP ${i.extra.world_size} ranks` : ""),
  ]));
  $("#cached").replaceChildren(...m.cached.map((c) => el("li", { class: "mono", text: `${c.name} (${bytes(c.size)})` })));
  const select = $("#chat-model");
  const current = select.value;
  const ids = m.reachable.map((r) => r.id);
  if (ids.join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
    select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
    if (ids.includes(current)) select.value = current;
  }
}

function renderPulls() {
  $("#pulls").replaceChildren(...state.pulls.slice().reverse().map((p) => {
    const frac = p.total ? p.n / p.total : 0;
    const eta = p.total && p.rate ? Math.max(0, (p.total - p.n) / p.rate) : null;
    const line = p.state === "failed" ? el("span", { class: "err", text: p.error }) :
      p.state === "done" ? `done: ${p.path}` :
      `${bytes(p.n)} / ${bytes(p.total)} · ${(100 * frac).toFixed(0)}% · ${bytes(p.rate)}/s` + (eta != null ? ` · ${eta.toFixed(0)} s left` : "");
    return el("div", { class: "pull", "data-state": p.state }, el("code", { text: p.spec }), bar(frac, "downloaded"), line);
  }));
}

$("#pull-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const spec = $("#pull-spec").value.trim();
  if (!spec) return;
  const r = await fetch("/api/models/pull", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: spec }) });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    state.pulls.push({ id: "x" + Date.now(), spec, state: "failed", error: body.error?.message ?? r.statusText, n: 0 });
    renderPulls();
  }
});

// ------------------------------------------------------------------ tensor parallelism
function renderTP() {
  const box = $("#tp");
  if (!state.tp.length) {
    box.replaceChildren(el("p", { class: "note", text: "This node leads no tensor-parallel group. Start one with --tensor-parallel N." }));
    return;
  }
  box.replaceChildren(...state.tp.map((g) => {
    const span = (cls, [a, b], total) => {
      const s = el("div", { class: "span " + cls, title: `${a}–${b} of ${total}` });
      s.append(el("span", { style: `left:${(100 * a) / total}%;width:${(100 * (b - a)) / total}%` }));
      return s;
    };
    const rows = g.shares.flatMap((s) => [
      el("div", { class: "mono", title: s.peer_id, text: `rank ${s.rank} ${short(s.peer_id)}` }),
      el("div", {}, span("heads", s.heads, g.n_heads), span("ffn", s.ffn, g.ffn),
        el("div", { class: "note", text: `heads ${s.heads[0]}–${s.heads[1] - 1} · FFN cols ${s.ffn[0]}–${s.ffn[1] - 1} · ` +
          `memory ${bytes(s.est_bytes)}${s.budget_bytes ? ` of ${bytes(s.budget_bytes)} free` : ""} · all layers resident` +
          (s.transport ? ` · ${s.transport}` : "") })),
    ]);
    const live = g.master_live ? `rank 0: compute ${g.master_live.compute_ms} ms/token, all-reduce ${g.master_live.allreduce_ms} ms/token (${g.master_live.steps} steps)` : "no decode steps yet";
    return el("div", {}, el("h3", { text: `${g.model}: ${g.world_size} ranks, plan ${g.plan_id.slice(0, 8)}, ${g.n_layers} layers` }),
      el("div", { class: "tp-share" }, ...rows), el("p", { class: "note", text: live }));
  }));
}

// ------------------------------------------------------------------ privacy audit
function renderAudit() {
  const a = state.audit;
  if (!a) return;
  fill($("#audit-totals tbody"), a.totals.length ? a.totals.map((t) => [
    el("code", { text: t.destination }), tierName(t.tier), String(t.requests), String(t.chars), entities(t.entities),
  ]) : [["nothing has left this device", "", "", "", ""]]);
  fill($("#audit tbody"), a.rows.map((r) => [
    new Date(r.time).toLocaleString(), el("code", { text: r.destination }), tierName(r.tier), r.action, entities(r.entities),
  ]));
}

// ------------------------------------------------------------------ throughput
function renderThroughput() {
  const s = state.throughput?.samples ?? [];
  const svg = $("#chart");
  const W = 460, H = 160, P = 28;
  const rates = [];
  const SMOOTH = 5;  // samples per rate: tokens are counted when a request finishes, so average over ~10 s
  for (let i = 1; i < s.length; i++) {
    const j = Math.max(0, i - SMOOTH), dt = s[i][0] - s[j][0];
    if (dt > 0) rates.push([s[i][0], (s[i][1] - s[j][1]) / dt, (60 * (s[i][2] - s[j][2])) / dt]);
  }
  const now = s.length ? s[s.length - 1][0] : Date.now() / 1000;
  const span = 300;
  const maxTps = Math.max(1, ...rates.map((r) => r[1]));
  const maxRpm = Math.max(1, ...rates.map((r) => r[2]));
  const X = (t) => P + ((t - (now - span)) / span) * (W - 2 * P);
  const line = (idx, max) => rates.map((r, i) => `${i ? "L" : "M"}${X(r[0]).toFixed(1)},${(H - P - (r[idx] / max) * (H - 2 * P)).toFixed(1)}`).join("");
  svg.replaceChildren(
    el("svg:line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#9ca3af" }),
    el("svg:text", { x: P, y: 14, "font-size": 11, fill: "#c2410c", text: `tokens/s (max ${maxTps.toFixed(1)})` }),
    el("svg:text", { x: W - P, y: 14, "font-size": 11, fill: "#2563eb", "text-anchor": "end", text: `requests/min (max ${maxRpm.toFixed(0)})` }),
    el("svg:text", { x: P, y: H - 8, "font-size": 10, fill: "#6b7280", text: "−5 min" }),
    el("svg:text", { x: W - P, y: H - 8, "font-size": 10, fill: "#6b7280", "text-anchor": "end", text: "now" }),
    el("svg:path", { d: line(1, maxTps), fill: "none", stroke: "#c2410c", "stroke-width": 2 }),
    el("svg:path", { d: line(2, maxRpm), fill: "none", stroke: "#2563eb", "stroke-width": 1.5, "stroke-dasharray": "4 3" }),
  );
  const last = s[s.length - 1] ?? [0, 0, 0, 0, 0];
  const recent = rates.slice(-1);
  const tps = recent.length ? recent[recent.length - 1][1] : 0;
  const stat = (label, value) => el("div", {}, el("b", { text: value }), label);
  $("#counters").replaceChildren(stat("tokens/s (10 s)", tps.toFixed(1)), stat("tokens total", String(last[1])),
    stat("requests", String(last[2])), stat("429 (queue full)", String(last[3])), stat("errors (5xx)", String(last[4])));
}

// ------------------------------------------------------------------ activity
function renderLog() {
  const items = state.log.slice(-50).reverse();
  $("#activity").replaceChildren(...(items.length ? items.map((e) => el("li", {},
    el("time", { text: new Date(e.time_ms).toLocaleTimeString() }), e.text)) : [el("li", { class: "note", text: "nothing yet" })]));
}

// ------------------------------------------------------------------ chat
const chat = [];
function parseRoute(header) {
  if (!header) return "unknown";
  const [kind, rest] = header.split(";").map((x) => x.trim());
  const target = (rest || "").replace(/^target=/, "");
  if (kind === "local") return "local (this node)";
  if (kind === "peer") return `peer ${short(target)}`;
  if (kind === "tp") return `TP group (${target})`;
  if (kind === "cloud") return `cloud (${target})`;
  return kind;
}

async function sendChat(text) {
  const model = $("#chat-model").value;
  chat.push({ role: "user", content: text });
  const log = $("#chat-log");
  log.append(el("div", { class: "msg user" }, el("span", { class: "who", text: "you" }), text));
  const body = el("span", { class: "content" });
  const meta = el("div", { class: "meta", text: "waiting…" });
  const answer = el("div", { class: "msg assistant", "data-state": "streaming" }, el("span", { class: "who", text: model || "model" }), body, meta);
  log.append(answer);
  log.scrollTop = log.scrollHeight;
  const t0 = performance.now();
  let tFirst = null, usage = null, chunks = 0, reply = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: chat, stream: true, stream_options: { include_usage: true }, max_tokens: 128 }) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error?.message ?? `HTTP ${r.status}`);
    }
    const route = parseRoute(r.headers.get("X-Potluck-Route"));
    const sanitized = r.headers.get("X-Potluck-Sanitized") === "yes";
    const requestId = r.headers.get("X-Potluck-Request-Id");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of ev.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          if (obj.usage) usage = obj.usage;
          const delta = obj.choices?.[0]?.delta?.content;
          if (delta) {
            if (tFirst === null) tFirst = performance.now();
            chunks++;
            reply += delta;
            body.textContent = reply;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
    }
    const tEnd = performance.now();
    chat.push({ role: "assistant", content: reply });
    const n = usage?.completion_tokens ?? chunks;
    const ttft = tFirst === null ? null : tFirst - t0;
    const tps = tFirst !== null && tEnd > tFirst && n > 1 ? (n - 1) / ((tEnd - tFirst) / 1000) : null;
    meta.replaceChildren(`TTFT ${ttft === null ? "–" : ttft.toFixed(0) + " ms"} · ${tps === null ? "–" : tps.toFixed(1)} tok/s · ${n} tokens · route: ${route} · ` +
      (sanitized ? "sanitized" : "not sanitized"));
    if (requestId) meta.append(sentToggle(requestId, answer));
    answer.dataset.state = "done";
    answer.dataset.route = r.headers.get("X-Potluck-Route") || "";
  } catch (exc) {
    chat.pop();
    meta.replaceChildren(el("span", { class: "err", text: `failed: ${exc.message}` }));
    answer.dataset.state = "failed";
  }
}

function sentToggle(requestId, answer) {
  let box = null;
  return el("button", { type: "button", class: "ghost", text: "show what left", onclick: async (e) => {
    if (box) { box.remove(); box = null; e.target.textContent = "show what left"; return; }
    const r = await fetch(`/api/requests/${encodeURIComponent(requestId)}/sanitized`);
    const sent = r.ok ? await r.json() : null;
    const text = sent ? (sent.messages.length ? sent.messages.map((m) => `${m.role}: ${m.content}`).join("\n") : sent.prompt) : "no longer kept";
    box = el("pre", { class: "sent", text: `sent to ${sent?.destination ?? "?"}${sent?.sanitized ? " (sanitized)" : " (raw)"}:\n${text}` });
    answer.append(box);
    e.target.textContent = "hide what left";
  } });
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  const send = $("#chat-send");
  send.disabled = true;
  sendChat(text).finally(() => { send.disabled = false; });
});
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#chat-clear").addEventListener("click", () => { chat.length = 0; $("#chat-log").replaceChildren(); });

renderLog();
renderTP();
connect();
