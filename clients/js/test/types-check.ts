// Compiled, never run: `tsc --noEmit --strict` over this file checks that citapulse.d.ts
// describes the client as the docs use it (tests/js_client.rs runs it with a pinned
// TypeScript). `@ts-expect-error` lines must stay errors.
import CitapulseDefault, {
  CitapulseClient,
  Subscription,
  tenantChannel,
  type ConnectionState,
  type DefaultStats,
  type StatsData,
  type StatsMessage,
  type SubscriptionState,
} from "citapulse-client";

const client = new CitapulseClient({
  url: "wss://rt.example.com/ws",
  getToken: async () => "jwt",
  fetch: globalThis.fetch,
  WebSocket: globalThis.WebSocket,
});
const same: typeof CitapulseClient = CitapulseDefault;
void same;

// Client-level listeners, as before subscription objects.
client.on("stats", (m) => {
  const n: number = m.data.citas_hoy + m.data.as_of;
  const tenant: string = m.data.negocio_id;
  void n, tenant;
});
client.on("state", (s: ConnectionState) => {
  if (s === "unauthorized" || s === "revoked") client.close();
});
client.on("system_alert", (m) => void m.data);

// Subscription objects.
const sub: Subscription = client.subscribe(tenantChannel("negocio_123"), { since: 4711 });
const state: SubscriptionState = sub.state;
const resume: number | null = sub.lastEventId;
const channel: string = sub.channel;
void state, resume, channel;
const off = sub.on("stats", (m) => void m.data.total_citas);
sub.on("cita_created", (m) => void m.data.row);
sub.on("error", (e) => void e.code);
sub.on("state", (s) => { if (s === "error") console.log(sub.error?.code); });
off();
sub.unsubscribe();
const again: Subscription | null = client.subscription("estadisticas:negocio_123");
void again;
// @ts-expect-error not a subscription state
const wrong: SubscriptionState = "open";
void wrong;
// @ts-expect-error subscriptions come from client.subscribe()
new Subscription();

// Stats of a query of one's own.
interface Revenue { ingresos_hoy: number; citas_hoy: number }
const revenue = new CitapulseClient<Revenue>({ url: "wss://rt.example.com/ws", token: "jwt" });
revenue.on("stats", (m: StatsMessage<Revenue>) => {
  const r: number = m.data.ingresos_hoy + m.data.as_of;
  void r;
  // @ts-expect-error not a column of this query
  void m.data.total_citas;
});
revenue.subscribe("estadisticas:negocio_123").on("stats", (m) => void m.data.ingresos_hoy);
const defaults: StatsData = { negocio_id: "t", timestamp: 1, as_of: 2, citas_hoy: 0, total_citas: 0,
  citas_completadas: 0, citas_canceladas: 0 };
const cols: DefaultStats = defaults;
void cols;
