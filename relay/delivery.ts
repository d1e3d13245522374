// The delivery state machine: the one place that decides what happens to a message between its
// arrival from a source (the bus, or a replayed dead letter) and its end — acked by the controller
// or a dead letter. Attempt counting, the ack-wait clock, `working`, nack delays, `reject`, the
// last attempt, parking while no controller is connected and the hand-back on shutdown all live
// here; docs/delivery.md has the transition table.
//
// Crash safety of the last attempt: the relay asks its bus to redeliver without limit (see
// busSettings). An arrival past --max-deliver is never shown to the controller: it becomes the
// dead letter of an attempt nobody settled (the relay stopped, crashed or handed it back, or the
// arrival was lost on the way). So however many arrivals go astray, the bus keeps one to tell us.

import { randomBytes } from "node:crypto";
import type { InboundMessage } from "./bus/bus.js";
import { backoffMs, systemClock, type Clock, type TimerHandle } from "./clock.js";
import type { Logger } from "./log.js";
import type { RelayMetrics } from "./metrics.js";
import { deliverFrame } from "./protocol.js";
import type { ProcessSpan, RelayTracing } from "./trace-loader.js";

/** A kind of source messages arrive from, and how its dead letters are kept. */
export interface ArrivalSource {
  /** For logs: "bus", "replay". */
  readonly name: string;
  /**
   * True when the source redelivers by itself after a nak or an ack-wait expiry (a bus does);
   * false when the machine offers the message again itself (a replayed dead letter has no broker).
   */
  readonly redelivers: boolean;
  /** Records the message as a dead letter; resolves once that is durable (fsynced). */
  recordDeadLetter(msg: InboundMessage, attempts: number, reason: string): Promise<void>;
}

export interface DeliveryOptions {
  maxDeliver: number;
  ackWaitMs: number;
  nackDelayMs: number;
  metrics: RelayMetrics;
  logger: Logger;
  clock?: Clock;
  /** Present only when spans are exported. */
  tracing?: RelayTracing;
}

export type SettleResult = "ok" | "unknown_delivery";

interface Entry {
  msg: InboundMessage;
  source: ArrivalSource;
  /** The attempt the controller sees: the source's count, or ours for a source that does not redeliver. */
  attempt: number;
  deliveryId: string;
  /** clock.now() at which the ack wait runs out (in flight only). */
  deadline: number;
  /** The process span of the current attempt, with tracing on. */
  span?: ProcessSpan;
}

/** Later arrivals of the same message while its dead letter is being written: settled with it. */
interface Recording {
  entry: Entry;
  also: InboundMessage[];
  /** Set for refusals: the caller counts and logs them itself (rate-limited, under attack). */
  onRecorded?: () => void;
}

/** How many recently dead-lettered sequences are remembered, to settle a late redelivery without a second record. */
const RECENT_DEAD_MAX = 4096;
const RECORD_RETRY_MAX_MS = 5_000;

export class DeliveryMachine {
  private readonly o: DeliveryOptions;
  private readonly clock: Clock;
  /**
   * Deliveries awaiting settlement, in deadline order: every deadline is "now + ackWaitMs" when
   * set, and working() moves its entry to the end. One timer, armed for the head's deadline,
   * serves them all (a timer per delivery was a hot spot).
   */
  private readonly inFlight = new Map<string, Entry>();
  /** seq → deliveryId, to retire an attempt when the source redelivers the same message. */
  private readonly bySeq = new Map<number, string>();
  private readonly parked = new Map<number, Entry>();
  private readonly recording = new Map<number, Recording>();
  private readonly recentDead = new Set<number>();
  /** Redeliveries this machine owes to sources that do not redeliver by themselves. */
  private readonly redeliveries = new Map<number, { entry: Entry; timer: TimerHandle }>();
  private send: ((frame: string) => void) | undefined;
  private sweepTimer: TimerHandle | undefined;
  private keepAliveTimer: TimerHandle | undefined;
  private idleWaiters: Array<() => void> = [];
  private recordedWaiters: Array<() => void> = [];
  private gaugePending = false;
  private closed = false;
  private lastIso = "";
  private lastIsoMs = NaN;
  private readonly idPrefix = `d${randomBytes(3).toString("hex")}-`;
  private nextId = 0;

  constructor(o: DeliveryOptions) {
    this.o = o;
    this.clock = o.clock ?? systemClock;
  }

  get inFlightCount(): number {
    return this.inFlight.size;
  }

  get parkedCount(): number {
    return this.parked.size;
  }

  /** Dead letters being written right now. */
  get recordingCount(): number {
    return this.recording.size;
  }

  // ---- the controller session ----------------------------------------------------------------

  /** A controller session starts: parked messages go to it first. */
  attach(send: (frame: string) => void): void {
    this.send = send;
    const parked = [...this.parked.values()];
    this.parked.clear();
    this.armKeepAlive();
    for (const e of parked) {
      e.msg.working(); // restart the source's clock together with ours
      this.deliver(e);
    }
  }

  /**
   * The controller session ended. Its unsettled deliveries are parked with their attempt and go
   * to the next session: the controller may have handled them, so they may arrive twice
   * (at-least-once), but none is lost or burnt.
   */
  detach(): void {
    this.send = undefined;
    for (const e of this.inFlight.values()) {
      endSpan(e, "handed_back");
      this.parked.set(e.msg.seq, e);
    }
    this.inFlight.clear();
    this.bySeq.clear();
    this.stopSweep();
    this.gaugeInFlight();
    this.armKeepAlive();
    this.notifyIdle();
  }

  // ---- arrivals ------------------------------------------------------------------------------

  /** A message from a source (already validated and echo-filtered). `attempt` defaults to the source's count. */
  offer(msg: InboundMessage, source: ArrivalSource, attempt = msg.attempt): void {
    const seq = msg.seq;
    if (this.recentDead.has(seq)) {
      msg.term(); // a redelivery that crossed our term: already a dead letter
      return;
    }
    const recording = this.recording.get(seq);
    if (recording) {
      recording.also.push(msg);
      return;
    }
    let previous: Entry | undefined;
    const prevId = this.bySeq.get(seq);
    if (prevId !== undefined) {
      // The source redelivered before our own clock retired the earlier attempt: the new one wins.
      previous = this.inFlight.get(prevId);
      this.inFlight.delete(prevId);
      this.bySeq.delete(seq);
      this.gaugeInFlight();
    }
    previous ??= this.parked.get(seq);
    this.parked.delete(seq);
    const entry: Entry = { msg, source, attempt, deliveryId: "", deadline: 0 };
    if (attempt > this.o.maxDeliver) {
      const reason =
        previous && previous.attempt >= this.o.maxDeliver && previous.deliveryId
          ? `not acked within ${this.o.ackWaitMs} ms`
          : `attempt ${this.o.maxDeliver} of ${this.o.maxDeliver} was never settled (the relay stopped, crashed or handed it back during it, or the arrival was lost on the way)`;
      this.deadLetter({ ...entry, attempt: this.o.maxDeliver }, reason);
      return;
    }
    if (!this.send) {
      this.parked.set(seq, entry);
      this.armKeepAlive();
      return;
    }
    this.deliver(entry);
  }

  /**
   * A message that must never be delivered (it failed the inbound policy): straight to a dead
   * letter with this reason, written and settled like any other — term only once it is durable,
   * a failing store retried while the message is kept alive. `onRecorded` runs once it is.
   */
  refuse(msg: InboundMessage, source: ArrivalSource, reason: string, onRecorded: () => void): void {
    const seq = msg.seq;
    if (this.recentDead.has(seq)) {
      msg.term();
      return;
    }
    const recording = this.recording.get(seq);
    if (recording) {
      recording.also.push(msg);
      return;
    }
    this.deadLetter({ msg, source, attempt: msg.attempt, deliveryId: "", deadline: 0 }, reason, onRecorded);
  }

  // ---- the controller's verbs ------------------------------------------------------------------

  ack(deliveryId: string): SettleResult {
    const e = this.take(deliveryId);
    if (!e) return "unknown_delivery";
    endSpan(e, "ack");
    e.msg.ack();
    this.o.metrics.acked.inc();
    return "ok";
  }

  nack(deliveryId: string, delayMs?: number): SettleResult {
    const e = this.take(deliveryId);
    if (!e) return "unknown_delivery";
    endSpan(e, "nack");
    this.o.metrics.nacked.inc();
    this.fail(e, "nacked by the controller", delayMs ?? this.o.nackDelayMs);
    return "ok";
  }

  working(deliveryId: string): SettleResult {
    const e = this.inFlight.get(deliveryId);
    if (!e) return "unknown_delivery";
    e.msg.working();
    // A fresh deadline goes to the end, keeping the map in deadline order.
    e.deadline = this.clock.now() + this.o.ackWaitMs;
    this.inFlight.delete(deliveryId);
    this.inFlight.set(deliveryId, e);
    this.armSweep();
    return "ok";
  }

  reject(deliveryId: string, reason: string | undefined): SettleResult {
    const e = this.take(deliveryId);
    if (!e) return "unknown_delivery";
    endSpan(e, "reject");
    this.o.metrics.rejected.inc();
    this.deadLetter(e, `rejected by the controller${reason ? `: ${reason}` : ""}`);
    return "ok";
  }

  // ---- shutdown ------------------------------------------------------------------------------

  /** Resolves when nothing is in flight, or after timeoutMs; true when idle. */
  waitIdle(timeoutMs: number): Promise<boolean> {
    return this.waitFor(() => this.inFlight.size === 0, this.idleWaiters, timeoutMs);
  }

  /** Resolves when no dead letter is being written, or after timeoutMs; true when none is. */
  waitRecorded(timeoutMs: number): Promise<boolean> {
    return this.waitFor(() => this.recording.size === 0, this.recordedWaiters, timeoutMs);
  }

  /**
   * Shutdown: everything still held goes back to its source for a prompt redelivery (here after
   * a restart, or to this instance's successor) after delayMs. Safe for a last attempt too: the
   * bus redelivers without limit, and the arrival past --max-deliver becomes its dead letter. A replayed dead letter needs
   * nothing: it stays marked for replay in the store. Returns how many were released.
   */
  releaseAll(delayMs: number): number {
    const held = [...this.parked.values(), ...this.inFlight.values(), ...[...this.redeliveries.values()].map((r) => r.entry)];
    this.parked.clear();
    this.inFlight.clear();
    this.bySeq.clear();
    for (const r of this.redeliveries.values()) this.clock.clearTimer(r.timer);
    this.redeliveries.clear();
    this.stopSweep();
    this.armKeepAlive();
    for (const e of held) {
      endSpan(e, "handed_back");
      if (e.source.redelivers) e.msg.nak(delayMs);
    }
    this.gaugeInFlight();
    this.notifyIdle();
    return held.length;
  }

  /** No more retries of dead-letter writes (the store is closing); unsettled messages stay with the bus. */
  close(): void {
    this.closed = true;
    this.releaseAll(0);
    this.clock.clearTimer(this.keepAliveTimer);
    this.keepAliveTimer = undefined;
  }

  // ---- internals -----------------------------------------------------------------------------

  private deliver(e: Entry): void {
    e.deliveryId = this.idPrefix + (this.nextId++).toString(36);
    e.deadline = this.clock.now() + this.o.ackWaitMs;
    this.inFlight.set(e.deliveryId, e);
    this.bySeq.set(e.msg.seq, e.deliveryId);
    this.armSweep();
    this.gaugeInFlight();
    const m = this.o.metrics;
    m.delivered.inc();
    if (e.attempt > 1) m.redelivered.inc();
    else {
      const sent = this.parseTime(e.msg.publishedAt);
      if (!Number.isNaN(sent)) m.deliveryLatency.observe(Math.max(0, Date.now() - sent) / 1000);
    }
    const msg = e.msg;
    let traceparent = msg.traceparent;
    if (this.o.tracing) {
      e.span = this.o.tracing.process(msg, e.attempt);
      traceparent = e.span.traceparent; // the controller's handler runs inside the process span
    }
    this.send!(
      deliverFrame({
        deliveryId: e.deliveryId,
        id: msg.id,
        kind: msg.kind,
        origin: msg.origin,
        attempt: e.attempt,
        publishedAt: msg.publishedAt,
        payloadJson: msg.payloadJson,
        traceparent,
        tracestate: msg.tracestate,
      }),
    );
  }

  private take(deliveryId: string): Entry | undefined {
    const e = this.inFlight.get(deliveryId);
    if (!e) return undefined;
    this.inFlight.delete(deliveryId);
    if (this.bySeq.get(e.msg.seq) === deliveryId) this.bySeq.delete(e.msg.seq);
    this.gaugeInFlight();
    this.notifyIdle();
    return e;
  }

  /** A failed attempt: the last one becomes a dead letter, an earlier one comes again after delayMs. */
  private fail(e: Entry, reason: string, delayMs: number): void {
    if (e.attempt >= this.o.maxDeliver) this.deadLetter(e, reason);
    else if (e.source.redelivers) e.msg.nak(delayMs);
    else this.redeliverLater(e, delayMs);
  }

  /** For a source without a broker: the next attempt, after delayMs. */
  private redeliverLater(e: Entry, delayMs: number): void {
    const seq = e.msg.seq;
    const timer = this.clock.setTimer(() => {
      this.redeliveries.delete(seq);
      this.offer(e.msg, e.source, e.attempt + 1);
    }, delayMs);
    this.redeliveries.set(seq, { entry: e, timer });
  }

  private onAckWaitExpired(e: Entry): void {
    endSpan(e, "timeout");
    this.o.metrics.ackTimeouts.inc();
    // A source that redelivers runs the same ack-wait clock; only its last attempt needs us.
    if (e.attempt >= this.o.maxDeliver) this.deadLetter(e, `not acked within ${this.o.ackWaitMs} ms`);
    else if (!e.source.redelivers) this.redeliverLater(e, 0);
  }

  /**
   * Writes the dead letter, then settles the message (term). Until the write is durable the
   * message stays unsettled and is kept alive; a failing store is retried with back-off, never
   * by blocking, and never by settling what is not recorded.
   */
  private deadLetter(e: Entry, reason: string, onRecorded?: () => void): void {
    const seq = e.msg.seq;
    const rec: Recording = { entry: e, also: [], onRecorded };
    this.recording.set(seq, rec);
    this.armKeepAlive();
    void this.record(rec, reason);
  }

  private async record(rec: Recording, reason: string): Promise<void> {
    const { entry: e } = rec;
    const log = this.o.logger;
    for (let failures = 0; ; failures++) {
      try {
        await e.source.recordDeadLetter(e.msg, e.attempt, reason);
        break;
      } catch (err) {
        log.error({ err: (err as Error).message, id: e.msg.id, origin: e.msg.origin, failures }, "could not record a dead letter; retrying, message left unsettled");
        if (this.closed) {
          this.recording.delete(e.msg.seq);
          this.notifyRecorded();
          return; // unsettled: the bus redelivers it to the next run, which records it
        }
        await new Promise<void>((resolve) => this.clock.setTimer(resolve, backoffMs(failures, RECORD_RETRY_MAX_MS)));
      }
    }
    this.recording.delete(e.msg.seq);
    this.rememberDead(e.msg.seq);
    this.o.metrics.deadLettered.inc();
    if (rec.onRecorded) rec.onRecorded();
    else log.warn({ id: e.msg.id, kind: e.msg.kind, origin: e.msg.origin, attempts: e.attempt, reason, source: e.source.name }, "dead letter recorded");
    e.msg.term();
    for (const m of rec.also) m.term();
    this.notifyRecorded();
  }

  private rememberDead(seq: number): void {
    if (this.recentDead.size >= RECENT_DEAD_MAX) this.recentDead.delete(this.recentDead.values().next().value!);
    this.recentDead.add(seq);
  }

  /**
   * Arms the one timer for the earliest deadline. An armed timer never fires late: every deadline
   * is now + ackWaitMs when set, so none can come before the one it was armed for.
   */
  private armSweep(): void {
    if (this.sweepTimer) return;
    const head = this.inFlight.values().next();
    if (head.done) return;
    // +1: timers may fire a hair early.
    this.sweepTimer = this.clock.setTimer(this.sweep, head.value.deadline - this.clock.now() + 1);
  }

  private stopSweep(): void {
    this.clock.clearTimer(this.sweepTimer);
    this.sweepTimer = undefined;
  }

  private readonly sweep = (): void => {
    this.sweepTimer = undefined;
    const now = this.clock.now();
    for (const e of this.inFlight.values()) {
      if (e.deadline > now) break;
      if (this.take(e.deliveryId)) this.onAckWaitExpired(e);
    }
    this.armSweep();
  };

  /** Parked messages and dead letters being written stay ours: tell their sources so, well within each ack wait. */
  private armKeepAlive(): void {
    if (this.keepAliveTimer || this.closed || (this.parked.size === 0 && this.recording.size === 0)) return;
    this.keepAliveTimer = this.clock.setTimer(() => {
      this.keepAliveTimer = undefined;
      for (const e of this.parked.values()) e.msg.working();
      for (const r of this.recording.values()) for (const m of [r.entry.msg, ...r.also]) m.working();
      this.armKeepAlive();
    }, Math.max(50, Math.floor(this.o.ackWaitMs / 3)));
  }

  /** The in-flight gauge, set once per tick rather than on every change (prom-client allocates on each set). */
  private gaugeInFlight(): void {
    if (this.gaugePending) return;
    this.gaugePending = true;
    process.nextTick(this.setInFlightGauge);
  }

  private readonly setInFlightGauge = (): void => {
    this.gaugePending = false;
    this.o.metrics.inFlight.set(this.inFlight.size);
  };

  /** Date.parse of publishedAt: messages of one origin and millisecond share the same text. */
  private parseTime(iso: string): number {
    if (iso !== this.lastIso) {
      this.lastIso = iso;
      this.lastIsoMs = Date.parse(iso);
    }
    return this.lastIsoMs;
  }

  private waitFor(done: () => boolean, waiters: Array<() => void>, timeoutMs: number): Promise<boolean> {
    if (done()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const finish = (): void => {
        this.clock.clearTimer(timer);
        resolve(true);
      };
      const timer = this.clock.setTimer(() => {
        const i = waiters.indexOf(finish);
        if (i >= 0) waiters.splice(i, 1);
        resolve(done());
      }, timeoutMs);
      waiters.push(finish);
    });
  }

  private notifyIdle(): void {
    if (this.inFlight.size === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private notifyRecorded(): void {
    if (this.recording.size === 0) for (const w of this.recordedWaiters.splice(0)) w();
  }
}

function endSpan(e: Entry, outcome: Parameters<ProcessSpan["end"]>[0]): void {
  if (e.span === undefined) return;
  e.span.end(outcome);
  e.span = undefined;
}
