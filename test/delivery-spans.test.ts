// The delivery machine's process spans, with a recording RelayTracing in place of the OTel one:
// one span per attempt, ended exactly once with how the attempt ended (ack, nack, reject, ack-wait
// timeout, handed back when the controller goes), and the deliver frame carries its context
// instead of the publish's. Without tracing the publish's context goes through untouched.

import t from "tap";
import pino from "pino";
import type { InboundMessage } from "../relay/bus/bus.js";
import { DeliveryMachine, type ArrivalSource } from "../relay/delivery.js";
import { RelayMetrics } from "../relay/metrics.js";
import type { ProcessSpan, RelayTracing } from "../relay/trace-loader.js";
import { FakeClock, settle } from "./helpers/fake-clock.js";

const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

function msg(seq: number, attempt = 1): InboundMessage {
  return {
    id: `m${seq}`, kind: "K", origin: "peer", publishedAt: "2026-12-03T00:00:00.000Z", payloadJson: "{}", traceparent: TP, tracestate: "a=b",
    seq, attempt, ack() {}, nak() {}, working() {}, term() {},
  };
}

const source: ArrivalSource = { name: "bus", redelivers: true, recordDeadLetter: () => Promise.resolve() };

function recordingTracing(): RelayTracing & { spans: Array<{ id: string; attempt: number; ended: string[] }> } {
  const spans: Array<{ id: string; attempt: number; ended: string[] }> = [];
  return {
    spans,
    publish: () => { throw new Error("not here"); },
    receive: () => undefined,
    process(m, attempt): ProcessSpan {
      const s = { id: m.id, attempt, ended: [] as string[] };
      spans.push(s);
      const n = spans.length.toString(16).padStart(16, "0");
      return { traceparent: `00-4bf92f3577b34da6a3ce929d0e0e4736-${n}-01`, end: (o) => void s.ended.push(o) };
    },
    shutdown: () => Promise.resolve(),
  };
}

function machine(tracing?: RelayTracing) {
  const clock = new FakeClock();
  const frames: Array<Record<string, unknown>> = [];
  const m = new DeliveryMachine({ maxDeliver: 3, ackWaitMs: 1000, nackDelayMs: 100, metrics: new RelayMetrics(), logger: pino({ level: "silent" }), clock, tracing });
  m.attach((f) => frames.push(JSON.parse(f) as Record<string, unknown>));
  return { m, frames, clock };
}

t.test("one process span per attempt, ended once with its outcome", async (tt) => {
  const tracing = recordingTracing();
  const { m, frames, clock } = machine(tracing);
  const id = (i: number) => String(frames[i]!.deliveryId);
  for (let seq = 1; seq <= 5; seq++) m.offer(msg(seq), source);
  tt.same(frames.map((f) => f.traceparent), [1, 2, 3, 4, 5].map((n) => `00-4bf92f3577b34da6a3ce929d0e0e4736-${n.toString(16).padStart(16, "0")}-01`), "each deliver carries its process span's context");
  tt.same(frames.map((f) => f.tracestate), Array(5).fill("a=b"), "and the tracestate as it came");
  m.ack(id(0));
  m.nack(id(1));
  m.reject(id(2), "poison");
  await clock.advance(600);
  m.working(id(4)); // m5 is kept alive
  await clock.advance(500); // m4's ack wait runs out
  m.detach(); // m5 goes back unsettled
  await settle();
  tt.same(tracing.spans.map((s) => [s.id, s.ended]), [["m1", ["ack"]], ["m2", ["nack"]], ["m3", ["reject"]], ["m4", ["timeout"]], ["m5", ["handed_back"]]]);
  m.attach(() => undefined); // m5 again: a new attempt, a new span
  tt.equal(tracing.spans.length, 6);
  tt.same(tracing.spans[5], { id: "m5", attempt: 1, ended: [] });
  m.close();
  tt.same(tracing.spans[5]!.ended, ["handed_back"], "closing ends what is open");
});

t.test("without tracing the publish's context goes to the controller as it came", async (tt) => {
  const { m, frames } = machine();
  m.offer(msg(1), source);
  tt.equal(frames[0]!.traceparent, TP);
  tt.equal(frames[0]!.tracestate, "a=b");
  m.close();
});
