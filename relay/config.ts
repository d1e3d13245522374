// Every setting of the relay, parsed in one place: command-line flag first, then its
// UPTRAKIT_* env var, then the default. One table (OPTIONS) states each option once: flag, env
// var, parser, default and help; commander's options, the parsed RelayConfig and the README's
// table are all derived from it. An invalid value stops the relay with a message naming the
// option (commander reports it).

import os from "node:os";
import path from "node:path";
import { InvalidArgumentError, Option, type Command } from "commander";
import { ConfigError, parseNatsServers, resolveSecret, type NatsServers } from "./secrets.js";

export { ConfigError } from "./secrets.js";

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
  readiness: Readiness;
  logLevel: string;
  natsAuth: NatsAuth;
  /** false: the JetStream bus uses nats.js's public API only (relay/bus/nats-internals.ts). */
  fastPaths: boolean;
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
  // The id names this instance's durable consumer, travels in a header and is a token of every
  // subject it publishes on (uptrakit.push.<id>.<kind>): no dots, wildcards or spaces.
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(value))
    throw new InvalidArgumentError(
      "expected 1-64 characters of letters, digits, '_' or '-' (it becomes a NATS subject token, so no '.', '*', '>' or spaces)",
    );
  return value;
}

function streamName(value: string): string {
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(value))
    throw new InvalidArgumentError("expected 1-64 characters of letters, digits, '_' or '-'");
  return value;
}

/** What /readyz answers while the bus is down (see relay/readiness.ts). */
export type Readiness = "degraded" | "strict";
const READINESS_MODES: readonly Readiness[] = ["degraded", "strict"];

const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];

function list(value: string): string[] {
  return value.split(",").map((s) => s.trim()).filter(Boolean);
}

/** The host name made into a valid instance id (a Kubernetes pod name already is one). */
export function defaultInstanceId(): string {
  const h = os.hostname().replace(/[^A-Za-z0-9_-]/g, "-").slice(0, 64);
  return h || "relay";
}


function oneOf(choices: readonly string[]) {
  return (value: string): string => {
    if (!choices.includes(value)) throw new InvalidArgumentError(`Allowed choices are ${choices.join(", ")}.`);
    return value;
  };
}

const text = (value: string): string => value;

/** --nats-url: the URLs without credentials, and the credentials they carried (see secrets.ts). */
function natsServers(value: string): NatsServers {
  try {
    return parseNatsServers(value);
  } catch (err) {
    if (err instanceof ConfigError) throw new InvalidArgumentError(err.message);
    throw err;
  }
}

// ---- the option table: every option once, with its default -------------------------------------

interface OptionEntry<T> {
  flags: string;
  env: string;
  /** Markdown, as in the README's table; --help shows it without the markup. */
  help: string;
  parse: (value: string) => T;
  default?: T;
  /** Markdown: how the default reads when the value itself says little, or when it is computed. */
  defaultText?: string;
  /** Only `run` takes it (the local server and the delivery path); the others also `stream info`. */
  runOnly?: boolean;
}

interface OptionWithDefault<T> extends OptionEntry<T> {
  default: T;
}

// Overloads keep in the type whether an entry has a default, so that its parsed value is T, not T | undefined.
function option<T>(e: OptionWithDefault<T>): OptionWithDefault<T>;
function option<T>(e: OptionEntry<T>): OptionEntry<T>;
function option<T>(e: OptionEntry<T>): OptionEntry<T> {
  return e;
}

/**
 * Every option of the relay, in the order of --help and of the README's table. Each key is
 * commander's name for the option (the long flag in camelCase), checked by test/config.test.ts.
 * A default that depends on another option (--bus, --instance-id) is computed in toRelayConfig
 * and only described here.
 */
const OPTIONS = {
  natsUrl: option({
    flags: "--nats-url <urls>",
    env: "UPTRAKIT_NATS_URL",
    help: "NATS server URL(s), comma-separated for a cluster; may carry credentials (`nats://user:pass@host:4222`, `nats://token@host:4222`, see *Secrets*). Without it the embedded SQLite bus is used",
    parse: natsServers,
  }),
  bus: option({
    flags: "--bus <spec>",
    env: "UPTRAKIT_BUS",
    help: "the embedded bus file as `sqlite:<file>` (ignored with `--nats-url`)",
    parse: busSpec,
    defaultText: "`sqlite:<data-dir>/bus.db`",
  }),
  instanceId: option({
    flags: "--instance-id <id>",
    env: "UPTRAKIT_INSTANCE_ID",
    help: "this relay's identity: the *origin* of what it publishes and its consumer's name (1-64 letters, digits, `_`, `-`)",
    parse: instanceId,
    defaultText: "the host name (the pod name in Kubernetes)",
  }),
  listen: option({
    flags: "--listen <host:port>",
    env: "UPTRAKIT_RELAY_LISTEN",
    help: "the controller-facing server (`/ws`, `/healthz`, `/readyz`, `/metrics`, and the status page `/` with `/status.json`)",
    parse: listen,
    default: { host: "127.0.0.1", port: 4380 },
    defaultText: "`127.0.0.1:4380`",
    runOnly: true,
  }),
  dataDir: option({
    flags: "--data-dir <dir>",
    env: "UPTRAKIT_DATA_DIR",
    help: "the relay's own store: outbox and dead letters (`relay.db`)",
    parse: text,
    default: "./.uptrakit",
  }),
  token: option({
    flags: "--token <secret>",
    env: "UPTRAKIT_RELAY_TOKEN",
    help: "require `Authorization: Bearer <secret>` on the WebSocket upgrade (else HTTP 401) and for the status page (`/`, `/status.json`)",
    parse: text,
    runOnly: true,
  }),
  tokenFile: option({
    flags: "--token-file <file>",
    env: "UPTRAKIT_RELAY_TOKEN_FILE",
    help: "`--token` read from a file (one trailing newline ignored)",
    parse: text,
    runOnly: true,
  }),
  allowOrigin: option({
    flags: "--allow-origin <origins>",
    env: "UPTRAKIT_ALLOW_ORIGIN",
    help: "comma-separated `Origin` values allowed to open `/ws`; any other Origin gets HTTP 403",
    parse: list,
    default: [],
    defaultText: "none",
    runOnly: true,
  }),
  ackWait: option({
    flags: "--ack-wait <ms>",
    env: "UPTRAKIT_ACK_WAIT",
    help: "how long a delivery may stay unacked before it is redelivered",
    parse: durationIn(100, 3_600_000),
    default: 30_000,
  }),
  maxDeliver: option({
    flags: "--max-deliver <n>",
    env: "UPTRAKIT_MAX_DELIVER",
    help: "delivery attempts before a message becomes a dead letter",
    parse: integer(1, 100),
    default: 3,
  }),
  nackDelay: option({
    flags: "--nack-delay <ms>",
    env: "UPTRAKIT_NACK_DELAY",
    help: "redelivery delay after a `nack` without `delayMs`",
    parse: durationIn(0, 86_400_000),
    default: 1000,
    runOnly: true,
  }),
  maxInFlight: option({
    flags: "--max-in-flight <n>",
    env: "UPTRAKIT_MAX_IN_FLIGHT",
    help: "deliveries awaiting the controller's ack at once (backpressure)",
    parse: integer(1, 10_000),
    default: 256,
  }),
  stream: option({
    flags: "--stream <name>",
    env: "UPTRAKIT_STREAM",
    help: "JetStream stream name (subjects `uptrakit.push.>`)",
    parse: streamName,
    default: "UPTRAKIT_PUSH",
  }),
  replicas: option({
    flags: "--replicas <n>",
    env: "UPTRAKIT_STREAM_REPLICAS",
    help: "stream replicas (`3` on a 3-node cluster)",
    parse: integer(1, 5),
    default: 1,
  }),
  maxAge: option({
    flags: "--max-age <duration>",
    env: "UPTRAKIT_MAX_AGE",
    help: "stream retention",
    parse: durationIn(1000, 365 * 86_400_000),
    default: 86_400_000,
    defaultText: "`24h`",
  }),
  maxFrameBytes: option({
    flags: "--max-frame-bytes <n>",
    env: "UPTRAKIT_MAX_FRAME_BYTES",
    help: "largest frame accepted from the controller (`frame_too_large` beyond)",
    parse: integer(1024, 64 * 1024 * 1024),
    default: 1_048_576,
    runOnly: true,
  }),
  outboxMax: option({
    flags: "--outbox-max <n>",
    env: "UPTRAKIT_OUTBOX_MAX",
    help: "publishes queued while NATS is unreachable; beyond, `unavailable`",
    parse: integer(0, 10_000_000),
    default: 100_000,
    runOnly: true,
  }),
  drainTimeout: option({
    flags: "--drain-timeout <ms>",
    env: "UPTRAKIT_DRAIN_TIMEOUT",
    help: "on SIGTERM, how long to wait for in-flight deliveries to be acked, then for the outbox to reach the bus",
    parse: durationIn(0, 600_000),
    default: 10_000,
    runOnly: true,
  }),
  readiness: option({
    flags: "--readiness <mode>",
    env: "UPTRAKIT_RELAY_READINESS",
    help: "what `/readyz` says while the bus is down: `degraded` (200 with `\"status\":\"degraded\"` while publishes can still be taken into the outbox; 503 only when they cannot) or `strict` (503 whenever the bus is not connected); see deploy/README.md",
    parse: (v: string) => oneOf(READINESS_MODES)(v) as Readiness,
    default: "degraded" as Readiness,
    runOnly: true,
  }),
  logLevel: option({
    flags: "--log-level <level>",
    env: "UPTRAKIT_LOG_LEVEL",
    help: `${LOG_LEVELS.slice(0, -1).map((l) => `\`${l}\``).join(", ")} or \`silent\``,
    parse: oneOf(LOG_LEVELS),
    default: "info",
  }),
  fastPaths: option({
    flags: "--fast-paths <mode>",
    env: "UPTRAKIT_RELAY_FAST_PATHS",
    help: "`on` or `off`; `off`: nats.js's public API only, none of the relay's shortcuts through its internals (each is checked at start-up and falls back on its own)",
    parse: oneOf(["on", "off"]),
    default: "on",
  }),
  natsUser: option({ flags: "--nats-user <user>", env: "UPTRAKIT_NATS_USER", help: "NATS user name", parse: text }),
  natsPass: option({ flags: "--nats-pass <password>", env: "UPTRAKIT_NATS_PASS", help: "NATS password (with `--nats-user`)", parse: text }),
  natsPassFile: option({
    flags: "--nats-pass-file <file>",
    env: "UPTRAKIT_NATS_PASS_FILE",
    help: "`--nats-pass` read from a file (one trailing newline ignored)",
    parse: text,
  }),
  natsToken: option({ flags: "--nats-token <token>", env: "UPTRAKIT_NATS_TOKEN", help: "NATS auth token", parse: text }),
  natsTokenFile: option({
    flags: "--nats-token-file <file>",
    env: "UPTRAKIT_NATS_TOKEN_FILE",
    help: "`--nats-token` read from a file (one trailing newline ignored)",
    parse: text,
  }),
  natsNkeySeedFile: option({ flags: "--nats-nkey-seed-file <file>", env: "UPTRAKIT_NATS_NKEY_SEED_FILE", help: "NKey seed file", parse: text }),
  natsCreds: option({ flags: "--nats-creds <file>", env: "UPTRAKIT_NATS_CREDS", help: "NATS `.creds` file (JWT + seed)", parse: text }),
  natsTlsCa: option({ flags: "--nats-tls-ca <file>", env: "UPTRAKIT_NATS_TLS_CA", help: "CA certificate to verify the NATS server", parse: text }),
  natsTlsCert: option({ flags: "--nats-tls-cert <file>", env: "UPTRAKIT_NATS_TLS_CERT", help: "client certificate for NATS mutual TLS", parse: text }),
  natsTlsKey: option({ flags: "--nats-tls-key <file>", env: "UPTRAKIT_NATS_TLS_KEY", help: "client key for NATS mutual TLS", parse: text }),
};

type Options = typeof OPTIONS;
export type OptionKey = keyof Options;
type ValueOf<E> = E extends OptionWithDefault<infer T> ? T : E extends OptionEntry<infer T> ? T | undefined : never;
/** What the option table parses to, each value typed by its entry's parser. */
export type OptionValues = { [K in OptionKey]: ValueOf<Options[K]> };

const ENTRIES: Array<[OptionKey, OptionEntry<unknown>]> = Object.entries(OPTIONS).map(([k, e]) => [k as OptionKey, e]);

/** Markdown to plain text for --help. */
const plain = (md: string): string => md.replace(/[`*]/g, "");

/** The commander Option of one table entry. */
export function makeOption(key: OptionKey): Option {
  const e: OptionEntry<unknown> = OPTIONS[key];
  const o = new Option(e.flags, plain(e.help)).env(e.env).argParser(e.parse);
  if (e.default !== undefined || e.defaultText) o.default(e.default, e.defaultText && plain(e.defaultText));
  return o;
}

function addOptions(cmd: Command, keys: OptionKey[]): Command {
  for (const k of keys) cmd.addOption(makeOption(k));
  return cmd;
}

const ALL_KEYS = ENTRIES.map(([k]) => k);
/** Options shared by every subcommand that talks to the bus (run, stream info). */
export const addConnectionOptions = (cmd: Command): Command => addOptions(cmd, ENTRIES.filter(([, e]) => !e.runOnly).map(([k]) => k));
/** Every option, for `run`. */
export const addRunOptions = (cmd: Command): Command => addOptions(cmd, ALL_KEYS);

/** Every env var the relay reads, for docs and for the deploy-file test. */
export const ENV_VARS: string[] = ENTRIES.map(([, e]) => e.env);

/** The commander attribute name of each entry's long flag (test/config.test.ts checks it is the key). */
export const optionKeys = (): Array<{ key: OptionKey; attribute: string }> =>
  ENTRIES.map(([key, e]) => ({ key, attribute: new Option(e.flags).attributeName() }));

/** The README's option table, rendered from the entries. */
export function renderOptionsTable(): string {
  const rows = ENTRIES.map(([, e]) => {
    const dflt = e.defaultText ?? (e.default !== undefined ? `\`${String(e.default)}\`` : "—");
    return `| \`${e.flags}\` | \`${e.env}\` | ${dflt} | ${e.help} |`;
  });
  return ["| option | env var | default | meaning |", "| --- | --- | --- | --- |", ...rows].join("\n") + "\n";
}

// ---- from parsed options to the one typed config ------------------------------------------------

/** How messages name an option: "--token / UPTRAKIT_RELAY_TOKEN". */
const nameOf = (key: OptionKey): string => `${OPTIONS[key].flags.split(" ")[0]} / ${OPTIONS[key].env}`;

/**
 * The given values over the table's defaults. Values come from commander, which ran each entry's
 * parser on them (flags and env vars alike), or are raw strings for text options; an empty
 * string counts as not given, as an empty env var does for most tools.
 */
function withDefaults(given: Record<string, unknown>): OptionValues {
  const values: Record<string, unknown> = {};
  for (const [key, e] of ENTRIES) {
    const v = given[key];
    values[key] = v === undefined || v === "" ? e.default : v;
  }
  return values as OptionValues; // the one cast: each value is its entry's parser's result or default
}

/**
 * Turns commander's parsed options into the one typed config. Reads the `_FILE` secrets; throws
 * ConfigError (naming options and files, never a secret) when they cannot be read or conflict.
 */
export function toRelayConfig(given: Record<string, unknown>): RelayConfig {
  const o = withDefaults(given);
  const dataDir = path.resolve(o.dataDir);
  return {
    natsUrls: o.natsUrl?.urls ?? [],
    busFile: path.resolve(dataDir, o.bus ?? "bus.db"),
    instanceId: o.instanceId ?? defaultInstanceId(),
    listenHost: o.listen.host,
    listenPort: o.listen.port,
    dataDir,
    token: resolveSecret({ value: o.token, file: o.tokenFile, valueName: nameOf("token"), fileName: nameOf("tokenFile") }),
    allowOrigins: [...o.allowOrigin], // a copy: the default [] is the table's own
    ackWaitMs: o.ackWait,
    maxDeliver: o.maxDeliver,
    nackDelayMs: o.nackDelay,
    stream: o.stream,
    replicas: o.replicas,
    maxAgeMs: o.maxAge,
    maxInFlight: o.maxInFlight,
    maxFrameBytes: o.maxFrameBytes,
    outboxMax: o.outboxMax,
    drainTimeoutMs: o.drainTimeout,
    readiness: o.readiness,
    logLevel: o.logLevel,
    natsAuth: natsAuth(o),
    fastPaths: o.fastPaths !== "off",
  };
}

/**
 * NATS credentials come one way: in --nats-url, or as --nats-user/--nats-pass/--nats-token (each
 * by value or by file). Both at once is an error rather than a silent choice between two secrets.
 */
function natsAuth(o: OptionValues): NatsAuth {
  const fromUrl = o.natsUrl?.credentials;
  const explicit = (["natsUser", "natsPass", "natsPassFile", "natsToken", "natsTokenFile"] as const).filter((k) => o[k] !== undefined);
  if (fromUrl && explicit.length > 0)
    throw new ConfigError(`--nats-url carries credentials and ${explicit.map(nameOf).join(", ")} ${explicit.length === 1 ? "is" : "are"} set too: give the NATS credentials one way only`);
  const pass = resolveSecret({ value: o.natsPass, file: o.natsPassFile, valueName: nameOf("natsPass"), fileName: nameOf("natsPassFile") });
  const token = resolveSecret({ value: o.natsToken, file: o.natsTokenFile, valueName: nameOf("natsToken"), fileName: nameOf("natsTokenFile") });
  const files = { nkeySeedFile: o.natsNkeySeedFile, credsFile: o.natsCreds, tlsCa: o.natsTlsCa, tlsCert: o.natsTlsCert, tlsKey: o.natsTlsKey };
  if (fromUrl) return { ...("token" in fromUrl ? { token: fromUrl.token } : { user: fromUrl.user, pass: fromUrl.pass }), ...files };
  return { user: o.natsUser, pass, token, ...files };
}

/** A consumer outlives its controller for at least the retention, so a relay down for a while keeps its place. */
export function inactiveThresholdMs(cfg: Pick<RelayConfig, "maxAgeMs">): number {
  return Math.max(cfg.maxAgeMs * 2, 3_600_000);
}
