// What only a relay on JetStream has to get right, end to end through real relay processes and
// real nats-servers: start-up failures, riding out a NATS restart, and the outbox ("an accepted
// publish is never lost"). The behaviour both buses share is in relay-conformance.test.ts.

import t, { type Test } from "tap";
import fs from "node:fs";
import path from "node:path";
import { freePort, startNatsServer, type NatsServer, type NatsServerOptions } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess, type StartRelayOptions } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";
import { RelayStore } from "../relay/store/store.js";

// ---- per-test environment: everything started here is killed/removed in teardown ----------------

interface Env {
  server(opts?: NatsServerOptions): Promise<NatsServer>;
  relay(o: StartRelayOptions): Promise<RelayProcess>;
  controller(r: RelayProcess): Promise<TestController>;
  dir(): string;
}

/**
 * SIGSTOP reaches each thread of a process in its own time: on a busy 2-core VM some threads of
 * nats-server ran on for up to ~5 ms, long enough to answer a publish sent right after kill().
 */
async function allThreadsStopped(pid: number): Promise<void> {
  const stopped = (stat: string): boolean => /^[Tt]/.test(stat.slice(stat.lastIndexOf(") ") + 2));
  const deadline = Date.now() + 5_000;
  for (;;) {
    const tasks = fs.readdirSync(`/proc/${pid}/task`);
    if (tasks.every((tid) => stopped(fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8")))) return;
    if (Date.now() > deadline) throw new Error(`nats-server (pid ${pid}) did not stop within 5 s of SIGSTOP`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

function setup(tt: Test): Env {
  const servers: NatsServer[] = [];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  const dirs: string[] = [];
  const stoppers: Array<() => void> = [];
  tt.teardown(async () => {
    for (const s of stoppers) s();
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await Promise.all(servers.map((s) => s.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });
  const env: Env = {
    async server(opts) {
      const s = await startNatsServer(opts);
      servers.push(s);
      return s;
    },
    async relay(o) {
      const r = await startRelay(o);
      relays.push(r);
      return r;
    },
    async controller(r) {
      const c = await TestController.connect(r.wsUrl);
      controllers.push(c);
      stoppers.push(autoAck(c));
      return c;
    },
    dir() {
      const d = tempDir("uptrakit-relay-js-");
      dirs.push(d);
      return d;
    },
  };
  return env;
}

/** Acks every delivery as it arrives (a well-behaved controller); returns the stop function. */
function autoAck(c: TestController): () => void {
  let stopped = false;
  let from = 0;
  void (async () => {
    while (!stopped) {
      let f: Frame;
      try {
        f = await c.next((x) => x.type === "deliver", 500, from);
      } catch {
        if (c.closeCode !== undefined) return;
        continue; // nothing within 500 ms: look again (or notice the stop)
      }
      from = c.frames.indexOf(f, from) + 1;
      try {
        c.ack(f);
      } catch {
        return; // socket gone
      }
    }
  })();
  return () => {
    stopped = true;
  };
}

/** Waits until the controller has been delivered every one of `ids` (at least once). */
async function waitForIds(c: TestController, ids: Iterable<string>, timeoutMs: number): Promise<void> {
  const want = new Set(ids);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = new Set(c.deliveries().map((f) => f.id as string));
    const missing = [...want].filter((id) => !got.has(id));
    if (missing.length === 0) return;
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`${missing.length} of ${want.size} ids never delivered, e.g. ${missing.slice(0, 5).join(", ")}`);
    await c.next((f) => f.type === "deliver", left, c.frames.length).catch(() => undefined);
  }
}

/** Reads one gauge/counter value from a relay's /metrics. */
async function metric(r: RelayProcess, name: string): Promise<number> {
  const res = await fetch(`${r.httpUrl}/metrics`);
  const body = await res.text();
  const m = new RegExp(`^${name} (\\S+)$`, "m").exec(body);
  if (!m) throw new Error(`/metrics has no ${name}`);
  return Number(m[1]);
}

/** How many times each id was delivered, restricted to `ids`; the ones seen more than once. */
function duplicates(c: TestController, ids: Set<string>): Record<string, number> {
  const n = new Map<string, number>();
  for (const f of c.deliveries()) if (ids.has(f.id)) n.set(f.id, (n.get(f.id) ?? 0) + 1);
  return Object.fromEntries([...n].filter(([, k]) => k > 1));
}

/** First-delivery order of `ids` at a controller. */
function firstOrder(c: TestController, ids: Set<string>): string[] {
  const seen = new Set<string>();
  for (const f of c.deliveries()) if (ids.has(f.id) && !seen.has(f.id)) seen.add(f.id);
  return [...seen];
}

const runArgs = (dataDir: string, extra: string[]): string[] => [
  "run", "--instance-id", "probe", "--data-dir", dataDir, "--listen", "127.0.0.1:0", ...extra,
];

// ---- 1. start-up ------------------------------------------------------------------------------

t.test("start-up failures are clear and fast; flags beat env vars", async (t) => {
  t.jobs = 4; // independent: each has its own servers and dirs
  t.test("unreachable NATS URL: non-zero exit within 15 s, names the URL", async (tt) => {
    const env = setup(tt);
    const url = `nats://127.0.0.1:${await freePort()}`;
    const r = await runRelayCli(runArgs(env.dir(), ["--nats-url", url]), { timeoutMs: 20_000 });
    tt.not(r.code, 0, "exits non-zero");
    tt.not(r.code, null, "exits by itself (not killed by the timeout)");
    tt.ok(r.ms < 15_000, `exited after ${r.ms} ms`);
    tt.match(r.stderr, /cannot reach NATS/, "says it cannot reach NATS");
    tt.ok(r.stderr.includes(url), `names the URL: ${r.stderr}`);
  });

  t.test("nats-server without -js: says JetStream is not enabled, names the URL", async (tt) => {
    const env = setup(tt);
    const s = await env.server({ jetstream: false });
    const r = await runRelayCli(runArgs(env.dir(), ["--nats-url", s.url]), { timeoutMs: 25_000 });
    tt.not(r.code, 0, "exits non-zero");
    tt.not(r.code, null, "exits by itself");
    tt.ok(r.ms < 15_000, `exited after ${r.ms} ms`);
    tt.match(r.stderr, /JetStream is not enabled/);
    tt.ok(r.stderr.includes(s.url), `names the URL: ${r.stderr}`);
  });

  t.test("invalid option values name the option", async (tt) => {
    const env = setup(tt);
    const s = await env.server();
    const flag = await runRelayCli(runArgs(env.dir(), ["--nats-url", s.url, "--ack-wait", "abc"]));
    tt.not(flag.code, 0, "--ack-wait abc: non-zero");
    tt.not(flag.code, null);
    tt.match(flag.stderr, /--ack-wait/, "names --ack-wait");
    tt.match(flag.stderr, /abc/, "quotes the bad value");
    const fromEnv = await runRelayCli(runArgs(env.dir(), ["--nats-url", s.url]), { env: { UPTRAKIT_MAX_DELIVER: "0" } });
    tt.not(fromEnv.code, 0, "UPTRAKIT_MAX_DELIVER=0: non-zero");
    tt.not(fromEnv.code, null);
    tt.match(fromEnv.stderr, /--max-deliver|UPTRAKIT_MAX_DELIVER/, "names the option");
    tt.match(fromEnv.stderr, /UPTRAKIT_MAX_DELIVER/, "says the value came from the env var");
    tt.notMatch(flag.stderr + fromEnv.stderr, /relay running/);
  });

  t.test("a flag beats its env var; an env var alone is used", async (tt) => {
    const env = setup(tt);
    const s = await env.server();
    const dead = `nats://127.0.0.1:${await freePort()}`;
    // --instance-id flag-id (startRelay passes it) against UPTRAKIT_INSTANCE_ID=env-id;
    // --nats-url <live> against UPTRAKIT_NATS_URL=<nobody listens>.
    const r = await env.relay({ instanceId: "flag-id", natsUrl: s.url, env: { UPTRAKIT_INSTANCE_ID: "env-id", UPTRAKIT_NATS_URL: dead } });
    const c = await env.controller(r);
    tt.same(c.ready, { type: "ready", instanceId: "flag-id", bus: "jetstream" }, "the flags won");
    // With no --nats-url flag, UPTRAKIT_NATS_URL is what puts the relay on JetStream.
    const r2 = await env.relay({ instanceId: "from-env", env: { UPTRAKIT_NATS_URL: s.url } });
    const c2 = await env.controller(r2);
    tt.same(c2.ready, { type: "ready", instanceId: "from-env", bus: "jetstream" }, "the env var was used");
  });
});

// ---- 2. a NATS restart mid-run ----------------------------------------------------------------

t.test("a NATS restart mid-run loses no acknowledged publish", async (tt) => {
  const env = setup(tt);
  const server = await env.server();
  const [ra, rb] = await Promise.all([
    env.relay({ instanceId: "alpha", natsUrl: server.url }),
    env.relay({ instanceId: "bravo", natsUrl: server.url }),
  ]);
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);

  const TOTAL = 200;
  const RESTART_AT = 70;
  const answers: Array<Promise<Frame>> = [];
  const sentBy = new Map<string, "alpha" | "bravo">();
  let restarted: Promise<void> | undefined;
  for (let i = 0; i < TOTAL; i++) {
    const from = i % 2 === 0 ? "alpha" : "bravo";
    const id = `${from}-${i}`;
    sentBy.set(id, from);
    answers.push((from === "alpha" ? ca : cb).publish("VersionCheckCompleted", { i }, id));
    if (i === RESTART_AT) restarted = server.restart(); // keeps port and store; publishing goes on
    await new Promise((r) => setTimeout(r, 20)); // the publishing pace, not a wait for anything
  }
  await restarted;
  const frames = await Promise.all(answers);
  const errors = frames.filter((f) => f.type !== "published");
  tt.same(errors, [], "no publish was refused (the outbox takes what NATS cannot)");
  const accepted = frames.filter((f) => f.type === "published");
  const queued = accepted.filter((f) => f.queued === true).length;
  tt.comment(`${accepted.length} published, ${queued} of them queued in the outbox during the restart`);

  const toBravo = new Set(accepted.filter((f) => sentBy.get(f.id) === "alpha").map((f) => f.id as string));
  const toAlpha = new Set(accepted.filter((f) => sentBy.get(f.id) === "bravo").map((f) => f.id as string));
  await Promise.all([waitForIds(cb, toBravo, 30_000), waitForIds(ca, toAlpha, 30_000)]);
  const lost = [...toBravo].filter((id) => !cb.deliveries().some((f) => f.id === id))
    .concat([...toAlpha].filter((id) => !ca.deliveries().some((f) => f.id === id)));
  tt.same(lost, [], "lost: 0");
  const dups = { ...duplicates(cb, toBravo), ...duplicates(ca, toAlpha) };
  tt.comment(`duplicates (allowed, at-least-once): ${Object.keys(dups).length} ${JSON.stringify(dups)}`);
  const sentOrder = (from: string, ids: Set<string>) => [...sentBy].filter(([id, o]) => o === from && ids.has(id)).map(([id]) => id);
  const inversions = (got: string[], sent: string[]) => got.filter((id, k) => id !== sent[k]).length;
  tt.comment(
    `first deliveries out of publish order (informational): alpha→bravo ${inversions(firstOrder(cb, toBravo), sentOrder("alpha", toBravo))}, ` +
      `bravo→alpha ${inversions(firstOrder(ca, toAlpha), sentOrder("bravo", toAlpha))}`,
  );
  tt.same(ca.deliveries().filter((f) => f.origin === "alpha"), [], "no echoes to alpha");
  tt.same(cb.deliveries().filter((f) => f.origin === "bravo"), [], "no echoes to bravo");
  await ra.waitForLog((l) => l.msg === "bus connected", 15_000);
  tt.equal(await metric(ra, "uptrakit_relay_nats_connected"), 1, "alpha says it is connected again");
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 0, "alpha's outbox is empty");
  tt.equal(await metric(rb, "uptrakit_relay_outbox_depth"), 0, "bravo's outbox is empty");
});

// ---- 3. the outbox ----------------------------------------------------------------------------

t.test("outbox: publishes accepted while NATS is down survive a relay crash and arrive once, in order", async (tt) => {
  const env = setup(tt);
  const server = await env.server();
  const dataA = env.dir();
  const ra = await env.relay({ instanceId: "alpha", natsUrl: server.url, dataDir: dataA });
  const rb = await env.relay({ instanceId: "bravo", natsUrl: server.url });
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);

  // Published directly while NATS is up; later queued again under the same id.
  tt.same(await ca.publish("CertificateRenewed", { v: 1 }, "twice"), { type: "published", id: "twice" });
  await waitForIds(cb, ["twice"], 10_000);

  await server.kill();
  await ra.waitForLog((l) => l.msg === "bus disconnected", 10_000);

  const N = 50;
  const ids = Array.from({ length: N }, (_, i) => `out-${String(i).padStart(2, "0")}`);
  const again = await ca.publish("CertificateRenewed", { v: 1 }, "twice");
  tt.same(again, { type: "published", id: "twice", queued: true }, "the retry of an id already in the stream is queued");
  const answers: Frame[] = [];
  for (const [i, id] of ids.entries()) answers.push(await ca.publish("VersionCheckCompleted", { i }, id));
  tt.same(answers, ids.map((id) => ({ type: "published", id, queued: true })), `all ${N} answered published+queued`);
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), N + 1, "/metrics: outbox depth = what was queued");
  tt.equal(await metric(ra, "uptrakit_relay_nats_connected"), 0, "/metrics: NATS not connected");

  // Crash: no drain, no flush. The outbox must hold them on disk.
  await ra.stop("SIGKILL");
  await server.restart();
  const ra2 = await env.relay({ instanceId: "alpha", natsUrl: server.url, dataDir: dataA });
  const running = await ra2.waitForLog((l) => l.msg === "relay running");
  tt.equal(running.outbox, N + 1, "the restarted relay found the queued publishes");
  await ra2.waitForLog((l) => l.msg === "outbox flushed" && l.left === 0, 20_000);
  tt.equal(await metric(ra2, "uptrakit_relay_outbox_depth"), 0, "/metrics: outbox depth 0 after the flush");

  await waitForIds(cb, ids, 30_000);
  const want = new Set(ids);
  tt.same(firstOrder(cb, want), ids, "all arrived, in publish order");
  tt.comment(`duplicates (allowed): ${JSON.stringify(duplicates(cb, want))}`);
  for (const f of cb.deliveries().filter((x) => want.has(x.id))) {
    tt.equal(f.origin, "alpha");
    if (f.payload?.i !== ids.indexOf(f.id)) tt.fail(`payload of ${f.id} is ${JSON.stringify(f.payload)}`);
  }
  // The queued copy of "twice" was sent with the same msg id: the stream's duplicate window
  // stored it once, so bravo must not get it again. out-49 was queued after it and has arrived,
  // so "twice" would have come before it.
  tt.equal(cb.deliveries().filter((f) => f.id === "twice").length, 1, "an id already in the stream is delivered once");
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "inspector", "--data-dir", env.dir(), "--nats-url", server.url]);
  tt.equal(info.code, 0, info.stderr);
  tt.equal(JSON.parse(info.stdout).messages, N + 1, `the stream holds ${N + 1} messages: no second copy of any`);
  const ca2 = await env.controller(ra2);
  tt.equal(ca2.ready.instanceId, "alpha");
});

t.test("outbox: a publish whose PubAck never came (stored after all) is flushed without a second copy", async (tt) => {
  const env = setup(tt);
  const server = await env.server();
  const ra = await env.relay({ instanceId: "alpha", natsUrl: server.url });
  const rb = await env.relay({ instanceId: "bravo", natsUrl: server.url });
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  await ca.publish("VersionCheckCompleted", {}, "before");
  await waitForIds(cb, ["before"], 10_000);

  // A frozen server: the connection stays up, the publish sits unread in its socket, no PubAck
  // comes, so the relay queues it. Thawed, the server stores that first copy and then gets the
  // outbox's retry with the same msg id: it must keep one.
  const pid = server.process.pid!;
  let frozen = true;
  process.kill(pid, "SIGSTOP");
  await allThreadsStopped(pid);
  tt.teardown(() => {
    if (frozen) process.kill(pid, "SIGCONT");
  });
  const answer = await ca.publish("VersionCheckCompleted", { n: 1 }, "unclear");
  tt.same(answer, { type: "published", id: "unclear", queued: true }, "no PubAck in time: queued");
  const flushed = ra.waitForLog((l) => l.msg === "outbox flushed" && l.left === 0, 20_000);
  process.kill(pid, "SIGCONT");
  frozen = false;
  await flushed;
  tt.same(await ca.publish("VersionCheckCompleted", {}, "after"), { type: "published", id: "after" });
  await waitForIds(cb, ["unclear", "after"], 15_000);
  tt.same(firstOrder(cb, new Set(["before", "unclear", "after"])), ["before", "unclear", "after"]);
  tt.equal(cb.deliveries().filter((f) => f.id === "unclear").length, 1, "delivered once");
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "inspector", "--data-dir", env.dir(), "--nats-url", server.url]);
  tt.equal(info.code, 0, info.stderr);
  tt.equal(JSON.parse(info.stdout).messages, 3, "the stream holds one copy of each");
});

t.test("outbox: a publish in flight when NATS dies is queued ahead of the ones after it", async (tt) => {
  const env = setup(tt);
  const server = await env.server();
  const ra = await env.relay({ instanceId: "alpha", natsUrl: server.url });
  const rb = await env.relay({ instanceId: "bravo", natsUrl: server.url });
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  const pid = server.process.pid!;
  let frozen = true;
  process.kill(pid, "SIGSTOP"); // so that "first" is sent but never answered
  await allThreadsStopped(pid);
  tt.teardown(() => {
    if (frozen) process.kill(pid, "SIGCONT");
  });
  const first = ca.publish("VersionCheckCompleted", { n: 1 }, "first");
  // The relay handles frames in order: once this is answered, "first" has been handed to NATS.
  const from = ca.frames.length;
  ca.send({ type: "ack", deliveryId: "sync-marker" });
  await ca.next((f) => f.type === "error" && f.code === "unknown_delivery", 5_000, from);
  await server.kill(); // SIGKILL: "first" dies unread in the server's socket
  frozen = false;
  await ra.waitForLog((l) => l.msg === "bus disconnected", 10_000);
  const later = [ca.publish("VersionCheckCompleted", { n: 2 }, "second"), ca.publish("VersionCheckCompleted", { n: 3 }, "third")];
  const answers = await Promise.all([first, ...later]);
  tt.same(answers, ["first", "second", "third"].map((id) => ({ type: "published", id, queued: true })), "all three queued");
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 3);
  const flushed = ra.waitForLog((l) => l.msg === "outbox flushed" && l.left === 0, 20_000);
  await server.restart();
  await flushed;
  await waitForIds(cb, ["first", "second", "third"], 15_000);
  tt.same(firstOrder(cb, new Set(["first", "second", "third"])), ["first", "second", "third"], "delivered in publish order");
});

t.test("outbox: --outbox-max bounds it; beyond it publishes are refused 'unavailable'", async (tt) => {
  const env = setup(tt);
  const server = await env.server();
  const ra = await env.relay({ instanceId: "alpha", natsUrl: server.url, args: ["--outbox-max", "3"] });
  const rb = await env.relay({ instanceId: "bravo", natsUrl: server.url });
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  await server.kill();
  await ra.waitForLog((l) => l.msg === "bus disconnected", 10_000);
  for (const id of ["q-1", "q-2", "q-3"]) tt.same(await ca.publish("VersionCheckCompleted", {}, id), { type: "published", id, queued: true });
  const fourth = await ca.publish("VersionCheckCompleted", {}, "q-4");
  tt.match(fourth, { type: "error", id: "q-4", code: "unavailable" }, "the 4th is refused");
  tt.match(fourth.message, /outbox is full/);
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 3, "/metrics: depth 3");
  tt.equal(await metric(ra, "uptrakit_relay_unavailable_total"), 1, "/metrics: one unavailable");

  // NATS back: the outbox drains on its own, and the refused one can be retried with its id.
  const flushed = ra.waitForLog((l) => l.msg === "outbox flushed" && l.left === 0, 20_000);
  await server.restart();
  await flushed;
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 0, "/metrics: depth 0 after the flush");
  tt.same(await ca.publish("VersionCheckCompleted", {}, "q-4"), { type: "published", id: "q-4" }, "the retry goes straight to NATS");
  await waitForIds(cb, ["q-1", "q-2", "q-3", "q-4"], 20_000);
  tt.same(firstOrder(cb, new Set(["q-1", "q-2", "q-3", "q-4"])), ["q-1", "q-2", "q-3", "q-4"]);
});

t.test("a message NATS will never take (over its max_payload) is refused, and never blocks the outbox", async (tt) => {
  const env = setup(tt);
  const conf = path.join(env.dir(), "nats.conf");
  fs.writeFileSync(conf, "max_payload: 65536\n");
  const server = await env.server({ args: ["-c", conf] });
  const dataA = env.dir();
  const ra = await env.relay({ instanceId: "alpha", natsUrl: server.url, dataDir: dataA });
  const rb = await env.relay({ instanceId: "bravo", natsUrl: server.url });
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  const big = { blob: "x".repeat(100_000) }; // under --max-frame-bytes, over the server's max_payload

  // Connected: answered at once with "refused" (a retry cannot help), and the next publish works.
  const refused = await ca.publish("VersionCheckCompleted", big, "big-direct");
  tt.match(refused, { type: "error", id: "big-direct", code: "refused" });
  tt.match(refused.message, /max_payload/);
  tt.same(await ca.publish("VersionCheckCompleted", { n: 0 }, "small-0"), { type: "published", id: "small-0" });

  // Disconnected: nothing can be checked against the server, so all three are queued...
  await server.kill();
  await ra.waitForLog((l) => l.msg === "bus disconnected", 10_000);
  for (const [id, payload] of [["small-1", { n: 1 }], ["big-queued", big], ["small-2", { n: 2 }]] as const)
    tt.same(await ca.publish("VersionCheckCompleted", payload, id), { type: "published", id, queued: true }, `${id} queued`);
  // ...and once NATS is back the refused one is set aside as a dead letter, not retried for ever
  // in front of the others.
  const setAside = ra.waitForLog((l) => l.msg === "queued publish refused by the bus; recorded as a dead letter", 20_000);
  const flushed = ra.waitForLog((l) => l.msg === "outbox flushed" && l.left === 0, 20_000);
  await server.restart();
  tt.equal((await setAside).id, "big-queued");
  await flushed;
  await waitForIds(cb, ["small-0", "small-1", "small-2"], 15_000);
  tt.same(firstOrder(cb, new Set(["small-0", "small-1", "small-2"])), ["small-0", "small-1", "small-2"], "the rest arrived, in order");
  tt.notOk(cb.deliveries().some((f) => f.id.startsWith("big-")), "nothing over max_payload was delivered");
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 0, "/metrics: the outbox is empty");
  tt.equal(await metric(ra, "uptrakit_relay_refused_total"), 2, "/metrics: two refused (one answered, one set aside)");
  tt.same(await ca.publish("VersionCheckCompleted", { n: 3 }, "small-3"), { type: "published", id: "small-3" }, "publishing goes straight to NATS again");

  const dlq = await runRelayCli(["dlq", "list", "--json", "--data-dir", dataA]);
  tt.equal(dlq.code, 0, dlq.stderr);
  const dead = JSON.parse(dlq.stdout) as Frame[];
  tt.equal(dead.length, 1, "one dead letter");
  tt.match(dead[0], { id: "big-queued", origin: "alpha", kind: "VersionCheckCompleted", attempts: 1, reason: /refused this queued publish.*max_payload/ });
  tt.same(dead[0]!.payload, big, "kept whole, for the operator");

  // Replaying it (say, after raising max_payload) publishes it again: it is this relay's own
  // message, so it is never handed to its own controller. Here NATS refuses it again.
  const refusedAgain = ra.waitForLog((l) => l.msg === "queued publish refused by the bus; recorded as a dead letter" && l.id === "big-queued", 20_000);
  const replay = await runRelayCli(["dlq", "replay", "big-queued", "--data-dir", dataA]);
  tt.equal(replay.code, 0, replay.stderr);
  await ra.waitForLog((l) => l.msg === "dead letter of this relay's own publish queued to be published again" && l.id === "big-queued", 20_000);
  await refusedAgain;
  const after = JSON.parse((await runRelayCli(["dlq", "list", "--json", "--data-dir", dataA])).stdout) as Frame[];
  tt.match(after, [{ id: "big-queued", reason: /max_payload/ }], "refused again: back among the dead letters, once");
  tt.notOk(ca.deliveries().some((f) => f.id === "big-queued"), "never delivered to its own controller");
  tt.equal(await metric(ra, "uptrakit_relay_outbox_depth"), 0);
  tt.notOk(ra.logs.some((l) => JSON.stringify(l).includes("x".repeat(100))), "the payload is not logged");
});

// ---- 4. data dir problems ---------------------------------------------------------------------

t.test("data dir problems are clear start-up errors naming the path", async (t) => {
  t.jobs = 4;
  let server: NatsServer;
  t.before(async () => {
    server = await startNatsServer();
  });
  t.teardown(() => server?.stop());

  const expectFailure = async (tt: Test, dataDir: string, named: string, why: RegExp): Promise<void> => {
    const r = await runRelayCli(runArgs(dataDir, ["--nats-url", server.url]));
    tt.not(r.code, 0, "exits non-zero");
    tt.not(r.code, null, "exits by itself");
    tt.ok(r.stderr.includes(named), `names ${path.basename(named)}: ${r.stderr}`);
    tt.match(r.stderr, why);
  };

  t.test("the data dir is a regular file", async (tt) => {
    const env = setup(tt);
    const file = path.join(env.dir(), "not-a-dir");
    fs.writeFileSync(file, "x");
    await expectFailure(tt, file, file, /not a writable directory/);
  });

  t.test("the data dir cannot be created (a path under a file: fails for root too)", async (tt) => {
    const env = setup(tt);
    const file = path.join(env.dir(), "plain-file");
    fs.writeFileSync(file, "x");
    const dir = path.join(file, "sub");
    await expectFailure(tt, dir, dir, /not a writable directory/);
  });

  t.test("a read-only data dir (only meaningful when not root)", { skip: process.getuid?.() === 0 ? "root ignores permission bits" : false }, async (tt) => {
    const env = setup(tt);
    const dir = path.join(env.dir(), "ro");
    fs.mkdirSync(dir, { mode: 0o500 });
    await expectFailure(tt, dir, dir, /not a writable directory/);
  });

  t.test("relay.db is junk bytes", async (tt) => {
    const env = setup(tt);
    const dir = env.dir();
    const file = path.join(dir, "relay.db");
    fs.writeFileSync(file, Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7919 + 13) % 256)));
    await expectFailure(tt, dir, file, /not a database/);
    tt.equal(fs.readFileSync(file).length, 8192, "the file is left as it was, for the operator");
  });

  t.test("relay.db with junk over its data pages", async (tt) => {
    const env = setup(tt);
    const dir = env.dir();
    const store = RelayStore.open(dir);
    for (let i = 0; i < 200; i++)
      void store.enqueue({ id: `m-${i}`, kind: "VersionCheckCompleted", origin: "alpha", publishedAt: new Date().toISOString(), payloadJson: JSON.stringify({ filler: "x".repeat(200) }) });
    store.close(); // commits what is queued
    const file = path.join(dir, "relay.db");
    const size = fs.statSync(file).size;
    tt.ok(size > 16384, `the file has several pages (${size} bytes)`);
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, Buffer.alloc(size - 8192, 0xa5), 0, size - 8192, 8192);
    fs.closeSync(fd);
    await expectFailure(tt, dir, file, /relay store/);
  });
});
