// The Order Edge Agent console: polls /status (open) and looks orders up through
// /v1/orders (bearer token, asked once, kept in sessionStorage for this tab).
// Everything from the agent is put in the page with textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "edgeAgentToken";
const LANG_KEY = "edgeAgentLang";
const SERIAL_RE = /^(RCV-)?[A-Z0-9][A-Z0-9_.-]*-\d{8}-\d{9}$|^RCV-/;

// The texts of both languages: /console/strings.json ({"en": {...}, "zh": {...}}, same keys,
// "{name}" placeholders); tests/test_console.py checks that zh has every en key.
let T = { en: {}, zh: {} };
const STATUS_TIMEOUT_MS = 5000;
let lang = "en";
let lastStatus = null;
let lastResult = null;
let lastProblems = null;
// Since when /status fails (a Date), and why (an error kind and the raw text); null: answering.
let downSince = null;
let downWhy = null;

function t(key, params) {
  const v = (T[lang] && T[lang][key]) ?? T.en[key] ?? key;
  return v.replace(/\{(\w+)\}/g, (m, name) => (params && name in params ? String(params[name]) : m));
}

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return t("dash");
  s = Math.max(0, Math.round(s));
  const zh = lang === "zh";
  if (s < 60) return zh ? `${s} 秒` : `${s} s`;
  const m = Math.floor(s / 60), sec = s % 60;
  if (m < 60) return zh ? `${m} 分 ${sec} 秒` : `${m} min ${sec} s`;
  const h = Math.floor(m / 60);
  return zh ? `${h} 小时 ${m % 60} 分` : `${h} h ${m % 60} min`;
}

function pad(n, w = 2) { return String(n).padStart(w, "0"); }

// "+08:00": the browser's offset from UTC at that moment (getTimezoneOffset is UTC - local).
function fmtOffset(d) {
  const off = -d.getTimezoneOffset();
  const a = Math.abs(off);
  return `${off < 0 ? "-" : "+"}${pad(Math.floor(a / 60))}:${pad(a % 60)}`;
}

function fmtClock(d) {
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${fmtOffset(d)}`;
}

// ISO 8601 with the local offset, the same in every language: 2026-12-03 16:40:05 +08:00.
function fmtTime(epochOrIso) {
  if (epochOrIso === null || epochOrIso === undefined || epochOrIso === "") return t("dash");
  const d = epochOrIso instanceof Date ? epochOrIso
    : typeof epochOrIso === "number" ? new Date(epochOrIso * 1000) : new Date(epochOrIso);
  if (isNaN(d.getTime())) return String(epochOrIso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(d)}`;
}

// What kind of failure a raw library / agent error string is, for a short text in the
// page's language; the raw string stays available under "details".
const ERROR_KINDS = [
  ["refusing", /^HTTP (\d{3}) to POST \/orders/],
  ["tls", /SSL|TLS|certificate|CERTIFICATE/],
  ["dns", /cannot resolve|resolv|Name or service not known|NXDOMAIN|No address associated|getaddrinfo|DNS/i],
  ["refused", /refused|Errno 111|Connect call failed/i],
  ["timeout", /in time|timed? ?out|timeout|AbortError/i],
  ["no_quorum", /no response from stream|no responders|no quorum|insufficient resources/i],
  ["unreachable", /unreachable|No route to host|Errno 11[03]|Errno 101/i],
  ["http", /\bHTTP (\d{3})\b/],
  ["reset", /reset by peer|disconnected|failed after sending|Connection lost|EOF/i],
  ["network", /Failed to fetch|NetworkError|Load failed/i],
];

function errorKind(raw) {
  for (const [kind, re] of ERROR_KINDS) {
    const m = re.exec(raw);
    if (m) return { kind, code: m[1] };
  }
  return { kind: "other", code: undefined };
}

function errorText(raw) {
  const { kind, code } = errorKind(String(raw));
  return t("err_" + kind, { code });
}

// The raw text one click away: a closed <details> with a "details" summary.
function rawDetails(raw) {
  return el("details", { class: "raw" }, el("summary", {}, t("details")), el("code", {}, String(raw)));
}

// The short text, with the raw error on demand (a closed <details>, and as a tooltip).
function errorNode(raw, cls = "") {
  return el("span", { class: ("err " + cls).trim(), title: String(raw), "data-kind": errorKind(String(raw)).kind },
            errorText(raw), " ", rawDetails(raw));
}

function short(text, max = 90) {
  text = String(text);
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

function fmtBytes(n) {
  if (!isFinite(n)) return t("dash");
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.documentElement.dataset.lang = lang;
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
  for (const b of document.querySelectorAll("[data-set-lang]")) {
    b.setAttribute("aria-pressed", String(b.dataset.setLang === lang));
  }
  document.title = t("title");
  if (lastStatus) render(lastStatus);
  showConn();
  if (lastResult) showResult(lastResult);
  if (lastProblems) showProblems(lastProblems);
}

function clusterName(name) {
  const key = "cluster_" + name;
  return key in T.en ? t(key) : name;
}

// A health badge; while the agent does not answer, every badge is grey "last known".
function badge(ok, okText, badText) {
  if (downSince) return el("span", { class: "badge stale" }, t("last_known", { m: ok ? okText : badText }));
  return el("span", { class: "badge " + (ok ? "ok" : "bad") }, ok ? okText : badText);
}

function render(s) {
  lastStatus = s;
  const stale = downSince !== null;
  document.body.dataset.stale = String(stale);
  $("node").textContent = s.node_id || "";
  $("version").textContent = s.version ? t("version", { v: s.version }) : "";
  const mode = s.mode || "";
  $("mode").textContent = stale ? t("last_known", { m: t(mode) }) : t(mode);
  $("mode").dataset.mode = stale ? "stale" : mode;
  $("mode-card").dataset.mode = stale ? "stale" : mode;
  const now = s.now || Date.now() / 1000;
  $("mode-since").textContent =
    `${fmtTime(s.mode_since)} (${fmtDuration(now - s.mode_since)} ${t("ago")})`;
  $("mode-help").textContent = stale ? t("help_stale") : t("help_" + mode);
  $("updated").textContent = fmtTime(now);

  $("pending").textContent = String(s.pending);
  $("oldest").textContent = s.pending ? fmtDuration(s.oldest_pending_age_s) : t("dash");
  $("drain-rate").textContent = `${(s.drain_rate_per_s || 0).toFixed(1)}${t("per_s")}`;
  $("eta").textContent = s.pending === 0 ? t("empty")
    : (s.drain_eta_s === null || s.drain_eta_s === undefined) ? t("no_estimate")
    : fmtDuration(s.drain_eta_s);
  $("bytes").textContent = s.max_bytes
    ? `${fmtBytes(s.pending_bytes || 0)} / ${fmtBytes(s.max_bytes)}` : fmtBytes(s.pending_bytes || 0);
  $("bytes").classList.toggle("warn", s.max_bytes && s.pending_bytes > 0.8 * s.max_bytes);
  const rejected = s.rejected === null || s.rejected === undefined ? null : s.rejected;
  $("rejected").textContent = rejected === null ? t("dash") : String(rejected);
  $("rejected").classList.toggle("warn", rejected > 0);
  $("rejected-help").hidden = !(rejected > 0);
  $("rejected-help").textContent = rejected > 0 ? t("rejected_help", { n: rejected }) : "";

  $("pinned").replaceChildren(...Object.entries(s.pinned || {}).map(([name, n]) =>
    figure({ "data-cluster": name }, name === "none" ? t("none") : clusterName(name), n)));

  const clusters = $("clusters");
  clusters.replaceChildren();
  for (const [name, c] of Object.entries(s.clusters || {})) {
    const badges = [badge(c.healthy, t("healthy"), t("down"))];
    if (c.refusing) badges.push(el("span", { class: "badge " + (stale ? "stale" : "refusing") }, t("refusing")));
    const shown = clusterName(name);
    const head = el("div", { class: "cluster-head" },
                    el("strong", {}, shown === name ? name : `${shown} (${name})`), ...badges,
                    el("span", { class: "muted small" }, `${t("since")} ${fmtTime(c.since)}`));
    const parts = [head, el("div", { class: "url" }, c.url || "")];
    if (c.refusing) parts.push(el("div", { class: "error small" }, `${t("refusing")}: `, errorNode(c.refusing)));
    const addrErrors = new Set(Object.values(c.addresses || {}).map((a) => a.error));
    if (c.last_error && !c.healthy && !addrErrors.has(c.last_error)) {
      parts.push(el("div", { class: "small last-error" }, `${t("last_error")}: `, errorNode(c.last_error, "muted")));
    }
    const addrs = el("ul", { class: "addrs" });
    const entries = Object.entries(c.addresses || {});
    if (!entries.length) addrs.append(el("li", { class: "muted" }, t("no_addresses")));
    for (const [addr, a] of entries) {
      addrs.append(el("li", {}, badge(a.healthy, t("healthy"), t("down")),
                      el("span", { class: "addr" }, addr),
                      a.error ? errorNode(a.error, "muted") : null));
    }
    parts.push(addrs);
    clusters.append(el("div", { class: "cluster", "data-cluster": name,
                                "data-healthy": String(!!c.healthy),
                                "data-refusing": String(!!c.refusing) }, ...parts));
  }

  const byState = (s.sms && s.sms.by_state) || {};
  $("sms").replaceChildren(...Object.entries(byState).map(([state, n]) =>
    figure({ "data-state": state }, t("state_" + state), n, state === "ambiguous" && n > 0)));
  const amb = byState.ambiguous || 0;
  $("sms-alert").hidden = amb === 0;
  $("sms-alert").textContent = amb ? t("ambiguous_alert", { n: amb }) : "";

  renderReplica(s.replication);
  renderChain(s.chain);

  const hist = $("history");
  hist.replaceChildren();
  for (const h of [...(s.mode_history || [])].reverse().slice(0, 10)) {
    const what = h.from ? `${t(h.from)} → ${t(h.to)}` : `${t("agent_started")}: ${t(h.to)}`;
    const li = el("li", {}, `${fmtTime(h.at)} — ${what}`);
    if (h.from && h.reason && h.to !== "normal") {
      li.append(` (${clusterName(h.cluster)}: `, errorNode(h.reason), ")");
    }
    hist.append(li);
  }
}

// One figure of a <dl class="figures">: its label, its value, red when ``warn``.
function figure(attrs, label, value, warn = false) {
  return el("div", attrs, el("dt", {}, label), el("dd", warn ? { class: "warn" } : {}, value));
}

// The replica (CONTRACT 11), shown only with [replication] on: is it taking writes, and
// what this server still owes it (orders on this disk only, later changes not written).
function renderReplica(r) {
  const card = $("replica-card");
  card.hidden = !(r && r.enabled);
  if (card.hidden) return;
  card.dataset.healthy = String(!!r.healthy);
  card.dataset.connected = String(!!r.connected);
  $("replica-head").replaceChildren(
    badge(r.healthy, t("healthy"), t("unhealthy")),
    badge(r.connected, t("connected"), t("not_connected")),
    el("span", { class: "muted small" }, t(r.required ? "replica_required" : "replica_optional")));
  const unreplicated = r.unreplicated || 0, owed = r.owed_changes || 0;
  $("replica").replaceChildren(
    figure({ "data-field": "unreplicated" }, t("unreplicated"), unreplicated, unreplicated > 0),
    figure({ "data-field": "owed_changes" }, t("owed_changes"), owed, owed > 0),
    figure({ "data-field": "last_ok" }, t("last_ok"), fmtTime(r.last_ok)));
  $("replica-alert").hidden = unreplicated === 0;
  $("replica-alert").textContent = unreplicated ? t("unreplicated_alert", { n: unreplicated }) : "";
  const error = $("replica-error");
  error.hidden = !r.last_error;
  error.replaceChildren(...(r.last_error ? [`${t("last_error")}: `, errorNode(r.last_error, "muted")] : []));
  $("replica-servers").textContent = `${t("replica_servers")}: ${(r.servers || []).join(", ")}`;
}

const CHAIN_STATES = ["verified", "pending", "failed", "overdue"];

// "After the outage" (CONTRACT 10): per step, how many outage orders are in each state.
function renderChain(chain) {
  const card = $("chain-card");
  card.hidden = !chain;
  if (!chain) return;
  const head = el("tr", {}, el("th", {}, t("chain_step")),
                  ...CHAIN_STATES.map((st) => el("th", { "data-state": st }, t("chain_" + st))));
  const body = Object.entries(chain).map(([step, counts]) => {
    const bad = (counts.failed || 0) > 0 || (counts.overdue || 0) > 0;
    return el("tr", { "data-step": step, class: bad ? "problem" : "" }, el("th", {}, step),
              ...CHAIN_STATES.map((st) => {
                const n = counts[st] || 0;
                const cls = n > 0 && (st === "failed" || st === "overdue") ? "warn" : "";
                return el("td", { "data-state": st, class: cls }, n);
              }));
  });
  $("chain").replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
  const problems = Object.values(chain).some((c) => (c.failed || 0) + (c.overdue || 0) > 0);
  $("chain-list").hidden = !problems;
}

// The failed and overdue orders with what was wrong (GET /v1/chain/problems, behind the
// token like the lookups): what customer service and finance work through.
async function listProblems() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  let r;
  try {
    r = await fetch("/v1/chain/problems", { headers, cache: "no-store" });
  } catch (e) {
    showProblems({ error: e.message });
    return;
  }
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = false;
    $("token-msg").textContent = token ? t("wrong_token") : t("need_token");
    $("token-msg").dataset.kind = token ? "wrong" : "missing";
    $("token").focus();
    showProblems(null);
    return;
  }
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    showProblems({ error: msg });
    return;
  }
  showProblems(await r.json());
}

// A chain step's detail (agent/chain/steps.py) in the page's language, the raw text on demand.
const CHAIN_DETAILS = [
  [/^(\S+) is (.+) downstream, expected (.+)$/, (m) => t("cd_mismatch", { p: m[1], got: m[2], exp: m[3] })],
  [/, no (\S+) in the answer$/, (m) => t("cd_absent", { p: m[1] })],
  [/^\S+ \S+: HTTP (404|408|429)$/, (m) => t("cd_not_yet", { code: m[1] })],
  [/^cannot build the/, () => t("cd_build")],
];

function chainDetail(raw) {
  raw = String(raw || "");
  for (const [re, text] of CHAIN_DETAILS) {
    const m = re.exec(raw);
    if (m) return el("span", { class: "err" }, text(m), " ", rawDetails(raw));
  }
  return raw ? errorNode(raw) : "";
}

function showProblems(res) {
  lastProblems = res;
  const box = $("chain-problems");
  box.replaceChildren();
  if (!res) return;
  if (res.error) {
    box.append(el("p", { class: "error" }, `${t("lookup_failed")}: `, errorNode(res.error)));
    return;
  }
  if (!res.problems.length) { box.append(el("p", { class: "muted" }, t("chain_none"))); return; }
  const head = el("tr", {}, ...["r_serial", "cp_order_id", "chain_step", "r_state", "cp_detail",
                                "cp_delivered"].map((k) => el("th", {}, t(k))));
  const rows = res.problems.map((p) => el("tr", { "data-serial": p.serial, "data-step": p.step },
    el("td", {}, p.serial), el("td", {}, p.order_id || t("dash")), el("td", {}, p.step),
    el("td", { class: p.state }, t("chain_" + p.state)), el("td", { "data-field": "detail" }, chainDetail(p.detail)),
    el("td", {}, fmtTime(p.delivered_at))));
  box.append(el("table", { class: "problems", id: "problems" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  if (res.more) box.append(el("p", { class: "help small" }, t("chain_more", { n: res.problems.length })));
}

function showConn() {
  const conn = $("conn");
  conn.hidden = downSince === null;
  if (downSince === null) { conn.replaceChildren(); return; }
  const d = fmtDuration((Date.now() - downSince.getTime()) / 1000);
  conn.replaceChildren(t("not_answering", { at: fmtClock(downSince), d, why: errorText(downWhy) }), " ",
                       rawDetails(downWhy));
}

async function refresh() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), STATUS_TIMEOUT_MS);
  try {
    let r;
    try {
      r = await fetch("/status", { cache: "no-store", signal: abort.signal });
    } catch (e) {
      throw new Error(e.name === "AbortError" ? "no answer in time (AbortError)" : e.message);
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const s = await r.json();
    downSince = null;
    downWhy = null;
    render(s);
  } catch (e) {
    if (downSince === null) downSince = new Date();
    downWhy = e.message;
    if (lastStatus) render(lastStatus); else document.body.dataset.stale = "true";
  } finally {
    clearTimeout(timer);
    showConn();
    setTimeout(refresh, REFRESH_MS);
  }
}

function lookupPath(channel, q) {
  q = q.trim();
  channel = channel.trim();
  if (channel) return { kind: "key", path: "/v1/orders/by-key/" + encodeURIComponent(`${channel}:${q}`) };
  if (SERIAL_RE.test(q)) return { kind: "serial", path: "/v1/orders/" + encodeURIComponent(q) };
  return { kind: "key", path: "/v1/orders/by-key/" + encodeURIComponent(q) };
}

async function lookup() {
  const channel = $("q-channel").value, q = $("q").value;
  if (!q.trim()) return;
  const token = sessionStorage.getItem(TOKEN_KEY);
  const { path } = lookupPath(channel, q);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  let r;
  try {
    r = await fetch(path, { headers, cache: "no-store" });
  } catch (e) {
    showResult({ error: e.message });
    return;
  }
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = false;
    $("token-msg").textContent = token ? t("wrong_token") : t("need_token");
    $("token-msg").dataset.kind = token ? "wrong" : "missing";
    showResult(null);
    $("token").focus();
    return;
  }
  $("token-form").hidden = true;
  if (r.status === 404) {
    showResult({ notFound: channel.trim() ? `${channel.trim()}:${q.trim()}` : q.trim() });
    return;
  }
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    showResult({ error: msg });
    return;
  }
  showResult({ order: await r.json() });
}

function showResult(res) {
  lastResult = res;
  const box = $("result");
  box.replaceChildren();
  if (!res) return;
  if (res.error) {
    box.append(el("p", { class: "error", id: "lookup-error" }, `${t("lookup_failed")}: `, errorNode(res.error)));
    return;
  }
  if (res.notFound) {
    const hint = res.notFound.includes(":") ? "" : ` ${t("add_channel")}`;
    box.append(el("p", { class: "error", id: "lookup-error" },
                  `${t("not_found")} ${res.notFound}.${hint}`));
    return;
  }
  const o = res.order;
  let smsText = t("sms_none");
  if (o.sms) {
    const st = t("state_" + o.sms.state);
    smsText = o.sms.state === "sent" ? t("sms_sent_to", { p: o.sms.phone || "" })
      : o.sms.phone ? `${st} (${o.sms.phone})` : st;
  }
  const rows = [
    ["r_state", `${t("os_" + o.state)} — ${t("st_" + o.state)}`, "state"],
    ["r_serial", o.serial, "serial"],
    [o.state === "buffered" ? "r_pinned" : "r_cluster",
     (o.state === "buffered" ? o.pinned_to : o.cluster) || t("none"), "cluster"],
    ["r_order_id", o.order_id || t("dash"), "order_id"],
    ["r_received", fmtTime(o.received_at), "received_at"],
    ["r_sms", smsText, "sms"],
  ];
  if (o.chain) {
    const steps = Object.entries(o.chain).map(([step, st]) => `${step}: ${t("chain_" + st)}`);
    rows.push(["r_chain", steps.join(", "), "chain"]);
  }
  const table = el("table", { id: "order", "data-state": o.state });
  for (const [k, v, field] of rows) {
    table.append(el("tr", {}, el("th", {}, t(k)), el("td", { "data-field": field }, v)));
  }
  box.append(table);
}

async function init() {
  try {
    T = await (await fetch("/console/strings.json")).json();
  } catch (_) { /* the keys show instead of texts; /status still works */ }
  const saved = localStorage.getItem(LANG_KEY);
  lang = saved || document.documentElement.dataset.lang || "en";
  for (const b of document.querySelectorAll("[data-set-lang]")) {
    b.addEventListener("click", () => {
      lang = b.dataset.setLang;
      localStorage.setItem(LANG_KEY, lang);
      applyLang();
    });
  }
  $("lookup").addEventListener("submit", (ev) => { ev.preventDefault(); lookup(); });
  $("chain-list").addEventListener("click", () => listProblems());
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("token").value.trim();
    if (!v) return;
    sessionStorage.setItem(TOKEN_KEY, v);
    $("token").value = "";
    $("token-form").hidden = true;
    lookup();
  });
  applyLang();
  refresh();
}

document.addEventListener("DOMContentLoaded", init);
