// Delivery to the controller: one deliveryId per attempt, settled by ack, nack, working, reject
// or the ack wait running out. The last failed attempt becomes a dead letter.
//
// While no controller is connected, messages the bus already handed over are parked (kept
// alive with working()) instead of failed: nothing is dead-lettered merely because the
// controller was away.

import { randomBytes } from "node:crypto";
import type { InboundMessage } from "./bus/bus.js";
import { deliverFrame } from "./protocol.js";
import type { RelayMetrics } from "./metrics.js";
import type { Logger } from "./log.js";

export interface DeliveryOptions {
  maxDeliver: number;
  ackWaitMs: number;
  nackDelayMs: number;
  metrics: RelayMetrics;
  logger: Logger;
  /** Records a dead letter durably (the message is then term()ed). */
  deadLetter(msg: InboundMessage, attempts: number, reason: string): void;
}

interface InFlight {
  deliveryId: string;
  msg: InboundMessage;
  timer: NodeJS.Timeout;
}

export type SettleResult = "ok" | "unknown_delivery";

export class DeliveryTracker {
  private readonly opts: DeliveryOptions;
  private readonly inFlight = new Map<string, InFlight>();
  /** stream seq → deliveryId, to retire an attempt when the bus redelivers the same message. */
  private readonly bySeq = new Map<number, string>();
  private readonly parked: InboundMessage[] = [];
  private send: ((frame: string) => void) | undefined;
  private keepAlive: NodeJS.Timeout | undefined;
  private idleWaiters: Array<() => void> = [];
  private readonly idPrefix = `d${randomBytes(3).toString("hex")}-`;
  private nextId = 0;

  constructor(opts: DeliveryOptions) {
    this.opts = opts;
  }

  get inFlightCount(): number {
    return this.inFlight.size;
  }

  get parkedCount(): number {
    return this.parked.length;
  }

  /** A controller session starts: parked messages go to it first. */
  attach(send: (frame: string) => void): void {
    this.send = send;
    this.stopKeepAlive();
    for (const msg of this.parked.splice(0)) {
      msg.working(); // restart the bus's clock together with ours
      this.deliver(msg);
    }
  }

  /**
   * The controller session ended. Its unacked deliveries are parked with their attempt
   * number and go to the next session: the controller may have handled them, so they may
   * arrive twice (at-least-once), but none is lost or burnt.
   */
  detach(): void {
    this.send = undefined;
    for (const f of this.inFlight.values()) {
      clearTimeout(f.timer);
      this.parked.push(f.msg);
    }
    this.inFlight.clear();
    this.bySeq.clear();
    this.opts.metrics.inFlight.set(0);
    this.startKeepAlive();
    this.notifyIdle();
  }

  /** A message from the bus (already echo-filtered). */
  offer(msg: InboundMessage): void {
    const previous = this.bySeq.get(msg.seq);
    const parkedAt = this.parked.findIndex((p) => p.seq === msg.seq);
    if (parkedAt >= 0) this.parked.splice(parkedAt, 1);
    if (previous !== undefined) {
      // The bus redelivered before our own clock retired the earlier attempt: the new one wins.
      const f = this.inFlight.get(previous);
      if (f) {
        clearTimeout(f.timer);
        this.inFlight.delete(previous);
      }
    }
    if (!this.send) {
      this.parked.push(msg);
      this.startKeepAlive();
      return;
    }
    this.deliver(msg);
  }

  ack(deliveryId: string): SettleResult {
    const f = this.take(deliveryId);
    if (!f) return "unknown_delivery";
    f.msg.ack();
    this.opts.metrics.acked.inc();
    return "ok";
  }

  nack(deliveryId: string, delayMs?: number): SettleResult {
    const f = this.take(deliveryId);
    if (!f) return "unknown_delivery";
    this.opts.metrics.nacked.inc();
    this.fail(f.msg, "nacked by the controller", delayMs ?? this.opts.nackDelayMs);
    return "ok";
  }

  working(deliveryId: string): SettleResult {
    const f = this.inFlight.get(deliveryId);
    if (!f) return "unknown_delivery";
    f.msg.working();
    f.timer.refresh();
    return "ok";
  }

  reject(deliveryId: string, reason: string | undefined): SettleResult {
    const f = this.take(deliveryId);
    if (!f) return "unknown_delivery";
    this.opts.metrics.rejected.inc();
    this.deadLetter(f.msg, `rejected by the controller${reason ? `: ${reason}` : ""}`);
    return "ok";
  }

  /** Resolves when nothing is in flight, or after timeoutMs; true when idle. */
  waitIdle(timeoutMs: number): Promise<boolean> {
    if (this.inFlight.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.idleWaiters = this.idleWaiters.filter((w) => w !== done);
        resolve(this.inFlight.size === 0);
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      this.idleWaiters.push(done);
    });
  }

  /**
   * Shutdown: everything still held goes back to the bus for a prompt redelivery, here after a
   * restart or to this instance's successor. Returns how many were released.
   */
  releaseAll(): number {
    const held = [...this.parked.splice(0), ...[...this.inFlight.values()].map((f) => (clearTimeout(f.timer), f.msg))];
    this.inFlight.clear();
    this.bySeq.clear();
    this.stopKeepAlive();
    for (const msg of held) msg.nak(0);
    this.opts.metrics.inFlight.set(0);
    this.notifyIdle();
    return held.length;
  }

  // ---- internals ----

  private deliver(msg: InboundMessage): void {
    const deliveryId = this.idPrefix + (this.nextId++).toString(36);
    const timer = setTimeout(() => this.onAckWaitExpired(deliveryId), this.opts.ackWaitMs);
    this.inFlight.set(deliveryId, { deliveryId, msg, timer });
    this.bySeq.set(msg.seq, deliveryId);
    const m = this.opts.metrics;
    m.inFlight.set(this.inFlight.size);
    m.delivered.inc();
    if (msg.attempt > 1) m.redelivered.inc();
    else {
      const sent = Date.parse(msg.publishedAt);
      if (!Number.isNaN(sent)) m.deliveryLatency.observe(Math.max(0, Date.now() - sent) / 1000);
    }
    this.send!(
      deliverFrame({
        deliveryId,
        id: msg.id,
        kind: msg.kind,
        origin: msg.origin,
        attempt: msg.attempt,
        publishedAt: msg.publishedAt,
        payloadJson: msg.payloadJson,
      }),
    );
  }

  private take(deliveryId: string): InFlight | undefined {
    const f = this.inFlight.get(deliveryId);
    if (!f) return undefined;
    clearTimeout(f.timer);
    this.inFlight.delete(deliveryId);
    if (this.bySeq.get(f.msg.seq) === deliveryId) this.bySeq.delete(f.msg.seq);
    this.opts.metrics.inFlight.set(this.inFlight.size);
    if (this.inFlight.size === 0) this.notifyIdle();
    return f;
  }

  private onAckWaitExpired(deliveryId: string): void {
    const f = this.take(deliveryId);
    if (!f) return;
    this.opts.metrics.ackTimeouts.inc();
    // The bus runs the same ack-wait clock and redelivers by itself; only the last attempt
    // needs us, because after it the bus goes quiet.
    if (f.msg.attempt >= this.opts.maxDeliver) this.deadLetter(f.msg, `not acked within ${this.opts.ackWaitMs} ms`);
  }

  private fail(msg: InboundMessage, reason: string, delayMs: number): void {
    if (msg.attempt >= this.opts.maxDeliver) this.deadLetter(msg, reason);
    else msg.nak(delayMs);
  }

  private deadLetter(msg: InboundMessage, reason: string): void {
    try {
      this.opts.deadLetter(msg, msg.attempt, reason);
    } catch (err) {
      // Not recorded: leave it unsettled so the bus keeps it rather than losing it.
      this.opts.logger.error({ err, id: msg.id, origin: msg.origin }, "could not record a dead letter; message left unsettled");
      return;
    }
    this.opts.metrics.deadLettered.inc();
    this.opts.logger.warn({ id: msg.id, kind: msg.kind, origin: msg.origin, attempts: msg.attempt, reason }, "dead letter recorded");
    msg.term();
  }

  private startKeepAlive(): void {
    if (this.keepAlive || this.parked.length === 0) return;
    // Parked messages stay ours: tell the bus so well within each ack wait.
    this.keepAlive = setInterval(() => {
      for (const msg of this.parked) msg.working();
    }, Math.max(50, Math.floor(this.opts.ackWaitMs / 3)));
    this.keepAlive.unref();
  }

  private stopKeepAlive(): void {
    if (this.keepAlive) clearInterval(this.keepAlive);
    this.keepAlive = undefined;
  }

  private notifyIdle(): void {
    if (this.inFlight.size !== 0) return;
    for (const w of this.idleWaiters.splice(0)) w();
  }
}
