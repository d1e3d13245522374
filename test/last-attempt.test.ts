// The last attempt survives the relay: a controller nacks attempts 1 and 2 and is still working
// on attempt 3 when its relay is stopped (SIGTERM, drain timeout shorter than the handler) or
// killed (SIGKILL). After the restart the message must be redelivered or be a dead letter with
// its attempts — never gone — and the controller never sees more than --max-deliver attempts.
// On both buses.

import t from "tap";
import { backends } from "./helpers/relay-backends.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";

const MAX_DELIVER = 3;
const ARGS = ["--ack-wait", "1500", "--nack-delay", "100", "--max-deliver", String(MAX_DELIVER), "--drain-timeout", "200"];

async function dlqList(dataDir: string): Promise<Frame[]> {
  const r = await runRelayCli(["dlq", "list", "--data-dir", dataDir, "--json"]);
  if (r.code !== 0) throw new Error(`dlq list failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as Frame[];
}

/** Waits until the message is either delivered to `c` or listed as a dead letter in `dataDir`. */
async function outcome(c: TestController, dataDir: string, id: string, timeoutMs: number): Promise<{ delivered?: Frame; dead?: Frame }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const delivered = c.deliveries().find((f) => f.id === id);
    if (delivered) return { delivered };
    const dead = (await dlqList(dataDir)).find((d) => d.id === id);
    if (dead) return { dead };
    if (Date.now() > deadline) return {};
    // The dead letter is written by another process: there is no event to wait on, so look again.
    await new Promise((r) => setTimeout(r, 100));
  }
}

for (const backend of backends) {
  for (const signal of ["SIGTERM", "SIGKILL"] as const) {
    t.test(`${backend.name}: relay ${signal} during the last attempt — redelivered or a dead letter after the restart`, async (tt) => {
      const medium = await backend.create();
      const relays: RelayProcess[] = [];
      const controllers: TestController[] = [];
      tt.teardown(async () => {
        await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
        await Promise.all(relays.map((r) => r.stop("SIGKILL")));
        await medium.stop();
      });
      const start = async (id: string, dataDir?: string): Promise<RelayProcess> => {
        const r = await startRelay({ instanceId: id, dataDir, args: [...medium.args, ...ARGS] });
        relays.push(r);
        return r;
      };
      const a = await start("origin-a");
      const bDir = tempDir();
      const b = await start("receiver-b", bDir);
      const ca = await TestController.connect(a.wsUrl);
      const cb = await TestController.connect(b.wsUrl);
      controllers.push(ca, cb);
      // Attempts 1 and 2 are nacked; attempt 3 is held (working) past the drain timeout.
      cb.onFrame((f) => {
        if (f.type !== "deliver") return;
        if (f.attempt < MAX_DELIVER) cb.send({ type: "nack", deliveryId: f.deliveryId, delayMs: 50 });
        else cb.send({ type: "working", deliveryId: f.deliveryId });
      });
      const id = `last-${signal}-${backend.name}`;
      tt.equal((await ca.publish("VersionCheckCompleted", { n: 1 }, id)).type, "published");
      const third = await cb.next((f) => f.type === "deliver" && f.id === id && f.attempt === MAX_DELIVER, 15_000);
      tt.equal(third.attempt, MAX_DELIVER, "the controller holds the last attempt");

      const code = await b.stop(signal);
      if (signal === "SIGTERM") tt.equal(code, 0, "drained and exited 0");
      await cb.close().catch(() => undefined);

      const b2 = await start("receiver-b", bDir);
      const cb2 = await TestController.connect(b2.wsUrl);
      controllers.push(cb2);
      cb2.onFrame((f) => {
        if (f.type === "deliver") cb2.ack(f);
      });
      const got = await outcome(cb2, bDir, id, 15_000);
      if (!tt.ok(got.delivered || got.dead, "after the restart the message is redelivered or a dead letter (not gone)"))
        tt.comment(JSON.stringify([...b.logs, ...b2.logs].filter((l) => Number(l.level) >= 40 || /consum|dead|drain/.test(String(l.msg)))));
      if (got.delivered) tt.ok(got.delivered.attempt <= MAX_DELIVER, `redelivered as attempt ${got.delivered.attempt} ≤ ${MAX_DELIVER}`);
      if (got.dead) {
        tt.equal(got.dead.attempts, MAX_DELIVER, "the dead letter counts the attempts the controller saw");
        tt.match(got.dead.reason, /attempt/i, "the reason says the last attempt was not settled");
      }
      for (const f of [...cb.deliveries(), ...cb2.deliveries()]) tt.ok(f.attempt <= MAX_DELIVER, `attempt ${f.attempt} ≤ ${MAX_DELIVER}`);
    });
  }
}
