// A benchmark controller, run as a child process of scripts/bench.ts and driven over IPC.
// Roles:
//   relay       a real controller: RelayClient on the relay's WebSocket (publishes and/or receives)
//   direct-pub  the baseline publisher: nats.js js.publish, pipelined
//   direct-sub  the baseline consumer: nats.js durable pull consumer, consume(), explicit ack
//
// Every payload is JSON text of exactly --size bytes (for sizes above ~60):
//   {"r":"<run>","s":<seq>,"t":<ms since the epoch, µs precision>,"p":"<padding>"}
// `t` is taken right before the publish call, with performance.timeOrigin + performance.now(),
// and compared with the same clock in the receiving process (same host, same wall clock).

import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, type ConsumerMessages, type JetStreamClient } from "@nats-io/jetstream";
import { RelayClient, type Delivery } from "../controller-stub/client.js";

const now = (): number => performance.timeOrigin + performance.now();
const encoder = new TextEncoder();

type Msg = Record<string, unknown> & { op: string };

function reply(m: object): void {
  process.send?.(m);
}

// ---- state -------------------------------------------------------------------------------------

let role: "relay" | "direct-pub" | "direct-sub" | undefined;
let client: RelayClient | undefined;
let nc: NatsConnection | undefined;
let js: JetStreamClient | undefined;
let subject = "bench.direct.BenchEvent";
let messages: ConsumerMessages | undefined;

const KIND = "BenchEvent";

interface Expectation {
  run: string;
  count: number;
  seen: Uint8Array;
  got: number;
  dups: number;
  first: number;
  last: number;
  lat: Float64Array | undefined;
  /** Arrival times, kept with BENCH_DUMP_LATENCY (diagnostics). */
  at: Float64Array | undefined;
}
let expecting: Expectation | undefined;
let strays = 0;

/** Backlog mode: the handler settles at most `slowRate` messages a second, one after another. */
let slowRate = 0;
const slowQueue: Array<() => void> = [];
let slowTimer: NodeJS.Timeout | undefined;

// ---- receiving -----------------------------------------------------------------------------------

/** Records one received payload; `r`, `s`, `t` come from the payload. */
function received(r: unknown, s: unknown, t: unknown, at: number): void {
  const e = expecting;
  if (!e || r !== e.run || typeof s !== "number" || s < 0 || s >= e.count) {
    strays++;
    return;
  }
  if (e.seen[s]) {
    e.dups++;
    return;
  }
  e.seen[s] = 1;
  if (e.got === 0) e.first = at;
  e.got++;
  e.last = at;
  if (e.lat && typeof t === "number") e.lat[s] = at - t;
  if (e.at) e.at[s] = at;
  if (e.got === e.count) {
    expecting = undefined;
    reply({ op: "received", run: e.run, count: e.got, dups: e.dups, strays, first: e.first, last: e.last, lat: e.lat ? Array.from(e.lat) : undefined, at: e.at ? Array.from(e.at) : undefined });
  }
}

function onDelivery(d: Delivery): void | Promise<void> {
  const at = now();
  const p = d.payload as { r?: unknown; s?: unknown; t?: unknown } | null;
  if (p && typeof p === "object") received(p.r, p.s, p.t, at);
  else strays++;
  if (slowRate > 0) return new Promise<void>((resolve) => slowQueue.push(resolve));
}

function runSlowQueue(): void {
  if (slowTimer) clearInterval(slowTimer);
  slowTimer = undefined;
  if (slowRate <= 0) {
    for (const r of slowQueue.splice(0)) r();
    return;
  }
  // Settle in ticks of 10 ms: slowRate/100 per tick, carrying the fraction over.
  let credit = 0;
  slowTimer = setInterval(() => {
    credit += slowRate / 100;
    while (credit >= 1 && slowQueue.length > 0) {
      credit--;
      slowQueue.shift()!();
    }
    if (slowQueue.length === 0) credit = Math.min(credit, 1);
  }, 10);
}

async function consumeDirect(stream: string, consumerName: string, maxMessages: number): Promise<void> {
  const consumer = await js!.consumers.get(stream, consumerName);
  messages = await consumer.consume({ max_messages: maxMessages });
  void (async () => {
    for await (const m of messages!) {
      const at = now();
      try {
        const p = JSON.parse(m.string()) as { r?: unknown; s?: unknown; t?: unknown };
        received(p.r, p.s, p.t, at);
      } catch {
        strays++;
      }
      m.ack();
    }
  })();
}

// ---- sending -------------------------------------------------------------------------------------

function payloadMaker(run: string, size: number): (s: number, t: number) => string {
  const padMax = "x".repeat(Math.max(0, size));
  return (s, t) => {
    const head = `{"r":"${run}","s":${s},"t":${t.toFixed(3)},"p":"`;
    const padLen = Math.max(0, size - head.length - 2);
    return `${head}${padMax.slice(0, padLen)}"}`;
  };
}

/** One publish of message s; resolves when the relay/JetStream confirmed it durable. */
function publishOne(run: string, s: number, make: (s: number, t: number) => string): Promise<unknown> {
  const t = now();
  const body = make(s, t);
  const id = `${run}-${s}`;
  if (role === "relay") return client!.publishJson(KIND, body, id);
  return js!.publish(subject, encoder.encode(body), { msgID: id });
}

/** Publishes with a retry for the rare failure (the id makes a retry safe). */
async function publishRetrying(run: string, s: number, make: (s: number, t: number) => string, failed: { n: number }): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await publishOne(run, s, make);
      return;
    } catch (err) {
      failed.n++;
      if (attempt >= 5) throw err;
      await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
    }
  }
}

/** As fast as possible with at most `concurrency` publishes awaiting their confirmation. */
function sendWindowed(run: string, count: number, size: number, concurrency: number): Promise<{ t0: number; t1: number; failed: number }> {
  const make = payloadMaker(run, size);
  const failed = { n: 0 };
  return new Promise((resolve, reject) => {
    let next = 0;
    let done = 0;
    let inflight = 0;
    const t0 = now();
    const pump = (): void => {
      while (inflight < concurrency && next < count) {
        inflight++;
        const s = next++;
        publishRetrying(run, s, make, failed).then(() => {
          inflight--;
          done++;
          if (done === count) resolve({ t0, t1: now(), failed: failed.n });
          else pump();
        }, reject);
      }
    };
    if (count === 0) resolve({ t0, t1: t0, failed: 0 });
    else pump();
  });
}

/** At a fixed offered rate, whatever the confirmations do (an open-loop load). */
function sendPaced(run: string, count: number, size: number, rate: number): Promise<{ t0: number; t1: number; failed: number }> {
  const make = payloadMaker(run, size);
  const failed = { n: 0 };
  return new Promise((resolve, reject) => {
    let sent = 0;
    let done = 0;
    const t0 = now();
    const tick = (): void => {
      const due = Math.min(count, Math.floor(((now() - t0) * rate) / 1000) + 1);
      while (sent < due) {
        const s = sent++;
        publishRetrying(run, s, make, failed).then(() => {
          if (++done === count) resolve({ t0, t1: now(), failed: failed.n });
        }, reject);
      }
      if (sent < count) setTimeout(tick, Math.max(0, Math.min(5, Math.floor(((sent / rate) * 1000 - (now() - t0))))));
    };
    if (count === 0) resolve({ t0, t1: t0, failed: 0 });
    else tick();
  });
}

// ---- IPC -----------------------------------------------------------------------------------------

async function handle(m: Msg): Promise<void> {
  switch (m.op) {
    case "init": {
      role = m.role as typeof role;
      if (role === "relay") {
        client = new RelayClient({ url: m.url as string, publishTimeoutMs: 120_000 });
        client.on("error", () => undefined);
        client.onMessage(onDelivery);
        await client.connect();
      } else {
        nc = await connect({ servers: m.natsUrl as string, name: `bench-${role}` });
        js = jetstream(nc);
        if (typeof m.subject === "string") subject = m.subject;
        if (role === "direct-sub") await consumeDirect(m.stream as string, m.consumer as string, m.maxMessages as number);
      }
      reply({ op: "ready" });
      return;
    }
    case "expect": {
      const count = m.count as number;
      expecting = {
        run: m.run as string,
        count,
        seen: new Uint8Array(count),
        got: 0,
        dups: 0,
        first: 0,
        last: 0,
        lat: m.collect ? new Float64Array(count) : undefined,
        at: m.collect && process.env.BENCH_DUMP_LATENCY ? new Float64Array(count) : undefined,
      };
      reply({ op: "expecting", run: m.run });
      return;
    }
    case "send": {
      const r = await sendWindowed(m.run as string, m.count as number, m.size as number, m.concurrency as number);
      reply({ op: "sent", run: m.run, ...r });
      return;
    }
    case "pace": {
      const r = await sendPaced(m.run as string, m.count as number, m.size as number, m.rate as number);
      reply({ op: "sent", run: m.run, ...r });
      return;
    }
    case "slow": {
      slowRate = m.rate as number;
      runSlowQueue();
      reply({ op: "slowed", rate: slowRate });
      return;
    }
    case "progress": {
      reply({ op: "progress", got: expecting?.got ?? -1, queued: slowQueue.length });
      return;
    }
    case "exit": {
      await client?.close().catch(() => undefined);
      await messages?.close().catch(() => undefined);
      await nc?.drain().catch(() => undefined);
      process.exit(0);
    }
  }
}

process.on("message", (m: Msg) => {
  handle(m).catch((err: unknown) => {
    reply({ op: "error", for: m.op, message: err instanceof Error ? err.message : String(err) });
  });
});
process.on("disconnect", () => process.exit(0));
