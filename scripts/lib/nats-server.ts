// Real nats-server processes for tests and scripts (bench, soak): single servers and small
// clusters on free local ports, each with its own temporary store. Never touches the system server
// on 127.0.0.1:4222. Lives in scripts/lib because scripts do not import from test/ (the tests
// reach it through test/helpers/nats-server.ts).
//
// Readiness is event-driven: the server's "Server is ready" log line, then its monitoring
// /healthz (and, for a cluster, /routez and /jsz) until they say so. /healthz is asked with
// js-server-only: a cluster node restarted after a kill serves clients at once but may report
// its streams and consumers "not current" for longer than 15 s while it catches up, and that
// catching up is what the fault tests measure themselves.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

export interface NatsServerOptions {
  /** Start with -js (default true). */
  jetstream?: boolean;
  /** Extra arguments, e.g. ["--user", "u", "--pass", "p"]. */
  args?: string[];
  /** JetStream store directory; default a fresh temp dir, removed by stop(). */
  storeDir?: string;
  /** Client port; default a free one. */
  port?: number;
  /** Monitoring port; default a free one. */
  monitorPort?: number;
  /** Name prefix of the temp store directory (default "uptrakit-nats-"). */
  storePrefix?: string;
}

export interface NatsClusterOptions {
  /** Name prefix of the nodes' temp store directories (default "uptrakit-nats-"; a node adds "n1-"...). */
  storePrefix?: string;
  /** Extra arguments for every node, e.g. ["--no_advertise"] so clients keep to the URLs they were given. */
  args?: string[];
}

export interface NatsServer {
  url: string;
  port: number;
  monitorPort: number;
  storeDir: string;
  /** The current process (a new one after restart()). */
  readonly process: ChildProcess;
  /** Stops the server for good and removes the temp store it created. */
  stop(): Promise<void>;
  /** Sends a signal (default SIGKILL) and resolves once the process has exited; the store stays. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Stops the server if running, then starts it again on the same port and store. */
  restart(): Promise<void>;
  /** The server's recent log output (for failure messages). */
  logs(): string;
}

export interface ClusterNode extends NatsServer {
  name: string;
  routePort: number;
}

export interface NatsCluster {
  urls: string[];
  nodes: ClusterNode[];
  /** Name of the node leading the stream (via /jsz), if any node knows one. */
  streamLeader(stream: string): Promise<string | undefined>;
  stop(): Promise<void>;
}

const READY_TIMEOUT_MS = 15_000;
const LOG_LINES_KEPT = 200;

// ---- process bookkeeping: nothing outlives the test process ------------------------------------

const live = new Set<ChildProcess>();

/** SIGKILLs `child` when this process exits, unless it has exited by then. */
export function killOnExit(child: ChildProcess): void {
  live.add(child);
  child.once("exit", () => live.delete(child));
}
const tempDirs = new Set<string>();

process.on("exit", () => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
  for (const d of tempDirs) fs.rmSync(d, { recursive: true, force: true });
});

function onPath(name: string): string | undefined {
  const found = spawnSync("sh", ["-c", `command -v ${name}`], { encoding: "utf8" });
  return (found.status === 0 && found.stdout.trim()) || undefined;
}

/** The nats-server binary: the one on PATH, else the usual install location. */
export function natsServerBinary(): string {
  return onPath("nats-server") ?? "/usr/sbin/nats-server";
}

let command: { file: string; prefix: string[] } | undefined;
/**
 * How to run nats-server. The exit hook above does not run when the test process dies of a
 * signal (a tap timeout), so where util-linux's setpriv exists the kernel kills the server when
 * its parent dies (setpriv execs nats-server: same pid, signals go straight to it).
 */
function natsServerCommand(args: string[]): { file: string; args: string[] } {
  if (!command) {
    const server = natsServerBinary();
    const setpriv = onPath("setpriv");
    command = setpriv ? { file: setpriv, prefix: ["--pdeathsig", "SIGKILL", server] } : { file: server, prefix: [] };
  }
  return { file: command.file, args: [...command.prefix, ...args] };
}

/** Ports already handed out by this process: never give one twice. */
const handedOut = new Set<number>();

/**
 * A port free right now: bind port 0 and read what the kernel picked. (Someone may still take it
 * before our server binds it: the start functions retry on "address already in use".)
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await kernelPort();
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
}

function kernelPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

function makeTempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

function removeTempDir(dir: string): void {
  if (!tempDirs.has(dir)) return;
  fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

async function getJson(url: string): Promise<unknown> {
  const res = await fetch(url, { signal: AbortSignal.timeout(2_000) });
  const body = await res.json();
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status} ${JSON.stringify(body)}`);
  return body;
}

/** Polls `check` (a cheap HTTP probe) until it returns true, the process dies, or time runs out. */
async function until(what: string, check: () => Promise<boolean>, alive: () => string | undefined, timeoutMs = READY_TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  for (;;) {
    const dead = alive();
    if (dead) throw new Error(`${what}: ${dead}`);
    try {
      if (await check()) return;
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    if (Date.now() > deadline) throw new Error(`${what}: not ready within ${timeoutMs} ms ${last}`);
    await sleep(50);
  }
}

// ---- one server process ---------------------------------------------------------------------

class ServerProcess implements NatsServer {
  url: string;
  port: number;
  monitorPort: number;
  storeDir: string;
  private child!: ChildProcess;
  private exited!: Promise<void>;
  private exitReason: string | undefined;
  private logLines: string[] = [];
  private readyLine!: Promise<void>;
  private stopped = false;

  constructor(
    port: number,
    monitorPort: number,
    storeDir: string,
    private readonly ownsStore: boolean,
    private readonly argsFor: () => string[],
  ) {
    this.port = port;
    this.monitorPort = monitorPort;
    this.storeDir = storeDir;
    this.url = `nats://127.0.0.1:${port}`;
  }

  get process(): ChildProcess {
    return this.child;
  }

  logs(): string {
    return this.logLines.join("\n");
  }

  /** Spawns the process and resolves once it logged "Server is ready" and its JetStream is up. */
  async launch(): Promise<void> {
    this.exitReason = undefined;
    const cmd = natsServerCommand(this.argsFor());
    const child = spawn(cmd.file, cmd.args, { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    live.add(child);
    let markReady!: () => void;
    this.readyLine = new Promise((resolve) => (markReady = resolve));
    const onData = (chunk: Buffer): void => {
      for (const line of chunk.toString("utf8").split("\n")) {
        if (!line) continue;
        this.logLines.push(line);
        if (line.includes("Server is ready")) markReady();
      }
      if (this.logLines.length > LOG_LINES_KEPT) this.logLines.splice(0, this.logLines.length - LOG_LINES_KEPT);
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        live.delete(child);
        this.exitReason = `nats-server exited (code ${code}, signal ${signal})\n${this.logLines.slice(-15).join("\n")}`;
        resolve();
      });
      child.once("error", (err) => {
        live.delete(child);
        this.exitReason = `cannot run nats-server: ${err.message}`;
        resolve();
      });
    });
    await Promise.race([this.readyLine, this.exited]);
    await until(`nats-server on port ${this.port}`, async () => {
      await getJson(`http://127.0.0.1:${this.monitorPort}/healthz?js-server-only=true`);
      return true;
    }, () => this.exitReason);
  }

  isRunning(): boolean {
    return this.exitReason === undefined && this.child !== undefined;
  }

  async kill(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    if (this.exitReason !== undefined) return;
    this.child.kill(signal);
    const escalate = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    await this.exited;
    clearTimeout(escalate);
  }

  async restart(): Promise<void> {
    if (this.stopped) throw new Error("restart() after stop()");
    await this.kill("SIGTERM");
    await this.launch();
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await this.kill("SIGTERM");
    if (this.ownsStore) removeTempDir(this.storeDir);
  }
}

function addressInUse(err: unknown): boolean {
  return err instanceof Error && /address already in use/i.test(err.message);
}

/** Starts one nats-server (JetStream on by default) on free ports with a temp store. */
export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServer> {
  const jetstream = opts.jetstream ?? true;
  // A free port can be taken by someone else before the server binds it: retry with new ones.
  for (let attempt = 1; ; attempt++) {
    const port = opts.port ?? (await freePort());
    const monitorPort = opts.monitorPort ?? (await freePort());
    const ownsStore = opts.storeDir === undefined;
    const storeDir = opts.storeDir ?? makeTempDir(opts.storePrefix ?? "uptrakit-nats-");
    const args = ["-a", "127.0.0.1", "-p", String(port), "-m", String(monitorPort)];
    if (jetstream) args.push("-js", "-sd", storeDir);
    args.push(...(opts.args ?? []));
    const server = new ServerProcess(port, monitorPort, storeDir, ownsStore, () => args);
    try {
      await server.launch();
      return server;
    } catch (err) {
      await server.stop();
      const fixedPorts = opts.port !== undefined && opts.monitorPort !== undefined;
      if (!addressInUse(err) || fixedPorts || attempt >= 5) throw err;
    }
  }
}

// ---- clusters -------------------------------------------------------------------------------

/** Starts an n-node JetStream cluster; resolves once every node routes to the others and a meta leader is elected. */
export async function startNatsCluster(n = 3, opts: NatsClusterOptions = {}): Promise<NatsCluster> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await launchCluster(n, opts.storePrefix ?? "uptrakit-nats-", opts.args ?? []);
    } catch (err) {
      // One of the free ports was taken meanwhile: start over on new ones.
      if (!addressInUse(err) || attempt >= 5) throw err;
    }
  }
}

async function launchCluster(n: number, storePrefix: string, extraArgs: string[]): Promise<NatsCluster> {
  const clusterName = `c${process.pid}${Math.floor(Math.random() * 1e6)}`;
  const specs = [];
  for (let i = 1; i <= n; i++) {
    specs.push({
      name: `n${i}`,
      port: await freePort(),
      monitorPort: await freePort(),
      routePort: await freePort(),
      storeDir: makeTempDir(`${storePrefix}n${i}-`),
    });
  }
  const routes = specs.map((s) => `nats://127.0.0.1:${s.routePort}`).join(",");
  const nodes: (ServerProcess & ClusterNode)[] = specs.map((s) => {
    const args = [
      "-a", "127.0.0.1", "-js", "-sd", s.storeDir, "-p", String(s.port), "-m", String(s.monitorPort),
      "--cluster_name", clusterName, "--server_name", s.name,
      "--cluster", `nats://127.0.0.1:${s.routePort}`, "--routes", routes, ...extraArgs,
    ];
    const proc = new ServerProcess(s.port, s.monitorPort, s.storeDir, true, () => args);
    return Object.assign(proc, { name: s.name, routePort: s.routePort });
  });
  const cluster: NatsCluster = {
    urls: nodes.map((x) => x.url),
    nodes,
    streamLeader: (stream) => streamLeader(nodes, stream),
    stop: async () => {
      await Promise.all(nodes.map((x) => x.stop()));
    },
  };
  try {
    // A clustered node reports ready only once it has peers, so launch them all together.
    await Promise.all(nodes.map((x) => x.launch()));
    for (const node of nodes) {
      const alive = () => (node.isRunning() ? undefined : `${node.name} exited\n${node.logs()}`);
      await until(`${node.name} routes`, async () => {
        const routez = (await getJson(`http://127.0.0.1:${node.monitorPort}/routez`)) as { num_routes?: number };
        return (routez.num_routes ?? 0) >= n - 1;
      }, alive);
      await until(`${node.name} JetStream meta leader`, async () => {
        const jsz = (await getJson(`http://127.0.0.1:${node.monitorPort}/jsz`)) as { meta_cluster?: { leader?: string } };
        return Boolean(jsz.meta_cluster?.leader);
      }, alive);
      await getJson(`http://127.0.0.1:${node.monitorPort}/healthz?js-enabled-only=true`);
    }
    return cluster;
  } catch (err) {
    await cluster.stop();
    throw err;
  }
}

interface Jsz {
  account_details?: { stream_detail?: { name: string; cluster?: { leader?: string } }[] }[];
}

async function streamLeader(nodes: ClusterNode[], stream: string): Promise<string | undefined> {
  for (const node of nodes) {
    try {
      const jsz = (await getJson(`http://127.0.0.1:${node.monitorPort}/jsz?streams=true&config=true`)) as Jsz;
      for (const acct of jsz.account_details ?? []) {
        const leader = acct.stream_detail?.find((s) => s.name === stream)?.cluster?.leader;
        if (leader) return leader;
      }
    } catch {
      // node down: ask the next one
    }
  }
  return undefined;
}
