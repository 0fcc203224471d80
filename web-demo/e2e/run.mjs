// Runs the browser end-to-end tests with Node's test runner and prints, after the usual
// report, one line that scripts/test.sh adds to its summary:
//   check: N passed, N failed, N skipped (browser end-to-end)
// Exits non-zero if a test failed, was skipped or none ran.

import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { run } from "node:test";
import { spec } from "node:test/reporters";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const files = process.argv.slice(2).length
  ? process.argv.slice(2)
  : readdirSync(here)
      .filter((f) => f.endsWith(".test.mjs"))
      .map((f) => join(here, f));

let passed = 0;
let failed = 0;
let skipped = 0;
const stream = run({ files, concurrency: 1, timeout: 180_000 });
stream.on("test:pass", (t) => {
  if (t.details?.type === "suite") return;
  if (t.skip || t.todo) skipped++;
  else passed++;
});
stream.on("test:fail", (t) => {
  if (t.details?.type === "suite") return;
  // A failing hook or file counts too.
  failed++;
});
stream.compose(new spec()).pipe(process.stdout);
await new Promise((resolve) => stream.on("end", resolve));
process.stdout.write(`check: ${passed} passed, ${failed} failed, ${skipped} skipped (browser end-to-end)\n`);
process.exitCode = failed > 0 || skipped > 0 || passed === 0 ? 1 : 0;
