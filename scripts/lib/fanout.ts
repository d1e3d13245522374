// `npm run bench -- --fanout <K>`: K controllers on one stream, each publishing at --rate and each
// receiving everyone else's notifications, through K relays against K direct nats.js peers
// (scripts/fanout-peer.ts) doing the same, in the same run on the same nats-server.
//
// Every peer pulls every message, its own included (one stream, one filter subject per consumer:
// nats-server 2.9 has no multi-filter consumers), so each of the K consumers sees K × rate msg/s
// and hands on (K − 1) × rate of them. The figures are per delivery (a message handed to a peer
// other than its publisher; K × (K − 1) × rate a second in all):
//   relay own CPU   the K relays' CPU time ÷ deliveries
//   relay path CPU  relays + their controllers ÷ deliveries (the controllers' WebSocket work)
//   direct CPU      the K direct peers ÷ deliveries
// and latency from the publish call to the receiving handler over every delivery of the run.

import path from "node:path";
import { fileURLToPath } from "node:url";
import { nanos } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, type JetStreamManager } from "@nats-io/jetstream";
import type { NatsServer } from "./nats-server.js";
import { forkChild, procStats, startRelay, type Child, type RelayProc } from "./procs.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const PEER = path.resolve(here, "../fanout-peer.js");

const DIRECT_STREAM = "BENCH_FANOUT";
const DIRECT_SUBJECT = "bench.fanout.BenchEvent";
const RELAY_STREAM = "UPTRAKIT_PUSH";
/** The relay's default --max-in-flight, as each direct peer's max_ack_pending and pull size. */
const MAX_IN_FLIGHT = 256;

/** The issue's defaults: the same total offered load (400 msg/s) at every K. */
export function defaultFanoutRate(k: number): number {
  return k === 2 ? 200 : k === 4 ? 100 : k === 8 ? 50 : Math.max(1, Math.round(400 / k));
}

export interface FanoutOptions {
  k: number;
  /** msg/s per controller. */
  rate: number;
  durationS: number;
  warmupS: number;
  size: number;
  rounds: number;
  /** "direct", "relay" and "relay@<name>" (an --alt build, main.js in altMains). */
  paths: string[];
  altMains: Map<string, string>;
  relayArgs: string[];
  relayNodeArgs: string[];
  log(s: string): void;
}

export interface FanoutResult {
  deliveries: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  duplicates: number;
  /** Own messages that reached a controller (relay path: must be 0). */
  echoesDelivered: number;
  /** CPU µs per delivery: the relays (0 for direct), the peers/controllers, the whole path, nats-server. */
  relayCpuUsPerDelivery: number;
  peerCpuUsPerDelivery: number;
  pathCpuUsPerDelivery: number;
  natsCpuUsPerDelivery: number;
  relayRssMb?: number;
  [extra: string]: number | undefined;
}

interface Rig {
  peers: Child[];
  relays: RelayProc[];
  stop(): Promise<void>;
}

let runs = 0;

const cpu = (pids: number[]): number => pids.reduce((s, pid) => s + (procStats(pid)?.cpuSeconds ?? 0), 0);

function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

function median(xs: number[]): number {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const round = (x: number, d = 3): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

async function init(c: Child, msg: object): Promise<void> {
  c.send({ op: "init", ...msg });
  const m = await c.next((m) => m.op === "ready" || (m.op === "error" && m.for === "init"), 30_000);
  if (m.op === "error") throw new Error(`fan-out peer init failed: ${String(m.message)}`);
}

async function resetDirect(jsm: JetStreamManager, k: number): Promise<void> {
  await jsm.streams.delete(DIRECT_STREAM).catch(() => false);
  // The relay's stream and consumer settings (relay/bus/jetstream-provisioning.ts), one durable per peer.
  await jsm.streams.add({
    name: DIRECT_STREAM,
    subjects: ["bench.fanout.>"],
    storage: StorageType.File,
    retention: RetentionPolicy.Limits,
    discard: DiscardPolicy.Old,
    max_age: nanos(86_400_000),
    duplicate_window: nanos(120_000),
    num_replicas: 1,
  });
  for (let i = 0; i < k; i++)
    await jsm.consumers.add(DIRECT_STREAM, {
      durable_name: `fanout-peer-${i}`,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.New,
      filter_subject: "bench.fanout.>",
      ack_wait: nanos(30_000),
      max_deliver: 3,
      max_ack_pending: MAX_IN_FLIGHT,
    });
}

async function startRig(name: string, o: FanoutOptions, nats: NatsServer, jsm: JetStreamManager, tag: string): Promise<Rig> {
  const peers: Child[] = [];
  const relays: RelayProc[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(peers.map((c) => c.stop()));
    await Promise.all(relays.map((r) => r.stop()));
  };
  try {
    for (let i = 0; i < o.k; i++) peers.push(forkChild(PEER));
    if (name === "direct") {
      await resetDirect(jsm, o.k);
      await Promise.all(
        peers.map((p, i) =>
          init(p, { mode: "direct", self: i, natsUrl: nats.url, stream: DIRECT_STREAM, subject: DIRECT_SUBJECT, consumer: `fanout-peer-${i}`, maxMessages: MAX_IN_FLIGHT }),
        ),
      );
    } else {
      await jsm.streams.delete(RELAY_STREAM).catch(() => false);
      const started = await Promise.allSettled(
        peers.map((_, i) =>
          startRelay({ instanceId: `fanout-${tag}-${i}`, natsUrl: nats.url, args: o.relayArgs, nodeArgs: o.relayNodeArgs, main: o.altMains.get(name) }),
        ),
      );
      for (const s of started) if (s.status === "fulfilled") relays.push(s.value);
      const failed = started.find((s) => s.status === "rejected") as PromiseRejectedResult | undefined;
      if (failed) throw failed.reason;
      await Promise.all(peers.map((p, i) => init(p, { mode: "relay", self: i, url: relays[i]!.wsUrl })));
    }
    return { peers, relays, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

interface Received {
  got: number;
  dups: number;
  echoes: number;
  lat: number[];
}

/** Every peer publishes `count` messages at o.rate; resolves when every peer has all the others'. */
async function exchange(rig: Rig, o: FanoutOptions, count: number, collect: boolean, rate = o.rate): Promise<Received[]> {
  const run = `f${(runs++).toString(36)}`;
  const timeoutMs = (count / rate) * 1000 + 120_000;
  for (const p of rig.peers) p.send({ op: "expect", run, peers: o.k, count, collect });
  await Promise.all(rig.peers.map((p) => p.next((m) => m.op === "expecting" && m.run === run, 10_000)));
  const recv = rig.peers.map((p) => p.next<Received>((m) => m.op === "received" && m.run === run, timeoutMs));
  for (const p of rig.peers) p.send({ op: "pace", run, count, size: o.size, rate });
  const sent = rig.peers.map((p) => p.next<{ op: string; message?: string }>((m) => (m.op === "sent" && m.run === run) || m.op === "error", timeoutMs));
  for (const s of await Promise.all(sent)) if (s.op === "error") throw new Error(`fan-out publisher failed: ${String(s.message)}`);
  try {
    return await Promise.all(recv);
  } catch (err) {
    for (const p of rig.peers) p.send({ op: "progress" });
    const got = await Promise.all(rig.peers.map((p) => p.next<{ got: number }>((m) => m.op === "progress", 5_000).then((m) => m.got, () => "?")));
    throw new Error(`${(err as Error).message}; peers received ${got.join(", ")} of ${(o.k - 1) * count} each${rig.relays.length ? `\n${rig.relays.map((r) => r.tail().slice(-1000)).join("\n")}` : ""}`);
  }
}

async function measure(name: string, o: FanoutOptions, nats: NatsServer, jsm: JetStreamManager, r: number): Promise<FanoutResult> {
  const rig = await startRig(name, o, nats, jsm, `${r}${name.replace(/[^A-Za-z0-9]/g, "").slice(0, 16)}`);
  try {
    // Warm-up, not recorded: at 5 × the rate (the JIT needs thousands of messages, not a second's
    // worth of 50 msg/s), then a second at the rate itself, so the measurement starts steady.
    if (o.warmupS > 0) {
      await exchange(rig, o, Math.round(o.rate * 5 * o.warmupS), false, o.rate * 5);
      await new Promise((res) => setTimeout(res, 500));
      await exchange(rig, o, Math.round(o.rate), false);
    }
    const relayPids = rig.relays.map((x) => x.pid);
    const peerPids = rig.peers.map((x) => x.pid);
    const natsPid = nats.process.pid!;
    const before = { relays: cpu(relayPids), peers: cpu(peerPids), nats: cpu([natsPid]) };
    const count = Math.max(1, Math.round(o.rate * o.durationS));
    const got = await exchange(rig, o, count, true);
    const after = { relays: cpu(relayPids), peers: cpu(peerPids), nats: cpu([natsPid]) };
    const deliveries = got.reduce((s, g) => s + g.got, 0);
    const lat = Float64Array.from(got.flatMap((g) => g.lat)).sort();
    const per = (seconds: number): number => (seconds * 1e6) / Math.max(1, deliveries);
    const relayS = after.relays - before.relays;
    const peerS = after.peers - before.peers;
    return {
      deliveries,
      p50: percentile(lat, 0.5),
      p90: percentile(lat, 0.9),
      p99: percentile(lat, 0.99),
      max: lat.length ? lat[lat.length - 1]! : NaN,
      duplicates: got.reduce((s, g) => s + g.dups, 0),
      echoesDelivered: name === "direct" ? 0 : got.reduce((s, g) => s + g.echoes, 0),
      relayCpuUsPerDelivery: per(relayS),
      peerCpuUsPerDelivery: per(peerS),
      pathCpuUsPerDelivery: per(relayS + peerS),
      natsCpuUsPerDelivery: per(after.nats - before.nats),
      ...(rig.relays.length ? { relayRssMb: Math.max(...rig.relays.map((x) => procStats(x.pid)?.hwmMb ?? NaN)) } : {}),
    };
  } finally {
    await rig.stop();
  }
}

function table(med: Record<string, FanoutResult>, paths: string[]): string {
  const head = ["path", "deliveries", "p50 ms", "p99 ms", "max ms", "relay µs/dlv", "path µs/dlv", "nats µs/dlv"];
  const rows = [head];
  const f = (x: number | undefined, d = 3): string => (x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(d));
  for (const p of paths) {
    const r = med[p];
    if (r) rows.push([p, f(r.deliveries, 0), f(r.p50), f(r.p99), f(r.max), p === "direct" ? "-" : f(r.relayCpuUsPerDelivery, 1), f(r.pathCpuUsPerDelivery, 1), f(r.natsCpuUsPerDelivery, 1)]);
  }
  const w = head.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  "));
  lines.splice(1, 0, w.map((n) => "-".repeat(n)).join("  "));
  return lines.join("\n");
}

/** relay ÷ direct: own CPU (relays alone), whole path (relays + controllers), p50, p99. */
function ratios(relay: FanoutResult, direct: FanoutResult): Record<string, number> {
  return {
    relayCpu: round(relay.relayCpuUsPerDelivery / direct.pathCpuUsPerDelivery, 4),
    pathCpu: round(relay.pathCpuUsPerDelivery / direct.pathCpuUsPerDelivery, 4),
    p50: round(relay.p50 / direct.p50, 4),
    p99: round(relay.p99 / direct.p99, 4),
  };
}

export async function benchFanout(nats: NatsServer, jsm: JetStreamManager, o: FanoutOptions): Promise<Record<string, unknown>> {
  const rounds: Array<Record<string, FanoutResult>> = [];
  for (let r = 1; r <= o.rounds; r++) {
    const res: Record<string, FanoutResult> = {};
    for (const p of o.paths) {
      o.log(`fan-out K=${o.k} at ${o.rate} msg/s each, round ${r}/${o.rounds}: ${p} ...`);
      const x = (res[p] = await measure(p, o, nats, jsm, r));
      o.log(
        `  ${p}: ${x.deliveries} deliveries  p50 ${x.p50.toFixed(3)}  p99 ${x.p99.toFixed(3)} ms  ` +
          `${p === "direct" ? "" : `relays ${x.relayCpuUsPerDelivery.toFixed(1)} µs/dlv  `}path ${x.pathCpuUsPerDelivery.toFixed(1)} µs/dlv`,
      );
    }
    rounds.push(res);
  }
  const med: Record<string, FanoutResult> = {};
  const worst: Record<string, FanoutResult> = {};
  for (const p of o.paths) {
    const rs = rounds.map((x) => x[p]!);
    const m: Record<string, number> = {};
    const w: Record<string, number> = {};
    for (const k of Object.keys(rs[0]!)) {
      const xs = rs.map((x) => x[k] as number);
      m[k] = round(median(xs), 3);
      // Worst round: the highest latency and CPU, the fewest deliveries.
      w[k] = round(k === "deliveries" ? Math.min(...xs) : Math.max(...xs), 3);
    }
    med[p] = m as FanoutResult;
    worst[p] = w as FanoutResult;
  }
  const rel = o.paths.filter((p) => p !== "direct");
  const ratio: Record<string, Record<string, number>> = {};
  if (med.direct) for (const p of rel) ratio[p] = ratios(med[p]!, med.direct);
  const roundRatios = rounds.map((x) => Object.fromEntries(rel.filter(() => x.direct).map((p) => [p, ratios(x[p]!, x.direct!)])));

  const out: string[] = ["", table(med, o.paths)];
  for (const [p, x] of Object.entries(ratio))
    out.push(`${p} ÷ direct: relays' own CPU ${x.relayCpu!.toFixed(3)}  whole path CPU ${x.pathCpu!.toFixed(3)}  p50 ${x.p50!.toFixed(3)}  p99 ${x.p99!.toFixed(3)}`);
  out.push(
    `(fan-out: K=${o.k} peers on one stream, ${o.rate} msg/s each for ${o.durationS} s, ${o.size} B; ` +
      `each peer receives the other ${o.k - 1}; medians of ${o.rounds} round${o.rounds === 1 ? "" : "s"}; µs/dlv = CPU per delivery)`,
  );
  process.stdout.write(`${out.join("\n")}\n`);
  return { fanout: { k: o.k, rate: o.rate, durationS: o.durationS, ...med, ratios: ratio, worst, roundRatios, rounds } };
}
