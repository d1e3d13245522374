// The JetStream bus: one file-backed stream shared by every relay, one durable pull consumer per
// relay instance. Written for nats-server 2.9 (no 2.10-only features: single filter_subject, no
// consumer metadata, term() without a reason).

import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import {
  connect,
  createInbox,
  credsAuthenticator,
  errors as natsErrors,
  nanos,
  nkeyAuthenticator,
  type Authenticator,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type NodeConnectionOptions,
  type Subscription,
} from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  RetentionPolicy,
  StorageType,
  jetstream,
  jetstreamManager,
  type ConsumerConfig,
  type ConsumerInfo,
  type ConsumerMessages,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  type StreamConfig,
} from "@nats-io/jetstream";
import type { NatsAuth } from "../config.js";
import { redactUrl } from "../redact.js";
import type { Logger } from "../log.js";
import {
  BusStartError,
  BusUnavailableError,
  type Bus,
  type BusMessage,
  type BusSettings,
  type BusStatus,
  type Consumption,
  type InboundMessage,
  type PublishResult,
  type StreamInfo,
} from "./bus.js";
import { JsInbound, type Settler } from "./jetstream-inbound.js";
import { readJetStreamPeers } from "./jetstream-peers.js";
import { backoffMs } from "../clock.js";
import type { Peer } from "../peers.js";
import { SUBJECT_FILTER, ackInfo, publishHeaders, readHeaders, subjectFor, wireCodec } from "./jetstream-wire.js";
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
/** Whole start(): connect, JetStream check, stream, consumer. */
const START_DEADLINE_MS = 15_000;
/** "JetStream not enabled" is also what a cluster answers during a leader election: retry this long. */
const JS_CHECK_WINDOW_MS = 5_000;
/** Each JetStream API request (stream/consumer info, create, update). */
const API_TIMEOUT_MS = 4_000;
/** A publish that gets no PubAck in this time is reported unavailable, so the relay can queue it. */
const PUBLISH_TIMEOUT_MS = 3_000;
/**
 * Silent partitions (a dead route drops packets without closing anything): nats.js pings every
 * PING_INTERVAL_MS and gives the connection up after MAX_PINGS_OUT unanswered pings (its
 * defaults, 2 min and 2, would take minutes). A PubAck timeout also triggers a probe at once.
 */
const PING_INTERVAL_MS = 2_000;
const MAX_PINGS_OUT = 3;
/** A probe (PING/PONG round trip) unanswered this long means the link is cut. */
const PROBE_TIMEOUT_MS = 1_500;
/** While cut off, probe again this often to notice the heal even if nats.js has not reconnected. */
const PROBE_RETRY_MS = 2_000;
const DUPLICATE_WINDOW_MS = 2 * 60_000;
/** Bounded pull batch: the consumer's max_ack_pending is the real in-flight limit. */
const MAX_PULL_BATCH = 1_000;
/**
 * A pull request lives at most one ack wait (nats.js: 1 s to its default 30 s). The server
 * redelivers into pending pull requests, and through a silent partition those are a dead
 * connection: with a pull outliving several ack waits, every redelivery went into the void and
 * counted against max_deliver until the server gave up — messages lost without an arrival to
 * dead-letter (found by npm run chaos). A pull no longer than the ack wait takes at most one.
 */
export function pullExpiresMs(ackWaitMs: number): number {
  return Math.max(1_000, Math.min(30_000, ackWaitMs));
}
/** consume() re-pulls on its own after missed heartbeats; restart it when that keeps failing. */
const HEARTBEATS_MISSED_RESTART = 4;
/** After "consumer deleted", give the server a moment to finish the delete before recreating. */
const RECREATE_DELAY_MS = 1_000;
/** Drain lets pending acks flush; don't let a reconnecting connection hold close() for ever. */
const DRAIN_TIMEOUT_MS = 5_000;

const encoder = new TextEncoder();

interface ConsumeRun {
  stopped: boolean;
  /** Aborted by stop(): cuts short any back-off wait. */
  abort: AbortController;
  messages?: ConsumerMessages;
  /** Set by the status watcher when the current consume() must be replaced. */
  restart?: { reason: string; recreate: boolean };
}

/** A publish awaiting its PubAck (see publish()). */
interface PendingAck {
  resolve(r: PublishResult): void;
  reject(err: Error): void;
  /** Date.now() after which the publish is reported unavailable. */
  deadline: number;
  /** Where it was published: a permissions violation names only the subject (see onPermissionViolation). */
  subject: string;
}

/** How often unanswered publishes are checked against their deadline. */
const ACK_SWEEP_MS = 100;

export class JetStreamBus implements Bus {
  readonly name = "jetstream" as const;

  private readonly opts: JetStreamBusOptions;
  private readonly log: Logger;
  private readonly where: string;
  private nc?: NatsConnection;
  private js?: JetStreamClient;
  private jsm?: JetStreamManager;
  private current: BusStatus = { state: "disconnected", reason: "not started" };
  private readonly listeners = new Set<(s: BusStatus) => void>();
  private readonly runs = new Set<{ run: ConsumeRun; done: Promise<void> }>();
  private closing = false;
  /** Set while the stream or this consumer is found missing and being recreated (not ready). */
  private missing: string | undefined;
  // Pipelined publishing: one wildcard reply subscription for every PubAck, pending publishes
  // keyed by the reply token (in deadline order), one sweep timer for all their timeouts.
  private ackSub?: Subscription;
  private ackPrefix = "";
  private ackSeq = 0;
  private readonly pendingAcks = new Map<string, PendingAck>();
  private ackSweep?: NodeJS.Timeout;
  private natsCorked = false;
  /** A probe is running (see probe()). */
  private probing = false;
  /** The last probe went unanswered: disconnected until one is answered or nats.js reconnects. */
  private cutOff = false;
  /** The shortcuts through nats.js internals, each checked before use (relay/bus/nats-internals.ts). */
  private readonly fast: NatsFastPaths;
  private readonly encodeHeaders: (bytes: Uint8Array) => MsgHdrs | undefined;

  constructor(opts: JetStreamBusOptions) {
    if (opts.urls.length === 0) throw new Error("JetStreamBus needs at least one NATS URL");
    this.opts = opts;
    this.log = opts.logger.child({ bus: "jetstream" });
    // Config hands over URLs without credentials (secrets.ts); redacting again costs nothing and
    // keeps any other caller's `nats://user:pass@` out of every message built on `where`.
    this.where = opts.urls.map(redactUrl).join(", ");
    this.fast = new NatsFastPaths({ enabled: opts.fastPaths !== false, logger: this.log, onState: (path, state) => opts.hooks?.fastPath?.(path, state) });
    this.encodeHeaders = (bytes) => this.fast.encodedHeaders(bytes);
  }

  // ---- start-up -------------------------------------------------------------------------------

  async start(): Promise<void> {
    if (this.nc) return;
    let step = "connecting";
    const run = async (): Promise<void> => {
      const nc = await this.connect();
      this.nc = nc;
      this.watchConnection(nc);
      step = "checking nats.js fast paths";
      await this.fast.check(nc, wireCodec);
      step = "checking JetStream";
      this.jsm = await this.checkJetStream(nc);
      this.js = jetstream(nc, { timeout: API_TIMEOUT_MS });
      this.ackPrefix = createInbox();
      this.ackSub = nc.subscribe(`${this.ackPrefix}.*`, { callback: (err, m) => this.onPubAck(err, m) });
      step = `creating or verifying stream ${this.opts.stream}`;
      await this.ensureStream();
      step = `creating or verifying consumer ${this.opts.instanceId}`;
      await this.ensureConsumer();
    };
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new BusStartError(`NATS at ${this.where} did not finish start-up within ${START_DEADLINE_MS / 1000} s (stuck ${step})`)),
        START_DEADLINE_MS,
      );
    });
    try {
      await Promise.race([run(), deadline]);
    } catch (err) {
      await this.abandon();
      if (err instanceof BusStartError) throw err;
      const hint = isPermissionViolation(err) ? " (this relay's NATS user lacks that permission: see deploy/nats/least-privilege.conf for what a relay needs)" : "";
      throw new BusStartError(`NATS at ${this.where}: ${step} failed: ${describe(err)}${hint}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
    this.setStatus({ state: "connected" });
    this.log.info({ urls: this.opts.urls, stream: this.opts.stream, consumer: this.opts.instanceId }, "JetStream bus started");
  }

  /**
   * A connection of its own with exactly the relay's connection and auth options, for `doctor`
   * (the caller closes it). Rejects with BusStartError as start() would; its cause is the error
   * nats.js gave (see isAuthError).
   */
  diagnosticConnection(): Promise<NatsConnection> {
    return this.connect("doctor");
  }

  /** The stream and consumer configuration this relay would create (for `doctor` to compare). */
  expectedConfig(): { stream: Partial<StreamConfig> & { name: string }; consumer: Partial<ConsumerConfig> } {
    return { stream: this.streamConfig(), consumer: this.consumerConfig() };
  }

  private async connect(purpose?: string): Promise<NatsConnection> {
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

  /**
   * A server without -js answers the JetStream API with "no responders"; so does a cluster while it
   * elects a leader. Retry for a few seconds before calling it a configuration error.
   */
  async checkJetStream(nc: NatsConnection): Promise<JetStreamManager> {
    const jsm = await jetstreamManager(nc, { timeout: API_TIMEOUT_MS, checkAPI: false });
    const until = Date.now() + JS_CHECK_WINDOW_MS;
    for (let attempt = 0; ; attempt++) {
      try {
        await jsm.getAccountInfo();
        return jsm;
      } catch (err) {
        if (!isTransient(err) && !isNotEnabled(err)) throw err;
        if (Date.now() >= until)
          throw new BusStartError(`JetStream is not enabled on the NATS server at ${this.where} (${describe(err)}); start nats-server with -js`, { cause: err });
        this.log.debug({ err: describe(err), attempt }, "JetStream not available yet; retrying");
        await sleep(Math.min(250 * (attempt + 1), 1_000));
      }
    }
  }

  private streamConfig(): Partial<StreamConfig> & { name: string } {
    return {
      name: this.opts.stream,
      subjects: [SUBJECT_FILTER],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.Old,
      max_age: nanos(this.opts.maxAgeMs),
      // The server refuses a duplicate window longer than max_age.
      duplicate_window: nanos(Math.min(DUPLICATE_WINDOW_MS, this.opts.maxAgeMs)),
      num_replicas: this.opts.replicas,
    };
  }

  /** Creates the stream, or verifies it; many relays may race here on a fresh server. */
  private async ensureStream(): Promise<void> {
    const jsm = this.jsm!;
    const want = this.streamConfig();
    try {
      await retryTransient(() => jsm.streams.add({ ...want }));
      this.log.debug({ stream: want.name }, "stream created or already identical");
      return;
    } catch (err) {
      if (/subjects overlap/i.test(describe(err)))
        throw new BusStartError(
          `cannot create stream ${want.name} on NATS at ${this.where}: its subject ${SUBJECT_FILTER} overlaps another stream's (${describe(err)}); remove that stream or narrow its subjects`,
          { cause: err },
        );
      // Exists with another config (or created by a racing relay a moment ago): look and decide.
      if (!/already in use/i.test(describe(err)))
        throw new BusStartError(`cannot create stream ${want.name} on NATS at ${this.where}: ${describe(err)}`, { cause: err });
    }
    await this.reconcileStream(want);
  }

  private async reconcileStream(want: Partial<StreamConfig> & { name: string }): Promise<void> {
    const jsm = this.jsm!;
    const have = (await retryTransient(() => jsm.streams.info(want.name))).config;
    const fatal: string[] = [];
    if (!sameSet(have.subjects ?? [], want.subjects!)) fatal.push(`subjects are [${(have.subjects ?? []).join(", ")}], not [${SUBJECT_FILTER}]`);
    if (have.storage !== want.storage) fatal.push(`storage is ${have.storage}, not ${want.storage}`);
    if (have.retention !== want.retention) fatal.push(`retention is ${have.retention}, not ${want.retention}`);
    if (fatal.length > 0)
      throw new BusStartError(
        `stream ${want.name} on NATS at ${this.where} exists with an incompatible configuration: ${fatal.join("; ")}. Use another --stream name or delete that stream`,
      );

    // Retention, replicas and the duplicate window follow the relay's settings (a deliberate update).
    const changes: Partial<StreamConfig> = {};
    if (have.max_age !== want.max_age) changes.max_age = want.max_age;
    if (have.duplicate_window !== want.duplicate_window) changes.duplicate_window = want.duplicate_window;
    if (have.num_replicas !== want.num_replicas) changes.num_replicas = want.num_replicas;
    if (have.discard !== want.discard) changes.discard = want.discard;
    if (Object.keys(changes).length === 0) return;
    const before = Object.fromEntries(Object.keys(changes).map((k) => [k, have[k as keyof StreamConfig]]));
    this.log.warn({ stream: want.name, before, after: changes }, "stream exists with different settings; updating it to this relay's settings");
    try {
      await retryTransient(() => jsm.streams.update(want.name, changes));
    } catch (err) {
      throw new BusStartError(`cannot update stream ${want.name} on NATS at ${this.where} to this relay's settings: ${describe(err)}`, { cause: err });
    }
  }

  private consumerConfig(existing?: ConsumerConfig): Partial<ConsumerConfig> {
    return {
      durable_name: this.opts.instanceId,
      ack_policy: AckPolicy.Explicit,
      // The deliver policy of an existing consumer cannot be changed: keep it.
      deliver_policy: existing?.deliver_policy ?? DeliverPolicy.New,
      filter_subject: SUBJECT_FILTER,
      ack_wait: nanos(this.opts.ackWaitMs),
      max_deliver: this.opts.maxDeliver,
      max_ack_pending: this.opts.maxInFlight,
      inactive_threshold: nanos(this.opts.inactiveThresholdMs),
    };
  }

  /**
   * Creates this instance's durable consumer, or brings an existing one to the relay's settings.
   * (On 2.9 re-adding a consumer with another config silently updates it; we do it knowingly.)
   */
  private async ensureConsumer(): Promise<void> {
    const jsm = this.jsm!;
    const { stream, instanceId } = this.opts;
    const existing = await this.consumerInfo();
    const want = this.consumerConfig(existing?.config);
    if (existing) {
      const changed = changedFields(existing.config, want);
      if (changed.length === 0) return;
      this.log.info({ consumer: instanceId, changed }, "consumer exists with different settings; updating it to this relay's settings");
    }
    try {
      await retryTransient(() => jsm.consumers.add(stream, { ...want }));
    } catch (err) {
      throw new BusStartError(`cannot create or update consumer ${instanceId} on stream ${stream} at ${this.where}: ${describe(err)}`, { cause: err });
    }
  }

  private async consumerInfo(jsm: JetStreamManager = this.jsm!): Promise<ConsumerInfo | null> {
    try {
      return await retryTransient(() => jsm.consumers.info(this.opts.stream, this.opts.instanceId));
    } catch (err) {
      if (isConsumerNotFound(err)) return null;
      throw err;
    }
  }

  /** A failed start must not leave a connection reconnecting in the background. */
  private async abandon(): Promise<void> {
    const nc = this.nc;
    this.nc = this.js = this.jsm = this.ackSub = undefined;
    this.failPendingAcks("start failed");
    this.setStatus({ state: "disconnected", reason: "start failed" });
    await nc?.close().catch(() => undefined);
  }

  // ---- connection status ----------------------------------------------------------------------

  private watchConnection(nc: NatsConnection): void {
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
            this.failPendingAcks("the connection went stale");
            this.setStatus({ state: "disconnected", reason: `no answer from NATS to ${MAX_PINGS_OUT} pings (silent partition?); reconnecting` });
            break;
          case "reconnect":
            this.cutOff = false;
            // Only after start() succeeded: before that, start() decides the status.
            if (this.js) {
              if (!this.missing) this.setStatus({ state: "connected" });
              // A server that came back with an empty store has lost the stream and the consumer.
              void this.checkTopology();
            }
            this.log.info({ server: s.server }, "reconnected to NATS");
            break;
          case "ldm":
            this.log.warn({ server: s.server }, "NATS server entering lame duck mode");
            break;
          case "error":
            if (s.error instanceof natsErrors.PermissionViolationError) this.onPermissionViolation(s.error);
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

  private setStatus(s: BusStatus): void {
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

  // ---- publishing -----------------------------------------------------------------------------

  /**
   * What js.publish() does, pipelined: the message goes out with a reply subject under one
   * wildcard subscription, and the PubAck settles it (onPubAck). nats.js's request() would
   * build a promise, a timer and two Error objects (stack traces) per message, which dominated
   * the relay's CPU profile; here a publish costs a map entry, and one sweep timer handles
   * every timeout. Semantics are unchanged: resolves on the PubAck (durable), Nats-Msg-Id
   * deduplicates, no answer within PUBLISH_TIMEOUT_MS or a 503 is BusUnavailableError.
   */
  publish(msg: BusMessage): Promise<PublishResult> {
    const nc = this.nc;
    // While reconnecting, nats.js would buffer the message and time out later: fail fast instead.
    if (!nc || !this.js || !this.ackSub || this.current.state !== "connected")
      return Promise.reject(
        new BusUnavailableError(`JetStream bus is ${this.current.state}${this.current.reason ? ` (${this.current.reason})` : ""}`),
      );
    const h = publishHeaders(msg, this.fast.on("header-encode") ? this.encodeHeaders : undefined);
    const token = (this.ackSeq++).toString(36);
    const subject = subjectFor(msg.origin, msg.kind);
    return new Promise<PublishResult>((resolve, reject) => {
      this.pendingAcks.set(token, { resolve, reject, deadline: Date.now() + PUBLISH_TIMEOUT_MS, subject });
      this.corkNats();
      try {
        nc.publish(subject, Buffer.from(msg.payloadJson), { headers: h, reply: `${this.ackPrefix}.${token}` });
      } catch (err) {
        this.pendingAcks.delete(token);
        reject(
          isTransient(err) ? new BusUnavailableError(`JetStream did not take the message: ${describe(err)}`, { cause: err }) : err,
        );
        return;
      }
      if (!this.ackSweep) this.ackSweep = setInterval(() => this.sweepAcks(), ACK_SWEEP_MS);
    });
  }

  /** A PubAck (or a no-responders status) for one pending publish. */
  private onPubAck(err: Error | null, m: Msg): void {
    if (err) {
      // The subscription itself failed (e.g. a permissions violation): pending publishes time out.
      this.log.warn({ err: describe(err) }, "PubAck subscription error");
      return;
    }
    const token = m.subject.slice(this.ackPrefix.length + 1);
    const p = this.pendingAcks.get(token);
    if (!p) return; // answered after its timeout
    this.pendingAcks.delete(token);
    const code = m.headers?.code ?? 0;
    if (m.data.length === 0 && code >= 300) {
      // 503 "no responders": no stream listens on the subject (JetStream down, or an election).
      p.reject(new BusUnavailableError(`JetStream did not take the message: ${code === 503 ? "no responders" : `status ${code}`}`));
      return;
    }
    let ack: { stream?: string; duplicate?: boolean; error?: { code?: number; err_code?: number; description?: string } };
    try {
      ack = JSON.parse(m.string()) as typeof ack;
    } catch {
      p.reject(new Error("JetStream sent an unreadable PubAck"));
      return;
    }
    if (ack.error) {
      const what = `${ack.error.description ?? "error"} (code ${ack.error.code ?? "?"}, err_code ${ack.error.err_code ?? "?"})`;
      // 503: JetStream is temporarily unavailable (a leader election): queue and retry.
      p.reject(ack.error.code === 503 ? new BusUnavailableError(`JetStream did not take the message: ${what}`) : new Error(`JetStream refused the message: ${what}`));
      return;
    }
    if (!ack.stream) {
      p.reject(new Error("JetStream sent an invalid PubAck (no stream)"));
      return;
    }
    p.resolve({ duplicate: ack.duplicate === true });
  }

  /**
   * The server refused something this connection did (its user lacks the permission). For a
   * publish the server drops the message and says so on the connection, naming the subject only:
   * it processes a connection's publishes in order, so the violation belongs to the oldest
   * publish still waiting on that subject. That one is refused for good, with the permission in
   * the message, rather than timing out as unavailable and queueing for ever.
   */
  private onPermissionViolation(err: InstanceType<typeof natsErrors.PermissionViolationError>): void {
    this.log.error({ operation: err.operation, subject: err.subject }, "NATS refused an operation: permissions violation (see the NATS user's permissions)");
    if (err.operation !== "publish") return;
    for (const [token, p] of this.pendingAcks) {
      if (p.subject !== err.subject) continue;
      this.pendingAcks.delete(token);
      if (this.pendingAcks.size === 0) this.stopAckSweep();
      p.reject(
        new Error(
          `NATS refused the publish: permissions violation for publish to "${err.subject}" (this relay's NATS user may not publish on it; a relay's user needs publish permission on uptrakit.push.<its --instance-id>.>)`,
        ),
      );
      return;
    }
  }

  /** Fails publishes whose PubAck is overdue; pendingAcks is in deadline order. */
  private sweepAcks(): void {
    const now = Date.now();
    let overdue = 0;
    for (const [token, p] of this.pendingAcks) {
      if (p.deadline > now) break;
      this.pendingAcks.delete(token);
      overdue++;
      p.reject(new BusUnavailableError(`JetStream did not take the message: no PubAck within ${PUBLISH_TIMEOUT_MS} ms`));
    }
    if (this.pendingAcks.size === 0) this.stopAckSweep();
    if (overdue > 0) void this.probe();
  }

  /**
   * Is the server still answering? A PING/PONG round trip within PROBE_TIMEOUT_MS. When it is
   * not, the bus reports itself disconnected at once — publishes go to the outbox instead of
   * each waiting out its PubAck timeout — and reconnects (the reconnect reports it connected).
   */
  private async probe(): Promise<void> {
    const nc = this.nc;
    if (this.probing || !nc || nc.isClosed() || this.closing) return;
    this.probing = true;
    try {
      for (;;) {
        const answered = await Promise.race([nc.flush().then(() => true, () => false), sleep(PROBE_TIMEOUT_MS).then(() => false)]);
        if (this.closing || nc.isClosed() || this.nc !== nc) return;
        if (answered) {
          if (this.cutOff) {
            this.cutOff = false;
            this.log.info("NATS answers again");
            if (!this.missing) this.setStatus({ state: "connected" });
          }
          return;
        }
        if (!this.cutOff) {
          this.cutOff = true;
          this.opts.hooks?.connectionStale?.("no PONG to a probe after a PubAck timeout");
          this.failPendingAcks("NATS does not answer");
          this.setStatus({ state: "disconnected", reason: `no answer from NATS within ${PROBE_TIMEOUT_MS} ms after a PubAck timeout (silent partition?)` });
          // Reconnect, as nats.js does after its missed pings. Probing on over the old connection
          // never sees the heal: PONGs are matched to PINGs in order, and the PINGs lost in the
          // partition are never answered, so every later probe waits behind them — the bus stayed
          // "disconnected" for good and its outbox was never flushed (found by npm run chaos).
          // A new connection also ends the server's pull requests into the dead one.
          void nc.reconnect().catch(() => undefined);
          return;
        }
        await sleep(PROBE_RETRY_MS);
      }
    } finally {
      this.probing = false;
    }
  }

  private stopAckSweep(): void {
    if (this.ackSweep) clearInterval(this.ackSweep);
    this.ackSweep = undefined;
  }

  /** close()/abandon(): nothing will answer the publishes still waiting. */
  private failPendingAcks(reason: string): void {
    const all = [...this.pendingAcks.values()];
    this.pendingAcks.clear();
    this.stopAckSweep();
    for (const p of all) p.reject(new BusUnavailableError(`JetStream did not take the message: ${reason}`));
  }

  // ---- consuming ------------------------------------------------------------------------------

  consume(onMessage: (msg: InboundMessage) => void): Consumption {
    if (!this.js) throw new Error("JetStreamBus.consume() called before start()");
    const run: ConsumeRun = { stopped: false, abort: new AbortController() };
    const done = this.consumeLoop(run, onMessage).catch((err) => this.log.error({ err: describe(err) }, "consume loop failed"));
    const entry = { run, done };
    this.runs.add(entry);
    return {
      stop: async () => {
        this.stopRun(run);
        await entry.done;
        this.runs.delete(entry);
      },
    };
  }

  private stopRun(run: ConsumeRun): void {
    if (run.stopped) return;
    run.stopped = true;
    run.abort.abort();
    // Ends the iteration in consumeLoop, which the caller then awaits.
    run.messages?.stop();
  }



  /** Keeps one consume() going until stopped, replacing it when it breaks. */
  private async consumeLoop(run: ConsumeRun, onMessage: (msg: InboundMessage) => void): Promise<void> {
    const elections = this.watchLeaderElections(run);
    try {
      await this.consumeUntilStopped(run, onMessage);
    } finally {
      elections?.unsubscribe();
    }
  }

  /**
   * In a cluster, a pull request pending on a consumer leader that died is lost without a word:
   * consume() would notice only after two missed heartbeats (30-45 s). The new consumer leader
   * announces itself with an advisory, so re-pull at once. (A new stream leader alone does not
   * break the pull.) Needs subscribe permission on $JS.EVENT.>; without it the heartbeat
   * fallback remains.
   */
  private watchLeaderElections(run: ConsumeRun): Subscription | undefined {
    if (!this.nc || this.nc.isClosed()) return undefined;
    const subject = `$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.${this.opts.stream}.${this.opts.instanceId}`;
    return this.nc.subscribe(subject, {
      callback: (err) => {
        if (err) {
          this.log.warn({ err: describe(err), subject }, "cannot watch consumer leader elections");
          return;
        }
        if (run.messages) this.restartConsume(run, run.messages, "new consumer leader elected", false);
      },
    });
  }

  private async consumeUntilStopped(run: ConsumeRun, onMessage: (msg: InboundMessage) => void): Promise<void> {
    let failures = 0;
    while (!run.stopped && this.nc && !this.nc.isClosed()) {
      const messages = await this.openConsume();
      if (!messages) {
        await this.backoff(run, failures++);
        continue;
      }
      if (run.stopped) {
        // stop() came while consume() was being set up. (close() would wait for an iteration.)
        messages.stop();
        break;
      }
      failures = 0;
      run.messages = messages;
      run.restart = undefined;
      this.watchConsumeStatus(messages, run);
      try {
        // After stop(), what was already pulled is still handed over (the iteration ends after
        // the buffer, where stop() queued its end): the relay parks or hands it back, and it
        // alone can turn a last arrival into a dead letter. Nak'ing it here lost that arrival.
        for await (const m of messages) this.dispatch(m, onMessage);
      } catch (err) {
        this.log.warn({ err: describe(err) }, "consume ended with an error; restarting it");
      }
      run.messages = undefined;
      if (run.stopped) break;
      // Set by the status watcher while we were iterating (TS cannot see that).
      const restart = run.restart as ConsumeRun["restart"];
      if (restart?.recreate) {
        // "consumer deleted" reaches us while the server is still removing it: recreating at once
        // races that removal (2.9 then fails the delete with "directory not empty").
        await this.pause(run, RECREATE_DELAY_MS);
        if (!run.stopped) await this.recreate();
      } else if (!restart) await this.backoff(run, failures++);
    }
  }

  private async openConsume(): Promise<ConsumerMessages | undefined> {
    try {
      const consumer = await this.js!.consumers.get(this.opts.stream, this.opts.instanceId);
      // consume() keeps a pull pending, so a message after long silence arrives at once.
      return await consumer.consume({ max_messages: Math.min(this.opts.maxInFlight, MAX_PULL_BATCH), expires: pullExpiresMs(this.opts.ackWaitMs) });
    } catch (err) {
      if (isConsumerNotFound(err) || isStreamNotFound(err)) {
        this.log.warn({ consumer: this.opts.instanceId }, "consumer is gone; recreating it");
        await this.recreate();
      } else {
        this.log.warn({ err: describe(err) }, "cannot start consuming yet; will retry");
      }
      return undefined;
    }
  }

  /** Ends the current consume() so that consumeLoop opens a new one (after recreating, if asked). */
  private restartConsume(run: ConsumeRun, messages: ConsumerMessages, reason: string, recreate: boolean): void {
    if (run.restart || run.stopped || run.messages !== messages) return;
    this.log.warn({ reason }, "restarting consume");
    run.restart = { reason, recreate };
    if (recreate) this.markMissing(); // not ready from now until recreate() has them back
    messages.stop();
  }

  /** Watches one consume()'s notifications and replaces it when it needs replacing. */
  private watchConsumeStatus(messages: ConsumerMessages, run: ConsumeRun): void {
    const restart = (reason: string, recreate: boolean): void => this.restartConsume(run, messages, reason, recreate);
    void (async () => {
      for await (const s of messages.status()) {
        if (s.type === "next" || s.type === "heartbeat") this.log.trace({ status: s }, "consume status");
        else this.log.debug({ status: s }, "consume status");
        switch (s.type) {
          case "heartbeats_missed":
            this.log.debug({ count: s.count }, "consumer heartbeats missed");
            if (s.count >= HEARTBEATS_MISSED_RESTART) restart(`${s.count} heartbeats missed`, false);
            break;
          case "consumer_not_found":
          case "consumer_deleted":
            restart(s.type.replace("_", " "), true);
            break;
          case "stream_not_found":
            restart("stream not found", true);
            break;
          case "exceeded_limits":
            this.log.warn({ description: s.description }, "pull request exceeded a server limit");
            break;
          default:
            break;
        }
      }
    })().catch((err) => this.log.debug({ err: describe(err) }, "consume status watcher ended"));
  }

  /**
   * Brings back the stream and consumer after they vanished under a running relay. Until they
   * are back the bus reports itself disconnected: not ready, and publishes go to the outbox.
   */
  private async recreate(): Promise<void> {
    if (this.closing) return;
    this.markMissing();
    try {
      await this.ensureStream();
      await this.ensureConsumer();
      this.missing = undefined;
      if (!this.closing && this.nc && !this.nc.isClosed()) this.setStatus({ state: "connected" });
    } catch (err) {
      this.log.error({ err: describe(err) }, "cannot recreate the stream/consumer; will retry");
    }
  }

  private markMissing(): void {
    const reason = `stream ${this.opts.stream} or consumer ${this.opts.instanceId} is missing; recreating it`;
    this.missing = reason;
    if (this.current.state === "connected") this.setStatus({ state: "disconnected", reason });
  }

  /** After a reconnect: are the stream and this consumer still there? Recreates them if not. */
  private async checkTopology(): Promise<void> {
    if (!this.jsm || this.closing) return;
    let gone: boolean;
    try {
      gone = (await this.consumerInfo()) === null;
    } catch (err) {
      if (!isStreamNotFound(err)) {
        this.log.debug({ err: describe(err) }, "cannot check the stream/consumer after reconnecting");
        return;
      }
      gone = true;
    }
    if (gone) await this.recreate();
    else if (this.missing && !this.closing) {
      this.missing = undefined;
      this.setStatus({ state: "connected" });
    }
  }

  private async backoff(run: ConsumeRun, failures: number): Promise<void> {
    await this.pause(run, backoffMs(failures, 5_000, 250));
  }

  /** Waits ms, or less if the consumption is stopped meanwhile. */
  private async pause(run: ConsumeRun, ms: number): Promise<void> {
    await sleep(ms, undefined, { signal: run.abort.signal }).catch(() => undefined);
  }

  private dispatch(m: JsMsg, onMessage: (msg: InboundMessage) => void): void {
    try {
      onMessage(this.toInbound(m));
    } catch (err) {
      this.log.error({ err: describe(err), seq: m.info.streamSequence }, "message handler threw");
    }
  }

  private toInbound(m: JsMsg): InboundMessage {
    this.fast.checkDelivery(m, this.readBlock, this.readPublic, ackInfo);
    return new JsInbound(m, this.settler);
  }

  private readonly readBlock = (block: Uint8Array): Record<string, string> => ({ ...readHeaders({ headers: undefined }, block) });
  private readonly readPublic = (h: MsgHdrs | undefined): Record<string, string> => ({ ...readHeaders({ headers: h }) });

  /** What a JsInbound needs to settle: cork the socket for the batch, log a failed settle. */
  private readonly settler: Settler = {
    headerBlock: (m) => this.fast.headerBlock(m),
    reply: (m) => this.fast.reply(m),
    cork: () => this.corkNats(),
    respond: (reply, data) => {
      if (!this.nc) throw new Error("not connected");
      this.nc.publish(reply, data);
    },
    failed: (err, seq, what) => {
      this.log.debug({ err: describe(err), seq, what }, "could not settle message");
      this.opts.hooks?.settleFailed?.(what, describe(err));
    },
  };

  /**
   * Holds the NATS socket's writes until the end of this event-loop turn. nats.js writes once per
   * microtask checkpoint, i.e. once per WebSocket read or NATS read that led to a publish or an
   * ack; corking merges all of them from one turn into one writev. (The socket is nats.js's own:
   * the socket-cork fast path; without it this is a no-op.)
   */
  private corkNats(): void {
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

  // ---- info and shutdown ----------------------------------------------------------------------

  async peers(): Promise<Peer[]> {
    if (!this.jsm) throw new BusUnavailableError("JetStream bus is not started");
    return readJetStreamPeers(this.jsm, this.opts.stream, this.opts.instanceId);
  }

  location(): string | undefined {
    const nc = this.nc;
    if (!nc || nc.isClosed()) return undefined;
    const info = nc.info;
    return `${redactUrl(nc.getServer())}${info ? ` (nats-server ${info.version}${info.server_name ? `, ${info.server_name}` : ""})` : ""}`;
  }

  async info(): Promise<StreamInfo> {
    if (!this.jsm) throw new BusUnavailableError("JetStream bus is not started");
    return this.readInfo(this.jsm);
  }

  /** Read-only (see Bus.inspect): its own short-lived connection unless the bus is started. */
  async inspect(): Promise<StreamInfo> {
    if (this.jsm && this.current.state === "connected") return this.readInfo(this.jsm);
    let nc: NatsConnection | undefined;
    let step = "connecting";
    const run = async (): Promise<StreamInfo> => {
      nc = await this.connect("inspect");
      step = "checking JetStream";
      const jsm = await this.checkJetStream(nc);
      step = `reading stream ${this.opts.stream}`;
      return await this.readInfo(jsm);
    };
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new BusStartError(`NATS at ${this.where} did not answer within ${START_DEADLINE_MS / 1000} s (stuck ${step})`)),
        START_DEADLINE_MS,
      );
    });
    try {
      return await Promise.race([run(), deadline]);
    } catch (err) {
      throw err instanceof BusStartError ? err : new BusStartError(`NATS at ${this.where}: ${step} failed: ${describe(err)}`, { cause: err });
    } finally {
      clearTimeout(timer);
      await (nc as NatsConnection | undefined)?.close().catch(() => undefined);
    }
  }

  /** Reads the stream's and this consumer's state; changes nothing. */
  private async readInfo(jsm: JetStreamManager): Promise<StreamInfo> {
    let si;
    try {
      si = await retryTransient(() => jsm.streams.info(this.opts.stream));
    } catch (err) {
      if (isStreamNotFound(err))
        throw new BusStartError(
          `stream ${this.opts.stream} does not exist on NATS at ${this.where}: no relay with --stream ${this.opts.stream} has started against this server yet`,
          { cause: err },
        );
      throw err;
    }
    const ci = await this.consumerInfo(jsm);
    return {
      bus: "jetstream",
      stream: this.opts.stream,
      messages: si.state.messages,
      bytes: si.state.bytes,
      firstSeq: si.state.first_seq,
      lastSeq: si.state.last_seq,
      consumer: ci && {
        name: ci.name,
        pending: ci.num_pending,
        ackPending: ci.num_ack_pending,
        redelivered: ci.num_redelivered,
      },
    };
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await Promise.all([...this.runs].map(async (e) => {
      this.stopRun(e.run);
      await e.done;
    }));
    this.runs.clear();
    const nc = this.nc;
    if (nc && !nc.isClosed()) {
      // drain() flushes pending acks. With the server away there is nothing to flush to, and a
      // reconnecting connection could hold drain() for ever: bound it.
      const drained = this.current.state === "connected" ? nc.drain().then(() => true, () => false) : Promise.resolve(false);
      const inTime = await Promise.race([drained, sleep(DRAIN_TIMEOUT_MS).then(() => false)]);
      if (!inTime) await nc.close().catch(() => undefined);
    }
    this.failPendingAcks("the bus was closed");
    this.setStatus({ state: "closed", reason: "closed" });
  }
}

// ---- helpers --------------------------------------------------------------------------------------

function describe(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause instanceof Error ? err.cause.message : undefined;
  return cause && !err.message.includes(cause) ? `${err.message} (${cause})` : err.message;
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

/** Node's certificate verification failures (UNABLE_TO_VERIFY_LEAF_SIGNATURE, CERT_HAS_EXPIRED, ERR_TLS_CERT_ALTNAME_INVALID, ...). */
function isTlsError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^(UNABLE_TO_|CERT_|ERR_TLS_|ERR_SSL_|DEPTH_ZERO_|SELF_SIGNED_|HOSTNAME_)/.test(code);
}

export function isAuthError(err: unknown): boolean {
  return (
    err instanceof natsErrors.AuthorizationError ||
    err instanceof natsErrors.UserAuthenticationExpiredError ||
    /authorization violation|authentication/i.test(describe(err))
  );
}

/** "JetStream not enabled": a config error at start-up, a leader election at run time. */
function isNotEnabled(err: unknown): boolean {
  return err instanceof Error && (err.name === "JetStreamNotEnabled" || /jetstream (is )?not enabled/i.test(err.message));
}

/** The server refused this user the operation (its permissions): never transient. */
function isPermissionViolation(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++)
    if (e instanceof natsErrors.PermissionViolationError || /permissions violation/i.test(e.message)) return true;
  return false;
}

/** Errors that mean "JetStream cannot answer right now", not "the request is wrong". */
function isTransient(err: unknown): boolean {
  if (isPermissionViolation(err)) return false;
  if (err instanceof natsErrors.TimeoutError) return true;
  if (err instanceof natsErrors.RequestError) return true;
  if (err instanceof natsErrors.ClosedConnectionError || err instanceof natsErrors.DrainingConnectionError) return true;
  if (err instanceof natsErrors.ConnectionError) return true;
  if (err instanceof JetStreamApiError && err.status === 503) return true;
  return err instanceof Error && /no responders|timeout|temporarily unavailable|no suitable peers/i.test(describe(err));
}

function isConsumerNotFound(err: unknown): boolean {
  return err instanceof Error && (err.name === "ConsumerNotFoundError" || /consumer not found/i.test(err.message));
}

function isStreamNotFound(err: unknown): boolean {
  return err instanceof Error && (err.name === "StreamNotFoundError" || /stream not found/i.test(err.message));
}

/** Retries an API call through a short outage (a cluster electing a leader answers 503). */
async function retryTransient<T>(fn: () => Promise<T>, windowMs = JS_CHECK_WINDOW_MS): Promise<T> {
  const until = Date.now() + windowMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (!(isTransient(err) || isNotEnabled(err)) || Date.now() >= until) throw err;
      await sleep(Math.min(250 * (attempt + 1), 1_000));
    }
  }
}

function sameSet(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x) => b.includes(x));
}

/** Names of the fields of `want` whose value differs in `have`. */
function changedFields(have: ConsumerConfig, want: Partial<ConsumerConfig>): string[] {
  return (Object.keys(want) as (keyof ConsumerConfig)[]).filter((k) => have[k] !== want[k]);
}
