// Type declarations for citapulse.js

/**
 * "unauthorized" (a refused token: a refused handshake, seen through the probe, or 4001 without
 * `getToken`) and "revoked" (4003, or a handshake refused as revoked) do not reconnect.
 */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed" | "unauthorized" | "revoked";

export declare const CloseCodes: Readonly<{
  NORMAL: 1000; GOING_AWAY: 1001; POLICY: 1008; TOO_BIG: 1009; TOKEN_EXPIRED: 4001; REVOKED: 4003;
  SLOW_CONSUMER: 4008;
}>;

/** `estadisticas:<tenant>`: the tenant's events, its `stats` and its presence. */
export type TenantChannel = `estadisticas:${string}`;
/** `usuario:<tenant>:<user>`: events routed to one user (route columns, `citapulse.emit_to_user`). */
export type UserChannel = `usuario:${string}:${string}`;
/** `rol:<tenant>:<role>`: events emitted to one role (`citapulse.emit_to_role`). */
export type RoleChannel = `rol:${string}:${string}`;
/** Any channel the daemon knows. Tenant: 1–64 of `[A-Za-z0-9_.-]`; user/role: 1–128 of `[A-Za-z0-9_.@-]`. */
export type ChannelName = TenantChannel | UserChannel | RoleChannel;

/** A channel name, parsed (see {@link parseChannel}). */
export type ParsedChannel =
  | { kind: "tenant"; tenant: string }
  | { kind: "user"; tenant: string; user: string }
  | { kind: "role"; tenant: string; role: string };

/** Builds `estadisticas:<tenant>`; throws TypeError if the tenant is not a valid channel part. */
export declare function tenantChannel(tenant: string): TenantChannel;
/** Builds `usuario:<tenant>:<user>`; throws TypeError if a part is not valid. */
export declare function userChannel(tenant: string, user: string): UserChannel;
/** Builds `rol:<tenant>:<role>`; throws TypeError if a part is not valid. */
export declare function roleChannel(tenant: string, role: string): RoleChannel;
/** Parses a channel name; null if the daemon would refuse it as a bad name. */
export declare function parseChannel(name: string): ParsedChannel | null;

/** Why a request such as `presence()` failed: the server's error code, or "timeout" / "closed". */
export declare class CitapulseError extends Error {
  constructor(code: string, message?: string, channel?: string);
  readonly name: "CitapulseError";
  readonly code: "forbidden" | "bad_request" | "rate_limited" | "timeout" | "closed" | string;
  /** The channel the request was about. */
  readonly channel?: string;
}

/** The columns of the default `stats.query`. Another query gives other columns: see {@link StatsData}. */
export interface DefaultStats {
  citas_hoy: number;
  total_citas: number;
  citas_completadas: number;
  citas_canceladas: number;
}

/** What the daemon adds to the columns of `stats.query`. */
export interface StatsMeta {
  /** The tenant. */
  negocio_id: string;
  /** When the numbers were computed, Unix seconds. */
  timestamp: number;
  /** Id of the last event reflected in this snapshot. */
  as_of: number;
}

/**
 * A `stats` payload: the columns of `stats.query` (`T`, by default those of the default query)
 * plus {@link StatsMeta}. With a query of your own, name its columns once on the client:
 * `new CitapulseClient<{ ingresos_hoy: number }>(…)` types every "stats" listener's data.
 */
export type StatsData<T = DefaultStats> = T & StatsMeta;

export interface StatsMessage<T = DefaultStats> { type: "stats"; channel: string; data: StatsData<T>; }

/**
 * Fields looked up by the operator's `[[enrich]]` queries (e.g. `profesional_nombre`); keys depend
 * on the configuration. Missing or `{}` when nothing is configured or a lookup failed.
 */
export type EventContext = Record<string, unknown>;

/** Row-change payload of cita_* / status_changed / schedule_updated events. */
export interface RowChangeData {
  action: string;
  table: string;
  row: Record<string, unknown>;
  old: Record<string, unknown> | null;
  timestamp: number;
  /** `[[enrich]]` lookups, on events of a kind that has entries (e.g. appointments). */
  context?: EventContext;
}

/**
 * The appointment row of a `cita_reminder`: every column of the table (the reference schema also
 * has negocio_id, cliente_id, profesional_id, hora_fin).
 */
export interface ReminderRow {
  id: number | string;
  /** `YYYY-MM-DD`. */
  fecha: string;
  /** `HH:MM:SS`, local time of the tenant. */
  hora_inicio: string;
  estado: string;
  [column: string]: unknown;
}

/** Payload of `cita_reminder`, sent `minutes_before` minutes before the appointment starts. */
export interface CitaReminderData {
  minutes_before: number;
  /** Start time, RFC 3339 with the tenant's offset, e.g. `2026-12-03T10:30:00-05:00`. */
  starts_at: string;
  row: ReminderRow;
  /** `[[enrich]]` lookups, as on the other appointment events. */
  context?: EventContext;
}

export interface CalendarRefreshData { reason: "bulk" | "truncate" | string; rows: number; }

export type RowEventType =
  | "cita_created" | "cita_updated" | "cita_deleted" | "status_changed" | "cita_rescheduled" | "schedule_updated";

/** An event delivered on a channel. Custom events (citapulse.emit) carry arbitrary `data`. */
export interface EventMessage<D = unknown> { type: string; channel: string; id: number; data: D; }

/** Appointment reminder, on `estadisticas:<tenant>` and the `usuario:` channels of the row's people. */
export interface CitaReminderMessage extends EventMessage<CitaReminderData> { type: "cita_reminder"; }

/** One user online in a tenant (every subscriber of `estadisticas:<tenant>`, across all daemon instances). */
export interface PresenceUser {
  user_id: string;
  /** The `role` claim of the user's first connection. */
  role: string | null;
  /** Open connections of the user; 0 in `presence_leave`. */
  connections: number;
  /** When its earliest open connection arrived, Unix seconds (fractional). */
  since: number;
}

/** Answer to a `presence` request: everyone online in the tenant now. */
export interface PresenceMessage { type: "presence"; channel: TenantChannel; data: { users: PresenceUser[] }; }
/**
 * Users whose first connection arrived, pushed to subscribers of the tenant channel. Joins of one
 * ~200 ms tick come as one message.
 */
export interface PresenceJoinMessage { type: "presence_join"; channel: TenantChannel; data: { users: PresenceUser[] }; }
/**
 * Users whose last connection has been gone for `presence.leave_grace_ms` (a reload is no leave), or
 * whose daemon died; `connections` is 0. Leaves of one ~200 ms tick come as one message.
 */
export interface PresenceLeaveMessage { type: "presence_leave"; channel: TenantChannel; data: { users: PresenceUser[] }; }

/** What "members" listeners receive: `members(channel)` changed (null: no longer known). */
export interface MembersEvent { channel: string; users: PresenceUser[] | null; }

export interface ConnectedMessage { type: "connected"; data: { user_id: string; tenant: string; role: string }; }
export interface SubscribedMessage { type: "subscribed"; channel: string; }
export interface UnsubscribedMessage { type: "unsubscribed"; channel: string; }
export interface AuthenticatedMessage { type: "authenticated"; data: { expires_at: number }; }
export interface PongMessage { type: "pong"; data: { timestamp: number }; }

/** `data` of a server `error` message (connection stays open), or a client-side error. */
export interface ErrorData {
  /** Server codes, "token_error" / "connect_failed" (client side), or after a refused handshake
   * the 401 body's code ("token_invalid", "token_expired", "token_revoked", …). */
  code: "forbidden" | "bad_request" | "history_expired" | "rate_limited" | "token_error" | "connect_failed" | string;
  message?: string;
  channel?: string;
}

/** Any message that carries a channel (what "*" listeners receive). */
export type ChannelMessage<S = DefaultStats> =
  | StatsMessage<S> | SubscribedMessage | UnsubscribedMessage | EventMessage
  | PresenceMessage | PresenceJoinMessage | PresenceLeaveMessage;

/** The messages of one channel, by type (the client's and a subscription's listeners). */
export interface ChannelEventMap<S = DefaultStats> {
  /** Every presence answer (also those settling a `presence()` call). */
  presence: PresenceMessage;
  presence_join: PresenceJoinMessage;
  presence_leave: PresenceLeaveMessage;
  stats: StatsMessage<S>;
  cita_created: EventMessage<RowChangeData>;
  cita_updated: EventMessage<RowChangeData>;
  cita_deleted: EventMessage<RowChangeData>;
  status_changed: EventMessage<RowChangeData>;
  cita_rescheduled: EventMessage<RowChangeData>;
  schedule_updated: EventMessage<RowChangeData>;
  calendar_refresh: EventMessage<CalendarRefreshData>;
  cita_reminder: CitaReminderMessage;
  "*": ChannelMessage<S>;
}

export interface CitapulseEventMap<S = DefaultStats> extends ChannelEventMap<S> {
  state: ConnectionState;
  /** Server errors (a refused subscribe carries its `channel`) and client-side ones. */
  error: ErrorData;
  /** Client state for the channel is stale (history expired); a fresh snapshot follows. */
  reload: string;
  connected: ConnectedMessage;
  subscribed: SubscribedMessage;
  unsubscribed: UnsubscribedMessage;
  authenticated: AuthenticatedMessage;
  pong: PongMessage;
  /** `members(channel)` changed. */
  members: MembersEvent;
}

/**
 * "subscribing": sent, or waiting for the connection (every reconnect subscribes again from
 * `lastEventId`); "subscribed": accepted; "error": refused (e.g. `forbidden`), or dropped after a
 * token refresh, tried again after the next reconnect or on `subscribe(channel)`; "unsubscribed":
 * after `unsubscribe()`, for good.
 */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed" | "error";

/** What a {@link Subscription}'s listeners receive: its channel's messages and its own changes. */
export interface SubscriptionEventMap<S = DefaultStats> extends ChannelEventMap<S> {
  state: SubscriptionState;
  subscribed: SubscribedMessage;
  /** The refused subscribe, or an error naming the channel (history_expired, unavailable, forbidden). */
  error: ErrorData;
  /** The channel's history expired: reload its state; a fresh snapshot follows. */
  reload: string;
}

/**
 * One channel of a client, with its own state, resume position and listeners: what
 * `client.subscribe(channel)` returns (the same object for the same channel until unsubscribed).
 */
export declare class Subscription<S = DefaultStats> {
  private constructor();
  readonly channel: string;
  readonly state: SubscriptionState;
  /** Id of the last event delivered on the channel: where a reconnect resumes; null before any. */
  readonly lastEventId: number | null;
  /** The last error about this channel, or null. */
  readonly error: ErrorData | null;
  /** Listen to this channel only; returns a function that removes the listener. */
  on<K extends keyof SubscriptionEventMap<S>>(type: K, fn: (arg: SubscriptionEventMap<S>[K]) => void): () => void;
  /** Listener for a custom event type (from SQL `citapulse.emit`) on this channel. */
  on(type: string, fn: (msg: EventMessage) => void): () => void;
  /** Removes a listener added with `on`. */
  off(type: string, fn: (arg: any) => void): void;
  /** Leaves the channel; the state becomes "unsubscribed". */
  unsubscribe(): void;
  /** The client's `presence(channel)` for this channel. */
  presence(opts?: { timeoutMs?: number }): Promise<PresenceUser[]>;
  /** The client's `members(channel)` for this channel. */
  members(): PresenceUser[] | null;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  /** Called with `{data}` (a text frame). */
  onmessage: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  /** Called with `{code, reason}`. */
  onclose: ((ev: any) => void) | null;
}

/** What the probe after a failed handshake needs of `fetch` (the global one fits). */
export type FetchLike = (
  url: string,
  init: { headers: Record<string, string>; credentials: "omit"; signal?: any },
) => Promise<{ status: number; json(): Promise<unknown> }>;

export interface CitapulseClientOptions {
  /** WebSocket URL; default `ws(s)://<location.host>/ws` in browsers. Required in Node. */
  url?: string;
  /** JWT, sent in the subprotocol list (`citapulse, <jwt>`) unless `tokenIn` is "query". */
  token?: string;
  /** Where the token travels: the subprotocol list (default; proxies do not log it) or `?token=`. */
  tokenIn?: "protocol" | "query";
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
  /** How long `presence()` waits for its answer before rejecting with code "timeout". Default 10000. */
  requestTimeoutMs?: number;
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
  /**
   * For the probe after a socket that closed before it opened (`GET` of the `/ws` URL over
   * http(s), with the token as `Authorization: Bearer`): 401 ends in "unauthorized" (or "revoked"),
   * anything else keeps reconnecting. Default `globalThis.fetch`; without one, no probe.
   */
  fetch?: FetchLike;
}

/**
 * The client. `S` names the columns of your `stats.query` when it is not the default one:
 * `new CitapulseClient<{ ingresos_hoy: number }>(opts)`.
 */
export declare class CitapulseClient<S = DefaultStats> {
  constructor(opts?: CitapulseClientOptions);
  /** Same as the module's {@link tenantChannel}. */
  static tenantChannel(tenant: string): TenantChannel;
  /** Same as the module's {@link userChannel}. */
  static userChannel(tenant: string, user: string): UserChannel;
  /** Same as the module's {@link roleChannel}. */
  static roleChannel(tenant: string, role: string): RoleChannel;
  /** Same as the module's {@link parseChannel}. */
  static parseChannel(name: string): ParsedChannel | null;
  readonly url: string;
  token: string | null;
  /** Current connection state. */
  readonly state: ConnectionState;
  /** Register a listener; returns a function that removes it. */
  on<K extends keyof CitapulseEventMap<S>>(type: K, fn: (arg: CitapulseEventMap<S>[K]) => void): () => void;
  /** Listener for a custom event type (from SQL `citapulse.emit`). */
  on(type: string, fn: (msg: EventMessage) => void): () => void;
  /**
   * Subscribe to a channel ("estadisticas:T", "usuario:T:U" or "rol:T:R"; see the channel helpers);
   * `since` seeds the resume point. Every channel is resumed with `since` after a reconnect.
   * Returns the channel's subscription: the same object for the same channel until unsubscribed.
   */
  subscribe(channel: ChannelName | string, opts?: { since?: number }): Subscription<S>;
  /** The channel's subscription, or null if it is not subscribed. */
  subscription(channel: string): Subscription<S> | null;
  /** Unsubscribe and forget the channel's resume state (and its members); its Subscription ends. */
  unsubscribe(channel: string): void;
  /**
   * Who is online in a tenant: resolves with the users of the `presence` answer. Rejects with a
   * {@link CitapulseError}: the server's code ("forbidden", "bad_request", e.g. a channel that is not
   * `estadisticas:<tenant>` or presence disabled; such errors do not reach "error" listeners),
   * "timeout" after `timeoutMs` (default `requestTimeoutMs`), or "closed" on close(). Waits for the
   * socket to open and is resent after a reconnect. For a subscribed channel the answer also starts
   * {@link members}.
   */
  presence(channel: TenantChannel | string, opts?: { timeoutMs?: number }): Promise<PresenceUser[]>;
  /**
   * Users online in a subscribed tenant channel, sorted by `user_id`: the last presence answer kept
   * current with every presence_join / presence_leave, refreshed automatically after a reconnect.
   * Null until a `presence(channel)` answer arrived, or after unsubscribe or a refused request.
   * Connection counts are those of the answer or join that listed the user.
   */
  members(channel: string): PresenceUser[] | null;
  /** Calls `fn` for each presence_join; returns a function that removes the listener. */
  onPresenceJoin(fn: (users: PresenceUser[], channel: TenantChannel, msg: PresenceJoinMessage) => void): () => void;
  /** Calls `fn` for each presence_leave (`connections` 0); returns a function that removes the listener. */
  onPresenceLeave(fn: (users: PresenceUser[], channel: TenantChannel, msg: PresenceLeaveMessage) => void): () => void;
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
