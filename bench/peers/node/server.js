// The Node.js baseline for citapulse-bench: what a team would write instead of citapulse.
//
// One `pg` connection LISTENs on a channel fed by a plain row trigger
// (`pg_notify(channel, row_to_json(NEW)::text)`); every notification is turned into
// one `cita_created` message, serialised once, and written to every socket subscribed
// to the row's tenant. Speaks the subset of citapulse's protocol the harness uses
// (`?token=JWT` HS256, `connected`, `subscribe` -> `subscribed`, `ping` -> `pong`).
// No durable log, no replay, no statistics: it is the cheap alternative on purpose.
//
// Environment: DATABASE_URL, JWT_SECRET, PORT (default 8090), HOST (127.0.0.1),
// NOTIFY_CHANNEL (bench_bare). Exits when its parent process goes away.
'use strict';

const crypto = require('crypto');
const http = require('http');
const { Client } = require('pg');
const { WebSocketServer } = require('ws');

const PORT = Number(process.env.PORT || 8090);
const HOST = process.env.HOST || '127.0.0.1';
const CHANNEL = process.env.NOTIFY_CHANNEL || 'bench_bare';
const SECRET = process.env.JWT_SECRET || '';
const PREFIX = 'estadisticas:';

/** HS256 verification with node's crypto: returns the claims or null. */
function verify(token) {
  const parts = token.split('.');
  if (parts.length !== 3 || SECRET === '') return null;
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
    claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  } catch {
    return null;
  }
  if (header.alg !== 'HS256') return null;
  const expected = crypto.createHmac('sha256', SECRET).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], 'base64url');
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  if (typeof claims.exp !== 'number' || claims.exp * 1000 < Date.now()) return null;
  return claims;
}

/** tenant -> Set of sockets. */
const subscribers = new Map();

const server = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ status: 'ok', connections: wss.clients.size }));
    return;
  }
  res.writeHead(404);
  res.end();
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: true });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  const claims = url.pathname === '/ws' ? verify(url.searchParams.get('token') || '') : null;
  if (!claims) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  socket.setNoDelay(true);
  wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, claims));
});

function onConnection(ws, claims) {
  const tenant = claims.negocio_id == null ? null : String(claims.negocio_id);
  const mine = new Set();
  ws.send(JSON.stringify({
    type: 'connected',
    data: { user_id: claims.sub, tenant, role: claims.role ?? null },
  }));
  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg.type === 'subscribe' && msg.data && typeof msg.data.channel === 'string') {
      const channel = msg.data.channel;
      const wanted = channel.startsWith(PREFIX) ? channel.slice(PREFIX.length) : null;
      if (wanted === null || wanted !== tenant) {
        ws.send(JSON.stringify({ type: 'error', data: { code: 'forbidden', message: 'forbidden' } }));
        return;
      }
      let set = subscribers.get(wanted);
      if (!set) subscribers.set(wanted, (set = new Set()));
      set.add(ws);
      mine.add(wanted);
      ws.send(JSON.stringify({ type: 'subscribed', channel }));
    } else if (msg.type === 'ping') {
      ws.send(JSON.stringify({ type: 'pong', data: { timestamp: Date.now() } }));
    }
  });
  ws.on('close', () => {
    for (const t of mine) {
      const set = subscribers.get(t);
      if (set) {
        set.delete(ws);
        if (set.size === 0) subscribers.delete(t);
      }
    }
  });
  ws.on('error', () => {});
}

async function main() {
  const pg = new Client({ connectionString: process.env.DATABASE_URL });
  pg.on('error', (err) => {
    console.error(`node-peer: database error: ${err.message}`);
    process.exit(1);
  });
  await pg.connect();
  pg.on('notification', (n) => {
    let row;
    try {
      row = JSON.parse(n.payload);
    } catch {
      return;
    }
    const tenant = String(row.negocio_id);
    const set = subscribers.get(tenant);
    if (!set) return;
    // Serialise once, encode once, share the bytes: the best a small team would do.
    const bytes = Buffer.from(JSON.stringify({
      type: 'cita_created',
      channel: PREFIX + tenant,
      data: { action: 'created', table: 'public.citas', row },
    }));
    for (const ws of set) {
      if (ws.readyState === 1) ws.send(bytes, { binary: false });
    }
  });
  await pg.query(`LISTEN ${CHANNEL}`);
  server.listen(PORT, HOST, () => console.error(`node-peer: listening on ${HOST}:${PORT}`));
}

// Never outlive the harness that started us.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) process.exit(0);
}, 500).unref();
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

main().catch((err) => {
  console.error(`node-peer: ${err.message}`);
  process.exit(1);
});
