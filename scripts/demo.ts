// npm run demo: two relays on one shared embedded bus file, each with a demo controller, so you
// can watch notifications cross between "controller A" and "controller B". Ctrl-C stops it all.
//
//   npm run demo                       # embedded SQLite bus, nothing else needed
//   npm run demo -- --nats-url nats://127.0.0.1:4222   # the same over JetStream

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Command } from "commander";

const here = path.dirname(fileURLToPath(import.meta.url));
const RELAY = path.resolve(here, "../relay/main.js");
const STUB = path.resolve(here, "../controller-stub/main.js");

const opts = new Command("demo")
  .option("--nats-url <url>", "run the relays on JetStream instead of the embedded bus")
  .option("--base-port <port>", "relay A listens here, relay B on the next port", "4381")
  .option("--publish-every <ms>", "how often each demo controller publishes", "2000")
  .parse()
  .opts<{ natsUrl?: string; basePort: string; publishEvery: string }>();

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-demo-"));
const children: ChildProcess[] = [];
let stopping = false;

function prefixLines(child: ChildProcess, label: string): void {
  for (const stream of [child.stdout!, child.stderr!]) {
    let buf = "";
    stream.setEncoding("utf8").on("data", (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        process.stdout.write(`${label} ${buf.slice(0, nl)}\n`);
        buf = buf.slice(nl + 1);
      }
    });
  }
}

function start(label: string, args: string[]): ChildProcess {
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  prefixLines(child, label);
  child.on("exit", (code, signal) => {
    if (!stopping) {
      process.stdout.write(`${label} exited (${signal ?? code}); stopping the demo\n`);
      void stopAll(1);
    }
  });
  children.push(child);
  return child;
}

async function stopAll(code: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  // Controllers first, then relays (which drain on SIGTERM).
  for (const c of children.slice().reverse()) {
    if (c.exitCode === null && c.signalCode === null) {
      c.kill("SIGTERM");
      await new Promise((r) => c.once("exit", r));
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
  process.exit(code);
}

process.on("SIGINT", () => void stopAll(0));
process.on("SIGTERM", () => void stopAll(0));

const busArgs = opts.natsUrl ? ["--nats-url", opts.natsUrl] : ["--bus", `sqlite:${path.join(dir, "bus.db")}`];
const ports = [Number(opts.basePort), Number(opts.basePort) + 1];
for (const [i, name] of ["a", "b"].entries())
  start(`[relay-${name}]`, [
    RELAY,
    "run",
    "--instance-id",
    `demo-${name}`,
    "--data-dir",
    path.join(dir, name),
    "--listen",
    `127.0.0.1:${ports[i]}`,
    "--log-level",
    "warn",
    ...busArgs,
  ]);
// The relays log at warn to keep the demo readable, so wait on their readiness probe.
await Promise.all(
  ports.map(async (port) => {
    for (let i = 0; i < 200; i++) {
      const ok = await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.ok, () => false);
      if (ok) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`relay on port ${port} did not become ready`);
  }),
);
process.stdout.write(
  `\nTwo relays on ${opts.natsUrl ? `JetStream at ${opts.natsUrl}` : "one embedded SQLite bus"}; each demo controller publishes every ${opts.publishEvery} ms.\nWatch A's notifications arrive at B and B's at A (never their own). Ctrl-C to stop.\n\n`,
);
for (const [i, name] of ["A", "B"].entries())
  start(`[controller-${name}]`, [STUB, "--relay-url", `ws://127.0.0.1:${ports[i]}/ws`, "--name", `controller-${name}`, "--publish-every", opts.publishEvery]);
