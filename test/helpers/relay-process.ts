// Runs the real relay binary (dist/relay/main.js) as a child process, the way operators do.

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const RELAY_MAIN = path.resolve(here, "../../relay/main.js");
export const STUB_MAIN = path.resolve(here, "../../controller-stub/main.js");

const live = new Set<ChildProcess>();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

export interface RelayProcess {
  instanceId: string;
  dataDir: string;
  /** ws://host:port/ws */
  wsUrl: string;
  /** http://host:port */
  httpUrl: string;
  port: number;
  proc: ChildProcess;
  /** Parsed pino lines so far. */
  logs: Array<Record<string, unknown>>;
  stderr(): string;
  waitForLog(pred: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** Sends a signal and resolves with the exit code. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
  exited: Promise<number | null>;
}

export interface StartRelayOptions {
  instanceId: string;
  natsUrl?: string;
  dataDir?: string;
  /** Extra command-line arguments. */
  args?: string[];
  env?: Record<string, string>;
  /** Fixed listen port (default: an ephemeral one). */
  port?: number;
  startTimeoutMs?: number;
}

export function tempDir(prefix = "uptrakit-test-"): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Environment without any UPTRAKIT_* or OTEL_* variable of the caller, so tests are not steered by it. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("UPTRAKIT_") && !k.startsWith("OTEL_")) env[k] = v;
  return { ...env, ...extra };
}

export async function startRelay(o: StartRelayOptions): Promise<RelayProcess> {
  const dataDir = o.dataDir ?? tempDir();
  const args = [
    RELAY_MAIN,
    "run",
    "--instance-id",
    o.instanceId,
    "--data-dir",
    dataDir,
    "--listen",
    `127.0.0.1:${o.port ?? 0}`,
    ...(o.natsUrl ? ["--nats-url", o.natsUrl] : []),
    ...(o.args ?? []),
  ];
  const proc = spawn(process.execPath, args, { env: cleanEnv(o.env), stdio: ["ignore", "pipe", "pipe"] });
  live.add(proc);
  const logs: Array<Record<string, unknown>> = [];
  const waiters: Array<{ pred: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }> = [];
  let stderr = "";
  let buf = "";
  proc.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
    buf += chunk;
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let parsed: Record<string, unknown>;
      try {
        parsed = JSON.parse(line) as Record<string, unknown>;
      } catch {
        parsed = { msg: line, unparsed: true };
      }
      logs.push(parsed);
      for (const w of [...waiters]) {
        if (w.pred(parsed)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(parsed);
        }
      }
    }
  });
  proc.stderr!.setEncoding("utf8").on("data", (c: string) => (stderr += c));
  const exited = new Promise<number | null>((resolve) =>
    proc.once("exit", (code) => {
      live.delete(proc);
      resolve(code);
    }),
  );

  const waitForLog = (pred: (l: Record<string, unknown>) => boolean, timeoutMs = 10_000): Promise<Record<string, unknown>> => {
    const found = logs.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`relay ${o.instanceId}: no matching log line within ${timeoutMs} ms; stderr: ${stderr}`)), timeoutMs);
      waiters.push({ pred, resolve: (l) => (clearTimeout(timer), resolve(l)) });
      void exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`relay ${o.instanceId} exited with ${code} while waiting for a log line; stderr: ${stderr}`));
      });
    });
  };

  const running = await waitForLog((l) => l.msg === "relay running", o.startTimeoutMs ?? 20_000);
  const listen = String(running.listen);
  const port = Number(listen.slice(listen.lastIndexOf(":") + 1));
  return {
    instanceId: o.instanceId,
    dataDir,
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    httpUrl: `http://127.0.0.1:${port}`,
    port,
    proc,
    logs,
    stderr: () => stderr,
    waitForLog,
    exited,
    stop: async (signal = "SIGTERM", timeoutMs = 20_000) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs the relay's CLI to completion (dlq, stream info, or a run expected to fail). */
export function runRelayCli(args: string[], opts: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    const started = Date.now();
    const proc = spawn(process.execPath, [RELAY_MAIN, ...args], { env: cleanEnv(opts.env), stdio: ["ignore", "pipe", "pipe"] });
    live.add(proc);
    let stdout = "";
    let stderr = "";
    proc.stdout.setEncoding("utf8").on("data", (c: string) => (stdout += c));
    proc.stderr.setEncoding("utf8").on("data", (c: string) => (stderr += c));
    const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 30_000);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      live.delete(proc);
      resolve({ code, stdout, stderr, ms: Date.now() - started });
    });
  });
}
