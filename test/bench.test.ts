// `npm run bench -- --quick` runs end to end (its own nats-server, relays, controllers) and writes
// JSON of the documented shape. No timing assertions: figures depend on the machine.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";

const here = path.dirname(fileURLToPath(import.meta.url));
const BENCH = path.resolve(here, "../scripts/bench.js");

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const env: NodeJS.ProcessEnv = {};
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_")) env[k] = v;
    const p = spawn(process.execPath, [BENCH, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (c: string) => (stdout += c));
    p.stderr.setEncoding("utf8").on("data", (c: string) => (stderr += c));
    const timer = setTimeout(() => p.kill("SIGKILL"), 150_000);
    p.once("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const positive = (x: unknown): boolean => typeof x === "number" && Number.isFinite(x) && x > 0;

t.test("bench --quick writes the figures as JSON", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-bench-test-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "bench.json");
  const r = await run(["--quick", "--json", file]);
  t.equal(r.code, 0, `exit code (stderr: ${r.stderr.slice(-2000)})`);
  t.match(r.stdout, /relay ÷ direct/, "prints the table with the ratios");

  const doc = JSON.parse(fs.readFileSync(file, "utf8")) as Record<string, Record<string, unknown>>;
  const shape: Record<string, string[]> = {
    direct: ["throughput", "p50", "p90", "p99", "max"],
    relay: ["throughput", "p50", "p90", "p99", "max", "rssMb"],
    sqlite: ["throughput", "p50", "p90", "p99", "max", "rssMb"],
    ratios: ["throughput", "p50", "p99"],
  };
  for (const [section, keys] of Object.entries(shape)) {
    t.type(doc[section], "object", `${section} is an object`);
    for (const k of keys) t.ok(positive(doc[section]?.[k]), `${section}.${k} is a positive finite number (${String(doc[section]?.[k])})`);
  }
  const ratio = (k: string): number => (doc.relay![k] as number) / (doc.direct![k] as number);
  for (const k of ["throughput", "p50", "p99"])
    t.ok(Math.abs((doc.ratios![k] as number) - ratio(k)) <= 0.001 * ratio(k) + 1e-4, `ratios.${k} is relay ÷ direct`);
});

t.test("bench leaves no processes behind", async (t) => {
  // The bench started its own nats-server and relays with temporary dirs under os.tmpdir();
  // none of them may still be running.
  const ps = await new Promise<string>((resolve) => {
    const p = spawn("ps", ["-eo", "args"], { stdio: ["ignore", "pipe", "ignore"] });
    let out = "";
    p.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
    p.once("exit", () => resolve(out));
  });
  const leftovers = ps.split("\n").filter((l) => /uptrakit-bench-(nats|bench-)/.test(l) || l.includes("bench-controller.js"));
  t.same(leftovers, [], "no nats-server, relay or controller of the bench is left running");
});
