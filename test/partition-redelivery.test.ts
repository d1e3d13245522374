// Found by npm run chaos (2 relays, every delivery acked, one silent partition of the receiver):
// messages published while a relay is silently cut off from NATS must reach it after the heal.
// Its pending pull request is a dead connection to the server, which redelivers into it every
// ack wait; with the pull outliving several ack waits (nats.js's default 30 s against
// --ack-wait 1500) every arrival up to max_deliver went into the void and the server gave the
// message up: neither delivered nor a dead letter. Now a pull lasts at most one ack wait.
// Second (also found by npm run chaos): a partition healed after the PubAck-timeout probe declared
// the link dead, but before nats.js's missed pings did, left the bus "disconnected" for good —
// its outbox never flushed — because probing on over the old connection never sees the heal.

import t from "tap";
import { startTcpProxy } from "../scripts/lib/tcp-proxy.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { runRelayCli, tempDir } from "./helpers/relay-process.js";
import { Scene } from "./helpers/scene.js";
import type { Frame } from "./helpers/test-controller.js";

const MAX_DELIVER = 3;
const ARGS = ["--ack-wait", "1500", "--max-deliver", String(MAX_DELIVER), "--nack-delay", "100"];

t.test("published during a silent partition longer than several ack waits: delivered (or a dead letter) after the heal", async (t) => {
  const scene = new Scene(t);
  const nats = await startNatsServer();
  scene.onStop(() => nats.stop());
  const proxy = await startTcpProxy(nats.port);
  scene.onStop(() => proxy.close());
  const a = await scene.relay({ instanceId: "pub-a", natsUrl: nats.url, args: ARGS });
  const bDir = tempDir();
  const b = await scene.relay({ instanceId: "cut-b", natsUrl: `nats://127.0.0.1:${proxy.port}`, dataDir: bDir, args: ARGS });
  const ca = await scene.controller(a.wsUrl);
  const cb = await scene.controller(b.wsUrl);
  cb.onFrame((f) => {
    if (f.type === "deliver") cb.ack(f);
  });
  // The link works: a first message crosses, so b's pull request is pending at the server.
  t.equal((await ca.publish("VersionCheckCompleted", { n: 0 }, "before")).type, "published");
  await cb.next((f) => f.type === "deliver" && f.id === "before", 10_000);

  proxy.partition();
  const ids = ["during-1", "during-2"];
  for (const id of ids) t.equal((await ca.publish("VersionCheckCompleted", { id }, id)).type, "published", `${id} published by a`);
  // b notices the cut only after three missed pings (about 6 s: four ack waits of 1.5 s).
  await b.waitForLog((l) => l.msg === "bus disconnected", 20_000);
  proxy.heal();

  const outcome = async (id: string): Promise<{ delivered?: Frame; dead?: Frame }> => {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const delivered = cb.deliveries().find((f) => f.id === id);
      if (delivered) return { delivered };
      if (Date.now() > deadline) {
        const r = await runRelayCli(["dlq", "list", "--json", "--data-dir", bDir]);
        const dead = (JSON.parse(r.stdout) as Frame[]).find((d) => d.id === id);
        return dead ? { dead } : {};
      }
      await cb.next((f) => f.type === "deliver" && f.id === id, Math.max(1, deadline - Date.now()), cb.frames.length).catch(() => undefined);
    }
  };
  for (const id of ids) {
    const got = await outcome(id);
    t.ok(got.delivered || got.dead, `${id}: delivered to b's controller or a dead letter at b (not gone)`);
    if (got.delivered) t.ok(Number(got.delivered.attempt) <= MAX_DELIVER, `${id} delivered as attempt ${got.delivered.attempt}`);
  }
});

t.test("a partition healed after the PubAck probe gave up but before the missed pings: the bus reconnects and flushes its outbox", async (t) => {
  const scene = new Scene(t);
  const nats = await startNatsServer();
  scene.onStop(() => nats.stop());
  const proxy = await startTcpProxy(nats.port);
  scene.onStop(() => proxy.close());
  const a = await scene.relay({ instanceId: "cut-a", natsUrl: `nats://127.0.0.1:${proxy.port}`, args: ARGS });
  const b = await scene.relay({ instanceId: "peer-b", natsUrl: nats.url, args: ARGS });
  const ca = await scene.controller(a.wsUrl);
  const cb = await scene.controller(b.wsUrl);
  cb.onFrame((f) => {
    if (f.type === "deliver") cb.ack(f);
  });
  t.equal((await ca.publish("VersionCheckCompleted", { n: 0 }, "before")).type, "published");

  proxy.partition();
  // No PubAck within 3 s: queued, and the probe that follows finds NATS silent (about 4.5 s in,
  // before nats.js's own three missed 2 s pings).
  const answer = await ca.publish("VersionCheckCompleted", { n: 1 }, "queued-1");
  t.match(answer, { type: "published", queued: true }, "answered queued");
  await a.waitForLog((l) => l.msg === "bus disconnected" && /PubAck timeout/.test(String(l.reason)), 15_000);
  proxy.heal();

  const got = await cb.next((f) => f.type === "deliver" && f.id === "queued-1", 30_000).catch(() => undefined);
  if (!t.ok(got, "the queued message reaches the peer after the heal (the outbox was flushed)"))
    t.comment(JSON.stringify(a.logs.filter((l) => /bus|NATS|outbox/.test(String(l.msg))).map((l) => [l.msg, l.reason ?? l.err])));
  t.ok(await a.waitForLog((l) => l.msg === "outbox flushed", 10_000), "a's outbox flushed");
});
