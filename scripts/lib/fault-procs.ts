// Relay processes for fault runs (scripts/soak.ts) that can be SIGKILLed and restarted with the
// same instance id, data dir and port. Loopback only. The JetStream cluster they run on comes from
// ./nats-server.js (startNatsCluster: nodes killed and restarted on the same ports and stores).
// Scripts do not import from test/.

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import { freePort, killOnExit } from "./nats-server.js";
import { RELAY_MAIN, tempDir } from "./procs.js";

const READY_TIMEOUT_MS = 20_000;
const TAIL_CHARS = 4_000;

function waitExit(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => p.once("exit", () => resolve()));
}

// ---- a restartable relay ----------------------------------------------------------------------------

export interface RestartableRelayOptions {
  instanceId: string;
  /** JetStream URLs; without them the relay runs on the SQLite bus at busFile. */
  natsUrls?: string[];
  /** The shared SQLite bus file (`--bus sqlite:<file>`), when natsUrls is not given. */
  busFile?: string;
  args?: string[];
  /** Prefix of the data dir's temp name (default "uptrakit-soak-<id>-"). */
  dirPrefix?: string;
  /** Every JSON log line of the relay, as it comes. */
  onLogLine?: (line: Record<string, unknown>) => void;
  /** Another build of the relay (e.g. an older commit's dist/relay/main.js); default this tree's. */
  main?: string;
  /** Every exit of a relay that had reported "relay running" (not of failed starts). */
  onExit?: (exit: { code: number | null; signal: NodeJS.Signals | null }) => void;
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
    this.dataDir = tempDir(o.dirPrefix ?? `uptrakit-soak-${o.instanceId}-`);
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
    const bus = this.o.natsUrls ? ["--nats-url", this.o.natsUrls.join(",")] : ["--bus", `sqlite:${this.o.busFile}`];
    const args = [
      this.o.main ?? RELAY_MAIN, "run", "--instance-id", this.instanceId, "--data-dir", this.dataDir, "--listen", `127.0.0.1:${this.port}`,
      ...bus, ...(this.o.args ?? []),
    ];
    const child = spawn(process.execPath, args, { env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    killOnExit(child);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`relay ${this.instanceId}: not running within ${READY_TIMEOUT_MS} ms\n${this.tail}`)), READY_TIMEOUT_MS);
      let running = false;
      let buf = "";
      child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
        this.tail = (this.tail + chunk).slice(-TAIL_CHARS);
        if (this.o.onLogLine) {
          buf += chunk;
          let nl: number;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            try {
              this.o.onLogLine(JSON.parse(line) as Record<string, unknown>);
            } catch {
              // not a JSON line
            }
          }
        }
        if (!running && this.tail.includes('"msg":"relay running"')) {
          running = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.stderr!.setEncoding("utf8").on("data", (chunk: string) => (this.tail = (this.tail + chunk).slice(-TAIL_CHARS)));
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        if (running) this.o.onExit?.({ code, signal });
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

  /** Sends `signal` and waits for the exit, keeping the data dir; resolves with how it ended (null: was not running). */
  async shutdown(signal: NodeJS.Signals = "SIGTERM", forceAfterMs = 20_000): Promise<{ code: number | null; signal: NodeJS.Signals | null } | null> {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return null;
    c.kill(signal);
    const force = setTimeout(() => c.kill("SIGKILL"), forceAfterMs);
    await waitExit(c);
    clearTimeout(force);
    return { code: c.exitCode, signal: c.signalCode };
  }

  /** Starts the relay again if it is not running (same instance id, data dir and port). */
  async ensureRunning(): Promise<void> {
    if (this.pid === undefined) await this.launch();
  }

  removeDataDir(): void {
    fs.rmSync(this.dataDir, { recursive: true, force: true });
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
