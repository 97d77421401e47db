// The Order Edge Agent console: polls /status (open) and looks orders up through
// /v1/orders (bearer token, asked once, kept in sessionStorage for this tab).
// Everything from the agent is put in the page with textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "edgeAgentToken";
const LANG_KEY = "edgeAgentLang";
const SERIAL_RE = /^(RCV-)?[A-Z0-9][A-Z0-9_.-]*-\d{8}-\d{9}$|^RCV-/;

const T = {
  en: {
    title: "Order Edge Agent", mode: "Mode", since: "since", updated: "Updated",
    buffer: "Offline buffer", pending: "Pending", oldest: "Oldest pending",
    drain_rate: "Drain rate", eta: "Time to empty", bytes: "Buffer use",
    pinned: "Pinned orders", pinned_help:
      "An order pinned to a cluster may already be there: it is sent only to that cluster.",
    clusters: "Order-center clusters", sms: "SMS notices", lookup: "Find an order",
    channel: "Channel (optional)", query: "Platform order number, dedupe key or serial",
    find: "Find", token: "API token", use_token: "Use token",
    token_help: "Kept for this tab only.", history: "Last mode changes",
    normal: "normal", standby: "standby", offline: "offline",
    help_normal: "The primary takes orders. Nothing to do.",
    help_standby: "The primary is down: orders go to the standby. The agent returns to the primary by itself.",
    help_offline: "Both clusters are down: every order is kept on this server and the customer gets an SMS with a serial. It is delivered automatically when a cluster returns.",
    healthy: "healthy", down: "down", refusing: "refusing the agent",
    takes_orders: "takes orders", last_error: "last error", none: "none",
    no_addresses: "no address resolved yet", unreachable: "The agent does not answer",
    per_s: "/s", no_estimate: "no estimate (not draining)", empty: "empty",
    state_queued: "queued", state_sending: "sending", state_sent: "sent",
    state_failed: "failed", state_suppressed: "suppressed", state_skipped: "skipped",
    state_ambiguous: "ambiguous",
    ambiguous_alert: (n) => `${n} SMS notice(s) are ambiguous: they may or may not have reached the customer, and are never resent (at most one SMS per order). Look each serial up in the agent log ("SMS for <serial> ambiguous"), then check the provider's send records for that number and date (Aliyun: OutId = serial). Tell the customer their serial if it did not arrive.`,
    r_state: "State", r_serial: "Serial", r_cluster: "Cluster", r_pinned: "Pinned to",
    r_order_id: "Order id", r_received: "Received", r_sms: "SMS",
    st_forwarded: "forwarded to the order center", st_buffered: "buffered on this server, waiting for the order center",
    st_merged: "merged into the order center", st_rejected: "rejected by the order center (ops: see rejected/)",
    sms_none: "no SMS for this order", sms_sent_to: (p) => `sent to ${p}`,
    sms_state_to: (s, p) => `${s}${p ? " (" + p + ")" : ""}`,
    not_found: "No order found for", add_channel: "A platform order number needs its channel (e.g. douyin).",
    need_token: "This lookup needs the API token.",
    wrong_token: "Wrong API token: the agent refused it (401). Enter the right one.",
    lookup_failed: "Lookup failed", from_to: (a, b) => `${a} → ${b}`,
    agent_started: "agent started", ago: "ago", dash: "—",
  },
  zh: {
    title: "订单边缘代理", mode: "模式", since: "开始于", updated: "更新于",
    buffer: "离线缓存", pending: "待投递", oldest: "最早待投递",
    drain_rate: "回灌速度", eta: "预计清空", bytes: "缓存占用",
    pinned: "锁定集群的订单", pinned_help: "锁定到某集群的订单可能已在该集群中,只会发往该集群。",
    clusters: "订单中心集群", sms: "短信通知", lookup: "查询订单",
    channel: "渠道(可选)", query: "平台订单号、去重键或流水号",
    find: "查询", token: "API 令牌", use_token: "使用令牌",
    token_help: "仅在本标签页内保存。", history: "最近模式变化",
    normal: "正常", standby: "备用集群", offline: "离线",
    help_normal: "主集群正常接单,无需处理。",
    help_standby: "主集群故障,订单转发到备用集群。主集群恢复后自动切回。",
    help_offline: "两个集群都不可用:订单保存在本机,有手机号的顾客会收到带流水号的短信。集群恢复后自动投递。",
    healthy: "正常", down: "故障", refusing: "拒绝代理",
    takes_orders: "可接单", last_error: "最近错误", none: "无",
    no_addresses: "尚未解析到地址", unreachable: "代理无响应",
    per_s: "/秒", no_estimate: "无法估计(未在回灌)", empty: "已清空",
    state_queued: "排队", state_sending: "发送中", state_sent: "已发送",
    state_failed: "失败", state_suppressed: "已限流", state_skipped: "已跳过",
    state_ambiguous: "不确定",
    ambiguous_alert: (n) => `${n} 条短信状态不确定:可能已送达,也可能没有,系统不会重发(每单最多一条短信)。请在代理日志中查找流水号("SMS for <serial> ambiguous"),再到短信服务商的发送记录中按号码和日期核对(阿里云:OutId 即流水号)。若顾客未收到,请人工告知流水号。`,
    r_state: "状态", r_serial: "流水号", r_cluster: "集群", r_pinned: "锁定集群",
    r_order_id: "订单号", r_received: "接收时间", r_sms: "短信",
    st_forwarded: "已转发到订单中心", st_buffered: "已缓存在本机,等待订单中心恢复",
    st_merged: "已合并到订单中心", st_rejected: "订单中心拒收(运维:查看 rejected/)",
    sms_none: "此订单无短信", sms_sent_to: (p) => `已发送至 ${p}`,
    sms_state_to: (s, p) => `${s}${p ? "(" + p + ")" : ""}`,
    not_found: "未找到订单:", add_channel: "平台订单号需要同时填写渠道(如 douyin)。",
    need_token: "查询需要 API 令牌。",
    wrong_token: "API 令牌错误:代理拒绝(401)。请输入正确的令牌。",
    lookup_failed: "查询失败", from_to: (a, b) => `${a} → ${b}`,
    agent_started: "代理启动", ago: "前", dash: "—",
  },
};

let lang = "en";
let lastStatus = null;
let lastResult = null;

function t(key, ...args) {
  const v = (T[lang] && T[lang][key]) ?? T.en[key] ?? key;
  return typeof v === "function" ? v(...args) : v;
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

function fmtTime(epochOrIso) {
  if (epochOrIso === null || epochOrIso === undefined || epochOrIso === "") return t("dash");
  const d = typeof epochOrIso === "number" ? new Date(epochOrIso * 1000) : new Date(epochOrIso);
  if (isNaN(d.getTime())) return String(epochOrIso);
  return d.toLocaleString(lang === "zh" ? "zh-CN" : "en-GB", { hour12: false });
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
  if (lastResult) showResult(lastResult);
}

function render(s) {
  lastStatus = s;
  $("node").textContent = s.node_id || "";
  const mode = s.mode || "";
  $("mode").textContent = t(mode);
  $("mode").dataset.mode = mode;
  $("mode-card").dataset.mode = mode;
  const now = s.now || Date.now() / 1000;
  $("mode-since").textContent =
    `${fmtTime(s.mode_since)} (${fmtDuration(now - s.mode_since)} ${t("ago")})`;
  $("mode-help").textContent = t("help_" + mode);
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

  const pinned = $("pinned");
  pinned.replaceChildren();
  for (const [name, n] of Object.entries(s.pinned || {})) {
    const label = name === "none" ? t("none") : name;
    pinned.append(el("div", { "data-cluster": name }, el("dt", {}, label), el("dd", {}, n)));
  }

  const clusters = $("clusters");
  clusters.replaceChildren();
  for (const [name, c] of Object.entries(s.clusters || {})) {
    const badges = [];
    badges.push(el("span", { class: "badge " + (c.healthy ? "ok" : "bad") },
                   c.healthy ? t("healthy") : t("down")));
    if (c.refusing) badges.push(el("span", { class: "badge refusing" }, t("refusing")));
    const head = el("div", { class: "cluster-head" }, el("strong", {}, name), ...badges,
                    el("span", { class: "muted small" }, `${t("since")} ${fmtTime(c.since)}`));
    const parts = [head, el("div", { class: "url" }, c.url || "")];
    if (c.refusing) parts.push(el("div", { class: "error small" }, `${t("refusing")}: ${c.refusing}`));
    const addrErrors = new Set(Object.values(c.addresses || {}).map((a) => a.error));
    if (c.last_error && !c.healthy && !addrErrors.has(c.last_error)) {
      parts.push(el("div", { class: "small" }, `${t("last_error")}: `,
                    el("span", { class: "muted" }, c.last_error)));
    }
    const addrs = el("ul", { class: "addrs" });
    const entries = Object.entries(c.addresses || {});
    if (!entries.length) addrs.append(el("li", { class: "muted" }, t("no_addresses")));
    for (const [addr, a] of entries) {
      addrs.append(el("li", {}, el("span", { class: "badge " + (a.healthy ? "ok" : "bad") },
                                   a.healthy ? t("healthy") : t("down")),
                      el("span", { class: "addr" }, addr),
                      a.error ? el("span", { class: "muted" }, a.error) : null));
    }
    parts.push(addrs);
    clusters.append(el("div", { class: "cluster", "data-cluster": name,
                                "data-healthy": String(!!c.healthy),
                                "data-refusing": String(!!c.refusing) }, ...parts));
  }

  const byState = (s.sms && s.sms.by_state) || {};
  const sms = $("sms");
  sms.replaceChildren();
  for (const [state, n] of Object.entries(byState)) {
    const dd = el("dd", {}, n);
    if (state === "ambiguous" && n > 0) dd.classList.add("warn");
    sms.append(el("div", { "data-state": state }, el("dt", {}, t("state_" + state)), dd));
  }
  const amb = byState.ambiguous || 0;
  $("sms-alert").hidden = amb === 0;
  $("sms-alert").textContent = amb ? t("ambiguous_alert", amb) : "";

  const hist = $("history");
  hist.replaceChildren();
  for (const h of [...(s.mode_history || [])].reverse().slice(0, 10)) {
    const what = h.from ? t("from_to", t(h.from), t(h.to)) : `${t("agent_started")}: ${t(h.to)}`;
    const reason = h.from && h.reason && h.to !== "normal" ? ` (${h.cluster}: ${short(h.reason)})` : "";
    hist.append(el("li", { title: h.reason || "" }, `${fmtTime(h.at)} — ${what}${reason}`));
  }
}

async function refresh() {
  try {
    const r = await fetch("/status", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
    $("conn").hidden = true;
  } catch (e) {
    $("conn").hidden = false;
    $("conn").textContent = `${t("unreachable")}: ${e.message}`;
  } finally {
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
    showResult({ error: `${t("lookup_failed")}: ${e.message}` });
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
    showResult({ error: `${t("lookup_failed")}: ${msg}` });
    return;
  }
  showResult({ order: await r.json() });
}

function showResult(res) {
  lastResult = res;
  const box = $("result");
  box.replaceChildren();
  if (!res) return;
  if (res.error) { box.append(el("p", { class: "error", id: "lookup-error" }, res.error)); return; }
  if (res.notFound) {
    const hint = res.notFound.includes(":") ? "" : ` ${t("add_channel")}`;
    box.append(el("p", { class: "error", id: "lookup-error" },
                  `${t("not_found")} ${res.notFound}.${hint}`));
    return;
  }
  const o = res.order;
  let smsText = t("sms_none");
  if (o.sms) {
    smsText = o.sms.state === "sent" ? t("sms_sent_to", o.sms.phone || "")
      : t("sms_state_to", t("state_" + o.sms.state), o.sms.phone);
  }
  const rows = [
    ["r_state", `${o.state} — ${t("st_" + o.state)}`, "state"],
    ["r_serial", o.serial, "serial"],
    [o.state === "buffered" ? "r_pinned" : "r_cluster",
     (o.state === "buffered" ? o.pinned_to : o.cluster) || t("none"), "cluster"],
    ["r_order_id", o.order_id || t("dash"), "order_id"],
    ["r_received", fmtTime(o.received_at), "received_at"],
    ["r_sms", smsText, "sms"],
  ];
  const table = el("table", { id: "order", "data-state": o.state });
  for (const [k, v, field] of rows) {
    table.append(el("tr", {}, el("th", {}, t(k)), el("td", { "data-field": field }, v)));
  }
  box.append(table);
}

function init() {
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
