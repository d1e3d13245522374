// One peer of the fan-out benchmark (scripts/lib/fanout.ts), a child process driven over IPC.
// Modes:
//   relay   a controller: RelayClient on its own relay (the relay drops the controller's echoes)
//   direct  what a controller would do without a relay: nats.js publishes with its own origin
//           header, its own durable pull consumer on the shared stream, its own echoes acked and
//           dropped (every peer pulls every message, as a relay does)
//
// Payloads are those of bench-controller.ts: {"r":"<run>-<peer>","s":<seq>,"t":<ms>,"p":"…"}.

import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, type ConsumerMessages, type JetStreamClient } from "@nats-io/jetstream";
import { RelayClient, type Delivery } from "../controller-stub/client.js";

const now = (): number => performance.timeOrigin + performance.now();
const encoder = new TextEncoder();
const KIND = "BenchEvent";
const HDR_ORIGIN = "Uptrakit-Origin";

type Msg = Record<string, unknown> & { op: string };
const reply = (m: object): void => void process.send?.(m);

let mode: "relay" | "direct" | undefined;
let self = -1;
let origin = "";
let client: RelayClient | undefined;
let nc: NatsConnection | undefined;
let js: JetStreamClient | undefined;
let subject = "";
let messages: ConsumerMessages | undefined;
let echoes = 0;
let strays = 0;

/** What one peer expects of a run: `count` messages from every other peer. */
interface Expectation {
  run: string;
  peers: number;
  count: number;
  /** seen[sender * count + s]. */
  seen: Uint8Array;
  lat: Float64Array;
  got: number;
  want: number;
  dups: number;
  collect: boolean;
}
let expecting: Expectation | undefined;

function received(r: unknown, s: unknown, t: unknown, at: number): void {
  const e = expecting;
  if (!e || typeof r !== "string" || typeof s !== "number") return void strays++;
  const dash = r.lastIndexOf("-");
  const sender = Number(r.slice(dash + 1));
  if (r.slice(0, dash) !== e.run || !Number.isInteger(sender) || sender < 0 || sender >= e.peers || s < 0 || s >= e.count) return void strays++;
  if (sender === self) return void echoes++; // must never reach a controller
  const i = sender * e.count + s;
  if (e.seen[i]) return void e.dups++;
  e.seen[i] = 1;
  if (e.collect && typeof t === "number") e.lat[e.got] = at - t;
  e.got++;
  if (e.got === e.want) {
    expecting = undefined;
    reply({ op: "received", run: e.run, got: e.got, dups: e.dups, strays, echoes, lat: e.collect ? Array.from(e.lat) : [] });
  }
}

function onDelivery(d: Delivery): void {
  const at = now();
  const p = d.payload as { r?: unknown; s?: unknown; t?: unknown } | null;
  if (p && typeof p === "object") received(p.r, p.s, p.t, at);
  else strays++;
}

async function consumeDirect(stream: string, consumerName: string, maxMessages: number): Promise<void> {
  const consumer = await js!.consumers.get(stream, consumerName);
  messages = await consumer.consume({ max_messages: maxMessages });
  void (async () => {
    for await (const m of messages!) {
      const at = now();
      // A peer's own message comes back too (one stream, one filter): ack it and drop it unread.
      if (m.headers?.get(HDR_ORIGIN) === origin) echoes++;
      else {
        try {
          const p = JSON.parse(m.string()) as { r?: unknown; s?: unknown; t?: unknown };
          received(p.r, p.s, p.t, at);
        } catch {
          strays++;
        }
      }
      m.ack();
    }
  })();
}

function payload(run: string, s: number, t: number, size: number): string {
  const head = `{"r":"${run}-${self}","s":${s},"t":${t.toFixed(3)},"p":"`;
  return `${head}${"x".repeat(Math.max(0, size - head.length - 2))}"}`;
}

async function publishOne(run: string, s: number, size: number): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    const body = payload(run, s, now(), size);
    const id = `${run}-${self}-${s}`;
    try {
      if (mode === "relay") await client!.publishJson(KIND, body, id);
      else {
        const h = headers();
        h.set(HDR_ORIGIN, origin);
        await js!.publish(subject, encoder.encode(body), { msgID: id, headers: h });
      }
      return;
    } catch (err) {
      if (attempt >= 5) throw err;
      await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
    }
  }
}

/** Open loop at `rate` msg/s, whatever the confirmations do. */
function sendPaced(run: string, count: number, size: number, rate: number): Promise<{ t0: number; t1: number }> {
  return new Promise((resolve, reject) => {
    let sent = 0;
    let done = 0;
    const t0 = now();
    const tick = (): void => {
      const due = Math.min(count, Math.floor(((now() - t0) * rate) / 1000) + 1);
      while (sent < due)
        publishOne(run, sent++, size).then(() => {
          if (++done === count) resolve({ t0, t1: now() });
        }, reject);
      if (sent < count) setTimeout(tick, Math.max(0, Math.min(5, Math.floor((sent / rate) * 1000 - (now() - t0)))));
    };
    if (count === 0) resolve({ t0, t1: t0 });
    else tick();
  });
}

async function handle(m: Msg): Promise<void> {
  switch (m.op) {
    case "init": {
      mode = m.mode as typeof mode;
      self = m.self as number;
      origin = `fanout-peer-${self}`;
      if (mode === "relay") {
        client = new RelayClient({ url: m.url as string, publishTimeoutMs: 120_000 });
        client.on("error", () => undefined);
        client.onMessage(onDelivery);
        await client.connect();
      } else {
        nc = await connect({ servers: m.natsUrl as string, name: origin });
        js = jetstream(nc);
        subject = m.subject as string;
        await consumeDirect(m.stream as string, m.consumer as string, m.maxMessages as number);
      }
      reply({ op: "ready" });
      return;
    }
    case "expect": {
      const peers = m.peers as number;
      const count = m.count as number;
      expecting = {
        run: m.run as string,
        peers,
        count,
        seen: new Uint8Array(peers * count),
        lat: new Float64Array((peers - 1) * count),
        got: 0,
        want: (peers - 1) * count,
        dups: 0,
        collect: m.collect === true,
      };
      reply({ op: "expecting", run: m.run });
      return;
    }
    case "pace": {
      const r = await sendPaced(m.run as string, m.count as number, m.size as number, m.rate as number);
      reply({ op: "sent", run: m.run, ...r });
      return;
    }
    case "progress":
      reply({ op: "progress", got: expecting?.got ?? -1, echoes, strays });
      return;
    case "exit":
      await client?.close().catch(() => undefined);
      await messages?.close().catch(() => undefined);
      await nc?.drain().catch(() => undefined);
      process.exit(0);
  }
}

process.on("message", (m: Msg) => {
  handle(m).catch((err: unknown) => reply({ op: "error", for: m.op, message: err instanceof Error ? err.message : String(err) }));
});
process.on("disconnect", () => process.exit(0));
