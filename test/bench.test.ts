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

t.test("bench --fanout 2 runs relays and direct peers on one stream and reports per-delivery figures", async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-bench-test-"));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "fanout.json");
  const r = await run(["--fanout", "2", "--quick", "--duration", "2", "--json", file]);
  t.equal(r.code, 0, `exit code (stderr: ${r.stderr.slice(-2000)})`);
  t.match(r.stdout, /relay ÷ direct: relays' own CPU/, "prints the ratios");

  const f = (JSON.parse(fs.readFileSync(file, "utf8")) as { fanout: Record<string, Record<string, unknown>> }).fanout;
  t.equal(f.k, 2);
  t.equal(f.rate, 200, "the issue's default rate for K = 2");
  // Each of the 2 peers receives the other's 200 msg/s × 2 s, every one exactly once.
  for (const p of ["direct", "relay"]) {
    const x = f[p]!;
    t.equal(x.deliveries, 2 * 1 * 400, `${p}: every peer got every other peer's messages`);
    for (const k of ["p50", "p99", "pathCpuUsPerDelivery"]) t.ok(positive(x[k]), `${p}.${k} is a positive finite number (${String(x[k])})`);
    t.equal(x.echoesDelivered, 0, `${p}: no controller saw its own message`);
  }
  t.ok(positive(f.relay!.relayCpuUsPerDelivery), "relay.relayCpuUsPerDelivery");
  const ratios = (f.ratios as unknown as Record<string, Record<string, unknown>>).relay!;
  for (const k of ["relayCpu", "pathCpu", "p50", "p99"]) t.ok(positive(ratios[k]), `ratios.relay.${k} (${String(ratios[k])})`);
  t.ok(Math.abs((ratios.p99 as number) - (f.relay!.p99 as number) / (f.direct!.p99 as number)) < 0.01 * (ratios.p99 as number) + 1e-3, "ratios.relay.p99 is relay ÷ direct");
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
  const leftovers = ps.split("\n").filter((l) => /uptrakit-bench-(nats|bench-)/.test(l) || l.includes("bench-controller.js") || l.includes("fanout-peer.js"));
  t.same(leftovers, [], "no nats-server, relay or controller of the bench is left running");
});
