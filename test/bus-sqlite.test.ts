// What only the SQLite bus has: several processes on one file, how fast they notice each other,
// retention pruning, idle consumers, the duplicate window, and files it must refuse.
// (The Bus semantics themselves are checked by test/bus-sqlite-conformance.test.ts.)

import t from "tap";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import Database from "better-sqlite3";
import pino from "pino";
import { BusStartError, type BusMessage, type InboundMessage } from "../relay/bus/bus.js";
import { SqliteBus, type SqliteBusOptions } from "../relay/bus/sqlite.js";
import type { TapTest } from "./helpers/bus-conformance.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const CHILD = path.join(here, "helpers", "sqlite-bus-child.js");
const logger = pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" });
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** A fresh temp dir, removed at teardown, with the bus file path in it. */
function freshFile(tt: TapTest): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-sqlite-bus-"));
  tt.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, "bus.db");
}

function makeBus(tt: TapTest, file: string, instanceId: string, extra: Partial<SqliteBusOptions> = {}): SqliteBus {
  const bus = new SqliteBus({
    instanceId,
    stream: "uptrakit",
    ackWaitMs: 30_000,
    maxDeliver: 5,
    maxInFlight: 256,
    maxAgeMs: 24 * 60 * 60 * 1000,
    inactiveThresholdMs: 24 * 60 * 60 * 1000,
    file,
    logger,
    ...extra,
  });
  tt.teardown(() => bus.close());
  return bus;
}

const msg = (origin: string, id: string, payloadJson = "{}"): BusMessage => ({
  id,
  kind: "test.event",
  origin,
  publishedAt: new Date().toISOString(),
  payloadJson,
});

/** Resolves once `pred` holds for the deliveries so far (checked on each delivery). */
function collector(bus: SqliteBus, onEach: (m: InboundMessage) => void = (m) => m.ack()) {
  const got: Array<{ m: InboundMessage; at: number }> = [];
  let check: (() => void) | undefined;
  const consumption = bus.consume((m) => {
    onEach(m);
    got.push({ m, at: performance.timeOrigin + performance.now() });
    check?.();
  });
  const until = (pred: () => boolean, what: string, timeoutMs = 15_000) =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what} (${got.length} received)`)), timeoutMs);
      check = () => {
        if (pred()) {
          clearTimeout(timer);
          check = undefined;
          resolve();
        }
      };
      check();
    });
  return { got, until, consumption };
}

// ---- child processes ------------------------------------------------------------------------

interface Child {
  proc: ChildProcess;
  ready: Promise<void>;
  done: Promise<{ done: true; published: number; duplicates: number; received: number; errors: string[]; errorCount: number }>;
  exited: Promise<number | null>;
  go(): void;
}

const children = new Set<ChildProcess>();
process.on("exit", () => {
  for (const p of children) p.kill("SIGKILL");
});

function child(tt: TapTest, opts: Record<string, unknown>): Child {
  const proc = spawn(process.execPath, [CHILD, JSON.stringify(opts)], { stdio: ["pipe", "pipe", "pipe"] });
  children.add(proc);
  let stderr = "";
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) =>
    proc.on("exit", (code) => {
      children.delete(proc);
      resolve(code);
    }),
  );
  tt.teardown(async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    await exited;
  });
  let onReady!: () => void;
  let onDone!: (v: Awaited<Child["done"]>) => void;
  const ready = new Promise<void>((resolve) => (onReady = resolve));
  const done = new Promise<Awaited<Child["done"]>>((resolve, reject) => {
    onDone = resolve;
    void exited.then((code) => reject(new Error(`child exited (${code}) before reporting: ${stderr.slice(0, 2000)}`)));
  });
  readline.createInterface({ input: proc.stdout! }).on("line", (line) => {
    const o = JSON.parse(line) as Record<string, unknown>;
    if (o.ready) onReady();
    if (o.done) onDone(o as Awaited<Child["done"]>);
  });
  return { proc, ready, done, exited, go: () => proc.stdin!.end("go\n") };
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;

// ---- tests ----------------------------------------------------------------------------------

t.test("two processes publish at once while a third consumes: no SQLITE_BUSY, nothing lost", async (t) => {
  const file = freshFile(t);
  const consumer = makeBus(t, file, "consumer");
  await consumer.start();
  const c = collector(consumer);
  const perChild = 1500;
  const pubs = ["pub-1", "pub-2"].map((id) => child(t, { mode: "publish", file, instanceId: id, count: perChild, consume: true }));
  await Promise.all(pubs.map((p) => p.ready));
  const t0 = performance.now();
  for (const p of pubs) p.go();
  const reports = await Promise.all(pubs.map((p) => p.done));
  const codes = await Promise.all(pubs.map((p) => p.exited));
  const publishMs = performance.now() - t0;
  t.same(codes, [0, 0], "both publishers exited cleanly");
  for (const r of reports) {
    t.same(r.errors, [], "no publish failed (no SQLITE_BUSY)");
    t.equal(r.published, perChild, `published ${perChild}`);
    t.equal(r.duplicates, 0, "none reported as duplicate");
  }
  await c.until(() => c.got.length >= perChild * 2, "every message");
  const totalMs = performance.now() - t0;
  const ids = new Set(c.got.map((g) => `${g.m.origin}/${g.m.id}`));
  t.equal(ids.size, perChild * 2, "every message received");
  t.equal(c.got.length, perChild * 2, "each exactly once");
  t.ok(c.got.every((g) => g.m.attempt === 1), "all first deliveries");
  t.ok(c.got.every((g, i) => i === 0 || g.m.seq > c.got[i - 1]!.m.seq), "in stream order");
  t.equal((await consumer.info()).messages, perChild * 2, "all stored");
  t.comment(
    `${perChild * 2} messages from 2 processes (each also consuming and acking): published in ${publishMs.toFixed(0)} ms, ` +
      `all consumed in ${totalMs.toFixed(0)} ms; the publishers' own consumers got ${reports.map((r) => r.received).join(" and ")}`,
  );
});

async function measureLatency(t: TapTest, label: string, extra: Partial<SqliteBusOptions>) {
  const file = freshFile(t);
  const consumer = makeBus(t, file, "consumer", extra);
  await consumer.start();
  const c = collector(consumer);
  const count = 150;
  const p = child(t, { mode: "publish", file, instanceId: "publisher", count, intervalMs: 7 });
  await p.ready;
  p.go();
  const report = await p.done;
  t.same(report.errors, [], "publisher had no errors");
  await c.until(() => c.got.length >= count, "every message");
  const lat = c.got.map((g) => g.at - (JSON.parse(g.m.payloadJson) as { sentAt: number }).sentAt).sort((a, b) => a - b);
  const fmt = (n: number) => n.toFixed(1);
  t.comment(
    `cross-process latency, ${label}, publish → onMessage over ${count} messages: ` +
      `p50 ${fmt(percentile(lat, 50))} ms, p90 ${fmt(percentile(lat, 90))} ms, p99 ${fmt(percentile(lat, 99))} ms, max ${fmt(lat[lat.length - 1]!)} ms`,
  );
  t.ok(lat[lat.length - 1]! < 1000, "every message arrived within a second (sanity bound)");
}

t.test("cross-process delivery latency: WAL watch + data_version poll (the default)", (t) => measureLatency(t, "watch + poll", {}));
t.test("cross-process delivery latency: data_version poll alone", (t) => measureLatency(t, "poll alone", { watchWal: false }));
t.test("cross-process delivery latency: WAL watch alone", (t) => measureLatency(t, "watch alone", { pollIntervalMs: 0 }));

t.test("six processes starting at once on a fresh file all succeed", async (t) => {
  const file = freshFile(t);
  const procs = [1, 2, 3, 4, 5, 6].map((i) => child(t, { mode: "start", file, instanceId: `starter-${i}` }));
  await Promise.all(procs.map((p) => p.ready));
  for (const p of procs) p.go();
  const reports = await Promise.all(procs.map((p) => p.done));
  t.same(reports.flatMap((r) => r.errors), [], "no start-up failed");
  t.same(await Promise.all(procs.map((p) => p.exited)), [0, 0, 0, 0, 0, 0], "all exited cleanly");
  const db = new Database(file, { readonly: true });
  t.teardown(() => db.close());
  t.equal((db.prepare("SELECT count(*) FROM bus_consumers").pluck().get() as number), 6, "six consumers registered");
});

t.test("retention: old messages are pruned periodically and at start", async (t) => {
  const file = freshFile(t);
  const maxAgeMs = 300;
  const a = makeBus(t, file, "a", { maxAgeMs, ackWaitMs: 60_000 });
  await a.start();
  const c = collector(a, () => {}); // deliveries left unsettled
  for (const id of ["old-1", "old-2", "old-3"]) await a.publish(msg("a", id));
  await c.until(() => c.got.length === 3, "three deliveries");
  t.equal((await a.info()).consumer?.ackPending, 3, "three unsettled");
  const t0 = Date.now();
  for (;;) {
    const info = await a.info();
    if (info.messages === 0) {
      t.equal(info.consumer?.ackPending, 0, "the delivery state of pruned messages went with them");
      break;
    }
    if (Date.now() - t0 > 5000) {
      t.fail(`not pruned after 5 s: ${JSON.stringify(info)}`);
      break;
    }
    await sleep(25);
  }
  t.ok(Date.now() - t0 < 5000, `pruned ${Date.now() - t0} ms after maxAge ${maxAgeMs} ms began`);
  await a.publish(msg("a", "fresh"));
  await c.until(() => c.got.some((g) => g.m.id === "fresh"), "a new message after pruning");
  await a.close();

  // At start: a file holding messages older than maxAge is pruned before start() resolves.
  const file2 = freshFile(t);
  const keeper = makeBus(t, file2, "keeper");
  await keeper.start();
  await keeper.publish(msg("keeper", "stale"));
  await keeper.close();
  await sleep(60); // let the message age past the next bus's maxAge (a bounded wait is the point here)
  const late = makeBus(t, file2, "late", { maxAgeMs: 50 });
  await late.start();
  t.equal((await late.info()).messages, 0, "pruned at start");
});

t.test("consumers idle past inactiveThreshold are removed; a removed one starts afresh (deliver new)", async (t) => {
  const file = freshFile(t);
  const threshold = { inactiveThresholdMs: 400 };
  const a = makeBus(t, file, "a", threshold);
  await a.start();
  const b1 = makeBus(t, file, "b", threshold);
  await b1.start();
  const first = collector(b1, () => {}); // leaves its delivery unsettled
  await a.publish(msg("a", "unsettled"));
  await first.until(() => first.got.length === 1, "b's delivery");
  await b1.close();
  await a.publish(msg("a", "while-b-idle"));

  const peek = new Database(file, { readonly: true });
  t.teardown(() => peek.close());
  const bRows = peek.prepare("SELECT (SELECT count(*) FROM bus_consumers WHERE name = 'b') + (SELECT count(*) FROM bus_deliveries WHERE consumer = 'b')").pluck();
  const t0 = Date.now();
  while ((bRows.get() as number) > 0 && Date.now() - t0 < 5000) await sleep(25);
  t.equal(bRows.get(), 0, `b's consumer and delivery state removed by a's maintenance after ${Date.now() - t0} ms`);
  t.equal(peek.prepare("SELECT count(*) FROM bus_consumers WHERE name = 'a'").pluck().get(), 1, "the active consumer stays");

  const b2 = makeBus(t, file, "b", threshold);
  await b2.start();
  const second = collector(b2);
  await a.publish(msg("a", "after-return"));
  await second.until(() => second.got.some((g) => g.m.id === "after-return"), "after-return");
  t.same(second.got.map((g) => g.m.id), ["after-return"], "the recreated consumer gets only what is new");
});

t.test("duplicate window: a retry within it is a duplicate, after it the message is stored anew", async (t) => {
  const file = freshFile(t);
  const a = makeBus(t, file, "a", { duplicateWindowMs: 200 });
  await a.start();
  const c = collector(a);
  t.same(await a.publish(msg("a", "m")), { duplicate: false });
  t.same(await a.publish(msg("a", "m")), { duplicate: true }, "within the window");
  await c.until(() => c.got.length === 1, "first copy");
  await sleep(250); // past the window
  t.same(await a.publish(msg("a", "m")), { duplicate: false }, "after the window");
  await c.until(() => c.got.length === 2, "second copy");
  t.ok(c.got[1]!.m.seq > c.got[0]!.m.seq, "stored with a new seq");
  t.equal((await a.info()).messages, 1, "replacing the old copy");
});

t.test("files it cannot use: BusStartError naming the file", async (t) => {
  const junk = freshFile(t);
  fs.writeFileSync(junk, Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7919) % 256)));
  const e1 = await makeBus(t, junk, "a").start().then(() => null, (e: unknown) => e);
  t.type(e1, BusStartError, "junk bytes: BusStartError");
  t.match((e1 as Error).message, junk, "names the file");
  t.match((e1 as Error).message, /not a database/, "says why");

  // A real bus file with junk over its data pages.
  const damaged = freshFile(t);
  const ok = makeBus(t, damaged, "a");
  await ok.start();
  for (let i = 0; i < 200; i++) await ok.publish(msg("a", `m-${i}`, JSON.stringify({ filler: "x".repeat(200) })));
  await ok.close();
  const size = fs.statSync(damaged).size;
  t.ok(size > 16384, "the file has several pages");
  const fd = fs.openSync(damaged, "r+");
  fs.writeSync(fd, Buffer.alloc(size - 8192, 0xa5), 0, size - 8192, 8192);
  fs.closeSync(fd);
  const e2 = await makeBus(t, damaged, "b").start().then(() => null, (e: unknown) => e);
  t.type(e2, BusStartError, "damaged pages: BusStartError");
  t.match((e2 as Error).message, damaged, "names the file");

  const underFile = path.join(junk, "bus.db"); // its "directory" is a regular file
  const e3 = await makeBus(t, underFile, "a").start().then(() => null, (e: unknown) => e);
  t.type(e3, BusStartError, "unusable path: BusStartError");
  t.match((e3 as Error).message, underFile, "names the file");
});
