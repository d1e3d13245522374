// The JetStream bus's connection to NATS, and the state its parts share through it: connecting
// (connection and auth options; a failure says what to fix), the status the bus reports, the
// watcher that turns nats.js's connection events into that status, and the socket cork. The
// publish path (jetstream-publish.ts) and the consume loop (jetstream-consume.ts) are each handed
// this one object instead of reaching into each other; what they must hear of the connection's
// events comes to them through ConnectionEvents.

import fs from "node:fs";
import {
  connect,
  credsAuthenticator,
  errors as natsErrors,
  nkeyAuthenticator,
  type Authenticator,
  type NatsConnection,
  type NodeConnectionOptions,
} from "@nats-io/transport-node";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import type { NatsAuth } from "../config.js";
import { redactUrl } from "../redact.js";
import type { Logger } from "../log.js";
import { BusStartError, type BusSettings, type BusStatus } from "./bus.js";
import { describe, isAuthError, isTlsError } from "./jetstream-errors.js";
import { NatsFastPaths } from "./nats-internals.js";

export type JetStreamBusOptions = BusSettings & {
  urls: string[];
  replicas: number;
  auth: NatsAuth;
  logger: Logger;
  /** false: nats.js's public API only (--fast-paths off). */
  fastPaths?: boolean;
};

/** An unreachable server must fail the connect within this. */
const CONNECT_TIMEOUT_MS = 5_000;
/**
 * Silent partitions (a dead route drops packets without closing anything): nats.js pings every
 * PING_INTERVAL_MS and gives the connection up after MAX_PINGS_OUT unanswered pings (its
 * defaults, 2 min and 2, would take minutes). A PubAck timeout also triggers a probe at once.
 */
const PING_INTERVAL_MS = 2_000;
const MAX_PINGS_OUT = 3;

const encoder = new TextEncoder();

/** What the connection watcher hands on to the other parts (see watch()). */
export interface ConnectionEvents {
  /** nats.js found the connection stale (unanswered pings): nothing will answer what waits on it. */
  stale(): void;
  /** nats.js reconnected after start() succeeded: the stream and consumer may be gone. */
  reconnected(): void;
  /** The server refused something this connection did (its user lacks the permission). */
  permissionViolation(err: InstanceType<typeof natsErrors.PermissionViolationError>): void;
}

export class JetStreamConnection {
  readonly opts: JetStreamBusOptions;
  readonly log: Logger;
  /** The servers, without credentials, for messages. */
  readonly where: string;
  /** The shortcuts through nats.js internals, each checked before use (relay/bus/nats-internals.ts). */
  readonly fast: NatsFastPaths;
  nc?: NatsConnection;
  js?: JetStreamClient;
  jsm?: JetStreamManager;
  /** The bus's status: read it; change it through setStatus() only. */
  current: BusStatus = { state: "disconnected", reason: "not started" };
  /** close() has begun. */
  closing = false;
  /** Set while the stream or this consumer is found missing and being recreated (not ready). */
  missing: string | undefined;
  /** The last probe went unanswered: disconnected until one is answered or nats.js reconnects. */
  cutOff = false;
  private readonly listeners = new Set<(s: BusStatus) => void>();
  private natsCorked = false;

  constructor(opts: JetStreamBusOptions) {
    this.opts = opts;
    this.log = opts.logger.child({ bus: "jetstream" });
    // Config hands over URLs without credentials (secrets.ts); redacting again costs nothing and
    // keeps any other caller's `nats://user:pass@` out of every message built on `where`.
    this.where = opts.urls.map(redactUrl).join(", ");
    this.fast = new NatsFastPaths({ enabled: opts.fastPaths !== false, logger: this.log, onState: (path, state) => opts.hooks?.fastPath?.(path, state) });
  }

  // ---- connecting -----------------------------------------------------------------------------

  /** A new connection with the relay's connection and auth options; rejects with BusStartError. */
  async connect(purpose?: string): Promise<NatsConnection> {
    const options: NodeConnectionOptions = {
      servers: this.opts.urls,
      name: `uptrakit-relay/${this.opts.instanceId}${purpose ? `/${purpose}` : ""}`,
      // A relay rides out any outage: it never gives up reconnecting.
      maxReconnectAttempts: -1,
      pingInterval: PING_INTERVAL_MS,
      maxPingOut: MAX_PINGS_OUT,
      timeout: CONNECT_TIMEOUT_MS,
      ...this.authOptions(),
    };
    try {
      return await connect(options);
    } catch (err) {
      if (isAuthError(err)) throw new BusStartError(`NATS at ${this.where} refused the credentials: ${describe(err)}`, { cause: err });
      if (isTlsError(err))
        throw new BusStartError(
          `TLS with NATS at ${this.where} failed: ${describe(err)} (is the server's certificate signed by the CA in --nats-tls-ca, and issued for this host name?)`,
          { cause: err },
        );
      const a = this.opts.auth;
      // With TLS 1.3 a server that requires a client certificate drops a client without one only
      // after the handshake, and nats.js then reports nothing but a timeout.
      const hint =
        err instanceof natsErrors.TimeoutError && (a.tlsCa || a.tlsCert) && !(a.tlsCert && a.tlsKey)
          ? " (if the server requires a client certificate, give it with --nats-tls-cert and --nats-tls-key)"
          : "";
      throw new BusStartError(`cannot reach NATS at ${this.where}: ${describe(err)}${hint}`, { cause: err });
    }
  }

  /** Connection options from NatsAuth; unreadable key files are start-up errors that name the file. */
  private authOptions(): Partial<NodeConnectionOptions> {
    const a = this.opts.auth;
    const o: Partial<NodeConnectionOptions> = {};
    const authenticators: Authenticator[] = [];
    if (a.user !== undefined) {
      o.user = a.user;
      o.pass = a.pass ?? "";
    }
    if (a.token !== undefined) o.token = a.token;
    if (a.nkeySeedFile) {
      const seed = readAuthFile(a.nkeySeedFile, "NKey seed file").toString("utf8").trim();
      authenticators.push(nkeyAuthenticator(encoder.encode(seed)));
    }
    if (a.credsFile) authenticators.push(credsAuthenticator(readAuthFile(a.credsFile, "creds file")));
    if (authenticators.length > 0) o.authenticator = authenticators;
    if (a.tlsCa || a.tlsCert || a.tlsKey) {
      o.tls = {};
      // nats.js would report a missing file as a connection failure: name the file instead.
      if (a.tlsCa) o.tls.caFile = checkReadable(a.tlsCa, "TLS CA file");
      if (a.tlsCert) o.tls.certFile = checkReadable(a.tlsCert, "TLS client certificate");
      if (a.tlsKey) o.tls.keyFile = checkReadable(a.tlsKey, "TLS client key");
    }
    return o;
  }

  // ---- connection status ----------------------------------------------------------------------

  /** Follows the bus's connection: its events become the bus's status (and `events`). */
  watch(nc: NatsConnection, events: ConnectionEvents): void {
    void (async () => {
      for await (const s of nc.status()) {
        switch (s.type) {
          case "disconnect":
            this.setStatus({ state: "disconnected", reason: `lost connection to ${s.server}` });
            break;
          case "reconnecting":
            if (this.current.state !== "disconnected") this.setStatus({ state: "disconnected", reason: "reconnecting" });
            break;
          case "staleConnection":
            this.opts.hooks?.connectionStale?.("no PONG");
            events.stale();
            this.setStatus({ state: "disconnected", reason: `no answer from NATS to ${MAX_PINGS_OUT} pings (silent partition?); reconnecting` });
            break;
          case "reconnect":
            this.cutOff = false;
            // Only after start() succeeded: before that, start() decides the status.
            if (this.js) {
              if (!this.missing) this.setStatus({ state: "connected" });
              // A server that came back with an empty store has lost the stream and the consumer.
              events.reconnected();
            }
            this.log.info({ server: s.server }, "reconnected to NATS");
            break;
          case "ldm":
            this.log.warn({ server: s.server }, "NATS server entering lame duck mode");
            break;
          case "error":
            if (s.error instanceof natsErrors.PermissionViolationError) events.permissionViolation(s.error);
            else this.log.warn({ err: describe(s.error) }, "NATS connection error");
            break;
          case "close":
            this.setStatus({ state: "closed", reason: "connection closed" });
            break;
          default:
            break;
        }
      }
    })().catch((err) => this.log.debug({ err: describe(err) }, "status watcher ended"));
    void nc.closed().then((err) => {
      this.setStatus({ state: "closed", reason: err ? describe(err) : "connection closed" });
    });
  }

  setStatus(s: BusStatus): void {
    if (this.current.state === "closed") return; // final
    if (this.current.state === s.state && this.current.reason === s.reason) return;
    this.current = s;
    if (s.state !== "connected") this.log.info({ state: s.state, reason: s.reason }, "bus status changed");
    for (const l of this.listeners) {
      try {
        l(s);
      } catch (err) {
        this.log.error({ err: describe(err) }, "bus status listener threw");
      }
    }
  }

  status(): BusStatus {
    return { ...this.current };
  }

  onStatus(listener: (s: BusStatus) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  // ---- the socket -----------------------------------------------------------------------------

  /**
   * Holds the NATS socket's writes until the end of this event-loop turn. nats.js writes once per
   * microtask checkpoint, i.e. once per WebSocket read or NATS read that led to a publish or an
   * ack; corking merges all of them from one turn into one writev. (The socket is nats.js's own:
   * the socket-cork fast path; without it this is a no-op.)
   */
  cork(): void {
    if (this.natsCorked) return;
    const socket = this.fast.socket(this.nc);
    if (!socket || typeof socket.cork !== "function" || socket.destroyed) return;
    this.natsCorked = true;
    socket.cork();
    setImmediate(() => {
      this.natsCorked = false;
      socket.uncork();
    });
  }
}

function readAuthFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new BusStartError(`cannot read the NATS ${what} ${file}: ${describe(err)}`, { cause: err });
  }
}

function checkReadable(file: string, what: string): string {
  try {
    fs.accessSync(file, fs.constants.R_OK);
  } catch (err) {
    throw new BusStartError(`cannot read the NATS ${what} ${file}: ${describe(err)}`, { cause: err });
  }
  return file;
}
