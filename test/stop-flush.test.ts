// SIGTERM with publishes still in the outbox (NATS down): the relay tries to flush them within
// --drain-timeout — also when NATS comes back during the drain — and whatever it cannot flush is
// logged at error with the count and shown in uptrakit_relay_outbox_unflushed_at_stop while it
// stops, never dropped quietly. (A pod whose data dir goes with it loses exactly that count.)

import t from "tap";
import type { TapTest } from "./helpers/bus-conformance.js";
import { startNatsServer } from "./helpers/nats-server.js";
import type { RelayProcess } from "./helpers/relay-process.js";
import { Scene } from "./helpers/scene.js";

const QUEUED = 5;

async function metric(r: RelayProcess, name: string): Promise<number | undefined> {
  const res = await fetch(`${r.httpUrl}/metrics`).catch(() => undefined);
  if (!res?.ok) return undefined;
  const line = (await res.text()).split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

async function queueWhileNatsIsDown(t: TapTest, drainTimeout: string) {
  const scene = new Scene(t);
  const nats = await startNatsServer();
  scene.onStop(() => nats.stop());
  const a = await scene.relay({ instanceId: "stopping-a", natsUrl: nats.url, args: ["--drain-timeout", drainTimeout] });
  const b = await scene.relay({ instanceId: "peer-b", natsUrl: nats.url });
  const ca = await scene.controller(a.wsUrl);
  const cb = await scene.controller(b.wsUrl);
  await nats.kill("SIGKILL");
  await a.waitForLog((l) => l.msg === "bus disconnected", 15_000);
  for (let i = 0; i < QUEUED; i++) {
    const answer = await ca.publish("VersionCheckCompleted", { i });
    t.equal(answer.queued, true, `publish ${i} answered queued while NATS is down`);
  }
  return { nats, a, b, ca, cb };
}

t.test("NATS stays down: the unflushed count is logged at error and shown in the metric during the stop", async (t) => {
  const { a } = await queueWhileNatsIsDown(t, "4s");
  const exited = a.stop("SIGTERM", 30_000);
  // The listener stays up while the relay tries to flush: a last scrape sees the count.
  let seen: number | undefined;
  while (a.proc.exitCode === null && seen !== QUEUED) {
    seen = await metric(a, "uptrakit_relay_outbox_unflushed_at_stop");
    if (seen !== QUEUED) await new Promise((r) => setTimeout(r, 100)); // another process: no event to wait on
  }
  t.equal(seen, QUEUED, `uptrakit_relay_outbox_unflushed_at_stop = ${QUEUED} while stopping`);
  t.equal(await exited, 0, "exit 0");
  const line = a.logs.find((l) => l.level === 50 && l.outbox === QUEUED);
  t.ok(line, `an error log line with outbox: ${QUEUED}`);
  t.match(String(line?.msg), /outbox/, "…saying they stay in the outbox");
});

t.test("NATS returns during the drain: the outbox is flushed before the relay exits", async (t) => {
  const { nats, a, cb } = await queueWhileNatsIsDown(t, "30s");
  const exited = a.stop("SIGTERM", 60_000);
  await a.waitForLog((l) => l.msg === "draining", 10_000);
  await nats.restart();
  t.equal(await exited, 0, "exit 0");
  t.ok(a.logs.some((l) => l.msg === "relay stopped" && l.outbox === 0), "stopped with an empty outbox");
  t.notOk(a.logs.some((l) => l.level === 50 && typeof l.outbox === "number"), "no unflushed-outbox error");
  const got = await cb.nextN((f) => f.type === "deliver", QUEUED, 30_000);
  t.equal(new Set(got.map((f) => f.id)).size, QUEUED, `the peer receives all ${QUEUED}`);
});
