#!/usr/bin/env node
// uptrakit-controller-stub: a stand-in controller for trying a relay by hand. It connects to the
// relay's WebSocket, publishes sample notifications on a timer, and prints what it publishes and
// what it receives, optionally simulating a failing (nack) or stuck (never-ack) handler.

import os from "node:os";
import { randomInt } from "node:crypto";
import { Command, InvalidArgumentError, Option } from "commander";
import { LEAVE_UNSETTLED, NackError, RelayClient, RelayError, type Delivery } from "./client.js";

interface StubOptions {
  relayUrl: string;
  token?: string;
  name: string;
  publishEvery: number;
  count?: number;
  nackRate: number;
  nackDelay?: number;
  handleMs: number;
  neverAck: boolean;
  quiet: boolean;
  json: boolean;
}

function wholeNumber(value: string): number {
  if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError("expected a whole number");
  return Number(value.trim());
}

function rate(value: string): number {
  const n = Number(value.trim());
  if (value.trim() === "" || !Number.isFinite(n) || n < 0 || n > 1) throw new InvalidArgumentError("expected a number from 0 to 1");
  return n;
}

// ---- sample notifications -----------------------------------------------------------------

const SERVICES = ["api", "web", "worker", "scheduler", "mailer"];
const KINDS = ["VersionCheckCompleted", "CertificateRenewed", "SoftwareStateUpdated"] as const;

const pick = <T>(xs: readonly T[]): T => xs[randomInt(xs.length)]!;
const version = () => `${randomInt(1, 4)}.${randomInt(0, 20)}.${randomInt(0, 10)}`;

function samplePayload(kind: (typeof KINDS)[number], n: number, name: string): Record<string, unknown> {
  const now = new Date();
  switch (kind) {
    case "VersionCheckCompleted": {
      const current = version();
      const latest = randomInt(3) === 0 ? version() : current;
      return { service: pick(SERVICES), version: current, latestVersion: latest, updateAvailable: latest !== current, checkedAt: now.toISOString(), seq: n, controller: name };
    }
    case "CertificateRenewed":
      return {
        domain: `${pick(SERVICES)}.example.org`,
        issuer: "Let's Encrypt R11",
        serial: randomInt(2 ** 47).toString(16),
        notAfter: new Date(now.getTime() + 90 * 86_400_000).toISOString(),
        renewedAt: now.toISOString(),
        seq: n,
        controller: name,
      };
    case "SoftwareStateUpdated":
      return { service: pick(SERVICES), state: pick(["running", "updating", "stopped", "degraded"]), version: version(), updatedAt: now.toISOString(), seq: n, controller: name };
  }
}

// ---- output -------------------------------------------------------------------------------

function makePrinter(o: StubOptions) {
  const perMessage = new Set(["published", "received"]);
  return (event: string, fields: Record<string, unknown>, text: string, isError = false): void => {
    if (o.quiet && perMessage.has(event)) return;
    if (o.json) {
      const line = JSON.stringify({ ts: new Date().toISOString(), name: o.name, event, ...fields });
      (isError ? process.stderr : process.stdout).write(line + "\n");
    } else {
      const line = `${new Date().toISOString().slice(11, 23)} [${o.name}] ${text}`;
      (isError ? process.stderr : process.stdout).write(line + "\n");
    }
  };
}

// ---- main ---------------------------------------------------------------------------------

async function run(o: StubOptions): Promise<void> {
  const print = makePrinter(o);
  const client = new RelayClient({ url: o.relayUrl, ...(o.token ? { token: o.token } : {}) });
  let stopping = false;
  let publishTimer: NodeJS.Timeout | null = null;

  const stop = async (code: number): Promise<never> => {
    stopping = true;
    if (publishTimer) clearTimeout(publishTimer);
    await client.close().catch(() => {});
    process.exit(code);
  };
  let signals = 0;
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.on(sig, () => {
      if (++signals > 1) process.exit(1); // second signal: do not wait any longer
      print("stopping", { signal: sig }, `${sig}: closing`);
      void stop(0);
    });
  }

  client.on("ready", (r) => print("ready", { instanceId: r.instanceId, bus: r.bus, url: o.relayUrl }, `connected to relay ${r.instanceId} (bus ${r.bus}) at ${o.relayUrl}`));
  client.on("disconnected", (d) => print("disconnected", { code: d.code, reason: d.reason }, `disconnected (code ${d.code}${d.reason ? `, ${d.reason}` : ""})`, true));
  client.on("reconnecting", (r) => print("reconnecting", { attempt: r.attempt, delayMs: r.delayMs }, `reconnecting in ${r.delayMs} ms (attempt ${r.attempt})`));
  client.on("error", (e) => {
    const code = e instanceof RelayError ? e.code : undefined;
    print("error", { code, message: e.message }, `error${code ? ` [${code}]` : ""}: ${e.message}`, true);
  });
  client.on("superseded", () => {
    if (stopping) return;
    print("superseded", {}, "superseded: a newer controller session took over this relay; exiting", true);
    void stop(1);
  });

  client.onMessage((msg: Delivery) => {
    const base = { kind: msg.kind, origin: msg.origin, attempt: msg.attempt, id: msg.id, deliveryId: msg.deliveryId };
    const say = (action: string) =>
      print("received", { ...base, action, payload: msg.payload }, `← ${msg.kind} from ${msg.origin} attempt ${msg.attempt} id=${msg.id} → ${action}`);
    if (o.neverAck) {
      say("left unacked");
      return LEAVE_UNSETTLED;
    }
    const fail = o.nackRate > 0 && Math.random() < o.nackRate;
    const finish = () => {
      if (fail) {
        say(o.nackDelay === undefined ? "nack" : `nack (delay ${o.nackDelay} ms)`);
        throw new NackError("simulated handler failure", o.nackDelay);
      }
      say("ack");
    };
    if (o.handleMs > 0) return new Promise<void>((resolve) => setTimeout(resolve, o.handleMs)).then(finish);
    finish();
    return undefined;
  });

  try {
    await client.connect();
  } catch (e) {
    print("error", { code: e instanceof RelayError ? e.code : undefined, message: (e as Error).message }, (e as Error).message, true);
    await client.close().catch(() => {});
    process.exit(1);
  }

  if (o.publishEvery <= 0 || o.count === 0) return;
  let n = 0;
  const publishOne = () => {
    publishTimer = null;
    if (stopping) return;
    n += 1;
    const kind = KINDS[(n - 1) % KINDS.length]!;
    const payload = samplePayload(kind, n, o.name);
    const settled = client.publish(kind, payload).then(
      (r) => print("published", { kind, id: r.id, queued: r.queued, seq: n }, `→ ${kind} id=${r.id}${r.queued ? " (queued by relay: bus unavailable)" : ""}`),
      (e: unknown) => {
        if (stopping) return;
        const code = e instanceof RelayError ? e.code : undefined;
        print("publish_failed", { kind, id: e instanceof RelayError ? e.id : undefined, code, message: (e as Error).message }, `✗ ${kind}: ${(e as Error).message}`, true);
      },
    );
    if (o.count !== undefined && n >= o.count) {
      // After the last publish is answered, so the line comes after its "→".
      void settled.then(() => {
        if (!stopping) print("done_publishing", { count: n }, `sent ${n} publish${n === 1 ? "" : "es"}; now only receiving (Ctrl-C to stop)`);
      });
      return;
    }
    publishTimer = setTimeout(publishOne, o.publishEvery);
  };
  publishOne();
}

const program = new Command()
  .name("uptrakit-controller-stub")
  .description("Stand-in controller: connects to an Uptrakit relay, publishes sample notifications and prints what it receives")
  .addOption(new Option("--relay-url <url>", "relay WebSocket URL").env("UPTRAKIT_RELAY_URL").default("ws://127.0.0.1:4380/ws"))
  .addOption(new Option("--token <token>", "relay token (sent as Authorization: Bearer)").env("UPTRAKIT_RELAY_TOKEN"))
  .option("--name <label>", "label for this stub in the output", `stub-${os.hostname()}-${process.pid}`)
  .option("--publish-every <ms>", "publish a sample notification every <ms> milliseconds (0 = never)", wholeNumber, 2000)
  .option("--count <n>", "stop publishing after <n> notifications (keep receiving)", wholeNumber)
  .option("--nack-rate <0..1>", "simulate a failing handler: nack this fraction of deliveries", rate, 0)
  .option("--nack-delay <ms>", "redelivery delay to ask for when nacking (default: the relay's)", wholeNumber)
  .option("--handle-ms <ms>", "simulate a handler that takes <ms> milliseconds (sends working frames if long)", wholeNumber, 0)
  .option("--never-ack", "never settle deliveries: they time out on the relay and are redelivered", false)
  .option("--quiet", "do not print each publish and delivery (connection events and errors still print)", false)
  .option("--json", "print one JSON line per event instead of friendly text", false)
  .showHelpAfterError()
  .action(async (opts: StubOptions) => run(opts));

await program.parseAsync(process.argv);
