// npm run chaos, bounded: a fixed number of scenarios from a fixed seed (real relays, nats-server
// processes or a SQLite bus, faults injected) end with 0 violations — and faults of several kinds
// were injected and dead letters checked, so that this cannot pass vacuously. A fixed count, not
// a time budget: on a loaded machine a budget ran fewer scenarios and covered less. (The budget
// stays as a safety stop.) The checker's own ability to fail is shown in-process by
// test/chaos-check.test.ts.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";

const CHAOS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../scripts/chaos.js");
/** Seeds 1000..1002: cluster and SQLite; relay SIGKILL and SIGTERM, NATS restart, leader kill, store busy; dead letters. */
const SEED = 1000;
const RUNS = 3;

t.test(`npm run chaos -- --seed ${SEED} --runs ${RUNS}: 0 violations, faults of several kinds, dead letters`, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-chaos-test-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const json = path.join(dir, "chaos.json");
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_")) env[k] = v;
  const child = spawn(process.execPath, [CHAOS, "--seed", String(SEED), "--runs", String(RUNS), "--budget", "150", "--shrink-budget", "0", "--json", json], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
  child.stderr.setEncoding("utf8").on("data", (c: string) => (out += c));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
  });
  const code = await new Promise<number | null>((resolve) => child.once("exit", (c) => resolve(c)));
  t.comment(out.trim());
  t.equal(code, 0, "chaos exits 0");
  t.match(out, /^violations: 0$/m, "no violation");
  const r = JSON.parse(fs.readFileSync(json, "utf8")) as { scenarios: number; faults: Record<string, number>; messages: number; deadLetters: number; deliveries: number; violations: number };
  t.equal(r.violations, 0);
  t.equal(r.scenarios, RUNS, `${r.scenarios} scenarios ran`);
  const kinds = Object.keys(r.faults);
  t.ok(kinds.length >= 4, `faults of ${kinds.length} kinds injected: ${JSON.stringify(r.faults)}`);
  t.ok(r.messages > 0 && r.deliveries > 0, `${r.messages} messages, ${r.deliveries} deliveries`);
  t.ok(r.deadLetters > 0, `${r.deadLetters} dead letters were checked`);
});
