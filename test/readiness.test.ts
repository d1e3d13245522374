// Readiness that degrades instead of cascading (the default, --readiness degraded): with NATS
// down a relay that can still take its controller's publishes into the outbox stays ready (200,
// "degraded", with the reason), and only a full outbox makes it 503. The gauges say the same.
// The pure rule is covered over its whole input space with fast-check.

import t from "tap";
import fc from "fast-check";
import { startNatsServer } from "./helpers/nats-server.js";
import { startRelay, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";
import { readiness, readinessBody } from "../relay/readiness.js";

async function readyz(r: RelayProcess): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${r.httpUrl}/readyz`);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** Polls /readyz until pred holds (an HTTP endpoint of another process: nothing else to wait on). */
async function readyzUntil(r: RelayProcess, what: string, pred: (x: { status: number; body: Record<string, unknown> }) => boolean, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await readyz(r);
    if (pred(got)) return got;
    if (Date.now() > deadline) throw new Error(`/readyz: ${what} not reached within ${timeoutMs} ms; last ${JSON.stringify(got)}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

async function gauge(r: RelayProcess, name: string): Promise<number | undefined> {
  const text = await (await fetch(`${r.httpUrl}/metrics`)).text();
  const m = new RegExp(`^uptrakit_relay_${name} (\\S+)$`, "m").exec(text);
  return m ? Number(m[1]) : undefined;
}

t.test("default readiness: NATS down keeps the pod in its Service while the outbox has room", async (t) => {
  const nats = await startNatsServer();
  const relay = await startRelay({ instanceId: "deg-a", natsUrl: nats.url, args: ["--outbox-max", "2"] });
  const c = await TestController.connect(relay.wsUrl);
  t.teardown(async () => {
    await c.close().catch(() => undefined);
    await relay.stop("SIGKILL");
    await nats.stop();
  });

  t.same(await readyz(relay), { status: 200, body: { status: "ready" } }, "ready while connected");
  t.equal(await gauge(relay, "ready"), 1, "uptrakit_relay_ready 1");
  t.equal(await gauge(relay, "degraded"), 0, "uptrakit_relay_degraded 0");
  t.equal(await gauge(relay, "outbox_max"), 2, "uptrakit_relay_outbox_max = --outbox-max");

  await nats.kill();
  const down = await readyzUntil(relay, "degraded", (x) => x.body.status === "degraded");
  t.equal(down.status, 200, "200 while NATS is down: the relay can still take publishes");
  t.match(String(down.body.reason), /jetstream is (disconnected|closed).*outbox \(0 of 2\)/, `the body says why: ${down.body.reason}`);
  t.equal(await gauge(relay, "ready"), 1, "ready gauge 1");
  t.equal(await gauge(relay, "degraded"), 1, "degraded gauge 1");
  t.equal(await gauge(relay, "nats_connected"), 0, "nats_connected 0");

  for (const id of ["q1", "q2"]) t.same(await c.publish("VersionCheckCompleted", {}, id), { type: "published", id, queued: true }, `${id} queued`);
  const full = await readyz(relay);
  t.equal(full.status, 503, "503 once the outbox is full: publishes would be refused");
  t.match(String(full.body.reason), /outbox is full \(2 of --outbox-max 2\)/, `reason: ${full.body.reason}`);
  t.equal(full.body.status, "not ready");
  t.equal(await gauge(relay, "ready"), 0, "ready gauge 0");

  await nats.restart();
  const back = await readyzUntil(relay, "ready again", (x) => x.status === 200 && x.body.status === "ready", 30_000);
  t.same(back.body, { status: "ready" }, "ready (not degraded) once NATS is back");
  t.equal(await gauge(relay, "degraded"), 0, "degraded gauge 0 again");
});

t.test("readiness rule: 200 iff running and (bus up, or degraded mode with a writable store and room in the outbox)", async (t) => {
  fc.assert(
    fc.property(
      fc.constantFrom("degraded" as const, "strict" as const),
      fc.constantFrom("running", "starting", "closing", "closed"),
      fc.constantFrom("connected" as const, "disconnected" as const, "closed" as const),
      fc.nat(10),
      fc.nat(10),
      fc.option(fc.constant("the relay store cannot be written: disk I/O error"), { nil: undefined }),
      (mode, state, bus, depth, max, storeProblem) => {
        const r = readiness({ mode, state, busName: "jetstream", bus: { state: bus, reason: "x" }, outboxDepth: depth, outboxMax: max, storeProblem });
        const busUp = bus === "connected";
        const expectReady = state === "running" && (busUp || (mode === "degraded" && !storeProblem && depth < max));
        if (r.ready !== expectReady) return false;
        if (r.degraded && !r.ready) return false;
        // Degraded exactly when ready with something wrong; every not-ready and degraded answer has a reason.
        if (r.ready && r.degraded !== (!busUp || storeProblem !== undefined)) return false;
        if ((!r.ready || r.degraded) && !r.reason) return false;
        const body = readinessBody(r);
        return body.status === (r.ready ? (r.degraded ? "degraded" : "ready") : "not ready");
      },
    ),
  );
  t.pass("holds for every mode, state, bus state, outbox depth and store state");
});
