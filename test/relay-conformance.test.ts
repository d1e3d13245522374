// The relay's behaviour, end to end through real relay processes and real WebSockets, on both
// buses: every scenario here must pass on JetStream and on the embedded SQLite bus alike.

import t, { type Test } from "tap";
import { conformanceBackends as backends, type Medium } from "./helpers/relay-backends.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, upgradeStatus, type Frame } from "./helpers/test-controller.js";

interface Env {
  medium: Medium;
  relays: RelayProcess[];
  controllers: TestController[];
  relay(id: string, extra?: string[], dataDir?: string): Promise<RelayProcess>;
  controller(r: RelayProcess, token?: string): Promise<TestController>;
}

async function setup(tt: Test, backend: (typeof backends)[number]): Promise<Env> {
  const env: Env = {
    medium: await backend.create(),
    relays: [],
    controllers: [],
    async relay(id, extra = [], dataDir) {
      const r = await startRelay({ instanceId: id, dataDir, args: [...env.medium.args, ...extra] });
      env.relays.push(r);
      return r;
    },
    async controller(r, token) {
      const c = await TestController.connect(r.wsUrl, { token });
      env.controllers.push(c);
      return c;
    },
  };
  tt.teardown(async () => {
    await Promise.all(env.controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(env.relays.map((r) => r.stop("SIGKILL")));
    await env.medium.stop();
  });
  return env;
}

async function dlqList(dataDir: string): Promise<Frame[]> {
  const r = await runRelayCli(["dlq", "list", "--data-dir", dataDir, "--json"]);
  if (r.code !== 0) throw new Error(`dlq list failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as Frame[];
}

/** Waits until `dlq list` shows a dead letter with this id (the CLI reads the store another process writes). */
async function waitForDeadLetter(dataDir: string, id: string, timeoutMs = 15_000): Promise<Frame> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const hit = (await dlqList(dataDir)).find((d) => d.id === id);
    if (hit) return hit;
    if (Date.now() > deadline) throw new Error(`no dead letter ${id} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100)); // polling another process's file: nothing to wait on
  }
}

const FAST = ["--ack-wait", "1000", "--nack-delay", "100", "--max-deliver", "3"];

// Three backends (jetstream-public-api as well) of real relay processes: more than tap's 180 s on
// a loaded 2-core machine. The root test's timeout tells the runner.
t.setTimeout(420_000);

for (const backend of backends) {
  t.test(`${backend.name}: relays deliver each other's messages and never echo`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo")]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    tt.same(ca.ready, { type: "ready", instanceId: "alpha", bus: backend.bus });

    const payload = { service: "billing", version: "1.2.3", nested: { list: [1, "two", null, true] }, text: "ünïcødé ✓" };
    for (let i = 0; i < 20; i++) tt.same(await ca.publish("VersionCheckCompleted", { ...payload, i }, `a-${i}`), { type: "published", id: `a-${i}` });
    const got = await cb.nextN((f) => f.type === "deliver", 20);
    for (const f of got) cb.ack(f);
    tt.same(got.map((f) => f.id), Array.from({ length: 20 }, (_, i) => `a-${i}`), "all 20, in order");
    const first = got[0]!;
    tt.equal(first.kind, "VersionCheckCompleted");
    tt.equal(first.origin, "alpha");
    tt.equal(first.attempt, 1);
    tt.ok(Math.abs(Date.parse(first.publishedAt) - Date.now()) < 60_000, "publishedAt is an ISO time of now");
    tt.same(first.payload, { ...payload, i: 0 });

    await cb.publish("CertificateRenewed", { host: "b.example" }, "b-1");
    const fromB = await ca.next((f) => f.type === "deliver");
    ca.ack(fromB);
    tt.equal(fromB.id, "b-1");
    // alpha's own 20 were in the stream before b-1: had echoes been delivered, they would have come first.
    tt.same(ca.deliveries().map((f) => f.origin), ["bravo"], "alpha never got its own messages");
    tt.same(cb.deliveries().filter((f) => f.origin === "bravo"), [], "bravo never got its own message");
  });

  t.test(`${backend.name}: nack redelivers with the attempt counting up, after the delay`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo", FAST)]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    await ca.publish("SoftwareStateUpdated", { state: "up" }, "n-1");
    const d1 = await cb.next((f) => f.type === "deliver");
    const nackedAt = Date.now();
    cb.send({ type: "nack", deliveryId: d1.deliveryId, delayMs: 300 });
    const d2 = await cb.next((f) => f.type === "deliver" && f.attempt === 2);
    tt.ok(Date.now() - nackedAt >= 250, "not redelivered before the nack delay");
    tt.equal(d2.id, "n-1");
    tt.not(d2.deliveryId, d1.deliveryId, "each attempt has its own deliveryId");
    cb.ack(d2);
    cb.send({ type: "ack", deliveryId: d1.deliveryId });
    const err = await cb.next((f) => f.type === "error");
    tt.equal(err.code, "unknown_delivery", "a stale deliveryId is answered, not silently dropped");
  });

  t.test(`${backend.name}: 'working' prevents a redelivery that silence would cause`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo", FAST)]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    await ca.publish("VersionCheckCompleted", { n: 1 }, "busy");
    await ca.publish("VersionCheckCompleted", { n: 2 }, "silent");
    const [busy, silent] = await cb.nextN((f) => f.type === "deliver", 2);
    tt.equal(busy!.id, "busy");
    tt.equal(silent!.id, "silent");
    // Keep "busy" alive for three ack waits while "silent" gets no answer at all.
    const keep = setInterval(() => cb.send({ type: "working", deliveryId: busy!.deliveryId }), 300);
    const redelivered = await cb.next((f) => f.type === "deliver" && f.attempt === 2);
    tt.equal(redelivered.id, "silent", "the silent one is redelivered after the ack wait");
    cb.ack(redelivered);
    await cb.next((f) => f.type === "deliver" && f.id === "silent" && f.attempt === 3, 1500).catch(() => undefined);
    clearInterval(keep);
    cb.ack(busy!);
    tt.equal(cb.deliveries().filter((f) => f.id === "busy").length, 1, "the busy one was delivered once");
    tt.same(cb.frames.filter((f) => f.type === "error"), [], "its ack after 3 s is accepted");
  });

  t.test(`${backend.name}: three failed attempts make a dead letter; replay delivers it again`, async (tt) => {
    const env = await setup(tt, backend);
    const dataB = tempDir();
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo", FAST, dataB)]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    await ca.publish("CertificateRenewed", { cn: "x" }, "poison");
    await ca.publish("CertificateRenewed", { cn: "y" }, "ignored");
    for (let attempt = 1; attempt <= 3; attempt++) {
      const d = await cb.next((f) => f.type === "deliver" && f.id === "poison" && f.attempt === attempt);
      cb.send({ type: "nack", deliveryId: d.deliveryId, delayMs: 50 });
    }
    // "ignored" is never answered: it goes through its three ack waits and dies too.
    const dead = await waitForDeadLetter(dataB, "poison");
    tt.match(dead, { id: "poison", kind: "CertificateRenewed", origin: "alpha", attempts: 3, payload: { cn: "x" } });
    tt.match(await waitForDeadLetter(dataB, "ignored"), { attempts: 3 });
    tt.equal(cb.deliveries().filter((f) => f.id === "poison").length, 3, "no fourth attempt");

    // Counted before the CLI runs: the relay may deliver the replay before we see the CLI exit.
    const beforeReplay = cb.frames.length;
    const replay = await runRelayCli(["dlq", "replay", "poison", "--data-dir", dataB]);
    tt.equal(replay.code, 0, replay.stderr);
    const again = await cb.next((f) => f.type === "deliver" && f.id === "poison" && f.attempt === 1, 10_000, beforeReplay);
    tt.same(again.payload, { cn: "x" });
    cb.ack(again);
    const deadline = Date.now() + 10_000;
    while ((await dlqList(dataB)).some((d) => d.id === "poison") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    tt.same((await dlqList(dataB)).map((d) => d.id), ["ignored"], "an acked replay leaves the dead letters");
    const purge = await runRelayCli(["dlq", "purge", "--data-dir", dataB]);
    tt.match(purge.stdout, /1 dead letter removed/);
  });

  t.test(`${backend.name}: reject dead-letters at once`, async (tt) => {
    const env = await setup(tt, backend);
    const dataB = tempDir();
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo", FAST, dataB)]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    await ca.publish("SoftwareStateUpdated", { broken: true }, "rej");
    const d = await cb.next((f) => f.type === "deliver");
    cb.send({ type: "reject", deliveryId: d.deliveryId, reason: "schema v9 unknown" });
    const dead = await waitForDeadLetter(dataB, "rej");
    tt.match(dead, { attempts: 1, reason: /schema v9 unknown/ });
    // Proof of no redelivery: a later message arrives while "rej" does not come back.
    await ca.publish("SoftwareStateUpdated", {}, "after");
    const after = await cb.next((f) => f.type === "deliver" && f.id === "after");
    cb.ack(after);
    await cb.next((f) => f.type === "deliver" && f.id === "rej" && f.attempt === 2, 1500).then(
      () => tt.fail("rejected message was redelivered"),
      () => tt.pass("not redelivered"),
    );
  });

  t.test(`${backend.name}: every malformed frame gets an error frame and the connection keeps working`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha", ["--max-frame-bytes", "2048"]), env.relay("bravo")]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    const cases: Array<[string, string | Buffer, string, boolean?]> = [
      ["not JSON", "{nope", "invalid_frame"],
      ["JSON array", "[1,2]", "invalid_frame"],
      ["JSON string", '"publish"', "invalid_frame"],
      ["no type", JSON.stringify({ id: "x" }), "invalid_frame"],
      ["unknown type", JSON.stringify({ type: "subscribe" }), "invalid_frame"],
      ["publish without id", JSON.stringify({ type: "publish", kind: "A", payload: 1 }), "invalid_frame"],
      ["id too long", JSON.stringify({ type: "publish", id: "x".repeat(129), kind: "A", payload: 1 }), "invalid_frame"],
      ["id not a string", JSON.stringify({ type: "publish", id: 7, kind: "A", payload: 1 }), "invalid_frame"],
      ["kind with a dot", JSON.stringify({ type: "publish", id: "k1", kind: "Foo.>", payload: 1 }), "invalid_frame"],
      ["kind wildcard", JSON.stringify({ type: "publish", id: "k2", kind: "*", payload: 1 }), "invalid_frame"],
      ["kind empty", JSON.stringify({ type: "publish", id: "k3", kind: "", payload: 1 }), "invalid_frame"],
      ["kind too long", JSON.stringify({ type: "publish", id: "k4", kind: "A".repeat(65), payload: 1 }), "invalid_frame"],
      ["missing payload", JSON.stringify({ type: "publish", id: "p1", kind: "A" }), "invalid_frame"],
      ["ack without deliveryId", JSON.stringify({ type: "ack" }), "invalid_frame"],
      ["nack with bad delay", JSON.stringify({ type: "nack", deliveryId: "d", delayMs: -5 }), "invalid_frame"],
      ["reject reason not string", JSON.stringify({ type: "reject", deliveryId: "d", reason: 5 }), "invalid_frame"],
      ["binary frame", Buffer.from([0, 1, 2, 3]), "invalid_frame", true],
      ["too large", JSON.stringify({ type: "publish", id: "big", kind: "A", payload: "x".repeat(4096) }), "frame_too_large"],
      ["ack of unknown delivery", JSON.stringify({ type: "ack", deliveryId: "nope" }), "unknown_delivery"],
    ];
    for (const [name, frame, code, binary] of cases) {
      const from = ca.frames.length;
      ca.send(frame, binary);
      const err = await ca.next((f) => f.type === "error", 5000, from);
      tt.equal(err.code, code, `${name} → ${code}`);
      tt.type(err.message, "string");
    }
    const big = ca.frames.find((f) => f.code === "frame_too_large");
    tt.equal(big?.id, "big", "frame_too_large names the publish id");
    tt.match(ca.frames.find((f) => f.code === "invalid_frame" && f.id === "k1"), { id: "k1" }, "errors carry the publish id when known");
    tt.same(await ca.publish("VersionCheckCompleted", { ok: true }, "valid-after"), { type: "published", id: "valid-after" });
    const d = await cb.next((f) => f.type === "deliver");
    tt.equal(d.id, "valid-after", "nothing malformed reached the other controller");
    cb.ack(d);
  });

  t.test(`${backend.name}: credential-bearing kinds are refused and never reach the bus`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo")]);
    const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
    const secret = "s3cr3t-tenant-key-do-not-log";
    for (const kind of ["TenantAssignments", "TenantConfigUpdated", "TenantRevoked", "tenantrevoked", "TENANT_REVOKED", " TenantRevoked", "Tenant.Revoked"]) {
      const r = await ca.publish(kind, { apiKey: secret });
      tt.equal(r.code, "forbidden_kind", `${JSON.stringify(kind)} refused`);
    }
    await ca.publish("VersionCheckCompleted", {}, "sentinel");
    const d = await cb.next((f) => f.type === "deliver");
    tt.equal(d.id, "sentinel", "the first thing bravo receives is the message published after the refused ones");
    const status = await runRelayCli(["stream", "info", "--json", "--instance-id", "inspector", "--data-dir", tempDir(), ...env.medium.args]);
    tt.equal(status.code, 0, status.stderr);
    tt.equal(JSON.parse(status.stdout).messages, 1, "the stream holds only the sentinel");
    tt.notMatch(JSON.stringify(ra.logs) + ra.stderr(), secret, "the payload never appears in the logs");
  });

  t.test(`${backend.name}: several relays starting at once on a fresh bus all come up`, async (tt) => {
    const env = await setup(tt, backend);
    const relays = await Promise.all(["r1", "r2", "r3", "r4", "r5"].map((id) => env.relay(id)));
    tt.equal(relays.length, 5);
    const cs = await Promise.all(relays.map((r) => env.controller(r)));
    await cs[0]!.publish("VersionCheckCompleted", {}, "hello-all");
    for (const c of cs.slice(1)) tt.equal((await c.next((f) => f.type === "deliver")).id, "hello-all");
  });

  t.test(`${backend.name}: nothing is lost or dead-lettered while the controller is away or the relay restarts`, async (tt) => {
    const env = await setup(tt, backend);
    const dataB = tempDir();
    const ra = await env.relay("alpha");
    const rb = await env.relay("bravo", FAST, dataB);
    const ca = await env.controller(ra);
    let cb = await env.controller(rb);
    await ca.publish("VersionCheckCompleted", {}, "m-0");
    const first = await cb.next((f) => f.type === "deliver");
    await cb.close(); // disconnect with m-0 in flight
    for (let i = 1; i <= 5; i++) await ca.publish("VersionCheckCompleted", { i }, `m-${i}`);
    // Away for longer than three ack waits: the relay must neither burn attempts nor dead-letter.
    await new Promise((r) => setTimeout(r, 3500));
    cb = await env.controller(rb);
    // At-least-once: on a loaded machine a keep-alive can come late and the bus redeliver a
    // parked message, so a duplicate is allowed; a missing id is not.
    const wanted = ["m-0", "m-1", "m-2", "m-3", "m-4", "m-5"];
    cb.onFrame((f) => f.type === "deliver" && cb.ack(f));
    for (const f of cb.deliveries()) cb.ack(f);
    for (const id of wanted) await cb.next((f) => f.type === "deliver" && f.id === id);
    const got = cb.deliveries();
    tt.same([...new Set(got.map((f) => f.id))].sort(), wanted);
    if (got.length > wanted.length) tt.comment(`duplicates: ${got.length - wanted.length}`);
    tt.equal(got.find((f) => f.id === "m-0")!.attempt, first.attempt, "the parked delivery kept its attempt");
    tt.same(await dlqList(dataB), [], "no dead letters");

    // Relay restart (drained by SIGTERM) with messages published while it was down.
    tt.equal(await rb.stop("SIGTERM"), 0, "SIGTERM exits 0");
    for (let i = 6; i <= 8; i++) await ca.publish("VersionCheckCompleted", { i }, `m-${i}`);
    const rb2 = await env.relay("bravo", FAST, dataB);
    const cb2 = await env.controller(rb2);
    const later = await cb2.nextN((f) => f.type === "deliver", 3);
    tt.same(later.map((f) => f.id), ["m-6", "m-7", "m-8"], "what was published while the relay was down arrives after its restart");
  });

  t.test(`${backend.name}: token and Origin are checked at the upgrade`, async (tt) => {
    const env = await setup(tt, backend);
    const r = await env.relay("alpha", ["--token", "letmein", "--allow-origin", "http://console.local"]);
    tt.equal(await upgradeStatus(r.wsUrl), 401, "no token → 401");
    tt.equal(await upgradeStatus(r.wsUrl, { authorization: "Bearer wrong" }), 401, "wrong token → 401");
    tt.equal(await upgradeStatus(r.wsUrl, { authorization: "letmein" }), 401, "not a Bearer header → 401");
    tt.equal(await upgradeStatus(r.wsUrl, { authorization: "Bearer letmein", origin: "http://evil.example" }), 403, "foreign Origin → 403");
    tt.equal(await upgradeStatus(r.wsUrl, { authorization: "Bearer letmein", origin: "http://console.local" }), 101, "allowed Origin → 101");
    const c = await env.controller(r, "letmein");
    tt.equal(c.ready.instanceId, "alpha");
    const health = await fetch(`${r.httpUrl}/healthz`);
    tt.equal(health.status, 200, "/healthz needs no token");
  });

  t.test(`${backend.name}: a newer controller connection supersedes the older`, async (tt) => {
    const env = await setup(tt, backend);
    const [ra, rb] = await Promise.all([env.relay("alpha"), env.relay("bravo")]);
    const ca = await env.controller(ra);
    const old = await env.controller(rb);
    const fresh = await env.controller(rb);
    await old.closed();
    tt.equal(old.closeCode, 4001, "the older socket is closed with 4001");
    tt.match(old.closeReason, /superseded/);
    await ca.publish("VersionCheckCompleted", {}, "to-new");
    tt.equal((await fresh.next((f) => f.type === "deliver")).id, "to-new");
  });
}
