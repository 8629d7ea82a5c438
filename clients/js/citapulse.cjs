// Generated from citapulse.js by scripts/cjs.mjs: do not edit.
"use strict";
// citapulse.js — dependency-free client for the citapulse WebSocket API.
// Works in browsers and in Node >= 22 (global WebSocket), or pass `WebSocket` in options.

/** Close codes sent by the daemon. */
const CloseCodes = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, POLICY: 1008, TOO_BIG: 1009, TOKEN_EXPIRED: 4001, REVOKED: 4003,
  SLOW_CONSUMER: 4008,
});

const OPEN = 1;

// Channel names, as the daemon parses them (src/auth.rs `Channel::parse`).
const TENANT_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const PERSON_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
const PREFIXES = { tenant: "estadisticas:", user: "usuario:", role: "rol:" };
/** Refusals of the probe that no retry with the same token can change. */
const FINAL_REFUSALS = new Set(["token_invalid", "token_expired", "token_missing", "token_revoked"]);
/** How long the probe of a failed handshake may take (the reconnect waits for it). */
const PROBE_TIMEOUT_MS = 5000;

/** `estadisticas:<tenant>`: the tenant's events, stats and presence. Throws TypeError on a bad tenant. */
function tenantChannel(tenant) {
  return PREFIXES.tenant + checkPart(tenant, TENANT_RE, "tenant", "1-64 characters of [A-Za-z0-9_.-]");
}

/** `usuario:<tenant>:<user>`: events routed to one user. Throws TypeError on a bad part. */
function userChannel(tenant, user) {
  return personChannel("user", tenant, user);
}

/** `rol:<tenant>:<role>`: events emitted to one role. Throws TypeError on a bad part. */
function roleChannel(tenant, role) {
  return personChannel("role", tenant, role);
}

/**
 * Parse a channel name: `{kind: "tenant"|"user"|"role", tenant, user?, role?}`, or null if the
 * daemon would refuse it as a bad name.
 */
function parseChannel(name) {
  if (typeof name !== "string") return null;
  if (name.startsWith(PREFIXES.tenant)) {
    const tenant = name.slice(PREFIXES.tenant.length);
    return TENANT_RE.test(tenant) ? { kind: "tenant", tenant } : null;
  }
  for (const kind of ["user", "role"]) {
    if (!name.startsWith(PREFIXES[kind])) continue;
    const rest = name.slice(PREFIXES[kind].length);
    const i = rest.indexOf(":");
    if (i < 0) return null;
    const tenant = rest.slice(0, i), who = rest.slice(i + 1);
    return TENANT_RE.test(tenant) && PERSON_RE.test(who) ? { kind, tenant, [kind]: who } : null;
  }
  return null;
}

function personChannel(kind, tenant, who) {
  checkPart(tenant, TENANT_RE, "tenant", "1-64 characters of [A-Za-z0-9_.-]");
  checkPart(who, PERSON_RE, kind, "1-128 characters of [A-Za-z0-9_.@-]");
  return `${PREFIXES[kind]}${tenant}:${who}`;
}

function checkPart(value, re, what, rule) {
  if (typeof value !== "string" || !re.test(value)) {
    throw new TypeError(`citapulse: invalid ${what} ${JSON.stringify(value)} (${rule})`);
  }
  return value;
}

/** A failed request (e.g. `presence()`): `code` is the server's error code, or "timeout" / "closed". */
class CitapulseError extends Error {
  constructor(code, message, channel) {
    super(message || code);
    this.name = "CitapulseError";
    this.code = code;
    if (channel != null) this.channel = channel;
  }
}

/**
 * One channel of a client, as `client.subscribe(channel)` returns it: its own state, resume
 * position and listeners. Not constructed directly; `subscribe()` twice on a channel gives the
 * same object, until `unsubscribe()`.
 *
 * States: "subscribing" (sent, or waiting for the connection: every (re)connect subscribes
 * again, resuming after `lastEventId`), "subscribed" (the server accepted it), "error" (the
 * server refused it, e.g. `forbidden`, or dropped it after a token refresh; tried again after
 * the next reconnect or on `client.subscribe(channel)`), "unsubscribed" (after `unsubscribe()`:
 * the object is done, a later `subscribe()` returns a new one).
 */
class Subscription {
  constructor(client, channel) {
    /** The channel name. */
    this.channel = channel;
    this._client = client;
    this._state = "subscribing";
    this._lastId = null;
    // Recently delivered event ids, oldest first in `_order` (duplicates are dropped).
    this._seen = new Set();
    this._order = [];
    /** @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** The last error about this channel (ErrorData), or null. */
    this.error = null;
  }

  /** @returns {"subscribing"|"subscribed"|"unsubscribed"|"error"} */
  get state() { return this._state; }

  /** Id of the last event delivered on this channel: where a reconnect resumes (null: none yet). */
  get lastEventId() { return this._lastId; }

  /**
   * Listen to this channel only. Types: any message type delivered on the channel ("stats",
   * "cita_created", custom events, "presence", "presence_join", "presence_leave"), "*" (every
   * message of the channel), "subscribed", "error" (a refused subscribe, and errors naming this
   * channel: history_expired, unavailable, forbidden after a token refresh), "reload" (history
   * expired: reload your state; a fresh snapshot follows) and "state" (the new state).
   * @returns {() => void} function that removes the listener
   */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  /** Remove a listener added with `on`. */
  off(type, fn) { this._listeners.get(type)?.delete(fn); }

  /** Leave the channel (the client's `unsubscribe(channel)`); the state becomes "unsubscribed". */
  unsubscribe() {
    if (this._client._channels.get(this.channel) === this) this._client.unsubscribe(this.channel);
    else this._setState("unsubscribed");
  }

  /** Who is online (tenant channels): the client's `presence(channel)`. */
  presence(opts) { return this._client.presence(this.channel, opts); }

  /** The members list kept for this channel: the client's `members(channel)`. */
  members() { return this._client.members(this.channel); }

  _setState(s) {
    if (s === this._state) return;
    this._state = s;
    this._emit("state", s);
  }

  /** Records an event id; false if it was delivered already (at-least-once replay). */
  _delivered(id, dedupeSize) {
    if (this._seen.has(id)) return false;
    this._seen.add(id);
    this._order.push(id);
    if (this._order.length > dedupeSize) this._seen.delete(this._order.shift());
    this._lastId = id; // most recently delivered, not max: the server handles late commits
    return true;
  }

  _emit(type, arg) { emitTo(this._listeners, type, arg); }
}

function emitTo(listeners, type, arg) {
  const set = listeners.get(type);
  if (!set) return;
  for (const fn of [...set]) {
    try { fn(arg); } catch (e) { console.error(`citapulse: "${type}" listener threw`, e); }
  }
}

// Server messages that answer one client message. The server handles a connection's
// messages in order and answers each with exactly one of these (or an error without a
// channel), so replies are matched to requests by position.
const REPLY_TYPES = new Set(["subscribed", "unsubscribed", "pong", "authenticated", "presence"]);

/**
 * Live client for citapulse: reconnects with exponential backoff + full jitter,
 * re-subscribes with `since` to resume, drops duplicate event ids (at-least-once delivery).
 *
 * @example
 * const c = new CitapulseClient({ token });
 * c.on("stats", (m) => render(m.data));
 * c.on("state", (s) => console.log(s));
 * c.subscribe(CitapulseClient.tenantChannel("negocio_123"));
 * c.subscribe(CitapulseClient.userChannel("negocio_123", "prof-7")); // same resume rules
 * c.connect();
 * c.onPresenceJoin((users) => console.log("online:", users.map((u) => u.user_id)));
 * c.presence("estadisticas:negocio_123").then((users) => console.log(users));
 */
class CitapulseClient {
  /**
   * @param {object} [opts]
   * @param {string} [opts.url] WebSocket URL; default `ws(s)://<location.host>/ws`.
   * @param {string} [opts.token] JWT, sent in the WebSocket subprotocol list (`citapulse, <jwt>`),
   *   which proxies do not log, unless `tokenIn` says "query".
   * @param {"protocol"|"query"} [opts.tokenIn="protocol"] Where the token travels: the subprotocol
   *   list, or `?token=` (for proxies that drop `Sec-WebSocket-Protocol`).
   * @param {() => (string|Promise<string>)} [opts.getToken] Fetches a fresh token (initially if no token,
   *   on close 4001, after a failed handshake, and shortly before the current JWT's `exp`).
   * @param {{initialMs?: number, maxMs?: number}} [opts.backoff] Reconnect backoff (default 500 / 15000 ms).
   * @param {number} [opts.pingIntervalMs=25000] Keep-alive ping interval while open.
   * @param {number} [opts.stableMs=5000] Open this long before the backoff resets.
   * @param {number} [opts.dedupeSize=2048] Remembered event ids per channel.
   * @param {number} [opts.requestTimeoutMs=10000] How long `presence()` waits for its answer.
   * @param {typeof WebSocket} [opts.WebSocket] WebSocket constructor (default globalThis.WebSocket).
   * @param {typeof fetch} [opts.fetch] fetch, for the probe after a failed handshake (default globalThis.fetch).
   */
  constructor(opts = {}) {
    this.url = opts.url || defaultUrl();
    this.token = opts.token || null;
    this.getToken = opts.getToken || null;
    this.backoff = { initialMs: 500, maxMs: 15000, ...(opts.backoff || {}) };
    this.pingIntervalMs = opts.pingIntervalMs ?? 25000;
    this.stableMs = opts.stableMs ?? 5000;
    this.dedupeSize = opts.dedupeSize ?? 2048;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 10000;
    this.tokenIn = opts.tokenIn === "query" ? "query" : "protocol";
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    this.fetch = opts.fetch || globalThis.fetch?.bind(globalThis) || null;
    if (!this.WebSocket) throw new Error("citapulse: no WebSocket implementation; pass opts.WebSocket");
    /** @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** @type {Map<string, Subscription>} */ this._channels = new Map();
    // Who is online per subscribed tenant channel (user_id -> entry), once a presence answer arrived.
    /** @type {Map<string, Map<string, object>>} */ this._members = new Map();
    // presence() calls not settled yet.
    /** @type {Set<{channel: string, resolve: Function, reject: Function, timer: any, done: boolean}>} */
    this._presenceReqs = new Set();
    // One entry per message sent on the current socket and not answered yet: its presence
    // request, `{sub}` for a subscribe, or null.
    this._replies = [];
    this._ws = null;
    this._state = "closed";
    this._stopped = true;
    this._attempt = 0;
    this._freshToken = false;
    this._refusals = 0; // refused handshakes since the last open (a fresh token is tried once)
    this._probeAbort = null; // the probe in flight, aborted by close()
    this._gen = 0; // bumped by connect()/close() so stale async attempts abort
    this._timers = { reconnect: null, ping: null, stable: null, refresh: null };
    // Back online after the browser lost its network: try now instead of after the backoff.
    this._onOnline = () => {
      if (!this._stopped && this._timers.reconnect != null) {
        clearTimeout(this._timers.reconnect);
        this._timers.reconnect = null;
        this._open("reconnecting");
      }
    };
  }

  /** `estadisticas:<tenant>` (validated). */
  static tenantChannel(tenant) { return tenantChannel(tenant); }
  /** `usuario:<tenant>:<user>` (validated). */
  static userChannel(tenant, user) { return userChannel(tenant, user); }
  /** `rol:<tenant>:<role>` (validated). */
  static roleChannel(tenant, role) { return roleChannel(tenant, role); }
  /** Parsed channel name, or null if invalid. */
  static parseChannel(name) { return parseChannel(name); }

  /**
   * Current connection state. "unauthorized": the token was refused (a refused handshake, or a
   * 4001 close without `getToken`; with `getToken`, after a fresh token was refused too);
   * "revoked": the user was revoked (close 4003, or a handshake refused as revoked). Neither
   * reconnects: call `connect()` with a new token.
   * @returns {"connecting"|"open"|"reconnecting"|"closed"|"unauthorized"|"revoked"}
   */
  get state() { return this._state; }

  /**
   * Register a listener. Types: any server message type ("stats", "cita_created", "presence",
   * "presence_join", "presence_leave", ...), "*" (every channel message), "state", "error", "reload",
   * "connected", "subscribed", "pong", and "members" ({channel, users}: `members(channel)` changed).
   * @returns {() => void} function that removes the listener
   */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  /**
   * Subscribe to a channel (`estadisticas:T`, `usuario:T:U` or `rol:T:R`; see the channel helpers);
   * `since` seeds the resume point (e.g. from localStorage). Resumed after every reconnect.
   * Returns the channel's {@link Subscription}: the same object for the same channel until it is
   * unsubscribed. Sends nothing for a channel already subscribed or being subscribed.
   * @returns {Subscription}
   */
  subscribe(channel, { since } = {}) {
    let sub = this._channels.get(channel);
    const fresh = !sub;
    if (fresh) this._channels.set(channel, (sub = new Subscription(this, channel)));
    if (since != null) sub._lastId = since;
    if (fresh || sub.state === "error") {
      sub._setState("subscribing");
      this._sendSubscribe(sub);
    }
    return sub;
  }

  /** The channel's Subscription, or null if it is not subscribed. */
  subscription(channel) { return this._channels.get(channel) ?? null; }

  /** Stop receiving a channel and forget its resume state; its Subscription becomes "unsubscribed". */
  unsubscribe(channel) {
    const sub = this._channels.get(channel);
    if (!sub) return;
    this._channels.delete(channel);
    sub._setState("unsubscribed");
    this._dropMembers(channel);
    this._send({ type: "unsubscribe", data: { channel } });
  }

  /**
   * Who is online in a tenant: resolves with the `users` of the server's `presence` answer for
   * `channel` (an `estadisticas:<tenant>` name), rejects with a CitapulseError on an error answer
   * (which then does not reach "error" listeners), on timeout (code "timeout") or on close()
   * (code "closed"). Sent as soon as the socket is open; resent after a reconnect. For a subscribed
   * channel, the answer also starts `members(channel)`.
   * @param {string} channel
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<Array<{user_id: string, role: string|null, connections: number, since: number}>>}
   */
  presence(channel, { timeoutMs } = {}) {
    if (parseChannel(channel)?.kind !== "tenant") {
      return Promise.reject(new CitapulseError("bad_request",
        `presence is kept for estadisticas:<tenant> channels, not ${JSON.stringify(channel)}`, channel));
    }
    return new Promise((resolve, reject) => {
      const req = { channel, resolve, reject, timer: null, done: false };
      const ms = timeoutMs ?? this.requestTimeoutMs;
      req.timer = setTimeout(() => this._settle(req, new CitapulseError("timeout",
        `no presence answer within ${ms} ms`, channel)), ms);
      this._presenceReqs.add(req);
      this._send({ type: "presence", data: { channel } }, req);
    });
  }

  /**
   * Users currently online in a subscribed tenant channel, sorted by user_id: the last presence
   * answer updated with every presence_join / presence_leave since, refreshed automatically after
   * a reconnect. Null until a `presence(channel)` answer arrived (or after unsubscribe). Connection
   * counts are those of the answer or join that listed the user.
   */
  members(channel) {
    const map = this._members.get(channel);
    if (!map) return null;
    return [...map.values()].sort((a, b) => (a.user_id < b.user_id ? -1 : a.user_id > b.user_id ? 1 : 0));
  }

  /** Call `fn(users, channel, msg)` for each presence_join (users whose first connection arrived). */
  onPresenceJoin(fn) {
    return this.on("presence_join", (m) => fn(m.data?.users || [], m.channel, m));
  }

  /** Call `fn(users, channel, msg)` for each presence_leave (users gone; `connections` is 0). */
  onPresenceLeave(fn) {
    return this.on("presence_leave", (m) => fn(m.data?.users || [], m.channel, m));
  }

  /** Id of the last event delivered on `channel` (for persistence / resume), or null. */
  lastEventId(channel) { return this._channels.get(channel)?.lastEventId ?? null; }

  /** Replace the token; sent to the server at once if connected, used on later reconnects. */
  setToken(token) {
    this.token = token;
    this._send({ type: "auth", data: { token } });
    this._scheduleRefresh();
  }

  /** Start (or restart) the connection. No-op if already running. */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    this._attempt = 0;
    this._refusals = 0;
    this._gen++;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open("connecting");
  }

  /** Close for good (no reconnect). */
  close() {
    this._stop();
    this._setState("closed");
  }

  _stop() {
    globalThis.removeEventListener?.("online", this._onOnline);
    this._probeAbort?.abort();
    this._stopped = true;
    this._gen++;
    this._clearTimers();
    this._replies = [];
    this._awaitConnection();
    for (const req of [...this._presenceReqs]) this._settle(req, new CitapulseError("closed", "client closed", req.channel));
    const ws = this._ws;
    this._ws = null;
    if (ws) try { ws.close(1000); } catch { /* ignore */ }
  }

  // ---- internals ----

  async _open(state) {
    const gen = this._gen;
    this._setState(state);
    if (this.getToken && (!this.token || this._freshToken)) {
      try { this.token = await this.getToken(); this._freshToken = false; }
      catch (e) { this._emit("error", { code: "token_error", message: String(e?.message || e) }); }
      if (this._stopped || gen !== this._gen) return;
      if (!this.token) return this._scheduleReconnect();
    }
    let url = this.url;
    let protocols = ["citapulse"];
    if (this.token && this.tokenIn === "query") {
      url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.token);
    } else if (this.token) {
      protocols = ["citapulse", this.token];
    }
    let ws;
    try { ws = new this.WebSocket(url, protocols); } catch (e) {
      this._emit("error", { code: "connect_failed", message: String(e?.message || e) });
      return this._scheduleReconnect();
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      opened = true;
      this._refusals = 0;
      this._setState("open");
      for (const sub of this._channels.values()) {
        sub._setState("subscribing");
        this._sendSubscribe(sub);
      }
      // Presence answers lost with the old socket, and members() that may have missed changes.
      const asked = new Set();
      for (const req of this._presenceReqs) {
        asked.add(req.channel);
        this._send({ type: "presence", data: { channel: req.channel } }, req);
      }
      for (const channel of this._members.keys()) {
        if (!asked.has(channel)) this.presence(channel).catch(() => { /* retried after the next reconnect */ });
      }
      this._timers.ping = setInterval(() => this._send({ type: "ping" }), this.pingIntervalMs);
      this._timers.stable = setTimeout(() => { this._attempt = 0; }, this.stableMs);
      this._scheduleRefresh();
    };
    ws.onmessage = (ev) => { if (this._ws === ws) this._handle(ev.data); };
    // A close event follows an error in browsers; Node 20's WebSocket sends none after a
    // failed handshake, so an error before open ends the attempt here (the later close, if
    // any, finds `_ws` changed and is ignored).
    ws.onerror = () => { if (!opened) ws.onclose?.({ code: 1006 }); };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._clearTimers();
      this._replies = [];
      this._awaitConnection();
      if (this._stopped) return this._setState("closed");
      const code = ev?.code;
      if (code === CloseCodes.REVOKED) {
        // Revoked: every reconnect with this user's tokens would be refused.
        this._stop();
        return this._setState("revoked");
      }
      if (code === CloseCodes.TOKEN_EXPIRED) {
        if (!this.getToken) { this._stop(); return this._setState("unauthorized"); }
        this._freshToken = true;
        return this._open("reconnecting");
      }
      if (opened) return this._scheduleReconnect();
      this._afterFailedHandshake();
    };
  }

  /**
   * A socket closed before it opened: a refused token (HTTP 401) or a network failure, which
   * page code cannot tell apart. One probe says which; a refused token is not retried (with
   * `getToken`: after one fresh token), anything else reconnects with backoff.
   */
  async _afterFailedHandshake() {
    const gen = this._gen;
    const verdict = await this._probe();
    if (this._stopped || gen !== this._gen) return;
    if (verdict.refused) {
      if (this.getToken && this._refusals++ === 0) {
        // The token may have expired or been rotated meanwhile: one fresh one.
        this._freshToken = true;
        return this._open("reconnecting");
      }
      this._emit("error", { code: verdict.code || "unauthorized", message: "the server refused the token" });
      this._stop();
      return this._setState(verdict.code === "token_revoked" ? "revoked" : "unauthorized");
    }
    // Unknown (no answer, or not the daemon's): a fresh token cannot hurt, as before probes.
    if (!verdict.accepted && this.getToken) this._freshToken = true;
    this._scheduleReconnect();
  }

  /**
   * Asks the daemon over HTTP whether the token is accepted: `GET /ws` without an upgrade
   * answers 401 (refused; body `{error, message}`) or 426 (accepted). Resolves
   * `{refused, code}`, `{accepted}` or `{}` (no answer, or some other status).
   */
  async _probe() {
    let url;
    try { url = probeUrl(this.url); } catch { return {}; }
    if (!this.fetch || !url) return {};
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    this._probeAbort = abort;
    // Short: the reconnect backoff waits for it.
    const timer = setTimeout(() => abort?.abort(), Math.min(this.requestTimeoutMs, PROBE_TIMEOUT_MS));
    try {
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      // No cookies, and no redirect: the token goes to the daemon's own URL only.
      const res = await this.fetch(url, { headers, credentials: "omit", redirect: "error", signal: abort?.signal });
      if (res.status !== 401) {
        try { await res.body?.cancel?.(); } catch { /* already read or gone */ }
        return res.status === 426 ? { accepted: true } : {};
      }
      let code = null;
      try { code = (await res.json())?.error ?? null; } catch { /* not the daemon's JSON */ }
      // Only the daemon's own verdicts that no retry can change end the client; a 401 of
      // something else (a proxy), or an unknown key id (a key rotation the daemon may not
      // have read yet), backs off and tries again.
      return FINAL_REFUSALS.has(code) ? { refused: true, code } : {};
    } catch {
      return {};
    } finally {
      clearTimeout(timer);
      if (this._probeAbort === abort) this._probeAbort = null;
    }
  }

  /** The connection is gone: every subscription waits for the next one. */
  _awaitConnection() {
    for (const sub of this._channels.values()) {
      if (sub.state === "subscribed") sub._setState("subscribing");
    }
  }

  _scheduleReconnect() {
    if (this._stopped) return;
    this._setState("reconnecting");
    const cap = Math.min(this.backoff.maxMs, this.backoff.initialMs * 2 ** this._attempt++);
    const delay = Math.random() * cap; // full jitter
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      if (!this._stopped) this._open("reconnecting");
    }, delay);
  }

  _scheduleRefresh() {
    clearTimeout(this._timers.refresh);
    const exp = jwtExp(this.token);
    if (!this.getToken || !exp || !this._ws) return;
    const inMs = Math.max(5000, exp * 1000 - Date.now() - 60000);
    this._timers.refresh = setTimeout(async () => {
      try { const t = await this.getToken(); if (t) this.setToken(t); }
      catch (e) { this._emit("error", { code: "token_error", message: String(e?.message || e) }); }
    }, Math.min(inMs, 2 ** 31 - 1));
  }

  _handle(raw) {
    let msg;
    try { msg = JSON.parse(typeof raw === "string" ? raw : String(raw)); } catch { return; }
    if (!msg || typeof msg.type !== "string") return;
    const isReply = REPLY_TYPES.has(msg.type)
      || (msg.type === "error" && msg.channel == null && msg.data?.channel == null);
    // A presence request, `{sub}` for a subscribe, or null.
    const entry = isReply ? this._replies.shift() : null;
    const answeredSub = entry && "sub" in entry ? entry.sub : null;
    const answered = answeredSub ? null : entry; // a presence request, or null
    const sub = msg.channel != null ? this._channels.get(msg.channel) : undefined;
    if (typeof msg.id === "number" && sub && !sub._delivered(msg.id, this.dedupeSize)) return;
    if (msg.type === "error") return this._error(msg, answered, answeredSub);
    if (msg.type === "presence") this._presenceAnswer(msg, answered);
    else if (msg.type === "presence_join" || msg.type === "presence_leave") this._presenceChange(msg);
    if (msg.type === "subscribed" && sub) sub._setState("subscribed");
    this._emit(msg.type, msg);
    if (msg.channel != null) this._emit("*", msg);
    if (sub && this._channels.get(msg.channel) === sub) {
      sub._emit(msg.type, msg);
      if (msg.type !== "subscribed") sub._emit("*", msg);
    }
  }

  /** An `error`: the answer to a presence request or a subscribe, or about a channel. */
  _error(msg, answered, answeredSub) {
    const d = msg.data || {};
    if (answered) {
      // A presence request failed: its promise carries the error.
      if (d.code === "bad_request" || d.code === "forbidden") this._dropMembers(answered.channel);
      return this._settle(answered, new CitapulseError(d.code || "error", d.message, answered.channel));
    }
    // A refused subscribe (the reply names no channel), or an error naming one.
    const target = answeredSub ? answeredSub.channel : (msg.channel ?? d.channel);
    const sub = target != null ? this._channels.get(target) : undefined;
    const live = sub && (!answeredSub || sub === answeredSub) ? sub : null;
    const data = target != null && d.channel == null ? { ...d, channel: target } : d;
    if (live) {
      live.error = data;
      // Refused, or dropped by a refreshed token; history_expired and unavailable leave it on.
      if (answeredSub || d.code === "forbidden") live._setState("error");
    }
    this._emit("error", data);
    live?._emit("error", data);
    if (d.code === "history_expired") {
      const channels = target != null ? [target] : [...this._channels.keys()];
      for (const c of channels) {
        const s = this._channels.get(c);
        if (s) s._lastId = null; // resume point is gone; a fresh snapshot follows
        this._emit("reload", c);
        s?._emit("reload", c);
      }
    }
  }

  _presenceAnswer(msg, answered) {
    const users = Array.isArray(msg.data?.users) ? msg.data.users : [];
    let req = answered;
    if (!req || req.channel !== msg.channel) {
      // Out of step (should not happen): resynchronise on the first request for this channel.
      const i = this._replies.findIndex((r) => r && r.channel === msg.channel);
      req = i >= 0 ? this._replies[i] : null;
      if (i >= 0) this._replies.splice(0, i + 1);
    }
    if (this._channels.has(msg.channel)) {
      this._members.set(msg.channel, new Map(users.map((u) => [u.user_id, u])));
      this._emitMembers(msg.channel);
    }
    if (req) this._settle(req, null, users);
  }

  _presenceChange(msg) {
    const map = this._members.get(msg.channel);
    if (!map) return; // not tracked: members() starts with a presence() answer
    for (const u of Array.isArray(msg.data?.users) ? msg.data.users : []) {
      if (msg.type === "presence_join") map.set(u.user_id, u);
      else map.delete(u.user_id);
    }
    this._emitMembers(msg.channel);
  }

  _dropMembers(channel) {
    if (this._members.delete(channel)) this._emitMembers(channel);
  }

  _emitMembers(channel) {
    this._emit("members", { channel, users: this.members(channel) });
  }

  _settle(req, err, users) {
    if (req.done) return;
    req.done = true;
    clearTimeout(req.timer);
    this._presenceReqs.delete(req);
    if (err) req.reject(err); else req.resolve(users);
  }

  _sendSubscribe(sub) {
    const { channel, lastEventId: since } = sub;
    this._send({ type: "subscribe", data: since != null ? { channel, since } : { channel } }, { sub });
  }

  /** Sends one message; `req` is what its reply answers: a presence request, `{sub}`, or null. */
  _send(obj, req = null) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try { ws.send(JSON.stringify(obj)); } catch { return false; }
    this._replies.push(req); // every client message gets exactly one reply
    return true;
  }

  _setState(s) {
    if (s === this._state) return;
    this._state = s;
    this._emit("state", s);
  }

  _emit(type, arg) { emitTo(this._listeners, type, arg); }

  _clearTimers() {
    clearInterval(this._timers.ping);
    for (const k of ["reconnect", "stable", "refresh"]) { clearTimeout(this._timers[k]); this._timers[k] = null; }
  }
}

/** The probe's address: the WebSocket URL with http(s) for ws(s). */
function probeUrl(wsUrl) {
  const u = new URL(wsUrl, globalThis.location?.href);
  if (u.protocol === "ws:") u.protocol = "http:";
  else if (u.protocol === "wss:") u.protocol = "https:";
  else if (u.protocol !== "http:" && u.protocol !== "https:") return null;
  return u.href;
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new Error("citapulse: opts.url is required outside a browser");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/** Read `exp` (seconds) from a JWT without verifying it; null if not decodable. */
function jwtExp(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = typeof atob === "function" ? atob(b64) : Buffer.from(b64, "base64").toString();
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch { return null; }
}

module.exports = { CloseCodes, tenantChannel, userChannel, roleChannel, parseChannel, CitapulseError, Subscription, CitapulseClient, default: CitapulseClient };
