// A silent partition between a relay and NATS: a proxy stops forwarding both ways without
// closing anything. The relay must notice within 10 s, answer publishes from the outbox at once
// while cut off, say so in /readyz and the metrics, reconnect after the heal, and lose nothing.

import t from "tap";
import { startTcpProxy } from "../scripts/lib/tcp-proxy.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { Scene } from "./helpers/scene.js";
import type { Frame } from "./helpers/test-controller.js";

const DETECT_WITHIN_MS = 10_000;

t.test("silent partition: detected, publishes queued at once, nothing lost after the heal", async (t) => {
  const scene = new Scene(t);
  const nats = await startNatsServer();
  scene.onStop(() => nats.stop());
  const proxy = await startTcpProxy(nats.port);
  scene.onStop(() => proxy.close());
  const a = await scene.relay({ instanceId: "cut-a", natsUrl: `nats://127.0.0.1:${proxy.port}` });
  const b = await scene.relay({ instanceId: "peer-b", natsUrl: nats.url });
  const ca = await scene.controller(a.wsUrl);
  const cb = await scene.controller(b.wsUrl);
  cb.onFrame((f) => {
    if (f.type === "deliver") cb.ack(f);
  });

  const published: string[] = [];
  const publish = async (id: string): Promise<{ frame: Frame; ms: number }> => {
    const started = performance.now();
    const frame = await ca.publish("VersionCheckCompleted", { id }, id);
    if (frame.type === "published") published.push(id);
    return { frame, ms: performance.now() - started };
  };
  t.equal((await publish("before-1")).frame.type, "published");

  proxy.partition();
  const cutAt = performance.now();
  // Publishes keep coming while the link is dead; the first ones wait for their PubAck timeout.
  let n = 0;
  const during: Array<{ frame: Frame; ms: number; afterDetect: boolean }> = [];
  let detectedAt = 0;
  const detected = a.waitForLog((l) => l.msg === "bus disconnected", DETECT_WITHIN_MS + 5_000).then(() => (detectedAt = performance.now()));
  const publisher = (async () => {
    while (!detectedAt || during.filter((d) => d.afterDetect).length < 20) {
      const afterDetect = detectedAt > 0;
      const r = await publish(`during-${n++}`);
      during.push({ ...r, afterDetect });
      await new Promise((res) => setTimeout(res, 50)); // a steady trickle of publishes
    }
  })();
  await detected;
  await publisher;
  const detectMs = detectedAt - cutAt;
  t.ok(detectMs <= DETECT_WITHIN_MS, `the partition is detected within ${DETECT_WITHIN_MS / 1000} s (${Math.round(detectMs)} ms)`);

  const ready = (await (await fetch(`${a.httpUrl}/readyz`)).json()) as Record<string, unknown>;
  t.match(JSON.stringify(ready), /no answer from NATS|disconnected|reconnecting/, `/readyz says the bus is cut off: ${JSON.stringify(ready)}`);
  const metrics = await (await fetch(`${a.httpUrl}/metrics`)).text();
  t.match(metrics, /uptrakit_relay_nats_connected 0/, "nats_connected is 0");
  t.match(metrics, /uptrakit_relay_nats_stale_total [1-9]/, "the silent cut is counted");

  const after = during.filter((d) => d.afterDetect);
  t.ok(after.every((d) => d.frame.type === "published" && d.frame.queued === true), "after detection every publish is answered queued");
  const sorted = after.map((d) => d.ms).sort((x, y) => x - y);
  t.comment(
    `answers after detection: p50 ${sorted[Math.floor(sorted.length / 2)]!.toFixed(1)} ms, max ${sorted.at(-1)!.toFixed(1)} ms; ` +
      `before detection ${during.length - after.length} publishes, max ${Math.max(...during.filter((d) => !d.afterDetect).map((d) => d.ms), 0).toFixed(0)} ms`,
  );

  proxy.heal();
  // Generous: a reconnect attempt made during the partition waits out its connect timeout first.
  await a
    .waitForLog((l) => l.msg === "bus connected" && a.logs.indexOf(l) > a.logs.findIndex((x) => x.msg === "bus disconnected"), 60_000)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nlast log lines: ${a.logs.slice(-15).map((l) => JSON.stringify(l)).join("\n")}`);
    });
  t.equal((await publish("after-1")).frame.type, "published");
  // Every acknowledged publish reaches the peer (at least once).
  await cb.nextN((f) => f.type === "deliver" && f.id === "after-1", 1, 30_000);
  const deadline = Date.now() + 30_000;
  for (;;) {
    const got = new Set(cb.deliveries().map((f) => String(f.id)));
    const missing = published.filter((id) => !got.has(id));
    if (missing.length === 0) break;
    if (Date.now() > deadline) {
      t.fail(`lost after the heal: ${missing.join(", ")}`);
      break;
    }
    await cb.next((f) => f.type === "deliver" && missing.includes(String(f.id)), Math.max(1, deadline - Date.now()), cb.frames.length).catch(() => undefined);
  }
  t.pass(`${published.length} acknowledged publishes, all delivered to the peer`);
});
