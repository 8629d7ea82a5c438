// citapulse.js — dependency-free client for the citapulse WebSocket API.
// Works in browsers and in Node >= 22 (global WebSocket), or pass `WebSocket` in options.

/** Close codes sent by the daemon. */
export const CloseCodes = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, POLICY: 1008, TOO_BIG: 1009, TOKEN_EXPIRED: 4001, REVOKED: 4003,
  SLOW_CONSUMER: 4008,
});

const OPEN = 1;

// Channel names, as the daemon parses them (src/auth.rs `Channel::parse`).
const TENANT_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const PERSON_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
const PREFIXES = { tenant: "estadisticas:", user: "usuario:", role: "rol:" };

/** `estadisticas:<tenant>`: the tenant's events, stats and presence. Throws TypeError on a bad tenant. */
export function tenantChannel(tenant) {
  return PREFIXES.tenant + checkPart(tenant, TENANT_RE, "tenant", "1-64 characters of [A-Za-z0-9_.-]");
}

/** `usuario:<tenant>:<user>`: events routed to one user. Throws TypeError on a bad part. */
export function userChannel(tenant, user) {
  return personChannel("user", tenant, user);
}

/** `rol:<tenant>:<role>`: events emitted to one role. Throws TypeError on a bad part. */
export function roleChannel(tenant, role) {
  return personChannel("role", tenant, role);
}

/**
 * Parse a channel name: `{kind: "tenant"|"user"|"role", tenant, user?, role?}`, or null if the
 * daemon would refuse it as a bad name.
 */
export function parseChannel(name) {
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
export class CitapulseError extends Error {
  constructor(code, message, channel) {
    super(message || code);
    this.name = "CitapulseError";
    this.code = code;
    if (channel != null) this.channel = channel;
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
export class CitapulseClient {
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
    if (!this.WebSocket) throw new Error("citapulse: no WebSocket implementation; pass opts.WebSocket");
    /** @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** @type {Map<string, {lastId: number|null, seen: Set<number>, order: number[]}>} */ this._channels = new Map();
    // Who is online per subscribed tenant channel (user_id -> entry), once a presence answer arrived.
    /** @type {Map<string, Map<string, object>>} */ this._members = new Map();
    // presence() calls not settled yet.
    /** @type {Set<{channel: string, resolve: Function, reject: Function, timer: any, done: boolean}>} */
    this._presenceReqs = new Set();
    // One entry per message sent on the current socket and not answered yet: its presence request, or null.
    this._replies = [];
    this._ws = null;
    this._state = "closed";
    this._stopped = true;
    this._attempt = 0;
    this._freshToken = false;
    this._gen = 0; // bumped by connect()/close() so stale async attempts abort
    this._timers = { reconnect: null, ping: null, stable: null, refresh: null };
    // Back online after the browser lost its network: try now instead of after the backoff.
    this._onOnline = () => {
      if (!this._stopped && this._state === "reconnecting" && !this._ws) {
        clearTimeout(this._timers.reconnect);
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
   * Current connection state. "unauthorized": a 4001 close without `getToken`; "revoked": the
   * user was revoked (close 4003). Neither reconnects: call `connect()` with a new token.
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
   */
  subscribe(channel, { since } = {}) {
    let ch = this._channels.get(channel);
    if (!ch) this._channels.set(channel, (ch = { lastId: null, seen: new Set(), order: [] }));
    if (since != null) ch.lastId = since;
    this._sendSubscribe(channel);
  }

  /** Stop receiving a channel and forget its resume state. */
  unsubscribe(channel) {
    if (!this._channels.delete(channel)) return;
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
  lastEventId(channel) { return this._channels.get(channel)?.lastId ?? null; }

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
    this._stopped = true;
    this._gen++;
    this._clearTimers();
    this._replies = [];
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
      this._setState("open");
      for (const channel of this._channels.keys()) this._sendSubscribe(channel);
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
    ws.onerror = () => { /* a close event always follows */ };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._clearTimers();
      this._replies = [];
      if (this._stopped) return this._setState("closed");
      const code = ev?.code;
      if (code === CloseCodes.REVOKED) {
        // Revoked: every reconnect with this user's tokens would be refused.
        this._stop();
        return this._setState("revoked");
      }
      if (code === CloseCodes.TOKEN_EXPIRED || (!opened && this.getToken)) {
        // 4001, or a failed handshake (possibly HTTP 401): fetch a fresh token before retrying.
        if (!this.getToken) { this._stop(); return this._setState("unauthorized"); }
        this._freshToken = true;
        if (code === CloseCodes.TOKEN_EXPIRED) return this._open("reconnecting");
      }
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    if (this._stopped) return;
    this._setState("reconnecting");
    const cap = Math.min(this.backoff.maxMs, this.backoff.initialMs * 2 ** this._attempt++);
    const delay = Math.random() * cap; // full jitter
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => { if (!this._stopped) this._open("reconnecting"); }, delay);
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
    const answered = isReply ? this._replies.shift() : null; // a presence request, or null
    const ch = msg.channel != null ? this._channels.get(msg.channel) : undefined;
    if (typeof msg.id === "number" && ch) {
      if (ch.seen.has(msg.id)) return; // duplicate from at-least-once replay
      ch.seen.add(msg.id);
      ch.order.push(msg.id);
      if (ch.order.length > this.dedupeSize) ch.seen.delete(ch.order.shift());
      ch.lastId = msg.id; // most recently delivered, not max: the server handles late commits
    }
    if (msg.type === "error") {
      if (answered) {
        // A presence request failed: its promise carries the error.
        const d = msg.data || {};
        if (d.code === "bad_request" || d.code === "forbidden") this._dropMembers(answered.channel);
        return this._settle(answered, new CitapulseError(d.code || "error", d.message, answered.channel));
      }
      this._emit("error", msg.data || {});
      if (msg.data?.code === "history_expired") {
        const target = msg.channel ?? msg.data?.channel;
        const channels = target != null ? [target] : [...this._channels.keys()];
        for (const c of channels) {
          const state = this._channels.get(c);
          if (state) state.lastId = null; // resume point is gone; a fresh snapshot follows
          this._emit("reload", c);
        }
      }
      return;
    }
    if (msg.type === "presence") this._presenceAnswer(msg, answered);
    else if (msg.type === "presence_join" || msg.type === "presence_leave") this._presenceChange(msg);
    this._emit(msg.type, msg);
    if (msg.channel != null) this._emit("*", msg);
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

  _sendSubscribe(channel) {
    const since = this._channels.get(channel)?.lastId;
    this._send({ type: "subscribe", data: since != null ? { channel, since } : { channel } });
  }

  /** Sends one message; `req` is the presence request its reply settles (null: none). */
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

  _emit(type, arg) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try { fn(arg); } catch (e) { console.error(`citapulse: "${type}" listener threw`, e); }
    }
  }

  _clearTimers() {
    clearInterval(this._timers.ping);
    for (const k of ["reconnect", "stable", "refresh"]) clearTimeout(this._timers[k]);
  }
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

export default CitapulseClient;
