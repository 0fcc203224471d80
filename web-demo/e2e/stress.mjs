// The stress mode of the browser end-to-end tests: runs e2e/chat.test.mjs (or the tests whose
// name matches --grep) many times, each run in a fresh Node process with its own browser,
// optionally next to busy loops (CPU load) and with every byte between the pages and the
// server delayed by a proxy (network latency). Prints one line per run and a summary; keeps
// the full output (with the diagnostics of each failure) of the failed runs only.
//
//   node e2e/stress.mjs [--runs N] [--grep PATTERN] [--load K] [--latency MS]
//                       [--max-minutes M] [--out DIR] [--stop-on-failure]
//
//   --runs N           runs (default 20)
//   --grep PATTERN     only the tests whose name matches (Node's --test-name-pattern)
//   --load K           K busy loops next to the tests (default 0), each ending by itself at
//                      the time limit at the latest
//   --latency MS       delay each chunk of bytes between pages and server by MS to 1.5 MS
//                      (E2E_LATENCY_MS, default 0: direct)
//   --max-minutes M    stop starting new runs after M minutes (default 120)
//   --out DIR          where failed runs' logs go (default e2e/output/stress-<time>)
//   --stop-on-failure  stop at the first failed run
//
// Closing line: `stress: N passed, N failed` (plus the load and the latency).

import { spawn } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, loadavg } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const { values: opt } = parseArgs({
  options: {
    runs: { type: "string", default: "20" },
    grep: { type: "string" },
    load: { type: "string", default: "0" },
    latency: { type: "string", default: "0" },
    "max-minutes": { type: "string", default: "120" },
    out: { type: "string" },
    "stop-on-failure": { type: "boolean", default: false },
  },
});
const runs = Number(opt.runs);
const load = Number(opt.load);
const latency = Number(opt.latency);
const limitMs = Number(opt["max-minutes"]) * 60_000;
const started = Date.now();
const out = opt.out ?? join(here, "output", `stress-${new Date(started).toISOString().replace(/[:.]/g, "-")}`);
mkdirSync(out, { recursive: true });

// Busy loops: separate processes (real CPU contention for the browser, the server and the
// test), each stopping by itself at the time limit, and stopped by pid when the runs end.
const loops = [];
for (let i = 0; i < load; i++) {
  const until = started + limitMs + 60_000;
  loops.push(spawn(process.execPath, ["-e", `const end = ${until}; let x = 0; while (Date.now() < end) x++;`], { stdio: "ignore" }));
}
const stopLoops = () => {
  for (const p of loops) if (p.exitCode === null) p.kill("SIGKILL");
};
process.on("exit", stopLoops);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    stopLoops();
    process.exit(130);
  });
}

const describe = [
  `${runs} runs of e2e/chat.test.mjs${opt.grep ? ` (tests matching /${opt.grep}/)` : ""}`,
  `${load} busy loop${load === 1 ? "" : "s"} on ${availableParallelism()} cores`,
  latency > 0 ? `latency ${latency}-${latency * 1.5} ms per chunk through a proxy` : "no added latency",
].join(", ");
console.log(`stress: ${describe}; failed runs' logs in ${out}`);

let passed = 0;
let failed = 0;
const failures = new Map();
const loads = [];
for (let i = 1; i <= runs; i++) {
  if (Date.now() - started > limitMs) {
    console.log(`stress: time limit reached after ${i - 1} runs`);
    break;
  }
  const t = Date.now();
  const runOut = join(out, `run-${i}`);
  const args = ["--test", "--test-reporter=spec"];
  if (opt.grep) args.push(`--test-name-pattern=${opt.grep}`);
  args.push(join(here, "chat.test.mjs"));
  const { code, output } = await new Promise((resolve) => {
    const child = spawn(process.execPath, args, {
      cwd: join(here, ".."),
      env: { ...process.env, E2E_LATENCY_MS: String(latency), E2E_OUTPUT: runOut },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let text = "";
    child.stdout.on("data", (d) => (text += d));
    child.stderr.on("data", (d) => (text += d));
    child.on("exit", (c, s) => resolve({ code: c ?? s, output: text }));
  });
  const secs = ((Date.now() - t) / 1000).toFixed(1);
  const avg = loadavg()[0];
  loads.push(avg);
  // A run counts as passed only if Node's runner reports no failure and at least one pass.
  const pass = code === 0 && /^ℹ pass [1-9]/m.test(output) && /^ℹ fail 0$/m.test(output);
  if (pass) {
    passed++;
    rmSync(runOut, { recursive: true, force: true });
    console.log(`run ${i}/${runs}: ok      ${secs}s  load ${avg.toFixed(1)}`);
  } else {
    failed++;
    const log = join(out, `run-${i}.log`);
    writeFileSync(log, output);
    // The failing tests (✖ lines before the summary) and the first line of each error.
    const body = output.split("\nℹ tests")[0];
    const lines = body.split("\n");
    const what = [];
    for (let k = 0; k < lines.length; k++) {
      const m = /^✖ (.*) \([\d.]+ms\)$/.exec(lines[k]);
      if (m) what.push(`${m[1]}: ${(lines[k + 1] ?? "").trim().replace(/^Error: /, "")}`);
    }
    if (what.length === 0) what.push(`exit ${code}, no failing test named`);
    for (const w of what) failures.set(w, (failures.get(w) ?? 0) + 1);
    console.log(`run ${i}/${runs}: FAILED  ${secs}s  load ${avg.toFixed(1)}  ${what.join(" | ")}  (${log})`);
    if (opt["stop-on-failure"]) break;
  }
}
stopLoops();

const minutes = ((Date.now() - started) / 60_000).toFixed(1);
const meanLoad = loads.length ? (loads.reduce((a, b) => a + b, 0) / loads.length).toFixed(1) : "-";
console.log(`\nstress: ${passed + failed} runs in ${minutes} min, mean 1-minute load ${meanLoad} on ${availableParallelism()} cores`);
for (const [w, n] of failures) console.log(`  ${n}x ${w}`);
console.log(`stress: ${passed} passed, ${failed} failed (${describe})`);
process.exitCode = failed > 0 || passed === 0 ? 1 : 0;
