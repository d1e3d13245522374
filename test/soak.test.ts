// The soak script, short: 5 relays on a 3-node cluster for 15 s with a fault every 5 s. It must
// exit 0 (no acknowledged message lost) and print its counters and latency percentiles.

import t from "tap";
import { spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const SOAK = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../scripts/soak.js");

t.test("npm run soak -- --duration 15 --fault-every 5: no loss, counters printed", async (t) => {
  const started = Date.now();
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_")) env[k] = v;
  const child = spawn(process.execPath, [SOAK, "--duration", "15", "--fault-every", "5", "--rate", "20"], { env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
  child.stderr.setEncoding("utf8").on("data", (c: string) => (out += c));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
  });
  const code = await new Promise<number | null>((resolve) => child.once("exit", (c) => resolve(c)));
  t.comment(out.trim());
  t.equal(code, 0, "the soak exits 0");
  t.match(out, /^faults injected: 2 \(/m, "two faults were injected");
  t.match(out, /^counters: sent=\d+ acked=\d+ queued=\d+ pending=0 gave_up=\d+$/m, "counters printed");
  t.match(out, /^delivered per peer: soak-1=\d+ soak-2=\d+ soak-3=\d+ soak-4=\d+ soak-5=\d+$/m, "deliveries per peer printed");
  t.match(out, /^deliveries=\d+ duplicates=\d+ echoes=0 foreign=0 lost=0$/m, "nothing lost");
  t.match(out, /^delivery latency ms: n=\d+ p50=\d+ p90=\d+ p99=\d+ max=\d+$/m, "latency percentiles printed");
  t.match(out, /^result: OK/m);
  const acked = Number(/acked=(\d+)/.exec(out)?.[1]);
  t.ok(acked >= 1000, `a real load went through (${acked} acknowledged)`);
  t.comment(`took ${Date.now() - started} ms`);
});
