// npm run soak: relays on a real JetStream cluster under steady load while faults are injected on
// a schedule; exits non-zero if any acknowledged message failed to reach every other controller.
//
// It starts its own nats-server cluster (free loopback ports, temporary stores, stream replicas
// 3), --relays relay processes each given every node's URL, and one controller (RelayClient) per
// relay publishing --rate messages a second and acking all it receives. Every --fault-every
// seconds one fault, chosen at random: SIGKILL a random node and restart it, SIGKILL the node that
// leads the stream (the worst case: no publish is stored until a new leader is elected) and
// restart it, or SIGKILL a random relay and restart it with the same instance id, data dir and
// port (its controller reconnects by itself). One fault at a time: each is over (restarted and ready) before the next is due.
//
// At the end publishing stops and the run drains: it waits (event-driven, bounded by
// --drain-timeout) until every acknowledged message has reached every other controller, then
// prints the counters (sent, acknowledged, queued, delivered per peer, duplicates, lost) and the
// delivery latency percentiles.
//
//   npm run soak -- --duration 300 --rate 50 --fault-every 20
//   npm run soak -- --duration 15 --fault-every 5 --json soak.json

import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { Command, InvalidArgumentError } from "commander";
import { startControllers, type LoadController } from "./lib/fault-harness.js";
import { RestartableRelay } from "./lib/fault-procs.js";
import { startNatsCluster, type NatsCluster } from "./lib/nats-server.js";
import { procStats } from "./lib/procs.js";

const STREAM = "UPTRAKIT_PUSH";

function num(min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min) throw new InvalidArgumentError(`expected a number ≥ ${min}`);
    return n;
  };
}
function int(min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    return n;
  };
}

const opts = new Command("soak")
  .description("relays on a 3-node JetStream cluster under load, with scheduled faults; exits 1 on any loss")
  .option("--rate <msg/s>", "publishes per second per controller", num(0.1), 20)
  .option("--duration <s>", "how long to publish", num(1), 60)
  .option("--fault-every <s>", "seconds between faults (0: none)", num(0), 10)
  .option("--relays <n>", "relays (each with a controller)", int(2, 20), 5)
  .option("--nodes <n>", "nats-server nodes in the cluster", int(3, 5), 3)
  .option("--down <s>", "how long a killed process stays down before its restart", num(0), 1.5)
  .option("--faults <list>", "fault kinds to choose from: node (a random node), leader (the stream leader's node), relay", "node,leader,relay")
  .option("--drain-timeout <s>", "how long to wait for every acknowledged message to arrive", num(1), 90)
  .option("--seed <n>", "random seed for the fault schedule", int(0, 2 ** 31))
  .option("--json <file>", "also write the result as JSON")
  .parse()
  .opts<{
    rate: number;
    duration: number;
    faultEvery: number;
    relays: number;
    nodes: number;
    down: number;
    faults: string;
    drainTimeout: number;
    seed?: number;
    json?: string;
  }>();

const faultKinds = opts.faults.split(",").map((s) => s.trim()).filter((s): s is "node" | "leader" | "relay" => s === "node" || s === "leader" || s === "relay");
if (faultKinds.length === 0) {
  process.stderr.write("soak: --faults must name node, leader and/or relay\n");
  process.exit(2);
}

const seed = opts.seed ?? Math.floor(Math.random() * 2 ** 31);
let state = seed >>> 0;
const random = (): number => {
  state = (state + 0x6d2b79f5) >>> 0;
  let x = Math.imul(state ^ (state >>> 15), 1 | state);
  x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
  return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
};
const pick = <T>(xs: T[]): T => xs[Math.floor(random() * xs.length)]!;

const t0 = Date.now();
const at = (): string => `${((Date.now() - t0) / 1000).toFixed(1)}s`;
const say = (line: string): void => void process.stdout.write(`${line}\n`);

interface FaultRecord {
  at: string;
  kind: "node" | "relay";
  target: string;
  leader?: boolean;
  downMs: number;
  recoverMs: number;
}

async function main(): Promise<number> {
  say(
    `soak: ${opts.relays} relays on a ${opts.nodes}-node JetStream cluster (replicas 3), ${opts.rate} msg/s per controller for ${opts.duration} s, ` +
      `${opts.faultEvery > 0 ? `a fault (${faultKinds.join("/")}) every ${opts.faultEvery} s` : "no faults"}; seed ${seed}`,
  );
  let cluster: NatsCluster | undefined;
  const relays: RestartableRelay[] = [];
  let controllers: LoadController[] = [];
  try {
    const nats = await startNatsCluster(opts.nodes, { storePrefix: "uptrakit-soak-" });
    cluster = nats;
    say(`[${at()}] cluster up: ${nats.nodes.map((n) => `${n.name}=${n.url}`).join(" ")}`);
    const relayArgs = ["--replicas", "3", "--ack-wait", "5s"];
    // The first relay creates the stream; the others find it.
    relays.push(await RestartableRelay.start({ instanceId: "soak-1", natsUrls: nats.urls, args: relayArgs }));
    relays.push(
      ...(await Promise.all(
        Array.from({ length: opts.relays - 1 }, (_, i) => RestartableRelay.start({ instanceId: `soak-${i + 2}`, natsUrls: nats.urls, args: relayArgs })),
      )),
    );
    say(`[${at()}] ${relays.length} relays running`);
    const started = await startControllers(
      relays.map((r) => ({ instanceId: r.instanceId, wsUrl: r.wsUrl })),
      { rate: opts.rate, giveUpAfterMs: Math.max(60_000, opts.faultEvery * 3_000) },
    );
    controllers = started.controllers;
    const ledger = started.ledger;
    for (const c of controllers) c.startPublishing();
    say(`[${at()}] publishing`);

    // ---- the fault schedule (timed by design) ----
    const faults: FaultRecord[] = [];
    const publishingFrom = Date.now();
    const end = publishingFrom + opts.duration * 1000;
    if (opts.faultEvery > 0) {
      for (let n = 1; ; n++) {
        const due = publishingFrom + n * opts.faultEvery * 1000;
        if (due >= end) break;
        await sleep(Math.max(0, due - Date.now()));
        const kind = pick(faultKinds);
        const began = Date.now();
        if (kind === "node" || kind === "leader") {
          const leaderName = await nats.streamLeader(STREAM);
          const node = (kind === "leader" && nats.nodes.find((x) => x.name === leaderName)) || pick(nats.nodes);
          const leader = leaderName === node.name;
          await node.kill("SIGKILL");
          say(`[${at()}] fault ${n}: SIGKILL nats-server ${node.name}${leader ? " (stream leader)" : ""}`);
          await sleep(opts.down * 1000);
          const downMs = Date.now() - began;
          await node.restart();
          const recoverMs = Date.now() - began - downMs;
          say(`[${at()}]   ${node.name} restarted (down ${downMs} ms, ready ${recoverMs} ms later)`);
          faults.push({ at: at(), kind: "node", target: node.name, leader, downMs, recoverMs });
        } else {
          const relay = pick(relays);
          await relay.kill("SIGKILL");
          say(`[${at()}] fault ${n}: SIGKILL relay ${relay.instanceId}`);
          await sleep(opts.down * 1000);
          const downMs = Date.now() - began;
          await relay.restart();
          const recoverMs = Date.now() - began - downMs;
          say(`[${at()}]   ${relay.instanceId} restarted with the same id, data dir and port (running ${recoverMs} ms later)`);
          faults.push({ at: at(), kind, target: relay.instanceId, downMs, recoverMs });
        }
      }
    }
    await sleep(Math.max(0, end - Date.now()));
    for (const c of controllers) c.stopPublishing();
    say(`[${at()}] publishing stopped; draining`);
    await Promise.all(controllers.map((c) => c.settled()));
    const drain = await ledger.waitDrained(opts.drainTimeout * 1000);
    const c = drain.counts;
    const latency = ledger.latency();
    const rss = Object.fromEntries(relays.map((r) => [r.instanceId, r.pid ? procStats(r.pid) : undefined]));

    say("");
    say(`faults injected: ${faults.length} (${faults.map((f) => `${f.kind} ${f.target}${f.leader ? "*" : ""}`).join(", ") || "none"})`);
    say(`counters: sent=${c.sent} acked=${c.acked} queued=${c.queued} pending=${c.pending} gave_up=${c.gaveUp}`);
    say(`delivered per peer: ${Object.entries(c.deliveredPerPeer).map(([p, n]) => `${p}=${n}`).join(" ")}`);
    say(`deliveries=${c.deliveries} duplicates=${c.duplicates} echoes=${c.echoes} foreign=${c.foreign} lost=${c.lost}`);
    say(`publish errors (retried): ${Object.entries(c.publishErrors).map(([k, v]) => `${k}=${v}`).join(" ") || "none"}`);
    say(`delivery latency ms: n=${latency.count} p50=${latency.p50} p90=${latency.p90} p99=${latency.p99} max=${latency.max}`);
    say(`relay RSS MB (now/peak): ${Object.entries(rss).map(([id, s]) => `${id}=${s ? `${s.rssMb.toFixed(0)}/${s.hwmMb.toFixed(0)}` : "?"}`).join(" ")}`);
    say(`drain: ${drain.drained ? `complete in ${drain.ms} ms` : `INCOMPLETE after ${drain.ms} ms`}`);
    const failed = !drain.drained || c.lost > 0 || c.echoes > 0 || c.foreign > 0;
    if (drain.missing.length > 0) say(`missing (first ${drain.missing.length}): ${JSON.stringify(drain.missing)}`);
    say(failed ? "result: FAIL (acknowledged messages lost)" : "result: OK (no acknowledged message lost)");
    if (opts.json)
      fs.writeFileSync(opts.json, JSON.stringify({ seed, options: opts, faults, counts: c, latency, rss, drain: { drained: drain.drained, ms: drain.ms, missing: drain.missing } }, null, 2) + "\n");
    return failed ? 1 : 0;
  } finally {
    await Promise.all(controllers.map((x) => x.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop().catch(() => null)));
    await cluster?.stop();
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`soak: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(2);
  },
);
