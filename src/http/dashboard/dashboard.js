// The flotilla dashboard. Plain JavaScript, no dependencies, no build step.
//
// Sources, all this origin's API (a follower forwards them to the leader):
// - GET /api/v1/executors/watch (Server-Sent Events): `snapshot`, then
//   `online` / `offline` as they happen. It decides which executors exist:
//   an executor shows up and goes offline (with the reason) from the feed.
// - GET /api/v1/executors, /api/v1/changefeeds, /api/v1/status, polled
//   every `refresh` ms (`?refresh=2000`, the default): heartbeat ages, the
//   changefeeds each executor runs, changefeed states, checkpoints, the leader.
//
// Everything shown is written with textContent (never innerHTML): labels,
// names and errors are data from executors and operators.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const REFRESH_MS = Math.max(200, Number(params.get("refresh")) || 2000);
  const NAMESPACE = params.get("namespace") || "default";
  // How long an executor that went offline stays on the page.
  const KEEP_OFFLINE_MS = 5 * 60 * 1000;
  // TiDB-style timestamps: unix milliseconds << 18.
  const TS_SHIFT = 2 ** 18;

  // id -> { info (the API's executor object), hbAt (ms, local clock, of the
  //         last heartbeat), offline: null | { reason, at } }
  const executors = new Map();
  let changefeeds = [];
  let status = null;
  let lastUpdate = null;
  let pollError = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function duration(ms) {
    if (ms < 0) ms = 0;
    if (ms < 1000) return `${Math.round(ms)}ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m${Math.floor(s % 60)}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h${m % 60}m`;
    return `${Math.floor(h / 24)}d${h % 24}h`;
  }

  function tsMillis(ts) {
    return Math.floor(Number(ts) / TS_SHIFT);
  }

  // --- the executor feed -------------------------------------------------

  function upsert(info, receivedAt) {
    const known = executors.get(info.id);
    if (known && known.offline) return; // ids are never reused
    const hbAt =
      info.last_heartbeat_ms_ago === null || info.last_heartbeat_ms_ago === undefined
        ? null
        : receivedAt - info.last_heartbeat_ms_ago;
    executors.set(info.id, {
      info: Object.assign({}, known ? known.info : {}, info),
      hbAt,
      offline: null,
    });
  }

  function goOffline(id, reason) {
    const known = executors.get(id);
    if (!known || known.offline) return;
    known.offline = { reason, at: Date.now() };
  }

  let source = null;
  function connectFeed() {
    if (source) source.close();
    source = new EventSource("/api/v1/executors/watch");
    setFeed("connecting");
    source.addEventListener("open", () => setFeed("live"));
    source.addEventListener("snapshot", (event) => {
      const data = JSON.parse(event.data);
      const now = Date.now();
      const present = new Set(data.executors.map((e) => e.id));
      // Missed while disconnected: gone without an event we saw.
      for (const [id, entry] of executors) {
        if (!entry.offline && !present.has(id)) goOffline(id, "missed");
      }
      for (const info of data.executors) upsert(info, now);
      setFeed("live");
      render();
    });
    source.addEventListener("online", (event) => {
      upsert(JSON.parse(event.data), Date.now());
      render();
    });
    source.addEventListener("offline", (event) => {
      const data = JSON.parse(event.data);
      goOffline(data.id, data.reason);
      render();
    });
    source.addEventListener("resync", () => {
      // This page fell behind; a fresh snapshot puts it right.
      connectFeed();
    });
    source.addEventListener("error", () => {
      // EventSource retries by itself after a dropped stream, but gives up
      // for good after an answer that is not an event stream (a 503 while
      // no leader is elected): then retry here.
      if (source.readyState === EventSource.CLOSED) {
        setFeed("reconnecting");
        setTimeout(connectFeed, Math.max(REFRESH_MS, 1000));
      } else {
        setFeed("reconnecting");
      }
    });
  }

  function setFeed(state) {
    const node = $("feed");
    node.dataset.state = state;
    node.textContent = state;
  }

  // --- polling -------------------------------------------------------------

  async function getJson(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const code = body && body.code ? body.code : `HTTP ${response.status}`;
      const message = body && body.message ? body.message : response.statusText;
      throw new Error(`${path}: ${code}: ${message}`);
    }
    return body;
  }

  async function poll() {
    const ns = encodeURIComponent(NAMESPACE);
    const [s, list, feeds] = await Promise.allSettled([
      getJson("/api/v1/status"),
      getJson("/api/v1/executors"),
      getJson(`/api/v1/changefeeds?namespace=${ns}`),
    ]);
    const failed = [s, list, feeds].filter((r) => r.status === "rejected");
    pollError = failed.length ? failed.map((r) => r.reason.message).join("; ") : null;
    if (s.status === "fulfilled") status = s.value;
    if (list.status === "fulfilled") {
      const now = Date.now();
      // The list also shows recent tombstones (expired or deregistered
      // before this page saw it happen): shown as such until the server
      // forgets them. Whether a live executor went offline is the feed's
      // call (it gives the reason, and it is not late by a poll).
      const listed = new Set();
      for (const info of list.value.items) {
        listed.add(info.id);
        upsert(info, now);
      }
      for (const [id, entry] of executors) {
        if (!entry.offline && entry.info.status === "tombstone" && !listed.has(id)) executors.delete(id);
      }
    }
    if (feeds.status === "fulfilled") changefeeds = feeds.value.items;
    if (!failed.length) lastUpdate = Date.now();
    render();
  }

  async function pollForever() {
    for (;;) {
      try {
        await poll();
      } catch (e) {
        pollError = String(e);
      }
      await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
    }
  }

  // --- rendering -------------------------------------------------------------

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || text}` }, text);
  }

  function renderHeader() {
    if (status) {
      $("cluster").textContent = status.cluster_id;
      $("server").textContent = `${status.id} (${status.advertise_addr})`;
      const election = status.election;
      let leader;
      if (!election) leader = "this server (no election)";
      else if (!election.leader) leader = "none elected";
      else {
        leader = `${election.leader.server_id} (${election.leader.advertise_addr})`;
        if (election.is_leader) leader += ", this server";
        if (election.members.length > 1) leader += ` · ${election.members.length} servers`;
      }
      $("leader").textContent = leader;
    }
    $("updated").textContent = lastUpdate
      ? `${duration(Date.now() - lastUpdate)} ago`
      : "-";
    $("error").hidden = !pollError;
    $("error").textContent = pollError || "";
  }

  function executorRows() {
    const now = Date.now();
    for (const [id, entry] of executors) {
      if (entry.offline && now - entry.offline.at > KEEP_OFFLINE_MS) executors.delete(id);
    }
    // Live ones first, then by name and id.
    const gone = (e) => Number(!!e.offline || e.info.status === "tombstone");
    return [...executors.values()].sort(
      (a, b) =>
        gone(a) - gone(b) ||
        a.info.name.localeCompare(b.info.name) ||
        a.info.id.localeCompare(b.info.id)
    );
  }

  function renderExecutors() {
    const now = Date.now();
    const rows = executorRows();
    const counts = {};
    const body = document.querySelector("#executors tbody");
    body.replaceChildren(
      ...rows.map(({ info, hbAt, offline }) => {
        const state = offline ? "offline" : info.status;
        counts[state] = (counts[state] || 0) + 1;
        let heartbeat;
        if (offline) heartbeat = el("span", { class: "muted" }, `offline ${duration(now - offline.at)} ago`);
        else if (state === "tombstone") heartbeat = el("span", { class: "muted" }, "-");
        else if (hbAt === null) heartbeat = el("span", { class: "muted" }, "none yet");
        else {
          const age = now - hbAt;
          heartbeat = el("span", { class: age > info.ttl_ms ? "late" : "" }, `${duration(age)} ago`);
        }
        const labels = Object.entries(info.labels || {}).map(([k, v]) =>
          el("span", { class: "label" }, `${k}=${v}`)
        );
        const running = offline || state === "tombstone" ? [] : info.changefeeds || [];
        return el(
          "tr",
          { "data-executor-id": info.id, "data-name": info.name, "data-status": state, class: offline || state === "tombstone" ? "gone" : "" },
          el("td", {}, info.id),
          el("td", { class: "status" }, badge(state), offline ? el("span", { class: "muted reason" }, ` ${offline.reason}`) : null),
          el("td", {}, ...labels),
          el("td", { class: "heartbeat" }, heartbeat),
          el("td", {}, duration(info.ttl_ms)),
          el("td", {}, info.address),
          el("td", { class: "assigned", "data-count": running.length }, running.map(shortFeed).join(", ") || "-")
        );
      })
    );
    $("executors-empty").hidden = rows.length > 0;
    $("executor-counts").textContent = Object.entries(counts)
      .map(([k, v]) => `${v} ${k}`)
      .join(" · ");
  }

  // `default/orders` -> `orders` when it is the namespace on show.
  function shortFeed(name) {
    const prefix = `${NAMESPACE}/`;
    return name.startsWith(prefix) ? name.slice(prefix.length) : name;
  }

  function renderChangefeeds() {
    const now = Date.now();
    const counts = {};
    const body = document.querySelector("#changefeeds tbody");
    body.replaceChildren(
      ...changefeeds.map((feed) => {
        counts[feed.state] = (counts[feed.state] || 0) + 1;
        const checkpointMs = tsMillis(feed.checkpoint_ts);
        const lag = feed.state === "normal" ? duration(now - checkpointMs) : "-";
        const executor = feed.executor
          ? executors.get(feed.executor) && executors.get(feed.executor).offline
            ? el("span", { class: "late" }, `${feed.executor} (offline)`)
            : feed.executor
          : el("span", { class: "muted" }, "unassigned");
        const note = feed.error
          ? el("span", { class: "late" }, typeof feed.error === "string" ? feed.error : JSON.stringify(feed.error))
          : feed.pending_reason || "";
        return el(
          "tr",
          { "data-changefeed": feed.id, "data-executor": feed.executor || "", "data-state": feed.state },
          el("td", {}, feed.id),
          el("td", {}, badge(feed.state)),
          el("td", { class: "executor" }, executor),
          el("td", {}, feed.epoch),
          el("td", { title: String(feed.checkpoint_ts) }, new Date(checkpointMs).toISOString().replace(".000Z", "Z")),
          el("td", { class: "lag" }, lag),
          el("td", {}, feed.sink_uri),
          el("td", {}, note)
        );
      })
    );
    $("changefeeds-empty").hidden = changefeeds.length > 0;
    $("changefeed-counts").textContent = Object.entries(counts)
      .map(([k, v]) => `${v} ${k}`)
      .join(" · ");
  }

  function render() {
    renderHeader();
    renderExecutors();
    renderChangefeeds();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("refresh").textContent = duration(REFRESH_MS);
    connectFeed();
    pollForever();
    // Ages and lags move between updates.
    setInterval(render, 500);
  });
})();
