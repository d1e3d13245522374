// The JetStream bus: one file-backed stream shared by every relay, one durable pull consumer per
// relay instance. Written for nats-server 2.9 (no 2.10-only features: single filter_subject, no
// consumer metadata, term() without a reason).
//
// This file wires the parts together and runs start-up, the read-only looks and shutdown; each
// part does one job:
//   jetstream-connection.ts    the NATS connection, its auth options, the bus's status, the socket cork
//   jetstream-provisioning.ts  the stream's and consumer's configuration: create, reconcile, read back
//   jetstream-publish.ts       the pipelined publish path (PubAcks, their timeouts, the probe)
//   jetstream-consume.ts       the consume loop: deliveries, restarts, recreating what vanished
//   jetstream-errors.ts        what an error from nats.js or JetStream means
//   jetstream-wire.ts, jetstream-inbound.ts, jetstream-peers.ts, nats-internals.ts (see each)

import { setTimeout as sleep } from "node:timers/promises";
import type { NatsConnection } from "@nats-io/transport-node";
import { jetstream, type ConsumerConfig, type JetStreamManager, type StreamConfig } from "@nats-io/jetstream";
import { redactUrl } from "../redact.js";
import {
  BusStartError,
  BusUnavailableError,
  type Bus,
  type BusMessage,
  type BusStatus,
  type Consumption,
  type InboundMessage,
  type PublishResult,
  type StreamInfo,
} from "./bus.js";
import { readJetStreamPeers } from "./jetstream-peers.js";
import type { Peer } from "../peers.js";
import { wireCodec } from "./jetstream-wire.js";
import { JetStreamConnection, type JetStreamBusOptions } from "./jetstream-connection.js";
import { API_TIMEOUT_MS, StreamProvisioning } from "./jetstream-provisioning.js";
import { JetStreamPublisher } from "./jetstream-publish.js";
import { JetStreamConsumeLoop } from "./jetstream-consume.js";
import { describe, isPermissionViolation } from "./jetstream-errors.js";

export type { JetStreamBusOptions } from "./jetstream-connection.js";
export { pullExpiresMs } from "./jetstream-consume.js";
export { isAuthError } from "./jetstream-errors.js";

/** Whole start(): connect, JetStream check, stream, consumer. */
const START_DEADLINE_MS = 15_000;
/** Drain lets pending acks flush; don't let a reconnecting connection hold close() for ever. */
const DRAIN_TIMEOUT_MS = 5_000;

export class JetStreamBus implements Bus {
  readonly name = "jetstream" as const;

  private readonly conn: JetStreamConnection;
  private readonly provisioning: StreamProvisioning;
  private readonly publisher: JetStreamPublisher;
  private readonly consumer: JetStreamConsumeLoop;

  constructor(opts: JetStreamBusOptions) {
    if (opts.urls.length === 0) throw new Error("JetStreamBus needs at least one NATS URL");
    this.conn = new JetStreamConnection(opts);
    this.provisioning = new StreamProvisioning(this.conn);
    this.publisher = new JetStreamPublisher(this.conn);
    this.consumer = new JetStreamConsumeLoop(this.conn, this.provisioning);
  }

  // ---- start-up -------------------------------------------------------------------------------

  async start(): Promise<void> {
    const conn = this.conn;
    if (conn.nc) return;
    let step = "connecting";
    const run = async (): Promise<void> => {
      const nc = await conn.connect();
      conn.nc = nc;
      conn.watch(nc, {
        stale: () => this.publisher.failPendingAcks("the connection went stale"),
        reconnected: () => void this.consumer.checkTopology(),
        permissionViolation: (err) => this.publisher.onPermissionViolation(err),
      });
      step = "checking nats.js fast paths";
      await conn.fast.check(nc, wireCodec);
      step = "checking JetStream";
      conn.jsm = await this.provisioning.checkJetStream(nc);
      conn.js = jetstream(nc, { timeout: API_TIMEOUT_MS });
      this.publisher.listen(nc);
      step = `creating or verifying stream ${conn.opts.stream}`;
      await this.provisioning.ensureStream(conn.jsm);
      step = `creating or verifying consumer ${conn.opts.instanceId}`;
      await this.provisioning.ensureConsumer(conn.jsm);
    };
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new BusStartError(`NATS at ${conn.where} did not finish start-up within ${START_DEADLINE_MS / 1000} s (stuck ${step})`)),
        START_DEADLINE_MS,
      );
    });
    try {
      await Promise.race([run(), deadline]);
    } catch (err) {
      await this.abandon();
      if (err instanceof BusStartError) throw err;
      const hint = isPermissionViolation(err) ? " (this relay's NATS user lacks that permission: see deploy/nats/least-privilege.conf for what a relay needs)" : "";
      throw new BusStartError(`NATS at ${conn.where}: ${step} failed: ${describe(err)}${hint}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
    conn.setStatus({ state: "connected" });
    conn.log.info({ urls: conn.opts.urls, stream: conn.opts.stream, consumer: conn.opts.instanceId }, "JetStream bus started");
  }

  /**
   * A connection of its own with exactly the relay's connection and auth options, for `doctor`
   * (the caller closes it). Rejects with BusStartError as start() would; its cause is the error
   * nats.js gave (see isAuthError).
   */
  diagnosticConnection(): Promise<NatsConnection> {
    return this.conn.connect("doctor");
  }

  /** The stream and consumer configuration this relay would create (for `doctor` to compare). */
  expectedConfig(): { stream: Partial<StreamConfig> & { name: string }; consumer: Partial<ConsumerConfig> } {
    return { stream: this.provisioning.streamConfig(), consumer: this.provisioning.consumerConfig() };
  }

  /** JetStream's manager on `nc`, once JetStream answers (see StreamProvisioning.checkJetStream). */
  checkJetStream(nc: NatsConnection): Promise<JetStreamManager> {
    return this.provisioning.checkJetStream(nc);
  }

  /** A failed start must not leave a connection reconnecting in the background. */
  private async abandon(): Promise<void> {
    const conn = this.conn;
    const nc = conn.nc;
    conn.nc = conn.js = conn.jsm = undefined;
    this.publisher.forget();
    this.publisher.failPendingAcks("start failed");
    conn.setStatus({ state: "disconnected", reason: "start failed" });
    await nc?.close().catch(() => undefined);
  }

  // ---- status, publishing, consuming ----------------------------------------------------------

  status(): BusStatus {
    return this.conn.status();
  }

  onStatus(listener: (s: BusStatus) => void): () => void {
    return this.conn.onStatus(listener);
  }

  publish(msg: BusMessage): Promise<PublishResult> {
    return this.publisher.publish(msg);
  }

  consume(onMessage: (msg: InboundMessage) => void): Consumption {
    return this.consumer.consume(onMessage);
  }

  // ---- info and shutdown ----------------------------------------------------------------------

  async peers(): Promise<Peer[]> {
    const { jsm, opts } = this.conn;
    if (!jsm) throw new BusUnavailableError("JetStream bus is not started");
    return readJetStreamPeers(jsm, opts.stream, opts.instanceId);
  }

  location(): string | undefined {
    const nc = this.conn.nc;
    if (!nc || nc.isClosed()) return undefined;
    const info = nc.info;
    return `${redactUrl(nc.getServer())}${info ? ` (nats-server ${info.version}${info.server_name ? `, ${info.server_name}` : ""})` : ""}`;
  }

  async info(): Promise<StreamInfo> {
    const jsm = this.conn.jsm;
    if (!jsm) throw new BusUnavailableError("JetStream bus is not started");
    return this.provisioning.readInfo(jsm);
  }

  /** Read-only (see Bus.inspect): its own short-lived connection unless the bus is started. */
  async inspect(): Promise<StreamInfo> {
    const conn = this.conn;
    if (conn.jsm && conn.current.state === "connected") return this.provisioning.readInfo(conn.jsm);
    let nc: NatsConnection | undefined;
    let step = "connecting";
    const run = async (): Promise<StreamInfo> => {
      nc = await conn.connect("inspect");
      step = "checking JetStream";
      const jsm = await this.provisioning.checkJetStream(nc);
      step = `reading stream ${conn.opts.stream}`;
      return await this.provisioning.readInfo(jsm);
    };
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new BusStartError(`NATS at ${conn.where} did not answer within ${START_DEADLINE_MS / 1000} s (stuck ${step})`)),
        START_DEADLINE_MS,
      );
    });
    try {
      return await Promise.race([run(), deadline]);
    } catch (err) {
      throw err instanceof BusStartError ? err : new BusStartError(`NATS at ${conn.where}: ${step} failed: ${describe(err)}`, { cause: err });
    } finally {
      clearTimeout(timer);
      await (nc as NatsConnection | undefined)?.close().catch(() => undefined);
    }
  }

  async close(): Promise<void> {
    const conn = this.conn;
    if (conn.closing) return;
    conn.closing = true;
    await this.consumer.stopAll();
    const nc = conn.nc;
    if (nc && !nc.isClosed()) {
      // drain() flushes pending acks. With the server away there is nothing to flush to, and a
      // reconnecting connection could hold drain() for ever: bound it.
      const drained = conn.current.state === "connected" ? nc.drain().then(() => true, () => false) : Promise.resolve(false);
      const inTime = await Promise.race([drained, sleep(DRAIN_TIMEOUT_MS).then(() => false)]);
      if (!inTime) await nc.close().catch(() => undefined);
    }
    this.publisher.failPendingAcks("the bus was closed");
    conn.setStatus({ state: "closed", reason: "closed" });
  }
}
