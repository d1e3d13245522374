// The delivery state machine in-process, with a fake clock: first every edge of the table in
// docs/delivery.md, one by one; then randomized scenarios (fast-check) against a model of a
// JetStream consumer (unlimited arrivals, as the relay configures it; ack wait, nak delays,
// working, term) with controller behaviours and faults (controller loss, graceful restart, crash,
// failing store, arrivals lost on the way as in a silent partition),
// checking that every message ends acked or as exactly one dead letter, and that the controller
// never sees more than --max-deliver attempts.

import t from "tap";
import fc from "fast-check";
import pino from "pino";
import type { InboundMessage } from "../relay/bus/bus.js";
import type { Clock, TimerHandle } from "../relay/clock.js";
import { DeliveryMachine, type ArrivalSource } from "../relay/delivery.js";
import { RelayMetrics } from "../relay/metrics.js";
import { FakeClock, settle } from "./helpers/fake-clock.js";

const silent = pino({ level: "silent" });
const metrics = new RelayMetrics();

type Call = "ack" | "nak" | "working" | "term";

/** A bus message that records what was done to it. */
class FakeMsg implements InboundMessage {
  readonly calls: Array<{ call: Call; delayMs?: number }> = [];
  readonly kind = "VersionCheckCompleted";
  readonly origin = "peer";
  readonly publishedAt = "2026-12-03T00:00:00.000Z";
  readonly payloadJson = "{}";
  constructor(
    readonly seq: number,
    readonly attempt: number,
    readonly id = `m${seq}`,
  ) {}
  ack(): void {
    this.calls.push({ call: "ack" });
  }
  nak(delayMs: number): void {
    this.calls.push({ call: "nak", delayMs });
  }
  working(): void {
    this.calls.push({ call: "working" });
  }
  term(): void {
    this.calls.push({ call: "term" });
  }
  did(call: Call): number {
    return this.calls.filter((c) => c.call === call).length;
  }
}

interface Recorded {
  id: string;
  seq: number;
  attempts: number;
  reason: string;
}

function source(redelivers: boolean, failures = 0): ArrivalSource & { recorded: Recorded[]; failuresLeft: number } {
  const s = {
    name: redelivers ? "bus" : "replay",
    redelivers,
    recorded: [] as Recorded[],
    failuresLeft: failures,
    recordDeadLetter(msg: InboundMessage, attempts: number, reason: string): Promise<void> {
      if (s.failuresLeft > 0) {
        s.failuresLeft--;
        return Promise.reject(new Error("SQLITE_BUSY: database is locked"));
      }
      s.recorded.push({ id: msg.id, seq: msg.seq, attempts, reason });
      return Promise.resolve();
    },
  };
  return s;
}

function machine(clock: FakeClock, o: { maxDeliver?: number; ackWaitMs?: number; nackDelayMs?: number } = {}): { m: DeliveryMachine; frames: Array<Record<string, unknown>> } {
  const frames: Array<Record<string, unknown>> = [];
  const m = new DeliveryMachine({
    maxDeliver: o.maxDeliver ?? 3,
    ackWaitMs: o.ackWaitMs ?? 1000,
    nackDelayMs: o.nackDelayMs ?? 100,
    metrics,
    logger: silent,
    clock,
  });
  m.attach((f) => frames.push(JSON.parse(f) as Record<string, unknown>));
  return { m, frames };
}

const lastId = (frames: Array<Record<string, unknown>>): string => String(frames.at(-1)!.deliveryId);

t.test("every edge of the table", async (t) => {
  t.test("arrival with a controller: delivered; ack settles it", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const msg = new FakeMsg(1, 1);
    m.offer(msg, source(true));
    t.equal(frames.length, 1);
    t.match(frames[0], { type: "deliver", id: "m1", attempt: 1, origin: "peer" });
    t.equal(m.ack(lastId(frames)), "ok");
    t.same(msg.calls, [{ call: "ack" }]);
    t.equal(m.ack(lastId(frames)), "unknown_delivery", "a second ack finds nothing");
    await clock.advance(10_000);
    t.same(msg.calls, [{ call: "ack" }], "nothing fires after an ack");
  });

  t.test("nack before the last attempt: nak with the delay asked for, or --nack-delay", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const a = new FakeMsg(1, 1);
    m.offer(a, source(true));
    m.nack(lastId(frames), 250);
    t.same(a.calls, [{ call: "nak", delayMs: 250 }]);
    const b = new FakeMsg(2, 2);
    m.offer(b, source(true));
    m.nack(lastId(frames));
    t.same(b.calls, [{ call: "nak", delayMs: 100 }]);
  });

  t.test("nack of the last attempt: a dead letter, then term", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 3);
    m.offer(msg, src);
    m.nack(lastId(frames));
    await settle();
    t.same(src.recorded, [{ id: "m1", seq: 1, attempts: 3, reason: "nacked by the controller" }]);
    t.same(msg.calls, [{ call: "term" }]);
  });

  t.test("reject at any attempt: a dead letter with the reason", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 1);
    m.offer(msg, src);
    m.reject(lastId(frames), "poison");
    await settle();
    t.same(src.recorded, [{ id: "m1", seq: 1, attempts: 1, reason: "rejected by the controller: poison" }]);
    t.same(msg.calls, [{ call: "term" }]);
  });

  t.test("working restarts the ack wait", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 3);
    m.offer(msg, src);
    await clock.advance(900);
    t.equal(m.working(lastId(frames)), "ok");
    await clock.advance(900);
    t.same(src.recorded, [], "not expired 1800 ms after delivery: working moved the deadline");
    await clock.advance(200);
    t.equal(src.recorded.length, 1, "expired 1000 ms after working");
    t.match(src.recorded[0]!.reason, /not acked within 1000 ms/);
  });

  t.test("ack wait expiry before the last attempt: nothing (the bus redelivers); the late ack is unknown", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 1);
    m.offer(msg, src);
    const id = lastId(frames);
    await clock.advance(1001);
    t.same(msg.calls, []);
    t.same(src.recorded, []);
    t.equal(m.ack(id), "unknown_delivery");
  });

  t.test("an arrival past --max-deliver is never delivered: it is the dead letter of an unsettled last attempt", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 4);
    m.offer(msg, src);
    await settle();
    t.equal(frames.length, 0);
    t.equal(src.recorded.length, 1);
    t.equal(src.recorded[0]!.attempts, 3, "counts the attempts the controller could see");
    t.match(src.recorded[0]!.reason, /never settled/);
    t.same(msg.calls, [{ call: "term" }]);
  });

  t.test("the bus's redelivery of the last attempt before our clock ran out: one dead letter, 'not acked'", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    m.offer(new FakeMsg(1, 3), src);
    const old = lastId(frames);
    m.offer(new FakeMsg(1, 4), src);
    await clock.advance(5000);
    t.equal(src.recorded.length, 1);
    t.match(src.recorded[0]!.reason, /not acked within/);
    t.equal(m.ack(old), "unknown_delivery");
  });

  t.test("a redelivery supersedes the attempt in flight", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    m.offer(new FakeMsg(1, 1), src);
    const first = lastId(frames);
    const second = new FakeMsg(1, 2);
    m.offer(second, src);
    t.equal(m.ack(first), "unknown_delivery");
    t.equal(m.ack(lastId(frames)), "ok");
    t.same(second.calls, [{ call: "ack" }]);
  });

  t.test("no controller: parked and kept alive, then delivered to the next session with the same attempt", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    m.detach();
    const msg = new FakeMsg(1, 2);
    m.offer(msg, source(true));
    t.equal(frames.length, 0);
    await clock.advance(2000);
    t.ok(msg.did("working") >= 5, `kept alive while parked (${msg.did("working")} working)`);
    m.attach((f) => frames.push(JSON.parse(f) as Record<string, unknown>));
    t.match(frames.at(-1), { id: "m1", attempt: 2 });
  });

  t.test("controller lost mid-delivery: parked, not burnt", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    const msg = new FakeMsg(1, 3);
    m.offer(msg, src);
    m.detach();
    await clock.advance(5000);
    t.same(src.recorded, [], "no dead letter for a last attempt interrupted by the controller's loss");
    m.attach((f) => frames.push(JSON.parse(f) as Record<string, unknown>));
    t.match(frames.at(-1), { id: "m1", attempt: 3 });
  });

  t.test("shutdown hands everything back to the bus, even a last attempt", async (t) => {
    const clock = new FakeClock();
    const { m } = machine(clock);
    const a = new FakeMsg(1, 3);
    const b = new FakeMsg(2, 1);
    m.offer(a, source(true));
    m.detach();
    m.offer(b, source(true));
    t.equal(m.releaseAll(1000), 2);
    t.same(a.calls.at(-1), { call: "nak", delayMs: 1000 });
    t.same(b.calls.at(-1), { call: "nak", delayMs: 1000 });
  });

  t.test("a failing store: retried with back-off, kept alive, settled only once recorded", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true, 4);
    const msg = new FakeMsg(1, 1);
    m.offer(msg, src);
    m.reject(lastId(frames), undefined);
    await clock.advance(50);
    t.equal(msg.did("term"), 0, "not settled while not recorded");
    await clock.advance(2000);
    t.equal(src.recorded.length, 1, "recorded once the store works again");
    t.equal(msg.did("term"), 1);
  });

  t.test("a redelivery that crossed our term: settled again, not recorded twice", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(true);
    m.offer(new FakeMsg(1, 1), src);
    m.reject(lastId(frames), "x");
    await settle();
    const late = new FakeMsg(1, 2);
    m.offer(late, src);
    t.equal(src.recorded.length, 1);
    t.same(late.calls, [{ call: "term" }]);
    t.equal(frames.length, 1, "not delivered again");
  });

  t.test("a source without a broker (replay): the machine redelivers, counting the attempts", async (t) => {
    const clock = new FakeClock();
    const { m, frames } = machine(clock);
    const src = source(false);
    const msg = new FakeMsg(-7, 1);
    m.offer(msg, src);
    m.nack(lastId(frames), 300);
    await clock.advance(299);
    t.equal(frames.length, 1, "not before the nack delay");
    await clock.advance(1);
    t.match(frames.at(-1), { attempt: 2 });
    await clock.advance(1001);
    t.match(frames.at(-1), { attempt: 3 }, "an ack-wait expiry redelivers at once");
    await clock.advance(1001);
    t.equal(src.recorded.length, 1, "the last attempt's expiry returns it to the dead letters");
    t.equal(src.recorded[0]!.attempts, 3);
    t.equal(m.releaseAll(0), 0);
    t.same(msg.calls, [{ call: "term" }], "a replayed message is never nak'ed");
  });

  t.test("unknown deliveries", async (t) => {
    const clock = new FakeClock();
    const { m } = machine(clock);
    t.equal(m.ack("nope"), "unknown_delivery");
    t.equal(m.nack("nope"), "unknown_delivery");
    t.equal(m.working("nope"), "unknown_delivery");
    t.equal(m.reject("nope", undefined), "unknown_delivery");
  });
});

// ---- randomized: a JetStream-like broker, controller behaviours, faults --------------------------

type Behaviour = "ack" | "nack" | "nackDelay" | "working" | "reject" | "silence" | "slow";
type Fault = "none" | "detach" | "restart" | "crash" | "storeFails" | "partition";

interface Scenario {
  maxDeliver: number;
  ackWaitMs: number;
  messages: number;
  behaviours: Behaviour[];
  faults: Array<{ at: number; kind: Fault }>;
}

/** A process's view of the clock: when the process dies, its timers never fire. */
class ProcessClock implements Clock {
  dead = false;
  constructor(private readonly base: FakeClock) {}
  now(): number {
    return this.base.now();
  }
  setTimer(fn: () => void, ms: number): TimerHandle {
    return this.base.setTimer(() => {
      if (!this.dead) fn();
    }, ms);
  }
  clearTimer(h: TimerHandle | undefined): void {
    this.base.clearTimer(h);
  }
}

/** A durable pull consumer, as nats-server runs one: arrivals capped at maxArrivals. */
class Broker {
  readonly state = new Map<number, { arrivals: number; visibleAt: number; done: "acked" | "termed" | "exhausted" | null; current: number }>();
  consumer: { offer(m: InboundMessage): void; clock: ProcessClock } | undefined;
  /** Until then arrivals are counted but reach no one (a pull into a silently cut connection). */
  lostUntil = -1;
  constructor(
    private readonly clock: FakeClock,
    private readonly maxArrivals: number,
    private readonly ackWaitMs: number,
  ) {}

  publish(seq: number): void {
    this.state.set(seq, { arrivals: 0, visibleAt: 0, done: null, current: 0 });
  }

  /** Delivers what is due; marks exhausted what can never come again. */
  pump(): void {
    const now = this.clock.now();
    for (const [seq, s] of this.state) {
      if (s.done || s.visibleAt > now) continue;
      if (s.arrivals >= this.maxArrivals) {
        s.done = "exhausted";
        continue;
      }
      const consumer = this.consumer;
      if (!consumer) continue;
      s.arrivals++;
      s.visibleAt = now + this.ackWaitMs;
      const arrival = ++s.current;
      if (now < this.lostUntil) continue;
      // A dead process settles nothing; nak and working act on the current arrival only.
      const alive = (): boolean => !consumer.clock.dead && !s.done;
      consumer.offer({
        id: `m${seq}`,
        kind: "VersionCheckCompleted",
        origin: "peer",
        publishedAt: "2026-12-03T00:00:00.000Z",
        payloadJson: "{}",
        seq,
        attempt: s.arrivals,
        ack: () => void (alive() && (s.done = "acked")),
        term: () => void (alive() && (s.done = "termed")),
        nak: (d: number) => void (alive() && s.current === arrival && (s.visibleAt = this.clock.now() + d)),
        working: () => void (alive() && s.current === arrival && (s.visibleAt = this.clock.now() + this.ackWaitMs)),
      });
    }
  }
}

/** The relay asks its bus for unlimited arrivals (relay/bus/create.ts); `maxArrivals` models other designs. */
async function runScenario(sc: Scenario, maxArrivals = Infinity): Promise<{ violations: string[]; transitions: number }> {
  const clock = new FakeClock();
  const broker = new Broker(clock, maxArrivals, sc.ackWaitMs);
  // Like relay.db: one dead letter per message, however often it is written (see store.ts).
  const dead = new Set<number>();
  let storeFailures = 0;
  const store: ArrivalSource = {
    name: "bus",
    redelivers: true,
    recordDeadLetter: (msg) => {
      if (storeFailures > 0) {
        storeFailures--;
        return Promise.reject(new Error("SQLITE_BUSY"));
      }
      dead.add(msg.seq);
      return Promise.resolve();
    },
  };
  const violations: string[] = [];
  let transitions = 0;
  let m!: DeliveryMachine;
  let pclock!: ProcessClock;
  const controller = (frame: string): void => {
    const f = JSON.parse(frame) as { deliveryId: string; id: string; attempt: number };
    if (f.attempt > sc.maxDeliver) violations.push(`${f.id}: attempt ${f.attempt} shown`);
    const b = sc.behaviours[transitions++ % sc.behaviours.length]!;
    const me = m;
    const later = (ms: number, fn: () => void): void => void pclock.setTimer(() => (transitions++, fn()), ms);
    switch (b) {
      case "ack": return later(5, () => void me.ack(f.deliveryId));
      case "nack": return later(5, () => void me.nack(f.deliveryId));
      case "nackDelay": return later(5, () => void me.nack(f.deliveryId, 37));
      case "reject": return later(5, () => void me.reject(f.deliveryId, "poison"));
      case "silence": return;
      case "working": return later(sc.ackWaitMs / 2, () => {
        me.working(f.deliveryId);
        later(sc.ackWaitMs / 2, () => void me.ack(f.deliveryId));
      });
      case "slow": return later(sc.ackWaitMs * 2, () => void me.ack(f.deliveryId));
    }
  };
  const start = (): void => {
    pclock = new ProcessClock(clock);
    const fresh = new DeliveryMachine({ maxDeliver: sc.maxDeliver, ackWaitMs: sc.ackWaitMs, nackDelayMs: 50, metrics, logger: silent, clock: pclock });
    fresh.attach(controller);
    m = fresh;
    broker.consumer = { offer: (msg) => fresh.offer(msg, store), clock: pclock };
  };
  start();
  for (let i = 1; i <= sc.messages; i++) broker.publish(i);
  const pumpEvery = 10;
  const faults = [...sc.faults].sort((a, b) => a.at - b.at);
  const horizon = sc.ackWaitMs * (sc.maxDeliver + 4) * 4 + 9000;
  for (let now = 0; now <= horizon; now += pumpEvery) {
    while (faults.length > 0 && faults[0]!.at <= now) {
      const fault = faults.shift()!;
      transitions++;
      if (fault.kind === "detach") {
        m.detach();
        const me = m;
        pclock.setTimer(() => me.attach(controller), sc.ackWaitMs / 3);
      } else if (fault.kind === "restart") {
        m.releaseAll(100);
        pclock.dead = true;
        start();
      } else if (fault.kind === "crash") {
        pclock.dead = true; // nothing it held is settled, its timers never fire
        start();
      } else if (fault.kind === "storeFails") storeFailures += 3;
      else if (fault.kind === "partition") broker.lostUntil = now + sc.ackWaitMs * 3;
    }
    broker.pump();
    await clock.advanceTo(now + pumpEvery);
  }
  for (const [seq, s] of broker.state) {
    const recorded = dead.has(seq);
    if (s.done === "acked" && recorded) violations.push(`m${seq}: acked and a dead letter`);
    if (s.done === "exhausted" && !recorded) violations.push(`m${seq}: lost (the broker gave up, no dead letter)`);
    if (s.done === "termed" && !recorded) violations.push(`m${seq}: termed without a dead letter`);
    if (s.done === null) violations.push(`m${seq}: still unsettled at the end`);
  }
  return { violations, transitions };
}

const behaviour = fc.constantFrom<Behaviour>("ack", "nack", "nackDelay", "working", "reject", "silence", "slow");
const fault = fc.record({ at: fc.integer({ min: 0, max: 8000 }), kind: fc.constantFrom<Fault>("detach", "restart", "crash", "storeFails", "partition") });
const scenario = fc.record({
  maxDeliver: fc.integer({ min: 1, max: 4 }),
  ackWaitMs: fc.constantFrom(100, 250, 500),
  messages: fc.integer({ min: 1, max: 6 }),
  behaviours: fc.array(behaviour, { minLength: 1, maxLength: 8 }),
  faults: fc.array(fault, { maxLength: 4 }),
});

t.test("randomized: every message ends acked or as one dead letter; never more than --max-deliver attempts shown", async (t) => {
  let scenarios = 0;
  let transitions = 0;
  const started = performance.now();
  await fc.assert(
    fc.asyncProperty(scenario, async (sc) => {
      scenarios++;
      const r = await runScenario(sc);
      transitions += r.transitions;
      if (r.violations.length > 0) throw new Error(`${r.violations.join("; ")} in ${JSON.stringify(sc)}`);
    }),
    { seed: Number(process.env.DELIVERY_SEED ?? 20261203), numRuns: Number(process.env.DELIVERY_RUNS ?? 150) },
  );
  t.pass(`${scenarios} scenarios, ${transitions} controller and fault transitions, in ${Math.round(performance.now() - started)} ms`);
});

t.test("the model can fail: with the broker capped at --max-deliver + 1 arrivals (the previous design), lost arrivals lose messages", async (t) => {
  const r = await fc.check(
    fc.asyncProperty(scenario, async (sc) => (await runScenario(sc, sc.maxDeliver + 1)).violations.length === 0),
    { seed: Number(process.env.DELIVERY_SEED ?? 20261203), numRuns: 300 },
  );
  t.ok(r.failed, "fast-check finds a scenario that breaks the promise");
  t.comment(`counterexample after ${r.numRuns} runs (shrunk): ${JSON.stringify(r.counterexample)}`);
});
