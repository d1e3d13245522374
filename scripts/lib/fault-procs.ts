// Processes for fault runs (scripts/soak.ts): a JetStream cluster of real nats-server processes
// that can be killed and restarted on the same ports and stores, and relay processes that can be
// SIGKILLed and restarted with the same instance id, data dir and port. Loopback only.
// Self-contained like procs.ts (scripts do not import from test/).

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { RELAY_MAIN, freePort, natsServerBinary, tempDir } from "./procs.js";

const READY_TIMEOUT_MS = 20_000;
const TAIL_CHARS = 4_000;

const live = new Set<ChildProcess>();
process.on("exit", () => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {
      // gone
    }
  }
});

/** nats-server under setpriv --pdeathsig where available: it dies with us even if we are SIGKILLed. */
function natsCommand(args: string[]): { file: string; args: string[] } {
  const setpriv = spawnSync("sh", ["-c", "command -v setpriv"], { encoding: "utf8" });
  const server = natsServerBinary();
  return setpriv.status === 0 && setpriv.stdout.trim()
    ? { file: setpriv.stdout.trim(), args: ["--pdeathsig", "SIGKILL", server, ...args] }
    : { file: server, args };
}

async function getJson(url: string): Promise<unknown> {
  const res = await fetch(url, { signal: AbortSignal.timeout(2_000) });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

/** Polls a monitoring endpoint (a server's own view; there is nothing to subscribe to). */
async function until(what: string, check: () => Promise<boolean>, timeoutMs = READY_TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  for (;;) {
    try {
      if (await check()) return;
    } catch (err) {
      last = (err as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms ${last}`);
    await sleep(100);
  }
}

function waitExit(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => p.once("exit", () => resolve()));
}

// ---- a cluster node ---------------------------------------------------------------------------------

export class ClusterNode {
  readonly url: string;
  private child: ChildProcess | undefined;
  private tail = "";

  constructor(
    readonly name: string,
    readonly port: number,
    readonly monitorPort: number,
    private readonly args: string[],
  ) {
    this.url = `nats://127.0.0.1:${port}`;
  }

  get running(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  get pid(): number | undefined {
    return this.running ? this.child!.pid : undefined;
  }

  /** Spawns the process; resolves on its "Server is ready" line. */
  async launch(): Promise<void> {
    const cmd = natsCommand(this.args);
    const child = spawn(cmd.file, cmd.args, { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    live.add(child);
    child.once("exit", () => live.delete(child));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: not ready within ${READY_TIMEOUT_MS} ms\n${this.tail}`)), READY_TIMEOUT_MS);
      const onData = (chunk: Buffer): void => {
        this.tail = (this.tail + chunk.toString("utf8")).slice(-TAIL_CHARS);
        if (this.tail.includes("Server is ready")) {
          clearTimeout(timer);
          resolve();
        }
      };
      child.stdout!.on("data", onData);
      child.stderr!.on("data", onData);
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`${this.name} exited (code ${code}, signal ${signal})\n${this.tail}`));
      });
    });
    this.tail = "";
  }

  async kill(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    if (!this.running) return;
    this.child!.kill(signal);
    await waitExit(this.child!);
  }

  /** Starts the node again on the same ports and store; resolves once it is healthy with JetStream. */
  async restart(): Promise<void> {
    await this.kill("SIGTERM");
    await this.launch();
    await until(`${this.name} healthz`, async () => {
      await getJson(`http://127.0.0.1:${this.monitorPort}/healthz?js-enabled-only=true`);
      return true;
    });
  }
}

export interface Cluster {
  nodes: ClusterNode[];
  urls: string[];
  /** Name of the stream's leader, asked of every running node in turn. */
  streamLeader(stream: string): Promise<string | undefined>;
  stop(): Promise<void>;
}

/** An n-node JetStream cluster on free loopback ports with temporary stores. */
export async function startCluster(n = 3): Promise<Cluster> {
  const clusterName = `soak${process.pid}`;
  const specs: Array<{ name: string; port: number; monitorPort: number; routePort: number; store: string }> = [];
  for (let i = 1; i <= n; i++)
    specs.push({ name: `n${i}`, port: await freePort(), monitorPort: await freePort(), routePort: await freePort(), store: tempDir(`uptrakit-soak-n${i}-`) });
  const routes = specs.map((s) => `nats://127.0.0.1:${s.routePort}`).join(",");
  const nodes = specs.map(
    (s) =>
      new ClusterNode(s.name, s.port, s.monitorPort, [
        "-a", "127.0.0.1", "-p", String(s.port), "-m", String(s.monitorPort), "-js", "-sd", s.store,
        "--server_name", s.name, "--cluster_name", clusterName, "--cluster", `nats://127.0.0.1:${s.routePort}`, "--routes", routes,
      ]),
  );
  const cluster: Cluster = {
    nodes,
    urls: nodes.map((x) => x.url),
    streamLeader: async (stream) => {
      for (const node of nodes.filter((x) => x.running)) {
        try {
          const jsz = (await getJson(`http://127.0.0.1:${node.monitorPort}/jsz?streams=true`)) as {
            account_details?: { stream_detail?: { name: string; cluster?: { leader?: string } }[] }[];
          };
          for (const a of jsz.account_details ?? []) {
            const leader = a.stream_detail?.find((s) => s.name === stream)?.cluster?.leader;
            if (leader) return leader;
          }
        } catch {
          // ask the next node
        }
      }
      return undefined;
    },
    stop: async () => {
      await Promise.all(nodes.map((x) => x.kill("SIGTERM")));
      for (const s of specs) fs.rmSync(s.store, { recursive: true, force: true });
    },
  };
  try {
    await Promise.all(nodes.map((x) => x.launch())); // a clustered node is ready only with peers
    for (const node of nodes) {
      await until(`${node.name} routes and meta leader`, async () => {
        const routez = (await getJson(`http://127.0.0.1:${node.monitorPort}/routez`)) as { num_routes?: number };
        const jsz = (await getJson(`http://127.0.0.1:${node.monitorPort}/jsz`)) as { meta_cluster?: { leader?: string } };
        return (routez.num_routes ?? 0) >= n - 1 && Boolean(jsz.meta_cluster?.leader);
      });
    }
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

// ---- a restartable relay ----------------------------------------------------------------------------

export interface RestartableRelayOptions {
  instanceId: string;
  natsUrls: string[];
  args?: string[];
}

function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_")) env[k] = v;
  return env;
}

/** A relay process on a fixed loopback port and data dir, so a restart is the same relay to its controller. */
export class RestartableRelay {
  readonly instanceId: string;
  readonly dataDir: string;
  port = 0;
  private child: ChildProcess | undefined;
  private tail = "";

  private constructor(private readonly o: RestartableRelayOptions) {
    this.instanceId = o.instanceId;
    this.dataDir = tempDir(`uptrakit-soak-${o.instanceId}-`);
  }

  static async start(o: RestartableRelayOptions): Promise<RestartableRelay> {
    const r = new RestartableRelay(o);
    r.port = await freePort();
    await r.launch();
    return r;
  }

  get wsUrl(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.child && this.child.exitCode === null && this.child.signalCode === null ? this.child.pid : undefined;
  }

  logTail(): string {
    return this.tail;
  }

  private async launch(): Promise<void> {
    const args = [
      RELAY_MAIN, "run", "--instance-id", this.instanceId, "--data-dir", this.dataDir, "--listen", `127.0.0.1:${this.port}`,
      "--nats-url", this.o.natsUrls.join(","), ...(this.o.args ?? []),
    ];
    const child = spawn(process.execPath, args, { env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    live.add(child);
    child.once("exit", () => live.delete(child));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`relay ${this.instanceId}: not running within ${READY_TIMEOUT_MS} ms\n${this.tail}`)), READY_TIMEOUT_MS);
      let running = false;
      child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
        this.tail = (this.tail + chunk).slice(-TAIL_CHARS);
        if (!running && this.tail.includes('"msg":"relay running"')) {
          running = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.stderr!.setEncoding("utf8").on("data", (chunk: string) => (this.tail = (this.tail + chunk).slice(-TAIL_CHARS)));
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        if (!running) reject(new Error(`relay ${this.instanceId} exited (code ${code}, signal ${signal})\n${this.tail}`));
      });
    });
  }

  async kill(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    c.kill(signal);
    await waitExit(c);
  }

  /** Same instance id, data dir and port. */
  async restart(): Promise<void> {
    await this.kill("SIGKILL");
    await this.launch();
  }

  /** SIGTERM (drain); resolves with the exit code and removes the data dir. */
  async stop(): Promise<number | null> {
    const c = this.child;
    if (c && c.exitCode === null && c.signalCode === null) {
      c.kill("SIGTERM");
      const force = setTimeout(() => c.kill("SIGKILL"), 20_000);
      await waitExit(c);
      clearTimeout(force);
    }
    fs.rmSync(this.dataDir, { recursive: true, force: true });
    return c?.exitCode ?? null;
  }
}
