// The inbound gate in-process: a rejected message is terminated only once its dead letter is
// durable; if the dead letter cannot be written it is left to the bus (nak), never dropped.

import t from "tap";
import pino from "pino";
import type { InboundMessage } from "../relay/bus/bus.js";
import type { ArrivalSource } from "../relay/delivery.js";
import { InboundGate } from "../relay/inbound-gate.js";
import { RelayMetrics } from "../relay/metrics.js";

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

t.test("term only after the dead letter is written; a failed write is nak'd, not lost", async (t) => {
  const metrics = new RelayMetrics();
  const delivered: InboundMessage[] = [];
  const gate = new InboundGate({ instanceId: "own", metrics, logger: pino({ level: "silent" }), deliver: (m) => delivered.push(m) });
  let release!: () => void;
  let fail = false;
  const recorded: Array<{ payload: string; reason: string }> = [];
  const source: ArrivalSource = {
    name: "bus",
    redelivers: true,
    recordDeadLetter: (m, _attempts, reason) =>
      new Promise<void>((resolve, reject) => {
        release = () => (fail ? reject(new Error("disk full")) : (recorded.push({ payload: m.payloadJson, reason }), resolve()));
      }),
  };

  const m1 = message();
  gate.admit(m1, source);
  const again = message(); // a redelivery of the same seq while its dead letter is being written
  gate.admit(again, source);
  t.same([m1.settles, again.settles], [[], []], "nothing settled while the dead letter is being written");
  const idle = gate.waitIdle(5_000);
  release();
  t.equal(await idle, true, "waitIdle resolves once it is written");
  t.same([m1.settles, again.settles], [["term"], ["term"]], "then terminated, the redelivery with it");
  t.match(recorded, [{ payload: "hello world", reason: /^malformed_payload: / }]);
  t.same(await rejected(metrics), { malformed_payload: 1 }, "counted once");

  fail = true;
  const m2 = message({ seq: 8, kind: "TenantRevoked", subject: "uptrakit.push.peer.TenantRevoked", payloadJson: '{"apiKey":"x"}' });
  gate.admit(m2, source);
  release();
  await gate.waitIdle(5_000);
  t.match(m2.settles, [/^nak \d+$/], "a dead letter that cannot be written: nak'd for the bus to redeliver, not terminated");
  t.same(await rejected(metrics), { malformed_payload: 1 }, "and not counted");
  fail = false;
  const m2b = message({ seq: 8, attempt: 2, kind: "TenantRevoked", subject: "uptrakit.push.peer.TenantRevoked", payloadJson: '{"apiKey":"x"}' });
  gate.admit(m2b, source);
  release();
  await gate.waitIdle(5_000);
  t.same(m2b.settles, ["term"], "its redelivery is recorded and terminated");
  t.match(recorded[1], { payload: "", reason: /^forbidden_kind: / }, "with the payload of a forbidden kind withheld");

  const own = message({ seq: 9, origin: "own", subject: "uptrakit.push.own.VersionCheckCompleted", payloadJson: "{}" });
  gate.admit(own, source);
  t.same(own.settles, ["ack"], "an echo is acked quietly");
  const ok = message({ seq: 10, payloadJson: "{}" });
  gate.admit(ok, source);
  t.same(delivered, [ok], "a valid message goes to delivery, unsettled");
});
