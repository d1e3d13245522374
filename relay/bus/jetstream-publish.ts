// The JetStream bus's publish path, pipelined: each publish goes out with a reply subject under
// one wildcard subscription and its PubAck settles it; one sweep timer times them all out. A hot
// path (see publish()), kept apart from start-up and consuming so that what runs per message is in
// plain sight. When PubAcks stop coming, the probe here finds a silently cut link and has it
// reconnected.

import { setTimeout as sleep } from "node:timers/promises";
import { createInbox, errors as natsErrors, type Msg, type MsgHdrs, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { BusUnavailableError, type BusMessage, type PublishResult } from "./bus.js";
import type { JetStreamConnection } from "./jetstream-connection.js";
import { describe, isTransient } from "./jetstream-errors.js";
import { publishHeaders, subjectFor } from "./jetstream-wire.js";
import type { NatsFastPaths } from "./nats-internals.js";
import type { Logger } from "../log.js";

/** A publish that gets no PubAck in this time is reported unavailable, so the relay can queue it. */
const PUBLISH_TIMEOUT_MS = 3_000;
/** A probe (PING/PONG round trip) unanswered this long means the link is cut. */
const PROBE_TIMEOUT_MS = 1_500;
/** While cut off, probe again this often to notice the heal even if nats.js has not reconnected. */
const PROBE_RETRY_MS = 2_000;
/** How often unanswered publishes are checked against their deadline. */
const ACK_SWEEP_MS = 100;

/** A publish awaiting its PubAck (see publish()). */
interface PendingAck {
  resolve(r: PublishResult): void;
  reject(err: Error): void;
  /** Date.now() after which the publish is reported unavailable. */
  deadline: number;
  /** Where it was published: a permissions violation names only the subject (see onPermissionViolation). */
  subject: string;
}

/** What the publish path uses of the connection (jetstream-connection.ts). */
export type PublishContext = Pick<
  JetStreamConnection,
  "opts" | "log" | "fast" | "nc" | "js" | "current" | "closing" | "missing" | "cutOff" | "setStatus" | "cork"
>;

export class JetStreamPublisher {
  private readonly conn: PublishContext;
  private readonly log: Logger;
  private readonly fast: NatsFastPaths;
  // Pipelined publishing: one wildcard reply subscription for every PubAck, pending publishes
  // keyed by the reply token (in deadline order), one sweep timer for all their timeouts.
  private ackSub?: Subscription;
  private ackPrefix = "";
  private ackSeq = 0;
  private readonly pendingAcks = new Map<string, PendingAck>();
  private ackSweep?: NodeJS.Timeout;
  /** A probe is running (see probe()). */
  private probing = false;
  private readonly encodeHeaders: (bytes: Uint8Array) => MsgHdrs | undefined;

  constructor(conn: PublishContext) {
    this.conn = conn;
    this.log = conn.log;
    this.fast = conn.fast;
    this.encodeHeaders = (bytes) => this.fast.encodedHeaders(bytes);
  }

  /** At start-up: the one subscription every PubAck comes back on. */
  listen(nc: NatsConnection): void {
    this.ackPrefix = createInbox();
    this.ackSub = nc.subscribe(`${this.ackPrefix}.*`, { callback: (err, m) => this.onPubAck(err, m) });
  }

  /** A failed start: the subscription goes with its connection. */
  forget(): void {
    this.ackSub = undefined;
  }

  /**
   * What js.publish() does, pipelined: the message goes out with a reply subject under one
   * wildcard subscription, and the PubAck settles it (onPubAck). nats.js's request() would
   * build a promise, a timer and two Error objects (stack traces) per message, which dominated
   * the relay's CPU profile; here a publish costs a map entry, and one sweep timer handles
   * every timeout. Semantics are unchanged: resolves on the PubAck (durable), Nats-Msg-Id
   * deduplicates, no answer within PUBLISH_TIMEOUT_MS or a 503 is BusUnavailableError.
   */
  publish(msg: BusMessage): Promise<PublishResult> {
    const conn = this.conn;
    const nc = conn.nc;
    // While reconnecting, nats.js would buffer the message and time out later: fail fast instead.
    if (!nc || !conn.js || !this.ackSub || conn.current.state !== "connected")
      return Promise.reject(
        new BusUnavailableError(`JetStream bus is ${conn.current.state}${conn.current.reason ? ` (${conn.current.reason})` : ""}`),
      );
    const h = publishHeaders(msg, this.fast.on("header-encode") ? this.encodeHeaders : undefined);
    const token = (this.ackSeq++).toString(36);
    const subject = subjectFor(msg.origin, msg.kind);
    return new Promise<PublishResult>((resolve, reject) => {
      this.pendingAcks.set(token, { resolve, reject, deadline: Date.now() + PUBLISH_TIMEOUT_MS, subject });
      this.conn.cork();
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
  onPermissionViolation(err: InstanceType<typeof natsErrors.PermissionViolationError>): void {
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
    const conn = this.conn;
    const nc = conn.nc;
    if (this.probing || !nc || nc.isClosed() || conn.closing) return;
    this.probing = true;
    try {
      for (;;) {
        const answered = await Promise.race([nc.flush().then(() => true, () => false), sleep(PROBE_TIMEOUT_MS).then(() => false)]);
        if (conn.closing || nc.isClosed() || conn.nc !== nc) return;
        if (answered) {
          if (conn.cutOff) {
            conn.cutOff = false;
            this.log.info("NATS answers again");
            if (!conn.missing) conn.setStatus({ state: "connected" });
          }
          return;
        }
        if (!conn.cutOff) {
          conn.cutOff = true;
          conn.opts.hooks?.connectionStale?.("no PONG to a probe after a PubAck timeout");
          this.failPendingAcks("NATS does not answer");
          conn.setStatus({ state: "disconnected", reason: `no answer from NATS within ${PROBE_TIMEOUT_MS} ms after a PubAck timeout (silent partition?)` });
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

  /** close(), a failed start (abandon()), a dead connection: nothing will answer the publishes still waiting. */
  failPendingAcks(reason: string): void {
    const all = [...this.pendingAcks.values()];
    this.pendingAcks.clear();
    this.stopAckSweep();
    for (const p of all) p.reject(new BusUnavailableError(`JetStream did not take the message: ${reason}`));
  }
}
