// AckBatcher (relay/bus/ack-batcher.ts): acks wait for company, never longer than its delay, never
// more than `max` of them, and flush() sends everything at once. (The JetStream suites cover the
// acks end to end: test/bus-jetstream-conformance, test/relay-conformance.)

import t from "tap";
import { AckBatcher } from "../relay/bus/ack-batcher.js";

function batcher(max = 4, delayMs = 5) {
  const sent: string[][] = [[]];
  const failed: string[] = [];
  let onSend: (() => void) | undefined;
  const b = new AckBatcher({
    delayMs,
    max,
    send: (r) => {
      if (r.startsWith("bad")) throw new Error("closed");
      sent[sent.length - 1]!.push(r);
      onSend?.();
    },
    failed: (_err, r) => failed.push(r),
  });
  const nextBatch = (): void => void sent.push([]);
  return { b, sent, failed, nextBatch, sentSoon: () => new Promise<void>((resolve) => (onSend = resolve)) };
}

t.test("acks wait until max of them are there, then leave together", async (t) => {
  const { b, sent } = batcher(4, 60_000);
  for (const r of ["a", "b", "c"]) b.add(r);
  t.same(sent, [[]], "three wait");
  b.add("d");
  t.same(sent, [["a", "b", "c", "d"]], "the fourth sends all four, in order");
  t.equal(b.size, 0);
});

t.test("a lone ack leaves after the delay", async (t) => {
  const { b, sent, sentSoon } = batcher(100, 5);
  const soon = sentSoon();
  b.add("x");
  t.same(sent, [[]]);
  await soon;
  t.same(sent, [["x"]]);
});

t.test("flush() sends what waits (before a publish, before closing); a throwing send is reported, the rest still go", async (t) => {
  const { b, sent, failed } = batcher(100, 60_000);
  b.add("a");
  b.add("bad-1");
  b.add("c");
  b.flush();
  t.same(sent, [["a", "c"]]);
  t.same(failed, ["bad-1"]);
  b.flush();
  t.same(sent, [["a", "c"]], "nothing twice");
});
