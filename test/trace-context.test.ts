// W3C trace context end to end: a publish's traceparent/tracestate reach the deliver frame on both
// buses, through the outbox (NATS down), a dead letter and its replay, and survive a store and a
// bus file made before the columns existed; a malformed one is dropped (warned, counted), never a
// refused publish. The format itself is covered with fast-check.

import fs from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import fc from "fast-check";
import Database from "better-sqlite3";
import { parseTraceContext, validTraceparent, validTracestate } from "../relay/trace-context.js";
import { parseClientFrame, type PublishFrame } from "../relay/protocol.js";
import { backends, type Medium } from "./helpers/relay-backends.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";

const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TS = "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7";

const hex = (n: number) => fc.string({ unit: fc.constantFrom(..."0123456789abcdef"), minLength: n, maxLength: n });
const traceparents = fc
  .tuple(hex(32), hex(16), hex(2))
  .filter(([tr, sp]) => /[^0]/.test(tr) && /[^0]/.test(sp))
  .map(([tr, sp, fl]) => `00-${tr}-${sp}-${fl}`);

t.test("traceparent: the W3C format, property-checked", async (tt) => {
  fc.assert(fc.property(traceparents, (tp) => validTraceparent(tp)));
  // Any single-character change of a valid one that breaks the format is refused.
  fc.assert(
    fc.property(traceparents, fc.nat(54), fc.constantFrom("g", "A", "-", " ", "\n", "\u00e9", ""), (tp, i, c) => {
      const mutated = tp.slice(0, i) + c + tp.slice(i + 1);
      const stillHex = /^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/.test(mutated);
      return validTraceparent(mutated) === (stillHex && !/-0{32}-|-0{16}-/.test(mutated));
    }),
  );
  for (const bad of [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // all-zero span id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
    `${TP}-extra`, // version 00 has no more fields
    TP.toUpperCase(),
    42,
    null,
  ])
    tt.notOk(validTraceparent(bad), `refused: ${JSON.stringify(bad)}`);
  tt.ok(validTraceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"), "a later version may add fields");
  tt.ok(validTracestate(TS));
  tt.ok(validTracestate("tenant@vendor=v,,  k=v2"), "tenant keys and empty members");
  for (const bad of ["Upper=x", "k=a,b", "k=a=b", "k", "x".repeat(513), Array.from({ length: 33 }, (_, i) => `k${i}=v`).join(",")])
    tt.notOk(validTracestate(bad), `refused tracestate: ${bad.slice(0, 40)}`);
  tt.same(parseTraceContext(TP, "Bad State"), { traceparent: TP, dropped: "malformed tracestate" });
  tt.same(parseTraceContext("nope", TS), { dropped: "malformed traceparent" }, "tracestate goes with its traceparent");
  tt.same(parseTraceContext(undefined, TS), { dropped: "tracestate without traceparent" });
});

t.test("a publish with any traceparent is never refused for it", async (tt) => {
  fc.assert(
    fc.property(fc.oneof(traceparents, fc.string(), fc.anything()), fc.oneof(fc.constant(undefined), fc.string(), fc.anything()), (tp, ts) => {
      const r = parseClientFrame(JSON.stringify({ type: "publish", id: "x", kind: "K", payload: 1, traceparent: tp, tracestate: ts }));
      if (!r.ok) return false;
      const f = r.frame as PublishFrame;
      return (f.traceparent === undefined || validTraceparent(f.traceparent)) && (f.tracestate === undefined || validTracestate(f.tracestate));
    }),
  );
});

async function metric(r: RelayProcess, name: string): Promise<number> {
  const body = await (await fetch(`${r.httpUrl}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, "m").exec(body);
  if (!m) throw new Error(`/metrics has no ${name}`);
  return Number(m[1]);
}

interface Env {
  relay(id: string, args?: string[], dataDir?: string): Promise<RelayProcess>;
  controller(r: RelayProcess): Promise<TestController>;
}

function setup(tt: Test, medium: () => string[], stopMedium?: () => Promise<void>): Env {
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await stopMedium?.();
  });
  return {
    async relay(id, args = [], dataDir) {
      const r = await startRelay({ instanceId: id, dataDir, args: [...medium(), ...args] });
      relays.push(r);
      return r;
    },
    async controller(r) {
      const c = await TestController.connect(r.wsUrl);
      controllers.push(c);
      return c;
    },
  };
}

async function publishTraced(c: TestController, id: string, extra: Frame): Promise<Frame> {
  const from = c.frames.length;
  c.send({ type: "publish", id, kind: "CertificateRenewed", payload: { id }, ...extra });
  return c.next((f) => (f.type === "published" || f.type === "error") && f.id === id, 15_000, from);
}

async function dlqList(dataDir: string): Promise<Frame[]> {
  const r = await runRelayCli(["dlq", "list", "--data-dir", dataDir, "--json"]);
  if (r.code !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout) as Frame[];
}

for (const backend of backends) {
  t.test(`${backend.name}: trace context reaches the deliver frame, through a dead letter and its replay`, async (tt) => {
    const medium: Medium = await backend.create();
    const env = setup(tt, () => medium.args, () => medium.stop());
    const dataB = tempDir();
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo", [], dataB)]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);

    tt.same(await publishTraced(ca, "traced", { traceparent: TP, tracestate: TS }), { type: "published", id: "traced" });
    const d = await cb.next((f) => f.type === "deliver" && f.id === "traced");
    tt.equal(d.traceparent, TP, "deliver carries the traceparent");
    tt.equal(d.tracestate, TS, "and the tracestate");
    cb.ack(d);

    tt.same(await publishTraced(ca, "plain", {}), { type: "published", id: "plain" });
    const plain = await cb.next((f) => f.type === "deliver" && f.id === "plain");
    tt.notOk("traceparent" in plain || "tracestate" in plain, "no trace context, no fields");
    cb.ack(plain);

    // Malformed: published all the same, without it; warned and counted.
    tt.same(await publishTraced(ca, "malformed", { traceparent: "00-xyz", tracestate: TS }), { type: "published", id: "malformed" });
    tt.same(await publishTraced(ca, "bad-state", { traceparent: TP, tracestate: "Not Valid" }), { type: "published", id: "bad-state" });
    const m = await cb.next((f) => f.type === "deliver" && f.id === "malformed");
    tt.notOk("traceparent" in m || "tracestate" in m, "a malformed traceparent is dropped, with its tracestate");
    const bs = await cb.next((f) => f.type === "deliver" && f.id === "bad-state");
    tt.equal(bs.traceparent, TP, "a malformed tracestate drops only itself");
    tt.notOk("tracestate" in bs);
    cb.ack(m);
    cb.ack(bs);
    tt.equal(await metric(ra, "uptrakit_relay_trace_context_dropped_total"), 2, "both drops counted");
    await ra.waitForLog((l) => l.msg === "dropped the publish's trace context; publishing without it" && l.id === "malformed");

    // Rejected → a dead letter that keeps the context → replayed with it.
    await publishTraced(ca, "poison", { traceparent: TP, tracestate: TS });
    const p = await cb.next((f) => f.type === "deliver" && f.id === "poison");
    cb.send({ type: "reject", deliveryId: p.deliveryId, reason: "test" });
    let dead: Frame | undefined;
    for (let i = 0; i < 100 && !dead; i++) {
      dead = (await dlqList(dataB)).find((x) => x.id === "poison");
      if (!dead) await new Promise((r) => setTimeout(r, 100)); // another process's file: nothing to wait on
    }
    tt.match(dead, { id: "poison", traceparent: TP, tracestate: TS }, "the dead letter keeps the trace context");
    const before = cb.frames.length;
    tt.equal((await runRelayCli(["dlq", "replay", "poison", "--data-dir", dataB])).code, 0);
    const again = await cb.next((f) => f.type === "deliver" && f.id === "poison", 15_000, before);
    tt.equal(again.traceparent, TP, "the replayed delivery carries the traceparent");
    tt.equal(again.tracestate, TS);
    cb.ack(again);
  });
}

t.test("jetstream: trace context survives the outbox (NATS down, relay restarted)", async (tt) => {
  const server = await startNatsServer();
  const env = setup(tt, () => ["--nats-url", server.url], () => server.stop());
  const dataA = tempDir();
  const ra = await env.relay("alpha", [], dataA);
  const rb = await env.relay("bravo");
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  await server.kill();
  await ra.waitForLog((l) => l.msg === "bus disconnected", 15_000);
  tt.same(await publishTraced(ca, "queued", { traceparent: TP, tracestate: TS }), { type: "published", id: "queued", queued: true });
  await ra.stop("SIGKILL");
  await server.restart();
  await env.relay("alpha", [], dataA);
  const d = await cb.next((f) => f.type === "deliver" && f.id === "queued", 30_000);
  tt.equal(d.traceparent, TP, "the outbox kept the traceparent");
  tt.equal(d.tracestate, TS);
  cb.ack(d);
});

// The schemas of the first release, without the trace columns.
const OLD_STORE = `
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL, dead_at TEXT NOT NULL,
  replay_requested INTEGER NOT NULL DEFAULT 0);
INSERT INTO outbox (id, kind, origin, published_at, payload) VALUES ('old-queued', 'CertificateRenewed', 'alpha', '2026-01-01T00:00:00.000Z', '{"old":true}');
`;
const OLD_BUS = `
CREATE TABLE bus_messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, origin TEXT NOT NULL, id TEXT NOT NULL,
  kind TEXT NOT NULL, published_at TEXT NOT NULL, payload TEXT NOT NULL, stored_at INTEGER NOT NULL, UNIQUE (stream, origin, id));
`;

t.test("sqlite: a store and a bus file from before the trace columns are migrated on start", async (tt) => {
  const busDir = tempDir("uptrakit-bus-");
  const busFile = path.join(busDir, "bus.db");
  const dataA = tempDir();
  for (const [file, sql] of [[busFile, OLD_BUS], [path.join(dataA, "relay.db"), OLD_STORE]] as const) {
    const db = new Database(file);
    db.exec(sql);
    db.close();
  }
  const env = setup(tt, () => ["--bus", `sqlite:${busFile}`], async () => fs.rmSync(busDir, { recursive: true, force: true }));
  const rb = await env.relay("bravo");
  const cb = await env.controller(rb);
  const ra = await env.relay("alpha", [], dataA);
  const ca = await env.controller(ra);
  const old = await cb.next((f) => f.type === "deliver" && f.id === "old-queued", 20_000);
  tt.same(old.payload, { old: true }, "the old outbox row was sent");
  tt.notOk("traceparent" in old);
  cb.ack(old);
  await publishTraced(ca, "new", { traceparent: TP });
  const d = await cb.next((f) => f.type === "deliver" && f.id === "new");
  tt.equal(d.traceparent, TP, "the migrated bus carries the traceparent");
  cb.ack(d);
});
