/*
 * Live stock dashboard: a table of products x warehouses kept current over /v1/ws.
 *
 * Vanilla JS, no build step. The flow:
 *   socket message -> model (Maps, version-checked) -> "dirty" sets -> one DOM pass per
 *   animation frame (requestAnimationFrame), so bursts of updates never cost more than one
 *   render per frame.
 * Before each (re)connect the page trades its token (sent in a header) for a single-use
 * stream ticket (POST /v1/stream-tickets) and opens /v1/ws?ticket=...: the token itself
 * never goes into a URL, where logs and proxies would keep it.
 * After any disconnect the socket reconnects with exponential backoff and jitter and
 * re-subscribes with `since` (the versions on screen); until the server has answered every
 * subscribe, the table is marked stale, so a number from before the disconnect is never
 * presented as live.
 * Waitlist lengths are not on the stream (joining a waitlist changes no stock): they are
 * polled every few seconds from GET /v1/waitlists while the tab is visible.
 *
 * window.__dashboard is a small read-only view of the internals for tests and debugging.
 */
"use strict";

(() => {
  const PRODUCT_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
  const MAX_PRODUCTS = 1000; // the server's limit per connection
  const SUBSCRIBE_FRAME_BUDGET = 48 * 1024; // stay well below the 64 KiB frame limit
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_MAX_MS = 10_000;
  const PING_AFTER_IDLE_MS = 15_000; // ping when nothing arrived for this long
  const DEAD_AFTER_IDLE_MS = 25_000; // and give the socket up when still nothing
  const RATE_HISTORY = 60; // seconds in the sparkline
  const HIGHLIGHT_STRONG_MS = 300; // a changed cell is highlighted strongly for this long
  const HIGHLIGHT_TOTAL_MS = 1000; // and faintly until this age
  const DELAY_SAMPLES = 4096; // ring buffer of update delays
  const MAX_PENDING_SAMPLES = 8192; // samples waiting for a paint (bounded while hidden)
  const TOKEN_KEY = "inventory.dashboard.token";
  const WAITLIST_POLL_MS = 2000;
  const WAITLIST_BATCH = 500; // product ids per GET /v1/waitlists
  const FIELDS = ["quantity", "reserved", "available"];
  const FIELD_LABELS = { quantity: "On hand", reserved: "Reserved", available: "Available" };

  const $ = (id) => document.getElementById(id);
  const ui = {
    conn: $("conn"),
    connText: $("conn-text"),
    rateValue: $("rate-value"),
    sparkline: $("sparkline-line"),
    addForm: $("add-form"),
    productInput: $("product-input"),
    tokenForm: $("token-form"),
    tokenInput: $("token-input"),
    notice: $("notice"),
    table: $("stock"),
    head: $("stock-head"),
    body: $("stock-body"),
    captionMeta: $("caption-meta"),
    empty: $("empty"),
    more: $("more-products"),
    stats: $("stats"),
  };
  const numberFormat = new Intl.NumberFormat();

  // ---------------------------------------------------------------- model

  /** Product ids in display order. */
  const products = [];
  /** product id -> Map(warehouse id -> {quantity, reserved, available, version}) */
  const levels = new Map();
  /** Products whose first snapshot arrived (others show placeholders). */
  const snapshotted = new Set();
  /** Warehouse ids seen in any level, sorted: the column groups. */
  let warehouses = [];

  // ---------------------------------------------------------------- view bookkeeping

  /** product id -> {tr, total, cells: Map(warehouse id -> {tds, values})} */
  const rowViews = new Map();
  /** product id -> Set(warehouse id): cells whose model changed since the last frame. */
  const dirty = new Map();
  let structureDirty = true;
  let chromeDirty = true;
  let frameRequested = false;

  // ---------------------------------------------------------------- connection state

  const conn = {
    state: "connecting", // connecting | connected | reconnecting | resynced | unauthorized
    detail: "",
    socket: null,
    opened: false, // the current socket reached OPEN
    everSynced: false,
    stale: true, // what is on screen may be behind the server
    pendingSubscribes: 0,
    attempt: 0,
    generation: 0, // bumped by every connect(): a superseded ticket request gives up
    reconnectTimer: 0,
    lastRx: 0,
    lastPing: 0,
    reconnects: 0,
    resyncedAt: null,
  };

  // ---------------------------------------------------------------- measurements

  const metrics = {
    frames: 0, // animation frames in which the page rendered
    messages: 0, // WebSocket messages received
    applied: 0, // level updates that changed the model
    ignored: 0, // updates not newer than what is shown
    reservedThisSecond: 0,
    messagesThisSecond: 0,
    messageRate: 0,
    rateHistory: new Array(RATE_HISTORY).fill(0),
    lastDelayMs: null,
    delays: new Float64Array(DELAY_SAMPLES), // server ts -> painted, ms
    pageDelays: new Float64Array(DELAY_SAMPLES), // message received -> painted, ms
    delayCount: 0,
    pendingTs: [], // ts (s) of stock messages applied since the last paint
    pendingRx: [], // performance.now() when each of them arrived
  };

  const afterPaint = (() => {
    // A message posted from inside requestAnimationFrame is handled after that frame's
    // style, layout and paint: the closest a page gets to "this is on screen now".
    const channel = new MessageChannel();
    const queue = [];
    channel.port1.onmessage = () => {
      const fn = queue.shift();
      if (fn) fn();
    };
    return (fn) => {
      queue.push(fn);
      channel.port2.postMessage(null);
    };
  })();

  // ---------------------------------------------------------------- products and URL

  /** Ids from the input box (comma or space separated) or the URL (comma separated). */
  function parseProductList(text, separator = /[\s,]+/) {
    const ids = [];
    const bad = [];
    for (const item of String(text || "").split(separator)) {
      const raw = item.trim();
      if (!raw) continue;
      (PRODUCT_ID_RE.test(raw) ? ids : bad).push(raw);
    }
    return { ids, bad };
  }

  function syncUrl() {
    const url = new URL(window.location.href);
    if (products.length) url.searchParams.set("products", products.join(","));
    else url.searchParams.delete("products");
    // Commas read better than %2C in the address bar and are valid in a query.
    const href = url.toString().replace(/%2C/gi, ",");
    window.history.replaceState(null, "", href);
  }

  function addProducts(ids) {
    const added = [];
    for (const id of ids) {
      if (products.length >= MAX_PRODUCTS) {
        showNotice(`At most ${MAX_PRODUCTS} products can be watched at once.`);
        break;
      }
      if (levels.has(id)) continue;
      products.push(id);
      levels.set(id, new Map());
      added.push(id);
    }
    if (!added.length) return;
    structureDirty = true;
    syncUrl();
    if (isOpen()) subscribe(added);
    refreshWaitlists();
    scheduleFrame();
  }

  function removeProduct(id) {
    const index = products.indexOf(id);
    if (index < 0) return;
    products.splice(index, 1);
    levels.delete(id);
    snapshotted.delete(id);
    waitlists.delete(id);
    dirty.delete(id);
    recomputeWarehouses();
    structureDirty = true;
    syncUrl();
    if (isOpen()) send({ op: "unsubscribe", product_ids: [id] });
    scheduleFrame();
  }

  function recomputeWarehouses() {
    const seen = new Set();
    for (const byWarehouse of levels.values()) {
      for (const warehouseId of byWarehouse.keys()) seen.add(warehouseId);
    }
    warehouses = [...seen].sort();
  }

  // ---------------------------------------------------------------- applying updates

  /** Store one row's state if it is newer than what we have; true when it changed. */
  function applyLevel(productId, level) {
    const byWarehouse = levels.get(productId);
    if (!byWarehouse) return false; // not (or no longer) watched
    const current = byWarehouse.get(level.warehouse_id);
    if (current && level.version <= current.version) {
      metrics.ignored++;
      return false;
    }
    byWarehouse.set(level.warehouse_id, {
      quantity: level.quantity,
      reserved: level.reserved,
      available: level.available,
      version: level.version,
    });
    if (!current && !warehouses.includes(level.warehouse_id)) {
      warehouses.push(level.warehouse_id);
      warehouses.sort();
      structureDirty = true;
    }
    let cells = dirty.get(productId);
    if (!cells) dirty.set(productId, (cells = new Set()));
    cells.add(level.warehouse_id);
    metrics.applied++;
    return true;
  }

  function onSnapshot(message) {
    const productId = message.product_id;
    if (!levels.has(productId)) return;
    for (const level of message.levels || []) applyLevel(productId, level);
    if (!snapshotted.has(productId)) {
      snapshotted.add(productId);
      structureDirty = true; // placeholders become numbers or "no stock"
    }
  }

  function onStock(message) {
    if (message.event === "reserved") metrics.reservedThisSecond++;
    if (!applyLevel(message.product_id, message)) return;
    // A resync message carries the row's updated_at, not the time of a change.
    // While the tab is hidden no frame comes; beyond the bound, samples are not kept.
    const measured = message.event !== "resync" && typeof message.ts === "number";
    if (measured && metrics.pendingTs.length < MAX_PENDING_SAMPLES) {
      metrics.pendingTs.push(message.ts);
      metrics.pendingRx.push(performance.now());
    }
  }

  // Kits (their number of whole kits, from `kit` messages) and low-stock alerts.
  const kits = new Map(); // product id -> {reservable, seq}
  const alerts = new Map(); // product id -> "low" | "out"

  function onKit(message) {
    const current = kits.get(message.product_id);
    if (current && message.seq <= current.seq) return;
    kits.set(message.product_id, { reservable: message.reservable, seq: message.seq });
    if (!current) structureDirty = true;
    else dirty.set(message.product_id, dirty.get(message.product_id) || new Set());
  }

  // Waitlist lengths per product (polled: see the top of the file).
  const waitlists = new Map(); // product id -> {waiting, units}
  let waitlistPoll = null; // the poll in flight

  function refreshWaitlists() {
    if (waitlistPoll || document.hidden || !products.length) return;
    waitlistPoll = pollWaitlists().finally(() => {
      waitlistPoll = null;
    });
  }

  async function pollWaitlists() {
    const t = token();
    const ids = products.slice();
    for (let i = 0; i < ids.length; i += WAITLIST_BATCH) {
      const url = new URL("/v1/waitlists", window.location.href);
      url.searchParams.set("product_ids", ids.slice(i, i + WAITLIST_BATCH).join(","));
      let page;
      try {
        const response = await fetch(url, {
          headers: t ? { Authorization: `Bearer ${t}` } : {},
          cache: "no-store",
        });
        if (!response.ok) return; // no token yet, or the server is away: next poll
        page = await response.json();
      } catch {
        return;
      }
      for (const { product_id: id, waiting, units } of page.waitlists) {
        if (!levels.has(id)) continue; // removed meanwhile
        const current = waitlists.get(id);
        if (current && current.waiting === waiting && current.units === units) continue;
        waitlists.set(id, { waiting, units });
        dirty.set(id, dirty.get(id) || new Set());
      }
      scheduleFrame();
    }
  }

  function onAlert(message) {
    const id = message.product_id;
    if (message.event === "stock.out") alerts.set(id, "out");
    else if (message.event === "stock.low") alerts.set(id, "low");
    else if (alerts.get(id) === "out") alerts.set(id, "low"); // stock.back: still low
    dirty.set(id, dirty.get(id) || new Set());
  }

  function onMessage(event) {
    metrics.messages++;
    metrics.messagesThisSecond++;
    conn.lastRx = performance.now();
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    switch (message.type) {
      case "stock":
        onStock(message);
        break;
      case "snapshot":
        onSnapshot(message);
        break;
      case "kit":
        onKit(message);
        break;
      case "alert":
        onAlert(message);
        break;
      case "subscribed":
        conn.pendingSubscribes = Math.max(0, conn.pendingSubscribes - 1);
        if (conn.pendingSubscribes === 0) markSynced();
        break;
      case "error":
        onServerError(message);
        break;
      default: // pong, unsubscribed: lastRx is all they are for
        return;
    }
    scheduleFrame();
  }

  function onServerError(message) {
    showNotice(`Server: ${message.message || message.code}`);
    if (message.code === "unavailable") {
      // A snapshot could not be read: start over on a fresh connection, with backoff.
      dropSocket("the server could not read stock levels");
      return;
    }
    // Errors answer our subscribe commands; do not wait for a "subscribed" that won't come.
    if (conn.pendingSubscribes > 0) {
      conn.pendingSubscribes--;
      if (conn.pendingSubscribes === 0) markSynced();
    }
  }

  function markSynced() {
    if (!conn.stale) return;
    conn.stale = false;
    conn.attempt = 0;
    if (conn.everSynced) {
      conn.resyncedAt = new Date();
      setState("resynced");
    } else {
      conn.everSynced = true;
      setState("connected");
    }
  }

  // ---------------------------------------------------------------- socket

  function token() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  /**
   * A single-use ticket for the stream (POST /v1/stream-tickets with the token in the
   * Authorization header), or null when the server refuses the token. Throws when the
   * server cannot be reached or cannot issue one right now.
   */
  async function streamTicket() {
    const t = token();
    const response = await fetch("/v1/stream-tickets", {
      method: "POST",
      headers: t ? { Authorization: `Bearer ${t}` } : {},
      cache: "no-store",
    });
    if (response.status === 401 || response.status === 403) return null;
    if (!response.ok) throw new Error(`the ticket request answered ${response.status}`);
    return (await response.json()).ticket;
  }

  function socketUrl(ticket) {
    const url = new URL("/v1/ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("ticket", ticket);
    return url.toString();
  }

  const isOpen = () => conn.socket !== null && conn.opened;

  function send(payload) {
    if (isOpen()) conn.socket.send(JSON.stringify(payload));
  }

  /** Subscribe in frames that stay under the size limit, each with its `since`. */
  function subscribe(ids) {
    let batch = [];
    let since = {};
    let size = 64;
    const flush = () => {
      if (!batch.length) return;
      const message = { op: "subscribe", product_ids: batch };
      if (Object.keys(since).length) message.since = since;
      conn.pendingSubscribes++;
      send(message);
      batch = [];
      since = {};
      size = 64;
    };
    for (const productId of ids) {
      const known = {};
      for (const [warehouseId, level] of levels.get(productId) || []) {
        known[warehouseId] = level.version;
      }
      const hasKnown = Object.keys(known).length > 0;
      const cost = productId.length * 2 + 8 + (hasKnown ? JSON.stringify(known).length : 0);
      if (size + cost > SUBSCRIBE_FRAME_BUDGET) flush();
      batch.push(productId);
      if (hasKnown) since[productId] = known;
      size += cost;
    }
    flush();
  }

  async function connect() {
    window.clearTimeout(conn.reconnectTimer);
    conn.reconnectTimer = 0;
    const generation = ++conn.generation;
    let ticket;
    try {
      ticket = await streamTicket();
    } catch {
      ticket = undefined; // unreachable: retried with backoff below
    }
    if (generation !== conn.generation || conn.socket) return; // superseded meanwhile
    if (ticket === undefined) {
      scheduleReconnect();
      return;
    }
    if (ticket === null) {
      showUnauthorized();
      return;
    }
    let socket;
    try {
      socket = new WebSocket(socketUrl(ticket));
    } catch (error) {
      showNotice(`Cannot open the WebSocket: ${error.message}`);
      scheduleReconnect();
      return;
    }
    conn.socket = socket;
    conn.opened = false;
    socket.onopen = () => {
      if (conn.socket !== socket) return;
      conn.opened = true;
      conn.lastRx = performance.now();
      conn.pendingSubscribes = 0;
      if (conn.everSynced) {
        conn.reconnects++;
        setState("reconnecting", "Reconnected; resyncing…");
      }
      if (products.length) subscribe(products);
      else markSynced();
    };
    socket.onmessage = (event) => {
      if (conn.socket === socket) onMessage(event);
    };
    socket.onclose = (event) => {
      if (conn.socket !== socket) return;
      const opened = conn.opened;
      conn.socket = null;
      conn.opened = false;
      onDisconnected(opened, event.code);
    };
  }

  /** Give up the current socket (e.g. silent for too long) and reconnect with backoff. */
  function dropSocket(reason) {
    const socket = conn.socket;
    if (!socket) return;
    const opened = conn.opened;
    conn.socket = null;
    conn.opened = false;
    socket.close(4000, reason.slice(0, 100));
    onDisconnected(opened, 0);
  }

  async function onDisconnected(opened, code) {
    conn.stale = true;
    conn.pendingSubscribes = 0;
    chromeDirty = true;
    scheduleFrame();
    if (!opened && (await handshakeRefused())) return;
    scheduleReconnect(code);
  }

  /**
   * A refused handshake looks like any other failure to a page (close code 1006), so ask
   * the HTTP API, which answers 401/403 for the same token. Then wait for a token instead
   * of hammering the server.
   */
  async function handshakeRefused() {
    const t = token();
    let response;
    try {
      response = await fetch("/v1/warehouses", {
        headers: t ? { Authorization: `Bearer ${t}` } : {},
        cache: "no-store",
      });
    } catch {
      return false; // the server is unreachable: keep retrying
    }
    if (response.status !== 401 && response.status !== 403) return false;
    if (conn.socket) return true; // a new token was entered meanwhile
    showUnauthorized();
    return true;
  }

  function showUnauthorized() {
    setState(
      "unauthorized",
      token()
        ? "Token rejected: enter a token with the read scope"
        : "Token needed: enter a read token",
    );
    ui.tokenInput.focus();
  }

  function scheduleReconnect(code) {
    if (conn.reconnectTimer || conn.socket) return; // already waiting, or reconnected meanwhile
    // Exponential backoff with jitter: a random delay in [cap/2, cap], cap doubling per try.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** conn.attempt);
    const delay = Math.round(cap / 2 + Math.random() * (cap / 2));
    conn.attempt++;
    const next = `attempt ${conn.attempt}, next try in ${(delay / 1000).toFixed(1)} s`;
    if (conn.everSynced) {
      const why = code === 4008 ? " (the page fell behind)" : "";
      setState("reconnecting", `Reconnecting${why}: ${next}`);
    } else {
      setState("connecting", `Cannot connect yet: ${next}`);
    }
    conn.reconnectTimer = window.setTimeout(connect, delay);
  }

  function reconnectNow() {
    window.clearTimeout(conn.reconnectTimer);
    conn.reconnectTimer = 0;
    conn.attempt = 0;
    const socket = conn.socket;
    conn.socket = null;
    conn.opened = false;
    if (socket) socket.close(1000, "reconnecting");
    conn.stale = true;
    setState(conn.everSynced ? "reconnecting" : "connecting", "Connecting…");
    connect();
  }

  function heartbeat() {
    if (!isOpen()) return;
    const idle = performance.now() - conn.lastRx;
    if (idle > DEAD_AFTER_IDLE_MS) {
      dropSocket("no answer to ping");
    } else if (
      idle > PING_AFTER_IDLE_MS &&
      performance.now() - conn.lastPing > PING_AFTER_IDLE_MS
    ) {
      conn.lastPing = performance.now();
      send({ op: "ping" });
    }
  }

  // ---------------------------------------------------------------- rendering

  function scheduleFrame() {
    if (frameRequested) return;
    frameRequested = true;
    window.requestAnimationFrame(render);
  }

  function setState(state, detail = "") {
    conn.state = state;
    conn.detail = detail;
    chromeDirty = true;
    scheduleFrame();
  }

  function render() {
    frameRequested = false;
    metrics.frames++;
    if (structureDirty) {
      buildTable();
      structureDirty = false;
      dirty.clear();
    } else if (dirty.size) {
      for (const [productId, cells] of dirty) {
        const row = rowViews.get(productId);
        if (!row) continue;
        for (const warehouseId of cells) renderCell(productId, warehouseId, row, true);
        renderTotal(productId, row);
        renderWaiting(productId, row);
      }
      dirty.clear();
    }
    ageHighlights(performance.now());
    if (chromeDirty) {
      renderChrome();
      chromeDirty = false;
    }
    if (metrics.pendingTs.length) {
      const stamps = metrics.pendingTs;
      const received = metrics.pendingRx;
      metrics.pendingTs = [];
      metrics.pendingRx = [];
      afterPaint(() => recordDelays(stamps, received));
    }
  }

  function recordDelays(stamps, received) {
    const nowEpochMs = performance.timeOrigin + performance.now();
    const nowPerf = performance.now();
    for (let i = 0; i < stamps.length; i++) {
      const slot = metrics.delayCount % DELAY_SAMPLES;
      metrics.delays[slot] = nowEpochMs - stamps[i] * 1000;
      metrics.pageDelays[slot] = nowPerf - received[i];
      metrics.delayCount++;
    }
    metrics.lastDelayMs = nowEpochMs - stamps[stamps.length - 1] * 1000;
  }

  function renderChrome() {
    ui.conn.dataset.state = conn.state;
    let text;
    switch (conn.state) {
      case "connecting":
        text = conn.detail || "Connecting…";
        break;
      case "connected":
        text = "Live";
        break;
      case "resynced":
        text = `Live · resynced after reconnect at ${conn.resyncedAt.toLocaleTimeString()}`;
        break;
      default:
        text = conn.detail || "Reconnecting…";
    }
    if (ui.connText.textContent !== text) ui.connText.textContent = text;
    ui.table.classList.toggle("is-stale", conn.stale && conn.everSynced);
    ui.table.setAttribute("aria-busy", String(conn.stale));
  }

  function buildTable() {
    rowViews.clear();
    highlights.strong.clear();
    highlights.faint.clear();
    ui.empty.hidden = products.length > 0;
    ui.table.hidden = products.length === 0;
    ui.captionMeta.textContent = products.length
      ? `(${products.length} product${products.length === 1 ? "" : "s"}, ` +
        `${warehouses.length} warehouse${warehouses.length === 1 ? "" : "s"})`
      : "";

    const top = document.createElement("tr");
    const sub = document.createElement("tr");
    top.append(th("Product", { scope: "col", rowSpan: 2 }));
    for (const warehouseId of warehouses) {
      top.append(th(warehouseId, { scope: "colgroup", colSpan: 3, className: "wh" }));
      for (const field of FIELDS) {
        sub.append(th(FIELD_LABELS[field], { scope: "col", className: `num ${field}` }));
      }
    }
    top.append(th("Total available", { scope: "col", rowSpan: 2, className: "num total" }));
    top.append(
      th("Waiting", {
        scope: "col",
        rowSpan: 2,
        className: "num waiting",
        title: "Waitlist entries waiting for stock",
      }),
    );
    const actions = th("", { scope: "col", rowSpan: 2 });
    const hidden = document.createElement("span");
    hidden.className = "visually-hidden";
    hidden.textContent = "Actions";
    actions.append(hidden);
    top.append(actions);
    ui.head.replaceChildren(top, sub);

    const fragment = document.createDocumentFragment();
    for (const productId of products) {
      const tr = document.createElement("tr");
      tr.dataset.product = productId;
      tr.append(th(productId, { scope: "row", className: "product" }));
      const cells = new Map();
      const known = snapshotted.has(productId);
      const byWarehouse = levels.get(productId);
      for (const warehouseId of warehouses) {
        const tds = FIELDS.map((field) => {
          const td = document.createElement("td");
          td.className = `num ${field}`;
          td.dataset.warehouse = warehouseId;
          td.dataset.field = field;
          td.textContent = known ? "–" : "…";
          tr.append(td);
          return td;
        });
        const view = { tds, values: [null, null, null] };
        cells.set(warehouseId, view);
        if (byWarehouse.has(warehouseId)) renderCell(productId, warehouseId, { cells }, false);
      }
      const total = document.createElement("td");
      total.className = "num total";
      tr.append(total);
      const waiting = document.createElement("td");
      waiting.className = "num waiting";
      tr.append(waiting);
      const remove = document.createElement("td");
      remove.className = "actions";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "remove";
      button.dataset.remove = productId;
      button.setAttribute("aria-label", `Stop watching ${productId}`);
      button.textContent = "×";
      remove.append(button);
      tr.append(remove);
      const row = { tr, total, waiting, cells };
      rowViews.set(productId, row);
      renderTotal(productId, row);
      renderWaiting(productId, row);
      if (known && byWarehouse.size === 0 && !kits.has(productId)) tr.classList.add("no-stock");
      fragment.append(tr);
    }
    ui.body.replaceChildren(fragment);
    chromeDirty = true;
  }

  function th(text, props) {
    const cell = document.createElement("th");
    cell.textContent = text;
    Object.assign(cell, props);
    return cell;
  }

  function renderCell(productId, warehouseId, row, flash) {
    const view = row.cells.get(warehouseId);
    const level = levels.get(productId)?.get(warehouseId);
    if (!view || !level) return;
    for (let i = 0; i < FIELDS.length; i++) {
      const value = level[FIELDS[i]];
      const previous = view.values[i];
      if (previous === value) continue;
      const td = view.tds[i];
      td.textContent = numberFormat.format(value);
      td.dataset.value = String(value);
      view.values[i] = value;
      if (flash && previous !== null) highlight(td, value > previous);
    }
    view.tds[0].parentElement.classList.remove("no-stock");
  }

  /*
   * Changed cells are highlighted in two steps (strong, then faint, then gone) by class
   * changes made in the frame loop. A CSS animation would look smoother, but at hundreds
   * of changes per second it repaints every animated cell on every frame, which costs
   * more than everything else on the page; steps cost three paints per change.
   */
  const highlights = { strong: new Map(), faint: new Map(), timer: 0 };

  function highlight(td, up) {
    td.dataset.dir = up ? "up" : "down";
    td.classList.remove("hl-faint");
    td.classList.add("hl-strong");
    highlights.faint.delete(td);
    highlights.strong.delete(td); // re-insert: the Maps stay ordered by time
    highlights.strong.set(td, performance.now());
  }

  function ageHighlights(now) {
    for (const [td, since] of highlights.strong) {
      if (now - since < HIGHLIGHT_STRONG_MS) break;
      highlights.strong.delete(td);
      td.classList.replace("hl-strong", "hl-faint");
      highlights.faint.set(td, since);
    }
    for (const [td, since] of highlights.faint) {
      if (now - since < HIGHLIGHT_TOTAL_MS) break;
      highlights.faint.delete(td);
      td.classList.remove("hl-faint");
    }
    // Come back when the oldest highlight is due for its next step.
    const oldestStrong = highlights.strong.values().next().value;
    const oldestFaint = highlights.faint.values().next().value;
    let next = Infinity;
    if (oldestStrong !== undefined) next = oldestStrong + HIGHLIGHT_STRONG_MS;
    if (oldestFaint !== undefined) next = Math.min(next, oldestFaint + HIGHLIGHT_TOTAL_MS);
    if (next !== Infinity && !highlights.timer) {
      highlights.timer = window.setTimeout(
        () => {
          highlights.timer = 0;
          scheduleFrame();
        },
        Math.max(16, next - now),
      );
    }
  }

  function renderTotal(productId, row) {
    const alert = alerts.get(productId);
    row.tr.classList.toggle("stock-low", alert === "low");
    row.tr.classList.toggle("stock-out", alert === "out");
    const kit = kits.get(productId);
    if (kit) {
      row.tr.classList.add("kit");
      row.tr.classList.remove("no-stock");
      const unit = kit.reservable === 1 ? "kit" : "kits";
      row.total.textContent = `${numberFormat.format(kit.reservable)} ${unit}`;
      row.total.dataset.value = String(kit.reservable);
      return;
    }
    const byWarehouse = levels.get(productId);
    if (!byWarehouse || byWarehouse.size === 0) {
      row.total.textContent = snapshotted.has(productId) ? "no stock" : "…";
      return;
    }
    let sum = 0;
    for (const level of byWarehouse.values()) sum += level.available;
    const text = numberFormat.format(sum);
    if (row.total.textContent !== text) row.total.textContent = text;
    row.total.dataset.value = String(sum);
  }

  function renderWaiting(productId, row) {
    const entry = waitlists.get(productId);
    const waiting = entry ? entry.waiting : 0;
    let text = entry ? numberFormat.format(waiting) : "…";
    if (kits.has(productId)) text = "–"; // a kit has no waitlist: its components do
    if (row.waiting.textContent !== text) row.waiting.textContent = text;
    row.waiting.dataset.value = String(waiting);
    row.waiting.title = entry
      ? `${numberFormat.format(waiting)} waiting for ${numberFormat.format(entry.units)} units`
      : "";
    row.tr.classList.toggle("waitlisted", waiting > 0);
  }

  function tick() {
    // Once a second: reservations/s (count of `stock` messages with event "reserved").
    const history = metrics.rateHistory;
    history.push(metrics.reservedThisSecond);
    history.shift();
    metrics.messageRate = metrics.messagesThisSecond;
    metrics.reservedThisSecond = 0;
    metrics.messagesThisSecond = 0;
    ui.rateValue.textContent = numberFormat.format(history[history.length - 1]);
    const max = Math.max(1, ...history);
    const step = 120 / (history.length - 1);
    ui.sparkline.setAttribute(
      "points",
      history
        .map((v, i) => `${(i * step).toFixed(1)},${(27 - (v / max) * 25).toFixed(1)}`)
        .join(" "),
    );
    const delay = metrics.lastDelayMs === null ? "–" : `${Math.round(metrics.lastDelayMs)} ms`;
    ui.stats.textContent =
      `${numberFormat.format(metrics.messageRate)} messages/s · last update delay ${delay}` +
      ` · ${conn.reconnects} reconnect${conn.reconnects === 1 ? "" : "s"}`;
    heartbeat();
  }

  // ---------------------------------------------------------------- notices and forms

  let noticeTimer = 0;
  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = false;
    window.clearTimeout(noticeTimer);
    noticeTimer = window.setTimeout(() => {
      ui.notice.hidden = true;
    }, 8000);
  }

  ui.addForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const { ids, bad } = parseProductList(ui.productInput.value);
    if (bad.length) {
      showNotice(`Not a product id (1-128 of A-Z a-z 0-9 . _ : -): ${bad.slice(0, 3).join(", ")}`);
    }
    addProducts(ids);
    ui.productInput.value = bad.join(", ");
  });

  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = ui.tokenInput.value.trim();
    try {
      if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      else window.sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      showNotice("This browser does not allow sessionStorage; the token lasts until reload.");
    }
    reconnectNow();
  });

  ui.body.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-remove]");
    if (button) removeProduct(button.dataset.remove);
  });

  // ---------------------------------------------------------------- debug hook (read-only)

  /** The samples in the ring buffer, oldest first. */
  function copyDelays(buffer) {
    const count = metrics.delayCount;
    if (count <= DELAY_SAMPLES) return Array.from(buffer.subarray(0, count));
    const next = count % DELAY_SAMPLES;
    return [...buffer.subarray(next), ...buffer.subarray(0, next)];
  }

  Object.defineProperty(window, "__dashboard", {
    value: Object.freeze({
      get state() {
        return conn.state;
      },
      get stale() {
        return conn.stale;
      },
      get frames() {
        return metrics.frames;
      },
      get messages() {
        return metrics.messages;
      },
      get applied() {
        return metrics.applied;
      },
      get ignored() {
        return metrics.ignored;
      },
      get reconnects() {
        return conn.reconnects;
      },
      get lastDelayMs() {
        return metrics.lastDelayMs;
      },
      get delayCount() {
        return metrics.delayCount;
      },
      get reservationsPerSecond() {
        return metrics.rateHistory[metrics.rateHistory.length - 1];
      },
      /** Reservations per second over the last minute, oldest first. */
      get reservationHistory() {
        return metrics.rateHistory.slice();
      },
      get products() {
        return products.slice();
      },
      get warehouses() {
        return warehouses.slice();
      },
      /** The waitlist length shown for a product ({waiting, units}), or null before the
       * first poll answered. */
      waitlist(productId) {
        const entry = waitlists.get(productId);
        return entry ? { ...entry } : null;
      },
      /** Server ts -> painted delays (ms) of the last DELAY_SAMPLES updates, oldest first. */
      delays: () => copyDelays(metrics.delays),
      /** Message received -> painted delays (ms), same samples. */
      pageDelays: () => copyDelays(metrics.pageDelays),
      /** What the table shows for one row: numbers, or null when nothing is shown. */
      cell(productId, warehouseId) {
        const view = rowViews.get(productId)?.cells.get(warehouseId);
        if (!view || view.values[0] === null) return null;
        const read = (td) => Number(td.dataset.value);
        return {
          quantity: read(view.tds[0]),
          reserved: read(view.tds[1]),
          available: read(view.tds[2]),
        };
      },
    }),
    enumerable: false,
  });

  // ---------------------------------------------------------------- product listing

  /**
   * Without ?products, watch the products the server has: the first page of
   * GET /v1/products, then more on request. While the server has none yet (a fresh
   * server before `inventory demo` seeds it), ask again every few seconds.
   */
  const LIST_PAGE = 50;
  let listAfter = "";

  async function listProducts() {
    const url = new URL("/v1/products", window.location.href);
    url.searchParams.set("limit", String(LIST_PAGE));
    if (listAfter) url.searchParams.set("after", listAfter);
    const t = token();
    let page = null;
    try {
      const response = await fetch(url, { headers: t ? { Authorization: `Bearer ${t}` } : {} });
      if (response.ok) page = await response.json();
      else if (response.status !== 401) showNotice(`Listing products failed (${response.status}).`);
    } catch {
      // unreachable: the connection state already says so; try again below
    }
    if (page === null || (!page.products.length && !listAfter && !products.length)) {
      window.setTimeout(listProducts, 3000);
      return;
    }
    addProducts(page.products.map((p) => p.product_id));
    listAfter = page.next_after || "";
    ui.more.hidden = !listAfter || products.length >= MAX_PRODUCTS;
  }

  ui.more.addEventListener("click", () => listProducts());

  // ---------------------------------------------------------------- start

  const initial = parseProductList(
    new URLSearchParams(window.location.search).get("products"),
    ",",
  );
  if (initial.bad.length) {
    showNotice(`Ignored invalid product ids: ${initial.bad.slice(0, 3).join(", ")}`);
  }
  ui.tokenInput.value = token();
  addProducts(initial.ids);
  if (!initial.ids.length && !initial.bad.length) listProducts();
  structureDirty = true;
  scheduleFrame();
  window.setInterval(tick, 1000);
  window.setInterval(refreshWaitlists, WAITLIST_POLL_MS);
  document.addEventListener("visibilitychange", refreshWaitlists);
  connect();
})();
