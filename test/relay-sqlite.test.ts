// What only a relay on the embedded SQLite bus has to get right, through the real relay binary:
// it is the default bus (no NATS URL), its file lives in the data dir, and a damaged bus file
// is a clear start-up error. The behaviour both buses share is in relay-conformance.test.ts.

import t, { type Test } from "tap";
import fs from "node:fs";
import path from "node:path";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";

function dir(tt: Test): string {
  const d = tempDir("uptrakit-relay-sqlite-");
  tt.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

t.test("with only --data-dir the relay runs on the SQLite bus in <data-dir>/bus.db", async (tt) => {
  const dataDir = dir(tt);
  // startRelay adds only --instance-id, --data-dir and --listen (an ephemeral port): no
  // --nats-url, no --bus, and no UPTRAKIT_* variable of ours leaks in.
  let relay: RelayProcess | undefined;
  let c: TestController | undefined;
  tt.teardown(async () => {
    await c?.close().catch(() => undefined);
    await relay?.stop("SIGKILL");
  });
  relay = await startRelay({ instanceId: "solo", dataDir });
  c = await TestController.connect(relay.wsUrl);
  tt.same(c.ready, { type: "ready", instanceId: "solo", bus: "sqlite" });
  tt.ok(fs.statSync(path.join(dataDir, "bus.db")).isFile(), "the bus file is <data-dir>/bus.db");
  tt.ok(fs.statSync(path.join(dataDir, "relay.db")).isFile(), "the relay's own store is beside it");
  tt.same(await c.publish("VersionCheckCompleted", {}, "local"), { type: "published", id: "local" }, "publish is local: never queued");
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "inspector", "--data-dir", dataDir]);
  tt.equal(info.code, 0, info.stderr);
  tt.match(JSON.parse(info.stdout), { bus: "sqlite", messages: 1 }, "`stream info` with the same data dir reads that bus file");
});

t.test("a corrupted bus file is a clear start-up error naming the file", async (tt) => {
  const dataDir = dir(tt);
  const busFile = path.join(dataDir, "bus.db");
  fs.writeFileSync(busFile, Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 7919 + 13) % 256)));
  const r = await runRelayCli(["run", "--instance-id", "solo", "--data-dir", dataDir, "--listen", "127.0.0.1:0"]);
  tt.not(r.code, 0, "exits non-zero");
  tt.not(r.code, null, "exits by itself");
  tt.ok(r.stderr.includes(busFile), `names the bus file: ${r.stderr}`);
  tt.match(r.stderr, /SQLite bus/);
  tt.match(r.stderr, /not a database/);
  tt.equal(fs.readFileSync(busFile).length, 8192, "the file is left as it was");

  // The same through --bus sqlite:<file> (a relative file is taken in the data dir).
  const r2 = await runRelayCli(["run", "--instance-id", "solo", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--bus", "sqlite:bus.db"]);
  tt.not(r2.code, 0);
  tt.ok(r2.stderr.includes(busFile), `names the bus file: ${r2.stderr}`);
});

t.test("a replayed dead letter obeys --max-deliver: unanswered, it goes back to the dead letters", async (tt) => {
  const bus = dir(tt);
  const dataB = dir(tt);
  const busArgs = ["--bus", `sqlite:${path.join(bus, "bus.db")}`];
  const fast = ["--ack-wait", "300", "--nack-delay", "50", "--max-deliver", "3"];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
  });
  const ra = await startRelay({ instanceId: "alpha", dataDir: dir(tt), args: busArgs });
  relays.push(ra);
  const rb = await startRelay({ instanceId: "bravo", dataDir: dataB, args: [...busArgs, ...fast] });
  relays.push(rb);
  const ca = await TestController.connect(ra.wsUrl);
  const cb = await TestController.connect(rb.wsUrl);
  controllers.push(ca, cb);

  await ca.publish("CertificateRenewed", { cn: "x" }, "poison");
  for (let attempt = 1; attempt <= 3; attempt++) {
    const d = await cb.next((f) => f.type === "deliver" && f.id === "poison" && f.attempt === attempt);
    cb.send({ type: "nack", deliveryId: d.deliveryId, delayMs: 10 });
  }
  const dead = await dlqWait(dataB, (rows) => rows.find((r) => r.id === "poison" && !r.replayRequested));
  tt.equal(dead.attempts, 3);

  const from = cb.frames.length; // before the CLI: the relay may deliver before we see the CLI exit
  const replay = await runRelayCli(["dlq", "replay", "poison", "--data-dir", dataB]);
  tt.equal(replay.code, 0, replay.stderr);
  // Never answered: three ack waits, then back among the dead letters with the attempts added.
  const back = await dlqWait(dataB, (rows) => rows.find((r) => r.id === "poison" && !r.replayRequested && r.attempts > 3));
  tt.equal(back.attempts, 6, "3 + 3 replay attempts");
  tt.match(back.reason, /replay failed/);
  const replayed = cb.frames.slice(from).filter((f) => f.type === "deliver" && f.id === "poison");
  tt.same(replayed.map((f) => f.attempt), [1, 2, 3], "the replay made exactly 3 attempts");
  // Proof of quiet: a later message arrives, and no fourth replay attempt came before or with it.
  await ca.publish("CertificateRenewed", {}, "after");
  cb.ack(await cb.next((f) => f.type === "deliver" && f.id === "after"));
  await cb.next((f) => f.type === "deliver" && f.id === "poison" && f.attempt === 4, 1_000, from).then(
    () => tt.fail("a fourth replay attempt was delivered"),
    () => tt.pass("no fourth attempt"),
  );
});

type DeadRow = { id: string; attempts: number; reason: string; replayRequested: boolean };

/** Polls `dlq list --json` (another process's store: nothing to wait on) until pick finds a row. */
async function dlqWait(dataDir: string, pick: (rows: DeadRow[]) => DeadRow | undefined, timeoutMs = 15_000): Promise<DeadRow> {
  const deadline = Date.now() + timeoutMs;
  let rows: DeadRow[] = [];
  for (;;) {
    const r = await runRelayCli(["dlq", "list", "--data-dir", dataDir, "--json"]);
    if (r.code !== 0) throw new Error(`dlq list failed: ${r.stderr}`);
    rows = JSON.parse(r.stdout) as DeadRow[];
    const hit = pick(rows);
    if (hit) return hit;
    if (Date.now() > deadline) throw new Error(`no matching dead letter within ${timeoutMs} ms: ${JSON.stringify(rows)}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}
