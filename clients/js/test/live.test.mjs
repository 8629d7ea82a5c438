// The client against a running daemon (started by the Rust test tests/js_client.rs, which
// passes its address and tokens in the environment and runs revocations when asked on
// stdout). Without CITAPULSE_WS_URL these tests are skipped, and say so.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createInterface } from "node:readline";
import { CitapulseClient } from "citapulse-client";

const url = process.env.CITAPULSE_WS_URL;
const skip = url ? false : "needs a daemon: run `cargo test --test js_client`";
const WAIT_MS = 20000;

function waitFor(client, type, pred = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${type} within ${WAIT_MS} ms`)); }, WAIT_MS);
    const off = client.on(type, (m) => { if (pred(m)) { clearTimeout(timer); off(); resolve(m); } });
  });
}

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

test("done", { skip }, () => { rl?.close(); });
