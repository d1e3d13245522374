// The behavioural suite every Bus backend must pass (in the spirit of Watermill's pub/sub
// tests): the semantics written at the top of relay/bus/bus.ts, checked from the outside only.
// Backend-neutral: a backend supplies a "shared medium" (an SQLite file, a stream on a
// nats-server...) fresh for each subtest, and makes any number of buses (relay instances) on it.
//
// Usage:
//   import t from "tap";
//   await runBusConformance(t, { name: "sqlite", newShared, create, cleanupShared });
//
// Timing: short ack waits keep the suite fast. Waiting for something to happen is always
// synchronised on the delivery itself (a promise resolved from onMessage, with a timeout that
// fails the test instead of hanging); only "this must NOT happen within X" uses a bounded wait.

import tap from "tap";
import { performance } from "node:perf_hooks";
import { UNLIMITED_DELIVERIES, type Bus, type BusMessage, type BusSettings, type Consumption, type InboundMessage, type StreamInfo } from "../../relay/bus/bus.js";

/** A tap test (the root `t` or a subtest's). */
export type TapTest = Parameters<Parameters<typeof tap.test>[0]>[0];

export type BusCreateSettings = Partial<BusSettings> & { instanceId: string };

export interface BusBackend<Shared> {
  /** Shown in the test names. */
  name: string;
  /** A fresh, empty medium: every bus created on it shares the same stream. */
  newShared(): Promise<Shared>;
  /**
   * A bus (one relay instance) on the medium, NOT started: the suite calls start(). Settings
   * the suite leaves out (notably `stream`) are the backend's choice. The same instanceId on
   * the same medium means the same consumer (a restarted relay).
   */
  create(settings: BusCreateSettings, shared: Shared): Promise<Bus>;
  /** Removes the medium; called after every bus made on it is closed. */
  cleanupShared(shared: Shared): Promise<void>;
}

/** Settings used unless a test says otherwise. */
const DEFAULTS: Omit<BusSettings, "instanceId" | "stream"> = {
  ackWaitMs: 800,
  maxDeliver: 5,
  maxInFlight: 64,
  maxAgeMs: 60 * 60 * 1000,
  inactiveThresholdMs: 60 * 60 * 1000,
};

/** Timer slack when asserting "not before X ms" (Date.now() granularity, timer rounding). */
const SLACK_MS = 5;
const ACK_WAIT_SLACK_MS = 50;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

let counter = 0;
/** A message as a relay would publish it; payloads deliberately not in canonical JSON form. */
function message(origin: string, id: string, payloadJson?: string): BusMessage {
  return {
    id,
    kind: "test.event",
    origin,
    publishedAt: new Date().toISOString(),
    payloadJson: payloadJson ?? `{ "n": ${++counter},  "text": "caf\u00e9 \\u00e9 \u{1F680}", "nested": {"a": [1, 2.50, null]} }`,
  };
}

type Pred = (m: InboundMessage) => boolean;
const is = (id: string, origin?: string, attempt?: number): Pred => (m) =>
  m.id === id && (origin === undefined || m.origin === origin) && (attempt === undefined || m.attempt === attempt);

interface Waiter {
  pred: Pred;
  resolve: (m: InboundMessage) => void;
}

/** Everything one consumption delivered, in order, with awaitable look-ups. */
class Inbox {
  readonly received: InboundMessage[] = [];
  /** performance.now() of each delivery, parallel to received. */
  readonly times: number[] = [];
  private waiters: Waiter[] = [];
  /** Called on each delivery before it is recorded (the "handler": ack, nak, keep...). */
  policy: (m: InboundMessage) => void = () => {};

  constructor(readonly label: string) {}

  push = (m: InboundMessage): void => {
    this.policy(m);
    this.received.push(m);
    this.times.push(performance.now());
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred(m)) return true;
      w.resolve(m);
      return false;
    });
  };

  /** The first delivery (already received or to come) that matches. */
  waitFor(pred: Pred, what: string, timeoutMs = 10_000): Promise<InboundMessage> {
    const found = this.received.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new Error(`${this.label}: timed out after ${timeoutMs} ms waiting for ${what}; got ${this.describe()}`));
      }, timeoutMs);
      const waiter: Waiter = {
        pred,
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
      };
      this.waiters.push(waiter);
    });
  }

  /** Waits until `n` deliveries matching pred have arrived; resolves with all of them. */
  waitForCount(pred: Pred, n: number, what: string, timeoutMs = 10_000): Promise<InboundMessage[]> {
    let have = this.count(pred);
    if (have >= n) return Promise.resolve(this.received.filter(pred));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new Error(`${this.label}: timed out after ${timeoutMs} ms waiting for ${n} × ${what}; got ${this.describe()}`));
      }, timeoutMs);
      const waiter: Waiter = {
        pred: (m) => pred(m) && ++have >= n,
        resolve: () => {
          clearTimeout(timer);
          resolve(this.received.filter(pred));
        },
      };
      this.waiters.push(waiter);
    });
  }

  /** Bounded wait: the deliveries matching pred that arrive within ms (expected: none). */
  async during(ms: number, pred: Pred = () => true): Promise<InboundMessage[]> {
    const from = this.received.length;
    await sleep(ms);
    return this.received.slice(from).filter(pred);
  }

  count(pred: Pred): number {
    return this.received.filter(pred).length;
  }

  describe(): string {
    return `[${this.received.map((m) => `${m.origin}/${m.id}#${m.attempt}`).join(", ")}]`;
  }
}

/** One subtest's world: a fresh medium, the buses made on it, all cleaned up at teardown. */
class World<S> {
  private readonly buses: Bus[] = [];
  private readonly consumptions: Consumption[] = [];
  private constructor(
    private readonly backend: BusBackend<S>,
    readonly shared: S,
  ) {}

  static async make<S>(t: TapTest, backend: BusBackend<S>): Promise<World<S>> {
    const w = new World(backend, await backend.newShared());
    t.teardown(() => w.dispose());
    return w;
  }

  /** A bus on this world's medium, not started. */
  async create(instanceId: string, settings: Partial<BusSettings> = {}): Promise<Bus> {
    const bus = await this.backend.create({ ...DEFAULTS, ...settings, instanceId }, this.shared);
    this.buses.push(bus);
    return bus;
  }

  /** A started bus. */
  async bus(instanceId: string, settings: Partial<BusSettings> = {}): Promise<Bus> {
    const bus = await this.create(instanceId, settings);
    await bus.start();
    return bus;
  }

  consume(bus: Bus, label: string, policy?: (m: InboundMessage) => void): { inbox: Inbox; consumption: Consumption } {
    const inbox = new Inbox(label);
    if (policy) inbox.policy = policy;
    const consumption = bus.consume(inbox.push);
    this.consumptions.push(consumption);
    return { inbox, consumption };
  }

  private async dispose(): Promise<void> {
    await Promise.allSettled(this.consumptions.map((c) => c.stop()));
    await Promise.allSettled(this.buses.map((b) => b.close()));
    await this.backend.cleanupShared(this.shared);
  }
}

const ack = (m: InboundMessage) => m.ack();

/**
 * Polls info() until `ok` holds (acks may reach a remote server a moment after ack() returns);
 * resolves with whether it did and the last info seen.
 */
async function eventuallyInfo(bus: Bus, ok: (i: StreamInfo) => boolean, timeoutMs = 5000): Promise<[boolean, StreamInfo]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await bus.info();
    if (ok(info)) return [true, info];
    if (Date.now() > deadline) return [false, info];
    await sleep(20);
  }
}

export async function runBusConformance<S>(t: TapTest, backend: BusBackend<S>): Promise<void> {
  const test = (name: string, fn: (t: TapTest, w: World<S>) => Promise<void>) =>
    t.test(`${backend.name}: ${name}`, async (t) => fn(t, await World.make(t, backend)));

  await test("publish on one instance, consume on another: both see both, fields intact", async (t, w) => {
    const a = await w.bus("inst-a");
    const b = await w.bus("inst-b");
    const inA = w.consume(a, "a", ack).inbox;
    const inB = w.consume(b, "b", ack).inbox;
    const ma = message("inst-a", "from-a");
    const mb = message("inst-b", "from-b", '{"z":1,   "a" : "\\" \u2028 \u00ff",\n"k":[ ]}');
    t.same(await a.publish(ma), { duplicate: false }, "a's publish is new");
    t.same(await b.publish(mb), { duplicate: false }, "b's publish is new");
    for (const [inbox, who] of [[inA, "a"], [inB, "b"]] as const) {
      for (const sent of [ma, mb]) {
        const got = await inbox.waitFor(is(sent.id, sent.origin), `${sent.id} on ${who}`);
        t.same(
          { id: got.id, kind: got.kind, origin: got.origin, publishedAt: got.publishedAt },
          { id: sent.id, kind: sent.kind, origin: sent.origin, publishedAt: sent.publishedAt },
          `${who} got ${sent.id} with its fields`,
        );
        t.equal(got.payloadJson, sent.payloadJson, `${who}: payload of ${sent.id} is byte-identical`);
        t.equal(got.attempt, 1, `${who}: ${sent.id} is a first delivery`);
        t.type(got.seq, "number");
      }
    }
    const seqOf = (inbox: Inbox, id: string) => inbox.received.find(is(id))!.seq;
    t.equal(seqOf(inA, "from-a"), seqOf(inB, "from-a"), "the same message has the same seq for every consumer");
    t.not(seqOf(inA, "from-a"), seqOf(inA, "from-b"), "different messages have different seqs");
  });

  await test("an instance receives its own messages (no echo filtering in the bus), in order", async (t, w) => {
    const a = await w.bus("inst-a");
    const { inbox } = w.consume(a, "a", ack);
    const ids = ["own-1", "own-2", "own-3"];
    for (const id of ids) await a.publish(message("inst-a", id));
    await inbox.waitForCount(() => true, 3, "own messages");
    t.same(inbox.received.map((m) => [m.origin, m.id, m.attempt]), ids.map((id) => ["inst-a", id, 1]), "all three, in order");
  });

  await test("a duplicate publish (same origin and id) is stored and delivered once", async (t, w) => {
    const a = await w.bus("inst-a");
    const b = await w.bus("inst-b");
    const c = await w.bus("inst-c");
    const { inbox } = w.consume(c, "c", ack);
    const m = message("inst-a", "dup");
    t.same(await a.publish(m), { duplicate: false }, "first publish is new");
    t.same(await a.publish({ ...m }), { duplicate: true }, "retry of the same (origin, id) is a duplicate");
    t.same(await b.publish(message("inst-b", "dup")), { duplicate: false }, "the same id from another origin is another message");
    // Deliveries come in stream order: once the sentinel is in, a second copy would be too.
    await a.publish(message("inst-a", "sentinel"));
    await inbox.waitFor(is("sentinel"), "sentinel");
    t.equal(inbox.count(is("dup", "inst-a")), 1, "inst-a/dup delivered once");
    t.equal(inbox.count(is("dup", "inst-b")), 1, "inst-b/dup delivered once");
    t.equal((await c.info()).messages, 3, "three messages stored");
  });

  await test("nak(delay) redelivers with attempt 2, not before the delay", async (t, w) => {
    const delay = 600;
    const a = await w.bus("inst-a");
    let nakAt = 0;
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.attempt === 1) {
        nakAt = performance.now();
        m.nak(delay);
      } else m.ack();
    });
    const sent = message("inst-a", "nakked");
    await a.publish(sent);
    const first = await inbox.waitFor(is("nakked", undefined, 1), "first delivery");
    const second = await inbox.waitFor(is("nakked", undefined, 2), "redelivery after nak");
    const elapsed = inbox.times[inbox.received.indexOf(second)]! - nakAt;
    t.ok(elapsed >= delay - SLACK_MS, `redelivered ${elapsed.toFixed(0)} ms after nak(${delay})`);
    t.equal(second.seq, first.seq, "same seq");
    t.equal(second.payloadJson, sent.payloadJson, "same payload");
  });

  await test("a message not settled within ackWait is redelivered with attempt 2", async (t, w) => {
    const ackWaitMs = 600;
    const a = await w.bus("inst-a", { ackWaitMs });
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.attempt > 1) m.ack(); // the first delivery is left unsettled
    });
    await a.publish(message("inst-a", "slow"));
    const first = await inbox.waitFor(is("slow", undefined, 1), "first delivery");
    const second = await inbox.waitFor(is("slow", undefined, 2), "redelivery after ackWait");
    const elapsed = inbox.times[inbox.received.indexOf(second)]! - inbox.times[inbox.received.indexOf(first)]!;
    // The bus starts its clock when it sends, we measure from receipt: allow for the transit.
    t.ok(elapsed >= ackWaitMs - ACK_WAIT_SLACK_MS, `redelivered ${elapsed.toFixed(0)} ms after the first delivery (ackWait ${ackWaitMs})`);
    t.equal(second.seq, first.seq, "same seq");
  });

  await test("working() before ackWait prevents the redelivery; ack() ends it", async (t, w) => {
    const ackWaitMs = 600;
    const a = await w.bus("inst-a", { ackWaitMs });
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.id === "control" && m.attempt > 2) m.ack(); // the control is left to expire twice
    });
    await a.publish(message("inst-a", "busy"));
    await a.publish(message("inst-a", "control"));
    const busy = await inbox.waitFor(is("busy", undefined, 1), "first delivery of busy");
    // Keep busy alive with working() every half ackWait while the unsettled control message
    // shows the clock running: it is redelivered twice meanwhile.
    const ticker = setInterval(() => busy.working(), ackWaitMs / 2);
    try {
      await inbox.waitFor(is("control", undefined, 3), "control's third delivery");
    } finally {
      clearInterval(ticker);
    }
    t.equal(inbox.count(is("busy")), 1, "busy was not redelivered while working() was called");
    busy.ack();
    const later = await inbox.during(ackWaitMs + 300, is("busy"));
    t.same(later.map((m) => m.attempt), [], "busy is not redelivered after ack()");
  });

  await test("after maxDeliver deliveries there are no more", async (t, w) => {
    const ackWaitMs = 500;
    const maxDeliver = 3;
    const a = await w.bus("inst-a", { ackWaitMs, maxDeliver });
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.id === "always-nak") m.nak(50);
      // "never-settled" is left to expire each time
    });
    await a.publish(message("inst-a", "always-nak"));
    await a.publish(message("inst-a", "never-settled"));
    await inbox.waitFor(is("never-settled", undefined, maxDeliver), "the last delivery of never-settled");
    await inbox.waitFor(is("always-nak", undefined, maxDeliver), "the last delivery of always-nak");
    const extra = await inbox.during(ackWaitMs * 2);
    t.same(extra.map((m) => `${m.id}#${m.attempt}`), [], "nothing after the last delivery");
    t.same(inbox.received.filter(is("always-nak")).map((m) => m.attempt), [1, 2, 3], "always-nak: attempts 1..3");
    t.same(inbox.received.filter(is("never-settled")).map((m) => m.attempt), [1, 2, 3], "never-settled: attempts 1..3");
  });

  await test("UNLIMITED_DELIVERIES (what the relay asks for): redelivered past any cap until settled", async (t, w) => {
    const ackWaitMs = 400;
    const a = await w.bus("inst-a", { ackWaitMs, maxDeliver: UNLIMITED_DELIVERIES });
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.id === "naked" && m.attempt < 7) m.nak(20);
      else if (m.id === "naked") m.ack();
      if (m.id === "expiring" && m.attempt >= 4) m.term(); // left to expire three times first
    });
    await a.publish(message("inst-a", "naked"));
    await a.publish(message("inst-a", "expiring"));
    await inbox.waitFor(is("naked", undefined, 7), "attempt 7 of naked");
    await inbox.waitFor(is("expiring", undefined, 4), "attempt 4 of expiring");
    const extra = await inbox.during(ackWaitMs * 2);
    t.same(extra.map((m) => `${m.id}#${m.attempt}`), [], "nothing once settled");
    t.same(inbox.received.filter(is("naked")).map((m) => m.attempt), [1, 2, 3, 4, 5, 6, 7], "naked: attempts 1..7");
  });

  await test("term() stops redelivery", async (t, w) => {
    const ackWaitMs = 600;
    const a = await w.bus("inst-a", { ackWaitMs });
    const { inbox } = w.consume(a, "a", (m) => {
      if (m.id === "terminated") m.term();
      else if (m.attempt > 1) m.ack(); // control: unsettled once, so it shows the clock ran
    });
    await a.publish(message("inst-a", "terminated"));
    await a.publish(message("inst-a", "control"));
    await inbox.waitFor(is("control", undefined, 2), "control's redelivery");
    const extra = await inbox.during(ackWaitMs / 2, is("terminated"));
    t.equal(inbox.count(is("terminated")), 1, "terminated was delivered once");
    t.same(extra, [], "and not redelivered");
  });

  await test("maxInFlight bounds the unsettled deliveries", async (t, w) => {
    const window = 3;
    const a = await w.bus("inst-a");
    const b = await w.bus("inst-b", { maxInFlight: window, ackWaitMs: 10_000 });
    const { inbox } = w.consume(b, "b");
    const ids = Array.from({ length: window * 3 }, (_, i) => `w-${i}`);
    for (const id of ids) await a.publish(message("inst-a", id));
    for (let round = 1; round <= 3; round++) {
      const got = await inbox.waitForCount(() => true, window * round, `${window * round} deliveries`);
      const more = await inbox.during(300);
      t.equal(inbox.received.length, window * round, `round ${round}: exactly ${window * round} delivered while ${window} are unsettled (${more.length} more)`);
      for (const m of got.slice(window * (round - 1))) m.ack();
    }
    t.same(inbox.received.map((m) => m.id), ids, "all delivered, in order");
    t.ok(inbox.received.every((m) => m.attempt === 1), "each once");
  });

  await test("five instances starting at once on a fresh medium all succeed", async (t, w) => {
    const buses = await Promise.all([1, 2, 3, 4, 5].map((i) => w.create(`inst-${i}`)));
    const results = await Promise.allSettled(buses.map((b) => b.start()));
    t.same(results.filter((r) => r.status === "rejected").map((r) => String((r as PromiseRejectedResult).reason)), [], "every start() resolved");
    t.ok(buses.every((b) => b.status().state === "connected"), "all connected");
    const inboxes = buses.map((b, i) => w.consume(b, `inst-${i + 1}`, ack).inbox);
    await buses[2]!.publish(message("inst-3", "hello-all"));
    for (const [i, inbox] of inboxes.entries()) {
      const got = await inbox.waitFor(is("hello-all"), "hello-all");
      t.equal(got.attempt, 1, `inst-${i + 1} got it`);
    }
  });

  await test("deliver new for a new consumer; a restarted instance resumes where it left off", async (t, w) => {
    const ackWaitMs = 600;
    const a = await w.bus("inst-a");
    await a.publish(message("inst-a", "before-b"));
    const b1 = await w.bus("inst-b", { ackWaitMs });
    const first = w.consume(b1, "b (first run)", (m) => {
      if (m.id !== "kept") m.ack();
    });
    await a.publish(message("inst-a", "seen"));
    await a.publish(message("inst-a", "kept"));
    await a.publish(message("inst-a", "done"));
    await first.inbox.waitFor(is("done"), "done");
    t.same(first.inbox.received.map((m) => m.id), ["seen", "kept", "done"], "b got what was published after it was created, not before");
    await first.consumption.stop();
    await b1.close();
    t.equal(b1.status().state, "closed", "b closed");

    await a.publish(message("inst-a", "while-away"));
    const b2 = await w.bus("inst-b", { ackWaitMs });
    const second = w.consume(b2, "b (second run)", ack);
    await second.inbox.waitFor(is("while-away"), "what was published while b was away");
    const kept = await second.inbox.waitFor(is("kept"), "what b had not acked");
    t.equal(kept.attempt, 2, "the unacked message comes back as attempt 2");
    await a.publish(message("inst-a", "sentinel"));
    await second.inbox.waitFor(is("sentinel"), "sentinel");
    t.same(second.inbox.received.map((m) => m.id).sort(), ["kept", "sentinel", "while-away"], "nothing acked before the restart comes back");
    t.equal(second.inbox.count(is("while-away", undefined, 1)), 1, "while-away is a first delivery");
  });

  await test("info() counts the stream and the consumer", async (t, w) => {
    const a = await w.bus("inst-a");
    const b = await w.bus("inst-b");
    const empty = await a.info();
    t.equal(empty.bus, a.name, "info names the bus");
    t.equal(empty.messages, 0, "a fresh stream is empty");
    t.ok(empty.consumer, "the consumer exists after start()");
    for (const id of ["i-1", "i-2", "i-3"]) await b.publish(message("inst-b", id));
    await b.publish(message("inst-b", "i-1")); // duplicate, not counted
    const full = await a.info();
    t.equal(full.messages, 3, "three messages");
    t.equal(full.lastSeq - full.firstSeq, 2, "seqs span three");
    t.ok(full.bytes > 0, "bytes counted");
    t.ok(typeof full.stream === "string" && full.stream.length > 0, "stream named");
    t.equal(full.consumer?.pending, 3, "three pending before consuming");
    t.equal(full.consumer?.ackPending, 0, "none ack-pending");

    const { inbox } = w.consume(a, "a", (m) => {
      if (m.id === "i-2" && m.attempt === 1) m.nak(0);
    });
    await inbox.waitForCount(() => true, 4, "three deliveries and a redelivery");
    const check = async (what: string, ok: (c: NonNullable<StreamInfo["consumer"]>) => boolean) => {
      const [held, info] = await eventuallyInfo(a, (i) => i.consumer !== null && ok(i.consumer));
      t.ok(held, `${what} (last seen: ${JSON.stringify(info.consumer)})`);
    };
    await check("all delivered, three unsettled, one redelivered", (c) => c.pending === 0 && c.ackPending === 3 && c.redelivered >= 1);
    inbox.received.find(is("i-1"))!.ack();
    await check("two unsettled after one ack", (c) => c.ackPending === 2);
    for (const m of inbox.received) m.ack();
    await check("none unsettled after acking all", (c) => c.ackPending === 0 && c.pending === 0);
    t.equal((await a.info()).messages, 3, "acking does not remove messages from the stream");
  });

  await test("inspect() reads without starting, creating or changing anything", async (t, w) => {
    const early = await w.create("inst-look");
    await t.rejects(early.inspect(), /does not exist/, "no stream yet: inspect() says so instead of creating it");
    const a = await w.bus("inst-a");
    for (const id of ["x-1", "x-2"]) await a.publish(message("inst-a", id));
    const look = await w.create("inst-look");
    const seen = await look.inspect();
    t.equal(seen.messages, 2, "inspect() sees the stream");
    t.equal(seen.consumer, null, "no consumer for an instance that never started");
    t.equal((await look.inspect()).consumer, null, "and looking did not create one");
    t.equal(look.status().state, "disconnected", "the inspecting bus is still not started");
    const other = await w.create("inst-a");
    const mine = await other.inspect();
    t.match(mine.consumer, { name: "inst-a", pending: 2, ackPending: 0 }, "an existing consumer is read (by an unstarted bus with its id)");
    t.same(await a.info(), mine, "the started bus's info() agrees");
  });

  await test("status follows the lifecycle; a stopped consumption delivers nothing more", async (t, w) => {
    const a = await w.bus("inst-a");
    t.equal(a.status().state, "connected", "connected after start()");
    const states: string[] = [];
    const off = a.onStatus((s) => states.push(s.state));
    const c1 = w.consume(a, "a (first)", ack);
    await a.publish(message("inst-a", "before-stop"));
    await c1.inbox.waitFor(is("before-stop"), "before-stop");
    await c1.consumption.stop();
    await a.publish(message("inst-a", "after-stop"));
    const extra = await c1.inbox.during(300);
    t.same(extra.map((m) => m.id), [], "nothing delivered after stop()");
    const c2 = w.consume(a, "a (second)", ack);
    const got = await c2.inbox.waitFor(is("after-stop"), "after-stop on a new consumption", DEFAULTS.ackWaitMs * 5);
    t.equal(got.id, "after-stop", "a new consume() picks up what was published meanwhile");
    await c2.consumption.stop();
    await a.close();
    t.equal(a.status().state, "closed", "closed after close()");
    t.equal(states[states.length - 1], "closed", "listeners heard of the close");
    off();
  });
}
