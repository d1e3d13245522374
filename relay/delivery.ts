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
  /** performance.now() at which the ack wait runs out. */
  deadline: number;
}

export type SettleResult = "ok" | "unknown_delivery";

export class DeliveryTracker {
  private readonly opts: DeliveryOptions;
  /**
   * Deliveries awaiting settlement, in deadline order: every deadline is "now + ackWaitMs" when
   * set, and working() moves its entry to the end. One timer, armed for the head's deadline,
   * serves them all (a per-delivery setTimeout/clearTimeout was a hot spot).
   */
  private readonly inFlight = new Map<string, InFlight>();
  private sweepTimer: NodeJS.Timeout | undefined;
  private gaugePending = false;
  private lastIso = "";
  private lastIsoMs = NaN;
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
    for (const f of this.inFlight.values()) this.parked.push(f.msg);
    this.inFlight.clear();
    this.stopSweep();
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
      this.inFlight.delete(previous);
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
    // A fresh deadline goes to the end, keeping the map in deadline order.
    f.deadline = performance.now() + this.opts.ackWaitMs;
    this.inFlight.delete(deliveryId);
    this.inFlight.set(deliveryId, f);
    this.armSweep();
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
   * restart or to this instance's successor, after delayMs. Returns how many were released.
   */
  releaseAll(delayMs = 0): number {
    const held = [...this.parked.splice(0), ...[...this.inFlight.values()].map((f) => f.msg)];
    this.inFlight.clear();
    this.stopSweep();
    this.bySeq.clear();
    this.stopKeepAlive();
    for (const msg of held) msg.nak(delayMs);
    this.opts.metrics.inFlight.set(0);
    this.notifyIdle();
    return held.length;
  }

  // ---- internals ----

  private deliver(msg: InboundMessage): void {
    const deliveryId = this.idPrefix + (this.nextId++).toString(36);
    this.inFlight.set(deliveryId, { deliveryId, msg, deadline: performance.now() + this.opts.ackWaitMs });
    this.armSweep();
    this.bySeq.set(msg.seq, deliveryId);
    const m = this.opts.metrics;
    this.gaugeInFlight();
    m.delivered.inc();
    if (msg.attempt > 1) m.redelivered.inc();
    else {
      const sent = this.parseTime(msg.publishedAt);
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
    this.inFlight.delete(deliveryId);
    if (this.bySeq.get(f.msg.seq) === deliveryId) this.bySeq.delete(f.msg.seq);
    this.gaugeInFlight();
    if (this.inFlight.size === 0) this.notifyIdle();
    return f;
  }

  /**
   * The in-flight gauge, set once per tick rather than on every deliver and settle (prom-client
   * allocates on each set); nothing can scrape it in between.
   */
  private gaugeInFlight(): void {
    if (this.gaugePending) return;
    this.gaugePending = true;
    process.nextTick(this.setInFlightGauge);
  }

  private readonly setInFlightGauge = (): void => {
    this.gaugePending = false;
    this.opts.metrics.inFlight.set(this.inFlight.size);
  };

  /** Date.parse of publishedAt: messages of one origin and millisecond share the same text. */
  private parseTime(iso: string): number {
    if (iso !== this.lastIso) {
      this.lastIso = iso;
      this.lastIsoMs = Date.parse(iso);
    }
    return this.lastIsoMs;
  }

  /**
   * Arms the one timer for the earliest deadline. An armed timer never fires late: every deadline
   * is set to now + ackWaitMs, so none can come before the one it was armed for (it re-arms for
   * the next head when it fires).
   */
  private armSweep(): void {
    if (this.sweepTimer) return;
    const head = this.inFlight.values().next();
    if (head.done) return;
    const at = head.value.deadline;
    // +1: timers may fire a hair early.
    this.sweepTimer = setTimeout(this.sweep, Math.max(0, at - performance.now() + 1));
  }

  private stopSweep(): void {
    if (this.sweepTimer) clearTimeout(this.sweepTimer);
    this.sweepTimer = undefined;
  }

  /** The ack wait ran out for every delivery at the head of the map with a past deadline. */
  private readonly sweep = (): void => {
    this.sweepTimer = undefined;
    const now = performance.now();
    for (const f of this.inFlight.values()) {
      if (f.deadline > now) break;
      this.onAckWaitExpired(f.deliveryId);
    }
    this.armSweep();
  };

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
