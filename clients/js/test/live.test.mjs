// The client against a running daemon (started by the Rust test tests/js_client.rs, which
// passes its address and tokens in the environment and runs revocations when asked on
// stdout). Without CITAPULSE_WS_URL these tests are skipped, and say so.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { CitapulseClient, Subscription } from "citapulse-client";

const url = process.env.CITAPULSE_WS_URL;
const skip = url ? false : "needs a daemon: run `cargo test --test js_client`";
const WAIT_MS = 20000;

/** The next `type` event of a client or a subscription that satisfies `pred`. */
function waitFor(emitter, type, pred = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${type} within ${WAIT_MS} ms`)); }, WAIT_MS);
    const off = emitter.on(type, (m) => { if (pred(m)) { clearTimeout(timer); off(); resolve(m); } });
  });
}

/** Resolves once `pred()` holds (checked every 10 ms). */
async function until(pred, what) {
  for (let waited = 0; !pred(); waited += 10) {
    if (waited > WAIT_MS) throw new Error(`not within ${WAIT_MS} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A well-formed HS256 token for t1, signed with a secret the daemon does not have. */
function forgedToken() {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const claims = { sub: "mallory", negocio_id: "t1", role: "staff", exp: Math.floor(Date.now() / 1000) + 3600 };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", "not-the-daemon-secret").update(body).digest("base64url")}`;
}

/**
 * A WebSocket and a fetch that count what the client opens: sockets, and the status of each
 * probe that got an answer. `rewrite` changes the socket's URL (the probe keeps the client's).
 */
function counting(rewrite = (u) => u) {
  const n = { sockets: 0, asked: 0, probes: [] };
  const WS = class extends WebSocket {
    constructor(u, protocols) { super(rewrite(u), protocols); n.sockets++; }
  };
  const probe = async (u, init) => {
    n.asked++;
    const res = await fetch(u, init);
    n.probes.push(res.status);
    return res;
  };
  return { n, WebSocket: WS, fetch: probe };
}

const fast = { initialMs: 10, maxMs: 20 };

/** Makes the daemon log an event for tenant t1 (POST /notify/cita with the shared secret). */
async function notify(citaId) {
  const http = url.replace(/^ws/, "http").replace(/\/ws$/, "");
  const res = await fetch(`${http}/notify/cita`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-citapulse-secret": process.env.CITAPULSE_NOTIFY_SECRET },
    body: JSON.stringify({ negocio_id: "t1", action: "created", cita_id: citaId }),
  });
  assert.equal(res.status, 202);
}

/** Asks the Rust side to run a statement, and waits for its answer line. */
const rl = url ? createInterface({ input: process.stdin }) : null;
async function ask(line) {
  const answer = new Promise((resolve) => rl.once("line", resolve));
  process.stdout.write(`CITAPULSE-ASK ${line}\n`);
  return answer;
}

for (const tokenIn of ["protocol", "query"]) {
  test(`events arrive with the token in the ${tokenIn}`, { skip }, async () => {
    const seen = [];
    const WS = class extends WebSocket {
      constructor(u, protocols) { super(u, protocols); seen.push({ u, protocols }); }
    };
    const client = new CitapulseClient({ url, token: process.env.CITAPULSE_TOKEN, tokenIn, WebSocket: WS });
    client.subscribe("estadisticas:t1");
    client.connect();
    await waitFor(client, "subscribed");
    const got = waitFor(client, "cita_created", (m) => m.data?.cita_id === 7);
    await notify(7);
    const ev = await got;
    assert.equal(ev.channel, "estadisticas:t1");
    assert.equal(client.lastEventId("estadisticas:t1"), ev.id);
    if (tokenIn === "protocol") {
      assert.ok(!seen[0].u.includes("token="), "the token stays out of the URL");
      assert.deepEqual(seen[0].protocols, ["citapulse", process.env.CITAPULSE_TOKEN]);
    } else {
      assert.ok(seen[0].u.includes("token="));
    }
    client.close();
    assert.equal(client.state, "closed");
  });
}

test("a revoked user's client stops in the revoked state instead of reconnecting", { skip }, async () => {
  let sockets = 0;
  const WS = class extends WebSocket {
    constructor(u, protocols) { super(u, protocols); sockets++; }
  };
  const client = new CitapulseClient({ url, token: process.env.CITAPULSE_VICTIM_TOKEN, WebSocket: WS,
    backoff: { initialMs: 10, maxMs: 20 } });
  client.subscribe("estadisticas:t1");
  client.connect();
  await waitFor(client, "subscribed");
  const revoked = waitFor(client, "state", (s) => s === "revoked");
  assert.equal(await ask("revoke victim"), "done");
  await revoked;
  // Another socket would be refused anyway: none is opened, and nothing is scheduled.
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(client.state, "revoked");
  assert.equal(sockets, 1);
});

test("a subscription has its own state, resume position and events", { skip }, async () => {
  const client = new CitapulseClient({ url, token: process.env.CITAPULSE_TOKEN });
  const sub = client.subscribe("estadisticas:t1");
  assert.ok(sub instanceof Subscription);
  assert.equal(client.subscribe("estadisticas:t1"), sub, "one object per channel");
  assert.equal(sub.channel, "estadisticas:t1");
  assert.equal(sub.state, "subscribing");
  assert.equal(sub.lastEventId, null);
  const foreign = client.subscribe("estadisticas:t2"); // the token is for t1 only
  const leaked = [];
  foreign.on("*", (m) => leaked.push(m));
  const states = [];
  sub.on("state", (s) => states.push(s));
  const subscribed = waitFor(sub, "subscribed");
  const stats = waitFor(sub, "stats");
  const refused = waitFor(foreign, "error");
  const clientErrors = [];
  client.on("error", (e) => clientErrors.push(e));
  client.connect();

  assert.equal((await subscribed).channel, "estadisticas:t1");
  assert.equal(sub.state, "subscribed");
  assert.equal((await stats).data.negocio_id, "t1");
  const err = await refused;
  assert.equal(err.code, "forbidden");
  assert.equal(err.channel, "estadisticas:t2");
  assert.equal(foreign.state, "error");
  assert.equal(foreign.error.code, "forbidden");
  assert.ok(clientErrors.some((e) => e.code === "forbidden"), "client-level error listeners still hear it");

  const got = waitFor(sub, "cita_created", (m) => m.data?.cita_id === 8);
  const all = waitFor(sub, "*", (m) => m.type === "cita_created" && m.data?.cita_id === 8);
  await notify(8);
  const ev = await got;
  assert.equal(await all, ev);
  assert.equal(sub.lastEventId, ev.id);
  assert.equal(client.lastEventId("estadisticas:t1"), ev.id);
  assert.deepEqual(leaked, [], "nothing of t1 reaches t2's listeners");

  sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
  assert.deepEqual(states, ["subscribed", "unsubscribed"]);
  assert.equal(client.subscription("estadisticas:t1"), null);
  const again = client.subscribe("estadisticas:t1");
  assert.notEqual(again, sub, "a new object after unsubscribe");
  await waitFor(again, "subscribed");
  client.close();
  assert.equal(again.state, "subscribing", "waits for the next connection");
});

test("a forged token ends in unauthorized after one probe, without reconnecting", { skip }, async () => {
  const { n, WebSocket, fetch } = counting();
  const client = new CitapulseClient({ url, token: forgedToken(), WebSocket, fetch, backoff: fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  client.subscribe("estadisticas:t1");
  client.connect();
  await waitFor(client, "state", (s) => s === "unauthorized");
  await sleep(200);
  assert.equal(client.state, "unauthorized");
  assert.equal(n.sockets, 1);
  assert.deepEqual(n.probes, [401]);
  assert.equal(errors.at(-1).code, "token_invalid");
});

test("with getToken, a refused token is replaced once, and a refused fresh one is final", { skip }, async () => {
  const { n, WebSocket, fetch } = counting();
  let calls = 0;
  const getToken = async () => { calls++; return forgedToken(); };
  const client = new CitapulseClient({ url, getToken, WebSocket, fetch, backoff: fast });
  client.connect();
  await waitFor(client, "state", (s) => s === "unauthorized");
  await sleep(200);
  assert.equal(client.state, "unauthorized");
  assert.equal(calls, 2);
  assert.equal(n.sockets, 2);
  assert.deepEqual(n.probes, [401, 401]);
});

test("with getToken, a refused token is replaced by a fresh one that works", { skip }, async () => {
  const { n, WebSocket, fetch } = counting();
  const tokens = [forgedToken(), process.env.CITAPULSE_TOKEN];
  const client = new CitapulseClient({ url, getToken: () => tokens.shift(), WebSocket, fetch, backoff: fast });
  const sub = client.subscribe("estadisticas:t1");
  client.connect();
  await waitFor(sub, "subscribed");
  assert.equal(client.state, "open");
  assert.deepEqual(n.probes, [401]);
  assert.equal(n.sockets, 2);
  client.close();
});

test("an accepted token whose socket fails keeps reconnecting", { skip }, async () => {
  // The socket goes to a path with no WebSocket (404); the probe of /ws says the token is fine.
  const { n, WebSocket, fetch } = counting((u) => u.replace(/\/ws$/, "/no-websocket-here"));
  const client = new CitapulseClient({ url, token: process.env.CITAPULSE_TOKEN, WebSocket, fetch, backoff: fast });
  const states = new Set();
  client.on("state", (s) => states.add(s));
  client.connect();
  await until(() => n.probes.length >= 3, "three failed attempts");
  client.close();
  assert.ok(n.probes.every((s) => s === 426), String(n.probes));
  assert.ok(states.has("reconnecting"));
  assert.ok(!states.has("unauthorized"));
});

test("an unreachable daemon keeps the client reconnecting", { skip }, async () => {
  const { n, WebSocket, fetch } = counting();
  const closed = "ws://127.0.0.1:9/ws"; // discard port: nothing listens there
  const client = new CitapulseClient({ url: closed, token: process.env.CITAPULSE_TOKEN, WebSocket, fetch, backoff: fast });
  client.connect();
  await until(() => n.sockets >= 3, "three attempts");
  assert.equal(client.state, "reconnecting");
  client.close();
  assert.deepEqual(n.probes, [], "no probe got an answer");
  // One probe per failed attempt (the last attempt's may still be on its way).
  assert.ok(n.asked >= n.sockets - 1 && n.asked <= n.sockets, `${n.asked} probes, ${n.sockets} sockets`);
});

test("a 401 that is not the daemon's verdict keeps the client reconnecting", { skip }, async () => {
  // A proxy in front of the daemon answers the probe 401 without the daemon's JSON.
  let asked = 0;
  const proxy = async () => { asked++; return new Response("login required", { status: 401 }); };
  const { n, WebSocket } = counting();
  const client = new CitapulseClient({ url, token: forgedToken(), WebSocket, fetch: proxy, backoff: fast });
  const states = new Set();
  client.on("state", (s) => states.add(s));
  client.connect();
  await until(() => asked >= 3, "three probes");
  client.close();
  assert.ok(n.sockets >= 3, String(n.sockets));
  assert.ok(!states.has("unauthorized"));
});

test("done", { skip }, () => { rl?.close(); });
