// citapulse.js — dependency-free client for the citapulse WebSocket API.
// Works in browsers and in Node >= 22 (global WebSocket), or pass `WebSocket` in options.

/** Close codes sent by the daemon. */
export const CloseCodes = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, POLICY: 1008, TOO_BIG: 1009, TOKEN_EXPIRED: 4001, SLOW_CONSUMER: 4008,
});

const OPEN = 1;

/**
 * Live client for citapulse: reconnects with exponential backoff + full jitter,
 * re-subscribes with `since` to resume, drops duplicate event ids (at-least-once delivery).
 *
 * @example
 * const c = new CitapulseClient({ token });
 * c.on("stats", (m) => render(m.data));
 * c.on("state", (s) => console.log(s));
 * c.subscribe("estadisticas:negocio_123");
 * c.connect();
 */
export class CitapulseClient {
  /**
   * @param {object} [opts]
   * @param {string} [opts.url] WebSocket URL; default `ws(s)://<location.host>/ws`.
   * @param {string} [opts.token] JWT sent as `?token=`.
   * @param {() => (string|Promise<string>)} [opts.getToken] Fetches a fresh token (initially if no token,
   *   on close 4001, after a failed handshake, and shortly before the current JWT's `exp`).
   * @param {{initialMs?: number, maxMs?: number}} [opts.backoff] Reconnect backoff (default 500 / 15000 ms).
   * @param {number} [opts.pingIntervalMs=25000] Keep-alive ping interval while open.
   * @param {number} [opts.stableMs=5000] Open this long before the backoff resets.
   * @param {number} [opts.dedupeSize=2048] Remembered event ids per channel.
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
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("citapulse: no WebSocket implementation; pass opts.WebSocket");
    /** @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** @type {Map<string, {lastId: number|null, seen: Set<number>, order: number[]}>} */ this._channels = new Map();
    this._ws = null;
    this._state = "closed";
    this._stopped = true;
    this._attempt = 0;
    this._freshToken = false;
    this._gen = 0; // bumped by connect()/close() so stale async attempts abort
    this._timers = { reconnect: null, ping: null, stable: null, refresh: null };
  }

  /** Current connection state. @returns {"connecting"|"open"|"reconnecting"|"closed"|"unauthorized"} */
  get state() { return this._state; }

  /**
   * Register a listener. Types: any server message type ("stats", "cita_created", ...), "*" (every
   * channel message), "state", "error", "reload", "connected", "subscribed", "pong".
   * @returns {() => void} function that removes the listener
   */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  /** Subscribe to a channel; `since` seeds the resume point (e.g. from localStorage). */
  subscribe(channel, { since } = {}) {
    let ch = this._channels.get(channel);
    if (!ch) this._channels.set(channel, (ch = { lastId: null, seen: new Set(), order: [] }));
    if (since != null) ch.lastId = since;
    this._sendSubscribe(channel);
  }

  /** Stop receiving a channel and forget its resume state. */
  unsubscribe(channel) {
    if (!this._channels.delete(channel)) return;
    this._send({ type: "unsubscribe", data: { channel } });
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
    this._open("connecting");
  }

  /** Close for good (no reconnect). */
  close() {
    this._stopped = true;
    this._gen++;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) try { ws.close(1000); } catch { /* ignore */ }
    this._setState("closed");
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
    if (this.token) url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.token);
    let ws;
    try { ws = new this.WebSocket(url); } catch (e) {
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
      if (this._stopped) return this._setState("closed");
      const code = ev?.code;
      if (code === CloseCodes.TOKEN_EXPIRED || (!opened && this.getToken)) {
        // 4001, or a failed handshake (possibly HTTP 401): fetch a fresh token before retrying.
        if (!this.getToken) { this._stopped = true; return this._setState("unauthorized"); }
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
    const ch = msg.channel != null ? this._channels.get(msg.channel) : undefined;
    if (typeof msg.id === "number" && ch) {
      if (ch.seen.has(msg.id)) return; // duplicate from at-least-once replay
      ch.seen.add(msg.id);
      ch.order.push(msg.id);
      if (ch.order.length > this.dedupeSize) ch.seen.delete(ch.order.shift());
      ch.lastId = msg.id; // most recently delivered, not max: the server handles late commits
    }
    if (msg.type === "error") {
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
    this._emit(msg.type, msg);
    if (msg.channel != null) this._emit("*", msg);
  }

  _sendSubscribe(channel) {
    const since = this._channels.get(channel)?.lastId;
    this._send({ type: "subscribe", data: since != null ? { channel, since } : { channel } });
  }

  _send(obj) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try { ws.send(JSON.stringify(obj)); return true; } catch { return false; }
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
