// npm run bench: the relay end to end against direct nats.js, on one throwaway nats-server, in one run.
//
// Paths (each message is acked end to end; every process is separate):
//   direct  nats.js publisher (js.publish, pipelined) → JetStream → nats.js durable pull consumer
//           (consume(), explicit ack): what a controller would do without the relay
//   relay   controller A (RelayClient) → relay A → JetStream → relay B → controller B → ack
//   sqlite  the same relay path on the embedded SQLite bus (two relays sharing one bus file)
//
// Per path and round, on fresh processes (relays with their default settings):
//   1. warm-up: --warmup messages as fast as allowed (JIT, connections), not recorded;
//   2. a 1 s pause, 1 s of paced traffic (not recorded), then latency from the publish call to the
//      receiving handler at a fixed offered rate (--rate for --duration; timestamps are
//      performance.timeOrigin + performance.now() in both processes, embedded in the payload);
//   3. a 1 s pause, then sustained throughput: --count messages with --concurrency publishes in
//      flight, from the first publish call to the last message handled (and acked) on the far side;
//   4. the relays' peak RSS (VmHWM) and CPU time (utime + stime) from /proc; also the CPU time of
//      nats-server and the controllers, per message, for the whole path.
// Figures quoted are the medians over --rounds rounds; ratios are relay ÷ direct of those medians.
//
// Other modes:
//   --idle <s>       idle cost: each relay's CPU and RSS over <s> seconds of silence (fresh, then
//                    after traffic), beside a bare node; then first-message latency (every path)
//   --backlog <n>    <n> messages backlogged for a slow controller: the relays' peak RSS
//   --alt n=main.js  also measure another relay build (A/B: e.g. before/after an optimisation); sqlite:n=main.js on the embedded bus
//   --profile <dir>  relays under node --cpu-prof (see scripts/cpuprofile-top.ts)
//   --tracing        the relays export spans over OTLP/HTTP to a sink this process runs (the cost
//                    of tracing; without it the relays get no OTEL_* variable and load no tracing code)
//   --cold           latency over the first --duration seconds (default 10) of fresh relays at
//                    --rate, no warm-up at all (a new pod), with the p99 of each second
//   --fanout <K>     K relays on one stream, everyone publishing (--rate each) and receiving
//                    everyone else's, against K direct nats.js peers (scripts/lib/fanout.ts)
// Diagnostics: BENCH_DUMP_LATENCY=<dir> keeps every latency sample; BENCH_RELAY_LOG_DIR=<dir>
// keeps the relays' output; BENCH_CONTROLLER_NODE_ARGS adds node flags to the controllers.
//
//   npm run bench -- --quick --json bench.json
//   npm run bench -- --rounds 5 --count 100000
//   npm run bench -- --idle 60 --idle-samples 3
//   npm run bench -- --backlog 100000
//   npm run bench -- --fanout 4 --rounds 3

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Command, InvalidArgumentError } from "commander";
import { connect, nanos, type NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { startNatsServer, type NatsServer } from "./lib/nats-server.js";
import { benchFanout, defaultFanoutRate } from "./lib/fanout.js";
import { forkChild, machineInfo, procStats, startBareNode, startRelay, tempDir, type Child, type RelayProc } from "./lib/procs.js";
import { startOtlpSink, type OtlpSink } from "./lib/otlp-sink.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const CONTROLLER = path.join(here, "bench-controller.js");

/** direct, relay, sqlite, or relay@<name> / sqlite@<name> for a relay build given with --alt. */
type PathName = string;
const ALL_PATHS: PathName[] = ["direct", "relay", "sqlite"];

// The direct baseline mirrors the relay's stream and consumer settings (relay/bus/jetstream-provisioning.ts).
const DIRECT_STREAM = "BENCH_DIRECT";
const DIRECT_SUBJECT = "bench.direct.BenchEvent";
const DIRECT_CONSUMER = "bench-direct";
const RELAY_STREAM = "UPTRAKIT_PUSH";
const RELAY_DEFAULT_MAX_IN_FLIGHT = 256;
/** Between warm-up, latency and throughput: lets each phase's garbage and acks settle. */
const PHASE_PAUSE_MS = 1_000;
/** Paced traffic before the latency measurement, at the same rate (at most half of --duration). */
const LATENCY_WARMUP_S = 1;

// ---- options -------------------------------------------------------------------------------------

function int(min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`expected a whole number ≥ ${min}`);
    return n;
  };
}
function num(min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min) throw new InvalidArgumentError(`expected a number ≥ ${min}`);
    return n;
  };
}

const program = new Command("bench")
  .description("benchmark the relay end to end against direct nats.js")
  .option("--count <n>", "messages per throughput measurement", int(1))
  .option("--size <bytes>", "payload size (JSON text)", int(1), 512)
  .option("--concurrency <n>", "publishes in flight (throughput)", int(1), 256)
  .option("--rate <msg/s>", "offered rate for the latency measurement", num(1), 1000)
  .option("--duration <s>", "length of the latency measurement", num(0.1))
  .option("--rounds <n>", "rounds; figures are medians", int(1))
  .option("--warmup <n>", "messages sent before measuring, per path and round", int(0))
  .option("--paths <list>", "comma-separated subset of direct,relay,sqlite", "direct,relay,sqlite")
  .option("--json <file>", "also write the figures as JSON")
  .option("--quick", "small counts, one round, short duration (< 30 s)")
  .option("--relay-args <args>", "extra arguments for every relay (space-separated), e.g. \"--max-in-flight 512\"")
  .option("--profile <dir>", "run the relays under node --cpu-prof, profiles written to <dir>")
  .option("--tracing", "relays export spans over OTLP/HTTP to a local sink (measures the cost of tracing)")
  .option("--relay-node-args <args>", "extra node flags for every relay (space-separated), e.g. \"--heap-prof\"")
  .option("--idle <s>", "instead: relays' idle CPU and RSS over <s> seconds of silence (fresh and after traffic, beside a bare node), then first-message latency", num(0))
  .option("--idle-samples <n>", "idle periods to measure (--idle)", int(1), 1)
  .option("--backlog <n>", "instead: backlog <n> messages for a slow controller and report relay RSS", int(1))
  .option("--alt <name=main.js>", "also measure another relay build on JetStream, as path relay@<name>; sqlite:<name>=main.js on the embedded bus, as sqlite@<name> (repeatable)", (v: string, prev: string[] = []) => [...prev, v])
  .option("--cold", "instead: latency at --rate over the first --duration s (default 10) after the relays start, no warm-up")
  .option("--fanout <K>", "instead: K relays on one stream, all publishing at --rate each (default 200/100/50 msg/s for K = 2/4/8) and receiving each other's, against K direct peers", int(2))
  .option("--slow-rate <msg/s>", "how fast the slow controller settles (--backlog)", num(1), 500)
  .option("--hold <s>", "how long the slow controller keeps the backlog before draining (--backlog)", num(0), 10)
  .parse();

interface Options {
  count?: number;
  size: number;
  concurrency: number;
  rate: number;
  duration?: number;
  rounds?: number;
  warmup?: number;
  paths: string;
  json?: string;
  quick?: boolean;
  relayArgs?: string;
  profile?: string;
  relayNodeArgs?: string;
  idle?: number;
  idleSamples: number;
  backlog?: number;
  slowRate: number;
  hold: number;
  alt?: string[];
  tracing?: boolean;
  fanout?: number;
  cold?: boolean;
}
const o = program.opts<Options>();
const quick = o.quick === true;
const settings = {
  count: o.count ?? (quick ? 3_000 : 50_000),
  size: o.size,
  concurrency: o.concurrency,
  rate: o.rate,
  durationS: o.duration ?? (quick ? 2 : 10),
  rounds: o.rounds ?? (quick ? 1 : 3),
  warmup: o.warmup ?? (quick ? 500 : 5_000),
  paths: o.paths.split(",").map((s) => s.trim()).filter(Boolean) as PathName[],
  relayArgs: o.relayArgs ? o.relayArgs.split(/\s+/).filter(Boolean) : [],
};
for (const p of settings.paths) if (!ALL_PATHS.includes(p)) program.error(`unknown path ${JSON.stringify(p)} in --paths`);
/** relay@<name> → the main.js of that relay build. */
const altMains = new Map<string, string>();
for (const a of o.alt ?? []) {
  const m = /^(?:(sqlite):)?([\w.-]+)=(.+)$/.exec(a);
  if (!m) {
    program.error(`--alt wants [sqlite:]name=path/to/relay/main.js, not ${JSON.stringify(a)}`);
  } else {
    const pathName = `${m[1] ?? "relay"}@${m[2]}`;
    altMains.set(pathName, path.resolve(m[3]!));
    settings.paths.push(pathName);
  }
}
const relayNodeArgs = [
  ...(o.profile ? ["--cpu-prof", "--cpu-prof-dir", path.resolve(o.profile)] : []),
  ...(o.relayNodeArgs ? o.relayNodeArgs.split(/\s+/).filter(Boolean) : []),
];
if (o.profile) fs.mkdirSync(path.resolve(o.profile), { recursive: true });

/** --tracing: the OTLP sink the relays export to. */
let sink: OtlpSink | undefined;
const tracingEnv = (): Record<string, string> | undefined => (sink ? { OTEL_EXPORTER_OTLP_ENDPOINT: sink.url, OTEL_SERVICE_NAME: "uptrakit-relay-bench" } : undefined);

const log = (s: string): void => void process.stderr.write(`${s}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---- statistics ------------------------------------------------------------------------------------

function percentile(sorted: Float64Array | number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}

function median(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const round2 = (x: number, d = 3): number => (Number.isFinite(x) ? Number(x.toFixed(d)) : x);

// ---- one path's processes ------------------------------------------------------------------------

interface Rig {
  name: PathName;
  pub: Child;
  sub: Child;
  relays: RelayProc[];
  stop(): Promise<void>;
}

let runCounter = 0;
const nextRun = (tag: string): string => `${tag}${(runCounter++).toString(36)}`;

async function initChild(c: Child, init: object): Promise<void> {
  c.send({ op: "init", ...init });
  const m = await c.next((m) => m.op === "ready" || (m.op === "error" && m.for === "init"), 30_000);
  if (m.op === "error") throw new Error(`controller init failed: ${String(m.message)}`);
}

async function resetDirect(jsm: JetStreamManager): Promise<void> {
  await jsm.streams.delete(DIRECT_STREAM).catch(() => false);
  await jsm.streams.add({
    name: DIRECT_STREAM,
    subjects: ["bench.direct.>"],
    storage: StorageType.File,
    retention: RetentionPolicy.Limits,
    discard: DiscardPolicy.Old,
    max_age: nanos(86_400_000),
    duplicate_window: nanos(120_000),
    num_replicas: 1,
  });
  await jsm.consumers.add(DIRECT_STREAM, {
    durable_name: DIRECT_CONSUMER,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.New,
    filter_subject: "bench.direct.>",
    ack_wait: nanos(30_000),
    max_deliver: 3,
    max_ack_pending: RELAY_DEFAULT_MAX_IN_FLIGHT,
  });
}

/** freshStream false: keep the relay stream (--idle runs several JetStream rigs at once on it). */
async function startRig(name: PathName, nats: NatsServer, jsm: JetStreamManager, tag: string, freshStream = true): Promise<Rig> {
  const relays: RelayProc[] = [];
  const children: Child[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(children.map((c) => c.stop()));
    await Promise.all(relays.map((r) => r.stop()));
  };
  try {
    // BENCH_CONTROLLER_NODE_ARGS: node flags for the controller children (diagnostics).
    const controllerArgs = (process.env.BENCH_CONTROLLER_NODE_ARGS ?? "").split(/\s+/).filter(Boolean);
    const pub = forkChild(CONTROLLER, controllerArgs);
    const sub = forkChild(CONTROLLER, controllerArgs);
    children.push(pub, sub);
    if (name === "direct") {
      await resetDirect(jsm);
      await initChild(sub, { role: "direct-sub", natsUrl: nats.url, stream: DIRECT_STREAM, consumer: DIRECT_CONSUMER, maxMessages: RELAY_DEFAULT_MAX_IN_FLIGHT });
      await initChild(pub, { role: "direct-pub", natsUrl: nats.url, subject: DIRECT_SUBJECT });
    } else {
      let bus: { natsUrl?: string; busFile?: string };
      if (name === "relay" || name.startsWith("relay@")) {
        // A fresh stream each time: every round starts from the same state.
        if (freshStream) await jsm.streams.delete(RELAY_STREAM).catch(() => false);
        bus = { natsUrl: nats.url };
      } else {
        bus = { busFile: path.join(tempDir("uptrakit-bench-bus-"), "bus.db") };
      }
      const started = await Promise.allSettled(
        ["a", "b"].map((x) =>
          startRelay({ instanceId: `bench-${tag}-${x}`, ...bus, args: settings.relayArgs, nodeArgs: relayNodeArgs, main: altMains.get(name), env: tracingEnv() }),
        ),
      );
      for (const s of started) if (s.status === "fulfilled") relays.push(s.value);
      const failed = started.find((s) => s.status === "rejected") as PromiseRejectedResult | undefined;
      if (failed) throw failed.reason;
      await initChild(sub, { role: "relay", url: relays[1]!.wsUrl });
      await initChild(pub, { role: "relay", url: relays[0]!.wsUrl });
    }
    return { name, pub, sub, relays, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

interface Received {
  count: number;
  dups: number;
  strays: number;
  first: number;
  last: number;
  lat?: number[];
  /** Arrival times (ms since the epoch), with BENCH_DUMP_LATENCY. */
  at?: number[];
}
interface Sent {
  t0: number;
  t1: number;
  failed: number;
}

/** Sends `count` messages (windowed, or paced at `rate`) and waits until the other side has all. */
async function transfer(rig: Rig, count: number, mode: { rate: number } | { concurrency: number }, collect: boolean, timeoutMs: number): Promise<{ sent: Sent; recv: Received }> {
  const run = nextRun("r");
  rig.sub.send({ op: "expect", run, count, collect });
  await rig.sub.next((m) => m.op === "expecting" && m.run === run, 10_000);
  const recvP = rig.sub.next<Received>((m) => m.op === "received" && m.run === run, timeoutMs);
  if ("rate" in mode) rig.pub.send({ op: "pace", run, count, size: settings.size, rate: mode.rate });
  else rig.pub.send({ op: "send", run, count, size: settings.size, concurrency: mode.concurrency });
  const sentP = rig.pub.next<Sent>((m) => (m.op === "sent" && m.run === run) || m.op === "error", timeoutMs);
  const [sent, recv] = await Promise.all([sentP, recvP.catch(async (err: Error) => {
    rig.sub.send({ op: "progress" });
    const p = await rig.sub.next((m) => m.op === "progress", 5_000).catch(() => undefined);
    throw new Error(`${rig.name}: ${err.message}; received ${p ? String(p.got) : "?"} of ${count}${rig.relays.length ? `\n${rig.relays.map((r) => r.tail().slice(-1500)).join("\n")}` : ""}`);
  })]);
  if ((sent as unknown as { op: string }).op === "error") throw new Error(`${rig.name}: publisher failed: ${String((sent as unknown as { message: string }).message)}`);
  return { sent, recv };
}

// ---- the main benchmark -----------------------------------------------------------------------------

interface PathResult {
  throughput: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  rssMb?: number;
  [extra: string]: number | undefined;
}

function cpuOf(pids: number[]): number {
  return pids.reduce((sum, pid) => sum + (procStats(pid)?.cpuSeconds ?? 0), 0);
}

function sysOf(pids: number[]): number {
  return pids.reduce((sum, pid) => sum + (procStats(pid)?.sysSeconds ?? 0), 0);
}

async function measurePath(name: PathName, nats: NatsServer, jsm: JetStreamManager, round: number): Promise<PathResult> {
  const rig = await startRig(name, nats, jsm, `${round}${name.replace(/[^A-Za-z0-9]/g, "").slice(0, 20)}`);
  try {
    const conc = { concurrency: settings.concurrency };
    const tpTimeout = 120_000 + settings.count * 5;
    if (settings.warmup > 0) await transfer(rig, settings.warmup, conc, false, 60_000 + settings.warmup * 5);
    const relayPids = rig.relays.map((r) => r.pid);
    const clientPids = [rig.pub.pid, rig.sub.pid];

    // Latency at a fixed offered rate, after a pause that lets the warm-up's garbage settle.
    const snap = () => ({ relays: cpuOf(relayPids), nats: cpuOf([nats.process.pid!]), clients: cpuOf(clientPids), relaysSys: sysOf(relayPids) });
    // Then a paced warm-up, not recorded: the first second after a burst is not steady state
    // (the burst's garbage is still being collected; seen in both paths, more in the relays).
    await sleep(PHASE_PAUSE_MS);
    const warmN = Math.round(settings.rate * Math.min(LATENCY_WARMUP_S, settings.durationS / 2));
    if (warmN > 0) await transfer(rig, warmN, { rate: settings.rate }, false, LATENCY_WARMUP_S * 1000 + 60_000);
    const l0 = snap();
    const n = Math.max(1, Math.round(settings.rate * settings.durationS));
    const lt = await transfer(rig, n, { rate: settings.rate }, true, settings.durationS * 1000 + 60_000);
    const l1 = snap();

    // Sustained throughput: first publish call → last message handled on the other side.
    await sleep(PHASE_PAUSE_MS);
    const c0 = snap();
    const tp = await transfer(rig, settings.count, conc, false, tpTimeout);
    const c1 = snap();
    const throughput = (settings.count * 1000) / (tp.recv.last - tp.sent.t0);
    const c2 = { relays: c1.relays + l1.relays - l0.relays };
    // BENCH_DUMP_LATENCY=<dir>: keep each latency run, in publish order, for a closer look.
    if (process.env.BENCH_DUMP_LATENCY)
      fs.writeFileSync(path.join(process.env.BENCH_DUMP_LATENCY, `${name}-${round}.json`), JSON.stringify({ lat: lt.recv.lat ?? [], at: lt.recv.at ?? [] }));
    const lat = Float64Array.from(lt.recv.lat ?? []).sort();

    const r: PathResult = {
      throughput,
      p50: percentile(lat, 0.5),
      p90: percentile(lat, 0.9),
      p99: percentile(lat, 0.99),
      max: lat.length ? lat[lat.length - 1]! : NaN,
      mean: lat.reduce((a, b) => a + b, 0) / Math.max(1, lat.length),
      duplicates: tp.recv.dups + lt.recv.dups,
      publishRetries: tp.sent.failed + lt.sent.failed,
      pathCpuUsPerMsg: ((c1.nats - c0.nats + c1.clients - c0.clients + c1.relays - c0.relays) * 1e6) / settings.count,
      natsCpuSecondsThroughput: c1.nats - c0.nats,
      clientCpuSecondsThroughput: c1.clients - c0.clients,
      natsCpuSecondsLatency: l1.nats - l0.nats,
      clientCpuSecondsLatency: l1.clients - l0.clients,
    };
    if (rig.relays.length > 0) {
      const stats = rig.relays.map((x) => procStats(x.pid));
      r.rssMb = Math.max(...stats.map((s) => s?.hwmMb ?? NaN));
      r.rssMbA = stats[0]?.hwmMb;
      r.rssMbB = stats[1]?.hwmMb;
      r.cpuSeconds = c2.relays - c0.relays;
      r.relayCpuSecondsThroughput = c1.relays - c0.relays;
      r.relayCpuSecondsLatency = l1.relays - l0.relays;
      r.relayCpuUsPerMsg = ((c1.relays - c0.relays) * 1e6) / settings.count;
      r.relaySysUsPerMsg = ((c1.relaysSys - c0.relaysSys) * 1e6) / settings.count;
    }
    return r;
  } finally {
    await rig.stop();
  }
}

function summarise(rounds: Array<Partial<Record<PathName, PathResult>>>): Partial<Record<PathName, PathResult>> {
  const out: Partial<Record<PathName, PathResult>> = {};
  for (const p of settings.paths) {
    const rs = rounds.map((r) => r[p]).filter((x): x is PathResult => x !== undefined);
    if (rs.length === 0) continue;
    const keys = Object.keys(rs[0]!);
    const m: Record<string, number> = {};
    for (const k of keys) m[k] = round2(median(rs.map((r) => r[k] as number)), k === "throughput" ? 0 : 3);
    out[p] = m as PathResult;
  }
  return out;
}

function table(res: Partial<Record<PathName, PathResult>>, ratios: Record<string, number> | undefined): string {
  const rows: string[][] = [["path", "msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "relay RSS MB", "relay CPU s", "relay CPU µs/msg"]];
  for (const p of settings.paths) {
    const r = res[p];
    if (!r) continue;
    const f = (x: number | undefined, d = 3): string => (x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(d));
    rows.push([p, f(r.throughput, 0), f(r.p50), f(r.p90), f(r.p99), f(r.max), f(r.rssMb, 1), f(r.cpuSeconds, 2), f(r.relayCpuUsPerMsg, 1)]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  "));
  lines.splice(1, 0, w.map((n) => "-".repeat(n)).join("  "));
  if (ratios) lines.push("", `relay ÷ direct: throughput ${ratios.throughput!.toFixed(3)}  p50 ${ratios.p50!.toFixed(3)}  p99 ${ratios.p99!.toFixed(3)}`);
  return lines.join("\n");
}

async function benchMain(nats: NatsServer, jsm: JetStreamManager): Promise<Record<string, unknown>> {
  const rounds: Array<Partial<Record<PathName, PathResult>>> = [];
  for (let round = 1; round <= settings.rounds; round++) {
    const r: Partial<Record<PathName, PathResult>> = {};
    for (const p of settings.paths) {
      log(`round ${round}/${settings.rounds}: ${p} ...`);
      r[p] = await measurePath(p, nats, jsm, round);
      const x = r[p]!;
      log(
        `  ${p}: ${x.throughput.toFixed(0)} msg/s  p50 ${x.p50.toFixed(3)}  p90 ${x.p90.toFixed(3)}  p99 ${x.p99.toFixed(3)}  max ${x.max.toFixed(3)} ms` +
          (x.rssMb !== undefined ? `  rss ${x.rssMb.toFixed(1)} MB  relay cpu ${x.cpuSeconds!.toFixed(2)} s (${x.relayCpuUsPerMsg!.toFixed(1)} µs/msg)` : ""),
      );
    }
    rounds.push(r);
  }
  const med = summarise(rounds);
  const ratio = (k: "throughput" | "p50" | "p99"): number => round2(med.relay![k] / med.direct![k], 4);
  const ratios = med.relay && med.direct ? { throughput: ratio("throughput"), p50: ratio("p50"), p99: ratio("p99") } : undefined;
  const perRound = rounds.map((r) =>
    r.relay && r.direct ? { throughput: round2(r.relay.throughput / r.direct.throughput, 4), p50: round2(r.relay.p50 / r.direct.p50, 4), p99: round2(r.relay.p99 / r.direct.p99, 4) } : undefined,
  );
  process.stdout.write(`\n${table(med, ratios)}\n`);
  process.stdout.write(`(medians of ${settings.rounds} round${settings.rounds === 1 ? "" : "s"}; ${settings.count} msgs × ${settings.size} B, concurrency ${settings.concurrency}; latency at ${settings.rate} msg/s for ${settings.durationS} s)\n`);
  return {
    ...med,
    ...(ratios ? { ratios } : {}),
    roundRatios: perRound,
    rounds: rounds.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, Object.fromEntries(Object.entries(v!).map(([kk, vv]) => [kk, round2(vv as number, 4)]))]))),
  };
}

// ---- idle: what a silent relay costs, and the first message after silence --------------------------

interface IdleProc {
  /** relay:a (the publishing controller's relay), relay:b (the receiving one's), direct:sub, baseline, ... */
  label: string;
  pid: number;
}
interface IdleReading {
  /** utime + stime over the window, % of one core. */
  cpuPct: number;
  /** VmRSS at the end of the window, MB. */
  rssMb: number;
  /** Highest VmRSS seen during the window (sampled each second), MB. */
  rssMaxMb: number;
}

/** Each process's CPU and RSS over `ms` of silence; the sampling itself is a /proc read a second. */
async function sampleIdle(procs: IdleProc[], ms: number): Promise<Record<string, IdleReading>> {
  const t0 = performance.now();
  const start = new Map(procs.map((p) => [p.label, procStats(p.pid)]));
  const max = new Map<string, number>();
  const tick = (): void => {
    for (const p of procs) {
      const s = procStats(p.pid);
      if (s) max.set(p.label, Math.max(max.get(p.label) ?? 0, s.rssMb));
    }
  };
  tick();
  const timer = setInterval(tick, 1_000);
  await sleep(ms);
  clearInterval(timer);
  tick();
  const seconds = (performance.now() - t0) / 1000;
  const out: Record<string, IdleReading> = {};
  for (const p of procs) {
    const a = start.get(p.label);
    const b = procStats(p.pid);
    if (!a || !b) continue;
    out[p.label] = { cpuPct: round2(((b.cpuSeconds - a.cpuSeconds) / seconds) * 100), rssMb: round2(b.rssMb, 1), rssMaxMb: round2(max.get(p.label) ?? b.rssMb, 1) };
  }
  return out;
}

/** The processes whose idle cost is reported: both relays of each relay path, the direct consumer, nats-server, a bare node. */
function idleProcs(rigs: Rig[], nats: NatsServer, baselinePid: number): IdleProc[] {
  const procs: IdleProc[] = [{ label: "baseline", pid: baselinePid }];
  for (const rig of rigs)
    if (rig.relays.length > 0) rig.relays.forEach((r, i) => procs.push({ label: `${rig.name}:${"ab"[i]}`, pid: r.pid }));
    else procs.push({ label: `${rig.name}:sub`, pid: rig.sub.pid });
  procs.push({ label: "nats-server", pid: nats.process.pid! });
  return procs;
}

function idleTable(fresh: Record<string, IdleReading>, after: Record<string, IdleReading[]>, procs: IdleProc[]): string {
  const f = (x: number | undefined, d: number): string => (x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(d));
  const range = (xs: number[], d: number): string => (xs.length > 1 ? ` (${f(Math.min(...xs), d)}-${f(Math.max(...xs), d)})` : "");
  const rows: string[][] = [["process", "fresh CPU %", "fresh RSS MB", "fresh max", "after-traffic CPU %", "after-traffic RSS MB", "after-traffic max"]];
  for (const { label } of procs) {
    const a = after[label] ?? [];
    const cpu = a.map((r) => r.cpuPct);
    const rss = a.map((r) => r.rssMb);
    rows.push([
      label,
      f(fresh[label]?.cpuPct, 2),
      f(fresh[label]?.rssMb, 1),
      f(fresh[label]?.rssMaxMb, 1),
      f(median(cpu), 2) + range(cpu, 2),
      f(median(rss), 1) + range(rss, 1),
      f(Math.max(...a.map((r) => r.rssMaxMb)), 1),
    ]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  "));
  lines.splice(1, 0, w.map((n) => "-".repeat(n)).join("  "));
  return lines.join("\n");
}

/**
 * Two kinds of silence, controllers connected throughout:
 *   fresh          the relays just started (their controllers connected, no message yet);
 *   after traffic  after warm-up traffic through every path (then after each sample's message).
 * Over each silent period: every relay's CPU and RSS, with a bare `node -e` idling alongside as
 * the floor, measured the same way in the same run. After each after-traffic period: the latency
 * of one message.
 */
async function benchIdle(nats: NatsServer, jsm: JetStreamManager, idleS: number): Promise<Record<string, unknown>> {
  const rigs: Rig[] = [];
  const baseline = startBareNode();
  try {
    let jetstreamRigs = 0;
    for (const p of settings.paths) {
      const onStream = p === "relay" || p.startsWith("relay@");
      rigs.push(await startRig(p, nats, jsm, `i${p.replace(/[^A-Za-z0-9]/g, "").slice(0, 20)}`, !onStream || jetstreamRigs++ === 0));
    }
    const procs = idleProcs(rigs, nats, baseline.pid);
    log(`idle ${idleS} s, fresh (relays just started, controllers connected) ...`);
    const fresh = await sampleIdle(procs, idleS * 1000);
    const warmup = Math.min(settings.warmup, 2_000) || 1;
    for (const rig of rigs) await transfer(rig, warmup, { concurrency: settings.concurrency }, false, 60_000);
    const samples: Record<string, number[]> = Object.fromEntries(rigs.map((r) => [r.name, []]));
    const after: Record<string, IdleReading[]> = {};
    for (let i = 0; i < o.idleSamples; i++) {
      log(`idle ${idleS} s after traffic (sample ${i + 1}/${o.idleSamples}) ...`);
      const reading = await sampleIdle(procs, idleS * 1000);
      for (const [k, v] of Object.entries(reading)) (after[k] ??= []).push(v);
      for (const rig of rigs) {
        const { recv } = await transfer(rig, 1, { rate: 1 }, true, 30_000);
        samples[rig.name]!.push(recv.lat![0]!);
        log(`  ${rig.name}: first message after ${idleS} s idle: ${recv.lat![0]!.toFixed(3)} ms`);
        await sleep(100);
      }
    }
    const out: Record<string, unknown> = { idleSeconds: idleS, samples };
    for (const [k, v] of Object.entries(samples)) out[k] = { median: round2(median(v)), max: round2(Math.max(...v)) };
    const summary = (rs: IdleReading[]): Record<string, number | number[]> => ({
      cpuPct: round2(median(rs.map((r) => r.cpuPct))),
      cpuPctMin: round2(Math.min(...rs.map((r) => r.cpuPct))),
      cpuPctMax: round2(Math.max(...rs.map((r) => r.cpuPct))),
      rssMb: round2(median(rs.map((r) => r.rssMb)), 1),
      rssMaxMb: round2(Math.max(...rs.map((r) => r.rssMaxMb)), 1),
    });
    out.resources = {
      warmupMessages: warmup,
      fresh,
      afterTraffic: Object.fromEntries(Object.entries(after).map(([k, rs]) => [k, { ...summary(rs), samples: rs }])),
    };
    process.stdout.write(
      `\nidle cost over ${idleS} s of silence, controllers connected (CPU: utime+stime, % of one core; RSS: VmRSS at the end, and the max):\n` +
        `  fresh: relays just started; after traffic: ${warmup} messages through each path before the first period` +
        `${o.idleSamples > 1 ? `, median of ${o.idleSamples} periods (range)` : ""}; baseline: a bare \`node -e\` idling\n` +
        `${idleTable(fresh, after, procs)}\n`,
    );
    process.stdout.write(`\nfirst message after ${idleS} s of silence (ms; ${o.idleSamples} sample${o.idleSamples === 1 ? "" : "s"}):\n`);
    for (const [k, v] of Object.entries(samples)) process.stdout.write(`  ${k.padEnd(7)} median ${median(v).toFixed(3)}  max ${Math.max(...v).toFixed(3)}  [${v.map((x) => x.toFixed(2)).join(", ")}]\n`);
    return { idle: out };
  } finally {
    for (const r of rigs) await r.stop();
    await baseline.stop();
  }
}

// ---- backlog: a slow controller, many messages waiting --------------------------------------------------

async function benchBacklog(nats: NatsServer, jsm: JetStreamManager, n: number): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for (const p of settings.paths.filter((x) => x !== "direct")) {
    log(`backlog ${n} on ${p} (slow controller at ${o.slowRate} msg/s) ...`);
    const rig = await startRig(p, nats, jsm, `b${p[0]}`);
    try {
      const peak = { a: 0, b: 0 };
      const sampler = setInterval(() => {
        const [a, b] = rig.relays.map((r) => procStats(r.pid));
        peak.a = Math.max(peak.a, a?.rssMb ?? 0);
        peak.b = Math.max(peak.b, b?.rssMb ?? 0);
      }, 100);
      rig.sub.send({ op: "slow", rate: o.slowRate });
      await rig.sub.next((m) => m.op === "slowed", 10_000);
      const run = nextRun("b");
      rig.sub.send({ op: "expect", run, count: n, collect: false });
      await rig.sub.next((m) => m.op === "expecting", 10_000);
      const recvP = rig.sub.next<Received>((m) => m.op === "received" && m.run === run, 3_600_000);
      rig.pub.send({ op: "send", run, count: n, size: settings.size, concurrency: settings.concurrency });
      const sent = await rig.pub.next<Sent>((m) => m.op === "sent" || m.op === "error", 3_600_000);
      rig.sub.send({ op: "progress" });
      const atSent = await rig.sub.next<{ got: number }>((m) => m.op === "progress", 10_000);
      log(`  published ${n} in ${((sent.t1 - sent.t0) / 1000).toFixed(1)} s; controller has ${atSent.got}; holding ${o.hold} s`);
      await sleep(o.hold * 1000);
      rig.sub.send({ op: "progress" });
      const atHold = await rig.sub.next<{ got: number }>((m) => m.op === "progress", 10_000);
      const before = rig.relays.map((r) => procStats(r.pid));
      rig.sub.send({ op: "slow", rate: 0 });
      const t = Date.now();
      const recv = await recvP;
      clearInterval(sampler);
      const after = rig.relays.map((r) => procStats(r.pid));
      const r = {
        messages: n,
        publishSeconds: round2((sent.t1 - sent.t0) / 1000),
        backlogWhileSlow: n - atHold.got,
        drainSeconds: round2((Date.now() - t) / 1000),
        duplicates: recv.dups,
        peakRssMbA: round2(Math.max(after[0]?.hwmMb ?? 0, peak.a), 1),
        peakRssMbB: round2(Math.max(after[1]?.hwmMb ?? 0, peak.b), 1),
        rssMbBWhileBacklogged: round2(before[1]?.rssMb ?? NaN, 1),
        rssMb: round2(Math.max(after[0]?.hwmMb ?? 0, after[1]?.hwmMb ?? 0, peak.a, peak.b), 1),
      };
      out[p] = r;
      process.stdout.write(
        `${p}: ${n} msgs published in ${r.publishSeconds} s; backlog while slow ${r.backlogWhileSlow}; drained in ${r.drainSeconds} s; ` +
          `peak RSS relay A ${r.peakRssMbA} MB, relay B ${r.peakRssMbB} MB (B while backlogged ${r.rssMbBWhileBacklogged} MB); duplicates ${r.duplicates}\n`,
      );
    } finally {
      await rig.stop();
    }
  }
  return { backlog: out };
}

// ---- cold: the first seconds of fresh relays ----------------------------------------------------------

/** Latency from the first message on, with nothing sent before: what a new pod's controller sees. */
async function benchCold(nats: NatsServer, jsm: JetStreamManager): Promise<Record<string, unknown>> {
  const seconds = o.duration ?? 10;
  const n = Math.max(1, Math.round(settings.rate * seconds));
  const out: Record<string, unknown> = {};
  const rounds: Record<string, Array<{ p50: number; p99: number; max: number; perSecondP99: number[]; startCpuS: number; cpuUsPerMsg: number }>> = {};
  for (let round = 1; round <= settings.rounds; round++)
    for (const p of settings.paths) {
      log(`cold ${seconds} s at ${settings.rate} msg/s, round ${round}/${settings.rounds}: ${p} ...`);
      const rig = await startRig(p, nats, jsm, `c${round}${p.replace(/[^A-Za-z0-9]/g, "").slice(0, 20)}`);
      try {
        // The relays' CPU (JetStream, SQLite) or the direct clients' (direct): start-up, then per message.
        const pids = rig.relays.length ? rig.relays.map((r) => r.pid) : [rig.pub.pid, rig.sub.pid];
        const cpu0 = cpuOf(pids);
        const { recv } = await transfer(rig, n, { rate: settings.rate }, true, seconds * 1000 + 60_000);
        const cpuUsPerMsg = round2(((cpuOf(pids) - cpu0) * 1e6) / n, 1);
        const lat = recv.lat ?? [];
        const all = Float64Array.from(lat).sort();
        // Message s was published about s / rate seconds after the start: one bucket per second.
        const perSecondP99: number[] = [];
        for (let i = 0; i * settings.rate < lat.length; i++)
          perSecondP99.push(round2(percentile(Float64Array.from(lat.slice(i * settings.rate, (i + 1) * settings.rate)).sort(), 0.99)));
        const r = { p50: round2(percentile(all, 0.5)), p99: round2(percentile(all, 0.99)), max: round2(all[all.length - 1] ?? NaN), perSecondP99, startCpuS: round2(cpu0, 2), cpuUsPerMsg };
        (rounds[p] ??= []).push(r);
        log(`  ${p}: p50 ${r.p50}  p99 ${r.p99}  max ${r.max} ms; p99 by second: ${perSecondP99.join(" ")}; CPU at start ${r.startCpuS} s, then ${cpuUsPerMsg} µs/msg`);
      } finally {
        await rig.stop();
      }
    }
  process.stdout.write(`\nfirst ${seconds} s of fresh relays at ${settings.rate} msg/s, no warm-up (ms; medians of ${settings.rounds} round${settings.rounds === 1 ? "" : "s"}, worst in brackets):\n`);
  for (const [p, rs] of Object.entries(rounds)) {
    const m = (k: "p50" | "p99" | "max" | "startCpuS" | "cpuUsPerMsg"): number => median(rs.map((r) => r[k]));
    const w = (k: "p50" | "p99" | "max"): number => Math.max(...rs.map((r) => r[k]));
    const perSecond = rs[0]!.perSecondP99.map((_, i) => round2(median(rs.map((r) => r.perSecondP99[i] ?? NaN))));
    out[p] = { p50: round2(m("p50")), p99: round2(m("p99")), max: round2(m("max")), worstP99: round2(w("p99")), perSecondP99: perSecond, startCpuS: m("startCpuS"), cpuUsPerMsg: m("cpuUsPerMsg") };
    process.stdout.write(
      `  ${p.padEnd(10)} p50 ${m("p50").toFixed(3)}  p99 ${m("p99").toFixed(3)} [${w("p99").toFixed(3)}]  max ${m("max").toFixed(3)}  p99 by second: ${perSecond.join(" ")}` +
        `  CPU ${m("cpuUsPerMsg").toFixed(1)} µs/msg (${p === "direct" ? "clients" : "relays"}; start-up ${m("startCpuS").toFixed(2)} s)\n`,
    );
  }
  return { cold: { seconds, rate: settings.rate, ...out, rounds } };
}

// ---- fan-out (scripts/lib/fanout.ts) ----------------------------------------------------------------

function fanoutOptions(k: number): Parameters<typeof benchFanout>[2] {
  // JetStream only: the embedded bus is one host's, not a fleet's.
  const paths = settings.paths.filter((p) => p === "direct" || p === "relay" || p.startsWith("relay@"));
  return {
    k,
    // --rate is per controller here; its default (1000, for the latency run) does not apply.
    rate: program.getOptionValueSource("rate") === "default" ? defaultFanoutRate(k) : settings.rate,
    durationS: settings.durationS,
    warmupS: quick ? 0.5 : 2,
    size: settings.size,
    rounds: settings.rounds,
    paths,
    altMains,
    relayArgs: settings.relayArgs,
    relayNodeArgs,
    log,
  };
}

// ---- main -------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = Date.now();
  const machine = machineInfo();
  log(`machine: ${machine.nproc} cores (${machine.cpu}), node ${machine.node}, ${machine.natsServer}`);
  if (o.tracing) {
    sink = await startOtlpSink();
    log(`tracing on: relays export spans to ${sink.url}`);
  }
  const nats = await startNatsServer({ storePrefix: "uptrakit-bench-nats-" });
  let nc: NatsConnection | undefined;
  let result: Record<string, unknown>;
  try {
    nc = await connect({ servers: nats.url, name: "bench" });
    const jsm = await jetstreamManager(nc);
    if (o.idle !== undefined) result = await benchIdle(nats, jsm, o.idle);
    else if (o.backlog !== undefined) result = await benchBacklog(nats, jsm, o.backlog);
    else if (o.cold) result = await benchCold(nats, jsm);
    else if (o.fanout !== undefined) result = await benchFanout(nats, jsm, fanoutOptions(o.fanout));
    else result = await benchMain(nats, jsm);
  } finally {
    await nc?.close().catch(() => undefined);
    await nats.stop();
  }
  const tracing = sink ? { tracing: sink.stats() } : {};
  if (sink) {
    await sink.close();
    process.stdout.write(`tracing: ${tracing.tracing!.spans} spans exported in ${tracing.tracing!.requests} OTLP requests (${round2(tracing.tracing!.bytes / 1e6, 1)} MB)\n`);
  }
  const doc = { ...result, ...tracing, machine, settings: { ...settings, quick, tracing: o.tracing === true }, seconds: round2((Date.now() - started) / 1000, 1) };
  if (o.json) fs.writeFileSync(o.json, JSON.stringify(doc, null, 2) + "\n");
  log(`done in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exit(1);
  },
);
