// The package as npm would ship it: the CommonJS file is the generated one, and both
// entry points (import and require, by the package's own name) give the same exports.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const dir = new URL("../", import.meta.url);

test("citapulse.cjs is what scripts/cjs.mjs generates", () => {
  const generated = execFileSync(process.execPath, [new URL("scripts/cjs.mjs", dir).pathname]).toString();
  assert.equal(readFileSync(new URL("citapulse.cjs", dir), "utf8"), generated,
    "citapulse.cjs is stale: run `npm run build:cjs` in clients/js");
});

test("import and require by the package name give the same exports", async () => {
  const esm = await import("citapulse-client");
  const cjs = createRequire(import.meta.url)("citapulse-client");
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  assert.equal(typeof cjs.CitapulseClient, "function");
  assert.equal(cjs.default, cjs.CitapulseClient);
  assert.equal(cjs.CloseCodes.REVOKED, 4003);
  // Every runtime export is declared in the types.
  const dts = readFileSync(new URL("citapulse.d.ts", dir), "utf8");
  for (const name of Object.keys(esm).filter((n) => n !== "default")) {
    assert.match(dts, new RegExp(`export declare (const|function|class) ${name}\\b`), name);
  }
});
