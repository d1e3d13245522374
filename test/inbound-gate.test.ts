// The inbound gate in-process, in front of the real delivery state machine with a fake clock: a
// rejected message is terminated only once its dead letter is durable; a dead letter that cannot
// be written is retried while the message is kept alive at the bus — never nak'd (each nak
// would spend one of the bus's arrivals), never dropped.

import t from "tap";
import pino from "pino";
import type { InboundMessage } from "../relay/bus/bus.js";
import { DeliveryMachine, type ArrivalSource } from "../relay/delivery.js";
import { InboundGate } from "../relay/inbound-gate.js";
import { RelayMetrics } from "../relay/metrics.js";
import { FakeClock, settle } from "./helpers/fake-clock.js";

function message(over: Partial<InboundMessage> = {}): InboundMessage & { settles: string[] } {
  const settles: string[] = [];
  return {
    id: "m-1", kind: "VersionCheckCompleted", origin: "peer", publishedAt: "2026-12-03T12:00:00.000Z", payloadJson: "hello world",
    subject: "uptrakit.push.peer.VersionCheckCompleted", attempt: 1, seq: 7,
    ack: () => settles.push("ack"), nak: (ms: number) => settles.push(`nak ${ms}`), working: () => settles.push("working"), term: () => settles.push("term"),
    settles, ...over,
  };
}

async function rejected(metrics: RelayMetrics): Promise<Record<string, number>> {
  const m = await metrics.inboundRejected.get();
  return Object.fromEntries(m.values.filter((v) => v.value > 0).map((v) => [String(v.labels.reason), v.value]));
}

t.test("term only after the dead letter is written; a failing store is retried, the message kept alive, never nak'd", async (t) => {
  const metrics = new RelayMetrics();
  const clock = new FakeClock();
  const silent = pino({ level: "silent" });
  const machine = new DeliveryMachine({ maxDeliver: 3, ackWaitMs: 3_000, nackDelayMs: 100, metrics, logger: silent, clock });
  const delivered: string[] = [];
  machine.attach((f) => delivered.push(f));
  const gate = new InboundGate({
    instanceId: "own",
    metrics,
    logger: silent,
    deliver: (m, s) => machine.offer(m, s),
    refuse: (m, s, reason, done) => machine.refuse(m, s, reason, done),
  });
  let failing = 0;
  const recorded: Array<{ payload: string; reason: string }> = [];
  let releases: Array<() => void> = [];
  const source: ArrivalSource = {
    name: "bus",
    redelivers: true,
    recordDeadLetter: (m, _attempts, reason) =>
      new Promise<void>((resolve, reject) => {
        releases.push(() => (failing > 0 ? (failing--, reject(new Error("disk full"))) : (recorded.push({ payload: m.payloadJson, reason }), resolve())));
      }),
  };
  const release = async (): Promise<void> => {
    const r = releases;
    releases = [];
    for (const f of r) f();
    await settle();
  };

  const m1 = message();
  gate.admit(m1, source);
  const again = message(); // a redelivery of the same seq while its dead letter is being written
  gate.admit(again, source);
  t.same([m1.settles, again.settles], [[], []], "nothing settled while the dead letter is being written");
  await release();
  t.same([m1.settles, again.settles], [["term"], ["term"]], "then terminated, the redelivery with it");
  t.match(recorded, [{ payload: "hello world", reason: /^malformed_payload: / }]);
  t.same(await rejected(metrics), { malformed_payload: 1 }, "counted once");
  const late = message();
  gate.admit(late, source);
  t.same(late.settles, ["term"], "a redelivery that crossed the term is terminated again, not recorded twice");

  failing = 5;
  const m2 = message({ seq: 8, kind: "TenantRevoked", subject: "uptrakit.push.peer.TenantRevoked", payloadJson: '{"apiKey":"x"}' });
  gate.admit(m2, source);
  for (let i = 0; i < 5; i++) {
    await release(); // fails
    await clock.advance(5_000); // the back-off, and the keep-alive on the way
  }
  t.notOk(m2.settles.some((x) => x.startsWith("nak") || x === "term"), "while the store fails: neither nak'd nor terminated");
  t.ok(m2.settles.includes("working"), "…but kept alive at the bus (working), so it is not redelivered meanwhile");
  t.same(await rejected(metrics), { malformed_payload: 1 }, "and not counted yet");
  await release(); // the store works again
  t.equal(m2.settles.at(-1), "term", "recorded at last, then terminated");
  t.match(recorded[1], { payload: "", reason: /^forbidden_kind: / }, "with the payload of a forbidden kind withheld");
  t.same(await rejected(metrics), { malformed_payload: 1, forbidden_kind: 1 }, "counted once recorded");
  t.equal(machine.recordingCount, 0, "nothing left being recorded");

  const own = message({ seq: 9, origin: "own", subject: "uptrakit.push.own.VersionCheckCompleted", payloadJson: "{}" });
  gate.admit(own, source);
  t.same(own.settles, ["ack"], "an echo is acked quietly");
  const ok = message({ seq: 10, payloadJson: "{}" });
  gate.admit(ok, source);
  t.equal(delivered.length, 1, "a valid message is delivered");
  t.match(JSON.parse(delivered[0]!), { type: "deliver", id: "m-1", payload: {} });
  t.same(ok.settles, [], "…and left unsettled for the controller");
  machine.close();
});
