// The chaos checker's runner: plays one scenario (chaos-scenario.ts) against real processes —
// nats-server (one node, or a 3-node cluster with --no_advertise so that relays keep to their
// proxies), or a shared SQLite bus file; relays that can be SIGTERMed, SIGKILLed and restarted
// with the same identity (fault-procs.ts); a userspace proxy per relay-to-NATS link for silent
// partitions (tcp-proxy.ts); a child process holding a relay store's write lock — and records
// the history that chaos-check.ts judges.
//
// Phases: every relay up (consumers exist) and every controller connected; then the publish
// window, with the faults one after another at their moments (each healed before the next: a
// relay restarted while NATS is away would only fail its start); then everything healed, every
// relay running, every controller acking all it gets, until each published message is acked or
// dead-lettered at every other relay (event-driven, bounded); then the relays are stopped
// (SIGTERM, exit 0 expected) and each one's `dlq list --json` is read.

import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import type { AckRecord, DeadLetterRecord, DeliveryRecord, ExitCause, ExitRecord, History, PublishRecord } from "./chaos-check.js";
import { ChaosController, type DeliverFrame } from "./chaos-controller.js";
import type { Fault, FaultKind, Scenario } from "./chaos-scenario.js";
import { RestartableRelay } from "./fault-procs.js";
import { killOnExit, startNatsCluster, startNatsServer, type NatsCluster, type NatsServer } from "./nats-server.js";
import { RELAY_MAIN, removeTempDir, tempDir } from "./procs.js";
import { startTcpProxy, type TcpProxy } from "./tcp-proxy.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const STORE_HOLDER = path.join(here, "chaos-store-holder.js");
const STREAM = "UPTRAKIT_PUSH";

export const MAX_DELIVER = 3;
/** Short clocks, so that a scenario takes seconds. */
export const RELAY_ARGS = ["--ack-wait", "1500", "--nack-delay", "100", "--max-deliver", String(MAX_DELIVER), "--drain-timeout", "300"];
const SETTLE_TIMEOUT_MS = 60_000;
/** After everything looks accounted for: an ack the relay refuses (unknown_delivery) is answered within this. */
const QUIET_MS = 400;
const RESTART_TRIES = 20;

export interface FaultEvent {
  kind: FaultKind;
  target: string;
  atMs: number;
  durationMs: number;
  note?: string;
}

export interface RunResult {
  history: History;
  faults: FaultEvent[];
  /** Relay starts that failed (e.g. while a cluster elected a leader) and were tried again. */
  startRetries: number;
  /** Whether every expected outcome was seen before the settle timeout. */
  settled: boolean;
  settleMs: number;
  wallMs: number;
}

interface Env {
  natsUrlsFor(relay: number): string[] | undefined;
  busFile?: string;
  extraArgs: string[];
  proxies: TcpProxy[][];
  single?: NatsServer;
  cluster?: NatsCluster;
  stop(): Promise<void>;
}

async function startEnv(s: Scenario): Promise<Env> {
  if (s.bus === "sqlite") {
    const dir = tempDir("uptrakit-chaos-bus-");
    return { natsUrlsFor: () => undefined, busFile: path.join(dir, "bus.db"), extraArgs: [], proxies: [], stop: async () => removeTempDir(dir) };
  }
  const servers: { port: number }[] = [];
  let single: NatsServer | undefined;
  let cluster: NatsCluster | undefined;
  if (s.bus === "jetstream") {
    single = await startNatsServer({ storePrefix: "uptrakit-chaos-" });
    servers.push(single);
  } else {
    cluster = await startNatsCluster(3, { storePrefix: "uptrakit-chaos-", args: ["--no_advertise"] });
    servers.push(...cluster.nodes);
  }
  const proxies: TcpProxy[][] = [];
  for (let i = 0; i < s.relays; i++) proxies.push(await Promise.all(servers.map((x) => startTcpProxy(x.port))));
  return {
    natsUrlsFor: (i) => proxies[i]!.map((p) => `nats://127.0.0.1:${p.port}`),
    extraArgs: cluster ? ["--replicas", "3"] : [],
    proxies,
    single,
    cluster,
    stop: async () => {
      await Promise.all(proxies.flat().map((p) => p.close()));
      await single?.stop();
      await cluster?.stop();
    },
  };
}

/** The recorder: every controller's and relay's events, and a waiter re-checked on each. */
class Recorder {
  readonly publishes = new Map<string, PublishRecord>();
  readonly deliveries: DeliveryRecord[] = [];
  readonly acks: AckRecord[] = [];
  readonly exits: ExitRecord[] = [];
  /** relay → "origin\0id" of dead letters its log reported (for waiting; the store is the truth). */
  readonly deadLogged = new Map<string, Set<string>>();
  private waiter: (() => void) | undefined;

  constructor(readonly relays: string[]) {
    for (const r of relays) this.deadLogged.set(r, new Set());
  }

  key(origin: string, id: string): string {
    return `${origin}\u0000${id}`;
  }

  notify(): void {
    this.waiter?.();
  }

  sent(origin: string, id: string, kind: string): void {
    this.publishes.set(this.key(origin, id), { origin, id, kind, outcome: "unanswered" });
  }

  /** Every published message acked or dead-lettered at every other relay, and no publish unanswered. */
  accounted(pendingPublishes: number): boolean {
    if (pendingPublishes > 0) return false;
    const acked = new Set(this.acks.filter((a) => a.effective).map((a) => `${a.relay}\u0000${this.key(a.origin, a.id)}`));
    for (const p of this.publishes.values()) {
      if (p.outcome !== "published" && p.outcome !== "queued") continue;
      for (const r of this.relays) {
        if (r === p.origin) continue;
        const k = this.key(p.origin, p.id);
        if (!acked.has(`${r}\u0000${k}`) && !this.deadLogged.get(r)!.has(k)) return false;
      }
    }
    return true;
  }

  /** Resolves true once pred() holds (checked on every event), false after timeoutMs. */
  waitFor(pred: () => boolean, timeoutMs: number): Promise<boolean> {
    return new Promise((resolve) => {
      const done = (ok: boolean): void => {
        clearTimeout(timer);
        this.waiter = undefined;
        resolve(ok);
      };
      const timer = setTimeout(() => done(pred()), timeoutMs);
      this.waiter = () => {
        if (pred()) done(true);
      };
      this.waiter();
    });
  }
}

function dlqList(relay: RestartableRelay, main = RELAY_MAIN): Promise<DeadLetterRecord[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [main, "dlq", "list", "--json", "--data-dir", relay.dataDir], { stdio: ["ignore", "pipe", "pipe"] });
    killOnExit(child);
    let out = "";
    let err = "";
    child.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
    child.stderr.setEncoding("utf8").on("data", (c: string) => (err += c));
    child.once("exit", (code) => {
      if (code !== 0) return reject(new Error(`dlq list for ${relay.instanceId} exited ${code}: ${err}`));
      try {
        const rows = JSON.parse(out) as Array<Omit<DeadLetterRecord, "relay">>;
        resolve(rows.map((r) => ({ relay: relay.instanceId, id: r.id, origin: r.origin, kind: r.kind, attempts: r.attempts, reason: r.reason })));
      } catch (e) {
        reject(new Error(`dlq list for ${relay.instanceId}: not JSON (${(e as Error).message})`));
      }
    });
  });
}

/** Another process takes the relay store's write lock for holdMs (as a concurrent `dlq purge` or a backup would). */
function holdStore(relay: RestartableRelay, holdMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [STORE_HOLDER, path.join(relay.dataDir, "relay.db"), String(holdMs)], { stdio: ["ignore", "ignore", "pipe"] });
    killOnExit(child);
    let err = "";
    child.stderr.setEncoding("utf8").on("data", (c: string) => (err += c));
    child.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`store holder exited ${code}: ${err}`))));
  });
}

export interface RunOptions {
  /** Progress lines (fault injections), or nothing. */
  log?: (line: string) => void;
  /** Another build of the relay to test (an older commit's dist/relay/main.js). */
  relayMain?: string;
  /** Append every relay log line and controller event here (JSON lines), for a post-mortem. */
  traceFile?: string;
}

export async function runScenario(s: Scenario, o: RunOptions = {}): Promise<RunResult> {
  const started = Date.now();
  const log = o.log ?? (() => undefined);
  const ids = Array.from({ length: s.relays }, (_, i) => `chaos-r${i}`);
  const rec = new Recorder(ids);
  const expecting = new Map<string, ExitCause>();
  const faults: FaultEvent[] = [];
  let startRetries = 0;
  const trace = o.traceFile ? fs.openSync(o.traceFile, "a") : undefined;
  const t = (what: string, data: object): void => {
    if (trace !== undefined) fs.writeSync(trace, JSON.stringify({ t: Date.now() - started, what, ...data }) + "\n");
  };
  const env = await startEnv(s);
  const relays: RestartableRelay[] = [];
  const controllers: ChaosController[] = [];
  try {
    const startRelay = (i: number): Promise<RestartableRelay> =>
      RestartableRelay.start({
        instanceId: ids[i]!,
        natsUrls: env.natsUrlsFor(i),
        busFile: env.busFile,
        args: [...RELAY_ARGS, ...env.extraArgs],
        dirPrefix: `uptrakit-chaos-${ids[i]}-`,
        main: o.relayMain,
        onLogLine: (l) => {
          t("relay", { relay: ids[i], line: l });
          if (l.msg === "dead letter recorded") {
            rec.deadLogged.get(ids[i]!)!.add(rec.key(String(l.origin), String(l.id)));
            rec.notify();
          }
        },
        onExit: ({ code, signal }) => {
          t("exit", { relay: ids[i], code, signal });
          rec.exits.push({ relay: ids[i]!, code, signal, injected: expecting.get(ids[i]!) });
          expecting.delete(ids[i]!);
          rec.notify();
        },
      });
    const firstStart = async (i: number): Promise<RestartableRelay> => {
      for (let n = 1; ; n++) {
        try {
          return await startRelay(i);
        } catch (err) {
          if (n >= 3) throw err;
          startRetries++;
          log(`  relay ${ids[i]} did not start (${(err as Error).message.split("\n")[0]}); trying again`);
        }
      }
    };
    relays.push(...(await Promise.all(ids.map((_, i) => firstStart(i)))));
    const ensureRunning = async (r: RestartableRelay): Promise<void> => {
      for (let n = 1; ; n++) {
        try {
          return await r.ensureRunning();
        } catch (err) {
          // A start refused while the bus is not usable yet (a cluster still electing): try again.
          if (n >= RESTART_TRIES) throw err;
          startRetries++;
          await sleep(500);
        }
      }
    };

    ids.forEach((id, i) => {
      controllers.push(
        new ChaosController(id, relays[i]!.wsUrl, s.behaviours[i] ?? [{ do: "ack" }], {
          published: (origin, mid, _kind, queued) => {
            t("published", { origin, id: mid, queued });
            const p = rec.publishes.get(rec.key(origin, mid));
            if (p) p.outcome = queued ? "queued" : "published";
            rec.notify();
          },
          publishFailed: (origin, mid, _kind, code) => {
            const p = rec.publishes.get(rec.key(origin, mid));
            if (p) p.outcome = `error:${code}`;
            rec.notify();
          },
          delivered: (relay, f: DeliverFrame) => {
            t("deliver", { relay, ...f });
            rec.deliveries.push({ relay, ...f });
            rec.notify();
          },
          acked: (relay, f) => {
            t("ack", { relay, deliveryId: f.deliveryId, id: f.id });
            rec.acks.push({ relay, deliveryId: f.deliveryId, id: f.id, origin: f.origin, effective: true });
            rec.notify();
          },
          ackIneffective: (relay, deliveryId) => {
            t("ack-ineffective", { relay, deliveryId });
            // Errors come in the order of the frames: the refused one is the latest ack of that delivery.
            for (let i = rec.acks.length - 1; i >= 0; i--) {
              const a = rec.acks[i]!;
              if (a.relay !== relay || a.deliveryId !== deliveryId || !a.effective) continue;
              a.effective = false;
              break;
            }
            rec.notify();
          },
        }),
      );
    });
    await Promise.all(controllers.map((c) => c.start()));

    // ---- the window: publishes and faults ----
    const t0 = Date.now();
    const publishing = (async () => {
      const steps = [...s.publishes].sort((a, b) => a.atMs - b.atMs);
      let n = 0;
      for (const p of steps) {
        const wait = t0 + p.atMs - Date.now();
        if (wait > 0) await sleep(wait);
        const from = p.from % s.relays;
        const id = `m${n++}`;
        rec.sent(ids[from]!, id, p.kind);
        controllers[from]!.publish(id, p.kind);
      }
    })();
    const nemesis = (async () => {
      for (const f of [...s.faults].sort((a, b) => a.atMs - b.atMs)) {
        const wait = t0 + f.atMs - Date.now();
        if (wait > 0) await sleep(wait);
        const ev = await inject(f);
        if (ev) {
          t("fault", ev);
          faults.push(ev);
          log(`  fault ${ev.kind} → ${ev.target} at ${ev.atMs} ms for ${ev.durationMs} ms${ev.note ? ` (${ev.note})` : ""}`);
        }
      }
    })();

    async function inject(f: Fault): Promise<FaultEvent | undefined> {
      const atMs = Date.now() - t0;
      const ri = f.target % s.relays;
      const relay = relays[ri]!;
      const ev = (target: string, note?: string): FaultEvent => ({ kind: f.kind, target, atMs, durationMs: f.durationMs, note });
      switch (f.kind) {
        case "relay-sigterm":
        case "relay-sigkill": {
          const signal = f.kind === "relay-sigterm" ? "SIGTERM" : "SIGKILL";
          expecting.set(relay.instanceId, signal);
          const ended = await relay.shutdown(signal);
          if (!ended) expecting.delete(relay.instanceId);
          await sleep(f.durationMs);
          await ensureRunning(relay);
          return ev(relay.instanceId);
        }
        case "nats-restart":
        case "leader-kill": {
          let node: NatsServer | undefined = env.single;
          let name = "nats";
          if (env.cluster) {
            const leader = f.kind === "leader-kill" ? await env.cluster.streamLeader(STREAM) : undefined;
            const n = env.cluster.nodes.find((x) => x.name === leader) ?? env.cluster.nodes[f.target % env.cluster.nodes.length]!;
            node = n;
            name = n.name;
          }
          if (!node) return undefined;
          await node.kill("SIGKILL");
          await sleep(f.durationMs);
          await node.restart();
          return ev(name);
        }
        case "store-busy":
          if (relay.pid === undefined) return undefined;
          await holdStore(relay, f.durationMs);
          return ev(relay.instanceId);
        case "partition": {
          const links = env.proxies[ri];
          if (!links) return undefined;
          for (const p of links) p.partition();
          // Twice as long as other faults: up to 8 s, past the relay's detection (three missed 2 s pings).
          await sleep(f.durationMs * 2);
          for (const p of links) p.heal();
          return { ...ev(relay.instanceId), durationMs: f.durationMs * 2 };
        }
      }
    }

    await Promise.all([publishing, nemesis]);
    const windowLeft = t0 + s.windowMs - Date.now();
    if (windowLeft > 0) await sleep(windowLeft);

    // ---- settle: everything healed and running, everything acked ----
    for (const p of env.proxies.flat()) p.heal();
    await Promise.all(relays.map(ensureRunning));
    for (const c of controllers) c.settleAll();
    t("settle", {});
    const settleFrom = Date.now();
    const pending = (): number => controllers.reduce((n, c) => n + c.pendingPublishes, 0);
    let settled = false;
    const settleDeadline = settleFrom + SETTLE_TIMEOUT_MS;
    while (!settled && Date.now() < settleDeadline) {
      if (!(await rec.waitFor(() => rec.accounted(pending()), settleDeadline - Date.now()))) break;
      await sleep(QUIET_MS); // a refused ack (unknown_delivery) comes right after it: look again
      settled = rec.accounted(pending());
    }
    const settleMs = Date.now() - settleFrom;

    // ---- stop, then read what each relay's store holds ----
    await Promise.all(controllers.map((c) => c.close()));
    await Promise.all(
      relays.map(async (r) => {
        expecting.set(r.instanceId, "stop");
        const ended = await r.shutdown("SIGTERM");
        if (!ended) expecting.delete(r.instanceId);
      }),
    );
    const deadLetters = (await Promise.all(relays.map((r) => dlqList(r, o.relayMain)))).flat();
    for (const p of rec.publishes.values()) if (p.outcome === "unanswered") log(`  publish ${p.origin}/${p.id} never answered`);
    return {
      history: {
        maxDeliver: MAX_DELIVER,
        relays: ids,
        publishes: [...rec.publishes.values()],
        deliveries: rec.deliveries,
        acks: rec.acks,
        deadLetters,
        exits: rec.exits,
      },
      faults,
      startRetries,
      settled,
      settleMs,
      wallMs: Date.now() - started,
    };
  } finally {
    if (trace !== undefined) fs.closeSync(trace);
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.shutdown("SIGKILL").catch(() => null)));
    for (const r of relays) r.removeDataDir();
    await env.stop();
  }
}
