// Process helpers for the benchmark scripts: relay processes (dist/relay/main.js) and controller
// children, plus /proc readings (peak RSS, CPU time). nats-server comes from ./nats-server.js.
// Scripts do not import from test/.

import { fork, spawn, spawnSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { natsServerBinary } from "./nats-server.js";

const here = path.dirname(fileURLToPath(import.meta.url));
/** dist/relay/main.js, relative to this compiled file (dist/scripts/lib/procs.js). */
export const RELAY_MAIN = path.resolve(here, "../../relay/main.js");

// ---- bookkeeping: nothing we start outlives us -------------------------------------------------

const live = new Set<ChildProcess>();
const tempDirs = new Set<string>();

function killAll(): void {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
  live.clear();
  for (const d of tempDirs) fs.rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"] as const)
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });

export function tempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

function waitExit(p: ChildProcess, timeoutMs: number): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      try {
        p.kill("SIGKILL");
      } catch {
        // gone
      }
    }, timeoutMs);
    p.once("exit", () => {
      clearTimeout(t);
      resolve();
    });
  });
}

// ---- /proc -------------------------------------------------------------------------------------

const CLK_TCK = (() => {
  const r = spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" });
  const n = Number(r.stdout?.trim());
  return Number.isFinite(n) && n > 0 ? n : 100;
})();

export interface ProcStats {
  /** Peak resident set (VmHWM), MB. */
  hwmMb: number;
  /** Current resident set (VmRSS), MB. */
  rssMb: number;
  /** utime + stime, seconds. */
  cpuSeconds: number;
  /** stime alone (time in the kernel), seconds. */
  sysSeconds: number;
}

export function procStats(pid: number): ProcStats | undefined {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (key: string): number => {
      const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status);
      return m ? Number(m[1]) : 0;
    };
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    return { hwmMb: kb("VmHWM") / 1024, rssMb: kb("VmRSS") / 1024, cpuSeconds: (utime + stime) / CLK_TCK, sysSeconds: stime / CLK_TCK };
  } catch {
    return undefined;
  }
}

// ---- machine -------------------------------------------------------------------------------------

export function machineInfo(): Record<string, string | number> {
  const v = spawnSync(natsServerBinary(), ["--version"], { encoding: "utf8" });
  return {
    nproc: os.availableParallelism(),
    cpu: os.cpus()[0]?.model ?? "unknown",
    memoryGb: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    natsServer: (v.stdout || v.stderr || "unknown").trim(),
    platform: `${os.platform()} ${os.release()}`,
  };
}

// ---- relays ---------------------------------------------------------------------------------------

export interface RelayProc {
  instanceId: string;
  pid: number;
  wsUrl: string;
  dataDir: string;
  proc: ChildProcess;
  /** Last lines of output, for error messages. */
  tail(): string;
  stop(): Promise<number | null>;
}

export interface RelayStartOptions {
  instanceId: string;
  /** JetStream when set, else the SQLite bus at busFile. */
  natsUrl?: string;
  busFile?: string;
  args?: string[];
  /** node flags, e.g. ["--cpu-prof", "--cpu-prof-dir", dir]. */
  nodeArgs?: string[];
  /** Another build of the relay (A/B comparisons); default this tree's dist/relay/main.js. */
  main?: string;
  /** Extra environment, e.g. OTEL_EXPORTER_OTLP_ENDPOINT (bench --tracing). */
  env?: Record<string, string>;
}

/**
 * Environment without any UPTRAKIT_* or OTEL_* variable of the caller: the relay runs on its
 * defaults, and exports spans only when asked (bench --tracing).
 */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_") && !k.startsWith("OTEL_")) env[k] = v;
  return { ...env, ...extra };
}

export async function startRelay(o: RelayStartOptions): Promise<RelayProc> {
  const dataDir = tempDir(`uptrakit-bench-${o.instanceId}-`);
  const args = [
    ...(o.nodeArgs ?? []),
    o.main ?? RELAY_MAIN,
    "run",
    "--instance-id",
    o.instanceId,
    "--data-dir",
    dataDir,
    "--listen",
    "127.0.0.1:0",
    ...(o.natsUrl ? ["--nats-url", o.natsUrl] : ["--bus", `sqlite:${o.busFile!}`]),
    ...(o.args ?? []),
  ];
  const proc = spawn(process.execPath, args, { env: cleanEnv(o.env), stdio: ["ignore", "pipe", "pipe"] });
  live.add(proc);
  let tail = "";
  let buf = "";
  // BENCH_RELAY_LOG_DIR=<dir>: keep each relay's whole output (e.g. with --relay-node-args --trace-gc).
  const logDir = process.env.BENCH_RELAY_LOG_DIR;
  if (logDir) {
    const out = fs.createWriteStream(path.join(logDir, `${o.instanceId}.log`));
    proc.stdout!.pipe(out);
    proc.stderr!.pipe(out);
  }
  const running = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`relay ${o.instanceId} not running within 20 s:\n${tail}`)), 20_000);
    proc.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
      tail = (tail + chunk).slice(-4000);
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!line.includes('"relay running"')) continue;
        try {
          const l = JSON.parse(line) as { listen?: string };
          clearTimeout(timer);
          resolve(String(l.listen));
        } catch {
          // not JSON after all
        }
      }
    });
    proc.stderr!.setEncoding("utf8").on("data", (chunk: string) => (tail = (tail + chunk).slice(-4000)));
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`relay ${o.instanceId} exited with ${code}:\n${tail}`));
    });
  });
  const listen = await running;
  const port = Number(listen.slice(listen.lastIndexOf(":") + 1));
  return {
    instanceId: o.instanceId,
    pid: proc.pid!,
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    dataDir,
    proc,
    tail: () => tail,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await waitExit(proc, 20_000);
      live.delete(proc);
      removeTempDir(dataDir);
      return proc.exitCode;
    },
  };
}

// ---- a bare Node process (the idle baseline) ----------------------------------------------------------

export interface BareNode {
  pid: number;
  stop(): Promise<void>;
}

/** `node -e` doing nothing but waiting: what any Node process costs at rest (bench --idle). */
export function startBareNode(nodeArgs: string[] = []): BareNode {
  const proc = spawn(process.execPath, [...nodeArgs, "-e", "setInterval(() => {}, 1e9)"], { env: cleanEnv(), stdio: "ignore" });
  live.add(proc);
  return {
    pid: proc.pid!,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await waitExit(proc, 5_000);
      live.delete(proc);
    },
  };
}

// ---- controller children (scripts/bench-controller.ts) ---------------------------------------------

export interface Child {
  proc: ChildProcess;
  pid: number;
  send(msg: object): void;
  /** Resolves with the next message matching pred. */
  next<T = Record<string, unknown>>(pred: (m: Record<string, unknown>) => boolean, timeoutMs: number): Promise<T>;
  stop(): Promise<void>;
}

export function forkChild(script: string, nodeArgs: string[] = []): Child {
  const proc = fork(script, [], { stdio: ["ignore", "inherit", "inherit", "ipc"], execArgv: nodeArgs, env: cleanEnv() });
  live.add(proc);
  const inbox: Array<Record<string, unknown>> = [];
  const waiters = new Set<{ pred: (m: Record<string, unknown>) => boolean; resolve: (m: Record<string, unknown>) => void }>();
  let exitError: Error | undefined;
  const failers = new Set<(e: Error) => void>();
  proc.on("message", (m) => {
    const msg = m as Record<string, unknown>;
    for (const w of waiters)
      if (w.pred(msg)) {
        waiters.delete(w);
        w.resolve(msg);
        return;
      }
    inbox.push(msg);
  });
  proc.once("exit", (code, signal) => {
    live.delete(proc);
    exitError = new Error(`controller child ${script} exited (code ${code}, signal ${signal})`);
    for (const f of failers) f(exitError);
  });
  return {
    proc,
    pid: proc.pid!,
    send: (msg) => {
      if (proc.connected) proc.send(msg);
    },
    next: <T>(pred: (m: Record<string, unknown>) => boolean, timeoutMs: number): Promise<T> => {
      const i = inbox.findIndex(pred);
      if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0] as T);
      if (exitError) return Promise.reject(exitError);
      return new Promise<T>((resolve, reject) => {
        const w = {
          pred,
          resolve: (m: Record<string, unknown>) => {
            clearTimeout(timer);
            failers.delete(fail);
            resolve(m as T);
          },
        };
        const fail = (e: Error): void => {
          clearTimeout(timer);
          waiters.delete(w);
          reject(e);
        };
        const timer = setTimeout(() => fail(new Error(`no answer from ${script} (pid ${proc.pid}) within ${timeoutMs} ms`)), timeoutMs);
        waiters.add(w);
        failers.add(fail);
      });
    },
    stop: async () => {
      if (proc.connected) proc.send({ op: "exit" });
      await waitExit(proc, 5_000);
      live.delete(proc);
    },
  };
}
