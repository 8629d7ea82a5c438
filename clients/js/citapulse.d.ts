// Type declarations for citapulse.js

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed" | "unauthorized";

export declare const CloseCodes: Readonly<{
  NORMAL: 1000; GOING_AWAY: 1001; POLICY: 1008; TOO_BIG: 1009; TOKEN_EXPIRED: 4001; SLOW_CONSUMER: 4008;
}>;

export interface StatsData {
  negocio_id: string;
  citas_hoy: number;
  total_citas: number;
  citas_completadas: number;
  citas_canceladas: number;
  timestamp: number;
  /** Id of the last event reflected in this snapshot. */
  as_of: number;
}

export interface StatsMessage { type: "stats"; channel: string; data: StatsData; }

/** Row-change payload of cita_* / status_changed / schedule_updated events. */
export interface RowChangeData {
  action: string;
  table: string;
  row: Record<string, unknown>;
  old: Record<string, unknown> | null;
  timestamp: number;
}

export interface CalendarRefreshData { reason: "bulk" | "truncate" | string; rows: number; }

export type RowEventType =
  | "cita_created" | "cita_updated" | "cita_deleted" | "status_changed" | "cita_rescheduled" | "schedule_updated";

/** An event delivered on a channel. Custom events (citapulse.emit) carry arbitrary `data`. */
export interface EventMessage<D = unknown> { type: string; channel: string; id: number; data: D; }

export interface ConnectedMessage { type: "connected"; data: { user_id: string; tenant: string; role: string }; }
export interface SubscribedMessage { type: "subscribed"; channel: string; }
export interface PongMessage { type: "pong"; data: { timestamp: number }; }

/** `data` of a server `error` message (connection stays open), or a client-side error. */
export interface ErrorData {
  code: "forbidden" | "bad_request" | "history_expired" | "rate_limited" | "token_error" | "connect_failed" | string;
  message?: string;
  channel?: string;
}

/** Any message that carries a channel (what "*" listeners receive). */
export type ChannelMessage = StatsMessage | SubscribedMessage | EventMessage;

export interface CitapulseEventMap {
  state: ConnectionState;
  error: ErrorData;
  /** Client state for the channel is stale (history expired); a fresh snapshot follows. */
  reload: string;
  connected: ConnectedMessage;
  subscribed: SubscribedMessage;
  pong: PongMessage;
  stats: StatsMessage;
  cita_created: EventMessage<RowChangeData>;
  cita_updated: EventMessage<RowChangeData>;
  cita_deleted: EventMessage<RowChangeData>;
  status_changed: EventMessage<RowChangeData>;
  cita_rescheduled: EventMessage<RowChangeData>;
  schedule_updated: EventMessage<RowChangeData>;
  calendar_refresh: EventMessage<CalendarRefreshData>;
  "*": ChannelMessage;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
}

export interface CitapulseClientOptions {
  /** WebSocket URL; default `ws(s)://<location.host>/ws` in browsers. Required in Node. */
  url?: string;
  /** JWT, sent as the `token` query parameter. */
  token?: string;
  /** Fetches a fresh token: initially if no token, on close 4001, after a failed handshake, and before `exp`. */
  getToken?: () => string | Promise<string>;
  /** Reconnect backoff with full jitter. Defaults: 500 / 15000 ms. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Keep-alive ping interval while open. Default 25000. */
  pingIntervalMs?: number;
  /** A connection open this long resets the backoff. Default 5000. */
  stableMs?: number;
  /** Event ids remembered per channel for duplicate dropping. Default 2048. */
  dedupeSize?: number;
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
}

export declare class CitapulseClient {
  constructor(opts?: CitapulseClientOptions);
  readonly url: string;
  token: string | null;
  /** Current connection state. */
  readonly state: ConnectionState;
  /** Register a listener; returns a function that removes it. */
  on<K extends keyof CitapulseEventMap>(type: K, fn: (arg: CitapulseEventMap[K]) => void): () => void;
  /** Listener for a custom event type (from SQL `citapulse.emit`). */
  on(type: string, fn: (msg: EventMessage) => void): () => void;
  /** Subscribe to a channel (e.g. "estadisticas:negocio_123"); `since` seeds the resume point. */
  subscribe(channel: string, opts?: { since?: number }): void;
  /** Unsubscribe and forget the channel's resume state. */
  unsubscribe(channel: string): void;
  /** Id of the last event delivered on the channel, or null. */
  lastEventId(channel: string): number | null;
  /** Replace the token (sends an `auth` message if connected). */
  setToken(token: string): void;
  /** Start connecting (auto-reconnects until close()). */
  connect(): void;
  /** Close for good; state becomes "closed". */
  close(): void;
}

export default CitapulseClient;
