// The clients of citapulse-bench's socketio scenario: N sockets of one tenant over
// Socket.IO (socket.io-client, WebSocket transport) or over /ws (the ws package), in one
// process. Each received `cita_created` is timed against the microsecond timestamp the
// bench writes into the row's cliente_id. Prints "READY" once every socket is subscribed;
// on a line "STOP" on stdin prints {"received", "p50_us", "p99_us", "client_cpu_s"} and
// exits (client_cpu_s: this process's CPU time, connecting included).
//   node clients.mjs '{"base":"http://127.0.0.1:8080","token":"…","transport":"socketio","clients":1000}'
import { createInterface } from "node:readline";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const opts = JSON.parse(process.argv[2]);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const latencies = [];
let ready = 0;

function record(row) {
  const sent = Number(row?.cliente_id);
  if (Number.isFinite(sent) && sent > 0) latencies.push(nowUs() - sent);
}

function readyOne() {
  if (++ready === opts.clients) process.stdout.write("READY\n");
}

const sockets = [];
if (opts.transport === "socketio") {
  const { io } = require("socket.io-client");
  for (let i = 0; i < opts.clients; i++) {
    const s = io(opts.base, { auth: { token: opts.token }, transports: ["websocket"], reconnection: false });
    // Joined to the tenant's channel on connect; its first stats snapshot says it is in.
    let first = true;
    s.on("stats", () => { if (first) { first = false; readyOne(); } });
    s.on("cita_created", (m) => record(m?.data?.row));
    sockets.push(s);
  }
} else {
  const WebSocket = require("ws");
  for (let i = 0; i < opts.clients; i++) {
    const ws = new WebSocket(`${opts.base.replace(/^http/, "ws")}/ws?token=${opts.token}`);
    let first = true;
    ws.on("open", () => ws.send(JSON.stringify({ type: "subscribe", data: { channel: opts.channel } })));
    ws.on("message", (raw) => {
      const m = JSON.parse(raw);
      if (m.type === "stats" && first) { first = false; readyOne(); }
      else if (m.type === "cita_created") record(m.data?.row);
    });
    sockets.push(ws);
  }
}

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() !== "STOP") return;
  latencies.sort((a, b) => a - b);
  const at = (q) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] : null);
  const cpu = process.cpuUsage();
  process.stdout.write(JSON.stringify({
    received: latencies.length, p50_us: at(0.5), p99_us: at(0.99),
    client_cpu_s: (cpu.user + cpu.system) / 1e6,
  }) + "\n");
  for (const s of sockets) { try { s.close(); } catch { /* gone */ } }
  process.exit(0);
});
