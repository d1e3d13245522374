// A relay store held busy by another process (an operator's `dlq purge`, a backup tool) past the
// old 5 s busy timeout: the relay must neither crash nor stall its event loop, and the write it
// had to make (removing a replayed dead letter once acked) lands once the store is free.

import path from "node:path";
import Database from "better-sqlite3";
import t from "tap";
import { sqliteBackend } from "./helpers/relay-backends.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";

const HOLD_MS = 6_000;

async function dlqList(dataDir: string): Promise<Frame[]> {
  const r = await runRelayCli(["dlq", "list", "--data-dir", dataDir, "--json"]);
  if (r.code !== 0) throw new Error(`dlq list failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as Frame[];
}

t.test("a busy relay store: no crash, no stalled event loop, the write lands afterwards", async (t) => {
  const medium = await sqliteBackend.create();
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  t.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await medium.stop();
  });
  const args = [...medium.args, "--ack-wait", "30000"];
  const a = await startRelay({ instanceId: "busy-a", args });
  const bDir = tempDir();
  const b = await startRelay({ instanceId: "busy-b", dataDir: bDir, args });
  relays.push(a, b);
  const ca = await TestController.connect(a.wsUrl);
  const cb = await TestController.connect(b.wsUrl);
  controllers.push(ca, cb);

  // A dead letter at b (rejected), then replayed to b's controller.
  await ca.publish("VersionCheckCompleted", { n: 1 }, "busy-1");
  const first = await cb.next((f) => f.type === "deliver" && f.id === "busy-1");
  cb.send({ type: "reject", deliveryId: first.deliveryId, reason: "poison" });
  await b.waitForLog((l) => l.msg === "dead letter recorded");
  t.equal((await runRelayCli(["dlq", "replay", "busy-1", "--data-dir", bDir])).code, 0);
  const replayed = await cb.next((f) => f.type === "deliver" && f.id === "busy-1" && f.deliveryId !== first.deliveryId, 10_000);

  // Another process holds the store's write lock; meanwhile the controller acks the replay.
  const holder = new Database(path.join(bDir, "relay.db"), { timeout: 5_000 });
  holder.exec("BEGIN IMMEDIATE");
  cb.ack(replayed);
  const probes: number[] = [];
  const holdUntil = Date.now() + HOLD_MS;
  while (Date.now() < holdUntil) {
    const started = performance.now();
    const r = await fetch(`${b.httpUrl}/healthz`, { signal: AbortSignal.timeout(4_000) });
    await r.text();
    probes.push(performance.now() - started);
    await new Promise((res) => setTimeout(res, 200)); // a probe every 200 ms while the lock is held
  }
  holder.exec("COMMIT");
  holder.close();
  t.ok(b.proc.exitCode === null && b.proc.signalCode === null, "the relay is still running");
  t.ok(Math.max(...probes) < 2_000, `/healthz answered throughout the hold (${probes.length} probes, slowest ${Math.round(Math.max(...probes))} ms)`);
  await b.waitForLog((l) => l.msg === "relay store busy (another process holds it); retrying", 1_000);

  // Once the lock is gone, the acked replay is removed from the dead letters.
  const deadline = Date.now() + 10_000;
  let left = await dlqList(bDir);
  while (left.some((d) => d.id === "busy-1") && Date.now() < deadline) {
    await new Promise((res) => setTimeout(res, 100)); // another process's file: nothing to wait on
    left = await dlqList(bDir);
  }
  t.notOk(left.some((d) => d.id === "busy-1"), "the acked replay is no longer a dead letter");
  t.notMatch(b.stderr(), /unhandled|uncaught|SQLITE_BUSY/i, "nothing escaped");
});
