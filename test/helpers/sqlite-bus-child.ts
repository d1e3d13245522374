// A relay-like process on an SQLite bus file, for test/bus-sqlite.test.ts (run from dist:
// `node dist/test/helpers/sqlite-bus-child.js '<json options>'`).
//
// It prints JSON lines on stdout: {"ready":true} once loaded (after start() in "publish" mode),
// then waits for a line "go" on stdin, does its job and prints {"done":true,...}. Errors are
// reported in the done line and make the exit code 1.
//
// Modes:
// - "start": start() the bus after "go" (several at once test concurrent schema creation).
// - "publish": publish `count` messages `<idPrefix><n>` as fast as possible, or one every
//   `intervalMs`; each payload carries {"sentAt": <ms since the epoch, sub-ms precision>} for
//   latency measurements. With `consume`, the process also consumes and acks meanwhile (more
//   writers on the file).

import readline from "node:readline";
import { performance } from "node:perf_hooks";
import pino from "pino";
import { SqliteBus } from "../../relay/bus/sqlite.js";

interface Options {
  mode: "start" | "publish";
  file: string;
  instanceId: string;
  stream?: string;
  count?: number;
  intervalMs?: number;
  idPrefix?: string;
  consume?: boolean;
}

const opts = JSON.parse(process.argv[2] ?? "{}") as Options;
const out = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

const bus = new SqliteBus({
  instanceId: opts.instanceId,
  stream: opts.stream ?? "uptrakit",
  ackWaitMs: 30_000,
  maxDeliver: 5,
  maxInFlight: 256,
  maxAgeMs: 24 * 60 * 60 * 1000,
  inactiveThresholdMs: 24 * 60 * 60 * 1000,
  file: opts.file,
  logger: pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" }),
});

const go = new Promise<void>((resolve) => {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    if (line.trim() === "go") {
      rl.close();
      process.stdin.destroy(); // or the open pipe keeps this process alive
      resolve();
    }
  });
});

const errors: string[] = [];
let published = 0;
let duplicates = 0;
let received = 0;

try {
  if (opts.mode === "start") {
    out({ ready: true });
    await go;
    await bus.start();
  } else {
    await bus.start();
    if (opts.consume) bus.consume((m) => {
      received++;
      m.ack();
    });
    out({ ready: true });
    await go;
    const count = opts.count ?? 100;
    for (let i = 0; i < count; i++) {
      try {
        const r = await bus.publish({
          id: `${opts.idPrefix ?? opts.instanceId}-${i}`,
          kind: "test.load",
          origin: opts.instanceId,
          publishedAt: new Date().toISOString(),
          payloadJson: JSON.stringify({ sentAt: now(), i }),
        });
        published++;
        if (r.duplicate) duplicates++;
      } catch (err) {
        errors.push(`${(err as Error).name}: ${(err as Error).message}`);
      }
      if (opts.intervalMs) await sleep(opts.intervalMs);
    }
  }
} catch (err) {
  errors.push(`${(err as Error).name}: ${(err as Error).message}`);
}
await bus.close();
out({ done: true, published, duplicates, received, errors: errors.slice(0, 20), errorCount: errors.length });
process.exitCode = errors.length > 0 ? 1 : 0;
