// Every setting of the relay, parsed in one place: command-line flag first, then its
// UPTRAKIT_* env var, then the default. An invalid value stops the relay with a message
// naming the option (commander reports it; see `optionError`).

import os from "node:os";
import path from "node:path";
import { InvalidArgumentError, Option, type Command } from "commander";

export interface NatsAuth {
  user?: string;
  pass?: string;
  token?: string;
  nkeySeedFile?: string;
  credsFile?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

export interface RelayConfig {
  /** NATS server URLs; empty means the embedded SQLite bus. */
  natsUrls: string[];
  /** SQLite bus file, used when natsUrls is empty. */
  busFile: string;
  instanceId: string;
  listenHost: string;
  listenPort: number;
  dataDir: string;
  token?: string;
  allowOrigins: string[];
  ackWaitMs: number;
  maxDeliver: number;
  nackDelayMs: number;
  stream: string;
  replicas: number;
  maxAgeMs: number;
  maxInFlight: number;
  maxFrameBytes: number;
  outboxMax: number;
  drainTimeoutMs: number;
  logLevel: string;
  natsAuth: NatsAuth;
}

// ---- value parsers (each throws InvalidArgumentError, which commander turns into a clear exit) --

function integer(min: number, max: number) {
  return (value: string): number => {
    if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    const n = Number(value.trim());
    if (n < min || n > max) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    return n;
  };
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** A duration: a bare number of milliseconds, or a number with ms/s/m/h/d. */
export function parseDuration(value: string): number {
  const m = /^(\d+)(ms|s|m|h|d)?$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError("expected a duration such as 30000, 30s, 5m or 24h");
  return Number(m[1]) * DURATION_UNITS[m[2] ?? "ms"]!;
}

function durationIn(min: number, max: number) {
  return (value: string): number => {
    const ms = parseDuration(value);
    if (ms < min || ms > max) throw new InvalidArgumentError(`expected a duration from ${min} ms to ${max} ms`);
    return ms;
  };
}

function natsUrls(value: string): string[] {
  const urls = value.split(",").map((s) => s.trim()).filter(Boolean);
  for (const u of urls) {
    // The URL is logged and appears in error messages: a secret in it would leak (and nats.js
    // ignores it anyway). Neither the URL nor its user part is echoed here.
    if (/^[a-z][a-z0-9+.-]*:\/\/[^/@\s]*@/i.test(u))
      throw new InvalidArgumentError("credentials in the URL are not supported: use --nats-user/--nats-pass, --nats-token or --nats-creds");
    if (!/^(nats|tls|ws|wss):\/\/[^\s]+$/.test(u) && !/^[\w.-]+:\d+$/.test(u))
      throw new InvalidArgumentError(`${JSON.stringify(u)} is not a NATS URL (nats://host:port)`);
  }
  if (urls.length === 0) throw new InvalidArgumentError("expected one or more comma-separated NATS URLs");
  return urls;
}

function listen(value: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(value.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new InvalidArgumentError("expected host:port, e.g. 127.0.0.1:4380");
  return { host: (m[1] ?? m[2])!, port };
}

function busSpec(value: string): string {
  const m = /^sqlite:(.+)$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError("expected sqlite:<file> (use --nats-url for JetStream)");
  return m[1]!;
}

function instanceId(value: string): string {
  // The id names this instance's durable consumer and travels in a header.
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(value))
    throw new InvalidArgumentError("expected 1-64 characters of letters, digits, '_' or '-'");
  return value;
}

function streamName(value: string): string {
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(value))
    throw new InvalidArgumentError("expected 1-64 characters of letters, digits, '_' or '-'");
  return value;
}

const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];

function list(value: string): string[] {
  return value.split(",").map((s) => s.trim()).filter(Boolean);
}

/** The host name made into a valid instance id (a Kubernetes pod name already is one). */
export function defaultInstanceId(): string {
  const h = os.hostname().replace(/[^A-Za-z0-9_-]/g, "-").slice(0, 64);
  return h || "relay";
}

// ---- the option table -------------------------------------------------------------------------

interface OptionSpec {
  flags: string;
  env: string;
  help: string;
  parse?: (value: string) => unknown;
  default?: unknown;
  defaultText?: string;
  choices?: string[];
}

/** Options shared by every subcommand that talks to the bus (run, stream info). */
const CONNECTION_OPTIONS: OptionSpec[] = [
  { flags: "--nats-url <urls>", env: "UPTRAKIT_NATS_URL", help: "NATS server URL(s), comma-separated for a cluster; without it the embedded SQLite bus is used", parse: natsUrls },
  { flags: "--bus <spec>", env: "UPTRAKIT_BUS", help: "embedded bus as sqlite:<file> (default <data-dir>/bus.db); ignored when --nats-url is set", parse: busSpec },
  { flags: "--instance-id <id>", env: "UPTRAKIT_INSTANCE_ID", help: "this relay's instance id (origin of what it publishes)", parse: instanceId, defaultText: "the host name" },
  { flags: "--data-dir <dir>", env: "UPTRAKIT_DATA_DIR", help: "directory for the relay's own store (outbox, dead letters)", default: "./.uptrakit" },
  { flags: "--stream <name>", env: "UPTRAKIT_STREAM", help: "JetStream stream name", parse: streamName, default: "UPTRAKIT_PUSH" },
  { flags: "--replicas <n>", env: "UPTRAKIT_STREAM_REPLICAS", help: "stream replicas (3 on a 3-node cluster)", parse: integer(1, 5), default: 1 },
  { flags: "--nats-user <user>", env: "UPTRAKIT_NATS_USER", help: "NATS user name" },
  { flags: "--nats-pass <password>", env: "UPTRAKIT_NATS_PASS", help: "NATS password" },
  { flags: "--nats-token <token>", env: "UPTRAKIT_NATS_TOKEN", help: "NATS auth token" },
  { flags: "--nats-nkey-seed-file <file>", env: "UPTRAKIT_NATS_NKEY_SEED_FILE", help: "file holding an NKey seed" },
  { flags: "--nats-creds <file>", env: "UPTRAKIT_NATS_CREDS", help: "NATS .creds file (JWT + seed)" },
  { flags: "--nats-tls-ca <file>", env: "UPTRAKIT_NATS_TLS_CA", help: "CA certificate to verify the NATS server" },
  { flags: "--nats-tls-cert <file>", env: "UPTRAKIT_NATS_TLS_CERT", help: "client certificate for NATS mutual TLS" },
  { flags: "--nats-tls-key <file>", env: "UPTRAKIT_NATS_TLS_KEY", help: "client key for NATS mutual TLS" },
  { flags: "--ack-wait <ms>", env: "UPTRAKIT_ACK_WAIT", help: "how long a delivery may stay unacked before it is redelivered", parse: durationIn(100, 3_600_000), default: 30_000 },
  { flags: "--max-deliver <n>", env: "UPTRAKIT_MAX_DELIVER", help: "delivery attempts before a message becomes a dead letter", parse: integer(1, 100), default: 3 },
  { flags: "--max-in-flight <n>", env: "UPTRAKIT_MAX_IN_FLIGHT", help: "deliveries awaiting the controller's ack at once (backpressure window)", parse: integer(1, 10_000), default: 256 },
  { flags: "--max-age <duration>", env: "UPTRAKIT_MAX_AGE", help: "stream retention", parse: durationIn(1000, 365 * 86_400_000), default: 86_400_000, defaultText: "24h" },
  { flags: "--log-level <level>", env: "UPTRAKIT_LOG_LEVEL", help: "log level", default: "info", choices: LOG_LEVELS },
];

/** Options of the local server and the delivery path: `run` only. */
const RUN_OPTIONS: OptionSpec[] = [
  { flags: "--listen <host:port>", env: "UPTRAKIT_RELAY_LISTEN", help: "address of the controller-facing server (/ws, /healthz, /readyz, /metrics)", parse: listen, default: { host: "127.0.0.1", port: 4380 }, defaultText: "127.0.0.1:4380" },
  { flags: "--token <secret>", env: "UPTRAKIT_RELAY_TOKEN", help: "require 'Authorization: Bearer <secret>' on the WebSocket upgrade" },
  { flags: "--allow-origin <origins>", env: "UPTRAKIT_ALLOW_ORIGIN", help: "comma-separated Origin values allowed to open /ws (browsers send one; default: none)", parse: list, default: [] },
  { flags: "--nack-delay <ms>", env: "UPTRAKIT_NACK_DELAY", help: "redelivery delay after a nack without delayMs", parse: durationIn(0, 86_400_000), default: 1000 },
  { flags: "--max-frame-bytes <n>", env: "UPTRAKIT_MAX_FRAME_BYTES", help: "largest frame accepted from the controller", parse: integer(1024, 64 * 1024 * 1024), default: 1_048_576 },
  { flags: "--outbox-max <n>", env: "UPTRAKIT_OUTBOX_MAX", help: "publishes queued while NATS is unreachable before new ones get 'unavailable'", parse: integer(0, 10_000_000), default: 100_000 },
  { flags: "--drain-timeout <ms>", env: "UPTRAKIT_DRAIN_TIMEOUT", help: "on SIGTERM, how long to wait for in-flight deliveries to be acked", parse: durationIn(0, 600_000), default: 10_000 },
];

function addOptions(cmd: Command, specs: OptionSpec[]): Command {
  for (const s of specs) {
    const o = new Option(s.flags, s.help).env(s.env);
    if (s.parse) o.argParser(s.parse as (value: string, previous: unknown) => unknown);
    if (s.choices) o.choices(s.choices);
    if (s.default !== undefined) o.default(s.default, s.defaultText);
    else if (s.defaultText) o.default(undefined, s.defaultText);
    cmd.addOption(o);
  }
  return cmd;
}

export const addConnectionOptions = (cmd: Command): Command => addOptions(cmd, CONNECTION_OPTIONS);
export const addRunOptions = (cmd: Command): Command => addOptions(addConnectionOptions(cmd), RUN_OPTIONS);

/** Every env var the relay reads, for docs and for the deploy-file test. */
export const ENV_VARS: string[] = [...CONNECTION_OPTIONS, ...RUN_OPTIONS].map((s) => s.env);

/** Turns commander's parsed options into the one typed config. */
export function toRelayConfig(o: Record<string, unknown>): RelayConfig {
  const dataDir = path.resolve(String(o.dataDir ?? "./.uptrakit"));
  const l = (o.listen as { host: string; port: number } | undefined) ?? { host: "127.0.0.1", port: 4380 };
  const str = (v: unknown): string | undefined => (typeof v === "string" && v !== "" ? v : undefined);
  return {
    natsUrls: (o.natsUrl as string[] | undefined) ?? [],
    busFile: path.resolve(dataDir, (o.bus as string | undefined) ?? "bus.db"),
    instanceId: (o.instanceId as string | undefined) ?? defaultInstanceId(),
    listenHost: l.host,
    listenPort: l.port,
    dataDir,
    token: str(o.token),
    allowOrigins: (o.allowOrigin as string[] | undefined) ?? [],
    ackWaitMs: (o.ackWait as number | undefined) ?? 30_000,
    maxDeliver: (o.maxDeliver as number | undefined) ?? 3,
    nackDelayMs: (o.nackDelay as number | undefined) ?? 1000,
    stream: (o.stream as string | undefined) ?? "UPTRAKIT_PUSH",
    replicas: (o.replicas as number | undefined) ?? 1,
    maxAgeMs: (o.maxAge as number | undefined) ?? 86_400_000,
    maxInFlight: (o.maxInFlight as number | undefined) ?? 256,
    maxFrameBytes: (o.maxFrameBytes as number | undefined) ?? 1_048_576,
    outboxMax: (o.outboxMax as number | undefined) ?? 100_000,
    drainTimeoutMs: (o.drainTimeout as number | undefined) ?? 10_000,
    logLevel: (o.logLevel as string | undefined) ?? "info",
    natsAuth: {
      user: str(o.natsUser),
      pass: str(o.natsPass),
      token: str(o.natsToken),
      nkeySeedFile: str(o.natsNkeySeedFile),
      credsFile: str(o.natsCreds),
      tlsCa: str(o.natsTlsCa),
      tlsCert: str(o.natsTlsCert),
      tlsKey: str(o.natsTlsKey),
    },
  };
}

/** A consumer outlives its controller for at least the retention, so a relay down for a while keeps its place. */
export function inactiveThresholdMs(cfg: Pick<RelayConfig, "maxAgeMs">): number {
  return Math.max(cfg.maxAgeMs * 2, 3_600_000);
}
