// Replay of dead letters (`uptrakit-relay dlq replay`): the CLI marks rows in the relay's store,
// the running relay picks them up and delivers them to its controller with fresh attempts.
// A dead letter of this relay's own origin (a queued publish the bus refused) is never handed to
// its own controller (no echoes): replaying it publishes it again.
// A replayed message behaves like a bus message (ack wait, nack delay, attempt limit), but its
// state lives in the store and the bus never sees it again.

import type { InboundMessage } from "./bus/bus.js";
import type { DeadLetter, RelayStore } from "./store/store.js";

const POLL_MS = 500;

export interface ReplayOptions {
  store: RelayStore;
  /** This relay's instance id: dead letters of this origin are republished, not delivered. */
  instanceId: string;
  ackWaitMs: number;
  /** Deliveries per replay; after the last one the source goes quiet, as the bus does. */
  maxDeliver: number;
  /** Hands a replayed message to delivery (the same path as bus messages). */
  offer(msg: InboundMessage): void;
  /** Sends a dead letter of this relay's own origin to the bus again. */
  republish(row: DeadLetter): void;
}

export class ReplayedMessage implements InboundMessage {
  readonly id: string;
  readonly kind: string;
  readonly origin: string;
  readonly publishedAt: string;
  readonly payloadJson: string;
  /** Negative, so it never collides with a bus sequence in the delivery tracker. */
  readonly seq: number;
  readonly deadLetterSeq: number;
  attempt = 1;
  private timer: NodeJS.Timeout | undefined;
  private done = false;

  constructor(
    row: DeadLetter,
    private readonly source: ReplaySource,
  ) {
    this.id = row.id;
    this.kind = row.kind;
    this.origin = row.origin;
    this.publishedAt = row.publishedAt;
    this.payloadJson = row.payloadJson;
    this.deadLetterSeq = row.seq;
    this.seq = -row.seq;
  }

  /** Starts this attempt's ack-wait clock, as the bus would. */
  arm(): void {
    this.timer = setTimeout(() => this.redeliver(), this.source.ackWaitMs);
    this.timer.unref();
  }

  ack(): void {
    this.finish();
    this.source.store.removeDeadLetter(this.deadLetterSeq);
  }

  nak(delayMs: number): void {
    if (this.done) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.redeliver(), delayMs);
    this.timer.unref();
  }

  working(): void {
    this.timer?.refresh();
  }

  /** Dead again: the delivery tracker has already returned it to the dead letters. */
  term(): void {
    this.finish();
  }

  private redeliver(): void {
    if (this.done) return;
    // Like the bus after max_deliver: no more attempts. The delivery tracker's own ack-wait
    // clock then returns the last attempt to the dead letters.
    if (this.attempt >= this.source.maxDeliver) return;
    this.attempt++;
    this.arm();
    this.source.redeliver(this);
  }

  private finish(): void {
    this.done = true;
    clearTimeout(this.timer);
    this.source.forget(this);
  }
}

export class ReplaySource {
  readonly store: RelayStore;
  readonly ackWaitMs: number;
  readonly maxDeliver: number;
  private readonly instanceId: string;
  private readonly offerFn: (msg: InboundMessage) => void;
  private readonly republishFn: (row: DeadLetter) => void;
  private readonly active = new Map<number, ReplayedMessage>();
  private poller: NodeJS.Timeout | undefined;

  constructor(o: ReplayOptions) {
    this.store = o.store;
    this.ackWaitMs = o.ackWaitMs;
    this.maxDeliver = o.maxDeliver;
    this.instanceId = o.instanceId;
    this.offerFn = o.offer;
    this.republishFn = o.republish;
  }

  /** Polls the store for replay requests while a controller is there to take them. */
  start(): void {
    if (this.poller) return;
    this.poll();
    this.poller = setInterval(() => this.poll(), POLL_MS);
    this.poller.unref();
  }

  stop(): void {
    if (this.poller) clearInterval(this.poller);
    this.poller = undefined;
  }

  /** A replayed message failed its last attempt: back among the dead letters. */
  returnToDeadLetters(msg: ReplayedMessage, reason: string): void {
    this.store.returnDeadLetter(msg.deadLetterSeq, msg.attempt, `replay failed: ${reason}`);
  }

  redeliver(msg: ReplayedMessage): void {
    this.offerFn(msg);
  }

  forget(msg: ReplayedMessage): void {
    this.active.delete(msg.deadLetterSeq);
  }

  private poll(): void {
    for (const row of this.store.replayRequests(64)) {
      if (this.active.has(row.seq)) continue;
      if (row.origin === this.instanceId) {
        this.republishFn(row);
        continue;
      }
      const msg = new ReplayedMessage(row, this);
      this.active.set(row.seq, msg);
      msg.arm();
      this.offerFn(msg);
    }
  }
}
