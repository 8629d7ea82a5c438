// Writes citapulse.cjs (CommonJS) from citapulse.js (ESM) to stdout: the same code with its
// `export` keywords taken off and a `module.exports` naming every export. No bundler: the
// client has no imports. `npm run build:cjs`; test/package.test.mjs fails when the two differ.
import { readFileSync } from "node:fs";

const src = readFileSync(new URL("../citapulse.js", import.meta.url), "utf8");
const names = [];
let out = src.replace(/^export (const|function|class) ([A-Za-z_$][\w$]*)/gm, (_, kind, name) => {
  names.push(name);
  return `${kind} ${name}`;
});
const def = /^export default ([A-Za-z_$][\w$]*);\n?/m.exec(out);
if (def) out = out.replace(def[0], "");
out = out.trimEnd() + "\n\nmodule.exports = { " + names.join(", ")
  + (def ? `, default: ${def[1]}` : "") + " };\n";
process.stdout.write("// Generated from citapulse.js by scripts/cjs.mjs: do not edit.\n\"use strict\";\n" + out);
