// Replay of dead letters (`uptrakit-relay dlq replay`): the CLI marks rows in the relay's store;
// the running relay picks them up and hands them to the delivery state machine as a source
// without a broker (it counts the fresh attempts and redelivers them itself). A replayed message
// that fails again goes back to the dead letters; one that is acked is removed.
// A dead letter of this relay's own origin (a queued publish the bus refused) is never handed to
// its own controller (no echoes): replaying it publishes it again.

import type { InboundMessage } from "./bus/bus.js";
import type { ArrivalSource } from "./delivery.js";
import type { Logger } from "./log.js";
import type { DeadLetter, RelayStore } from "./store/store.js";

const POLL_MS = 500;
const POLL_BATCH = 64;

export interface ReplayOptions {
  store: RelayStore;
  /** This relay's instance id: dead letters of this origin are republished, not delivered. */
  instanceId: string;
  logger: Logger;
  /** Hands a replayed message to delivery (the same entry point as bus messages). */
  offer(msg: InboundMessage, source: ArrivalSource): void;
  /** Sends a dead letter of this relay's own origin to the bus again. */
  republish(row: DeadLetter): Promise<void>;
}

/**
 * A replayed dead letter as the state machine sees it. Its `seq` is the store's row seq,
 * negated, so it never collides with a bus sequence. nak() and working() have nothing to tell:
 * the machine keeps its clock and its redeliveries.
 */
class ReplayedMessage implements InboundMessage {
  readonly id: string;
  readonly kind: string;
  readonly origin: string;
  readonly publishedAt: string;
  readonly payloadJson: string;
  readonly traceparent: string | undefined;
  readonly tracestate: string | undefined;
  readonly seq: number;
  readonly attempt = 1;

  constructor(
    readonly row: DeadLetter,
    private readonly source: ReplaySource,
  ) {
    this.id = row.id;
    this.kind = row.kind;
    this.origin = row.origin;
    this.publishedAt = row.publishedAt;
    this.payloadJson = row.payloadJson;
    this.traceparent = row.traceparent;
    this.tracestate = row.tracestate;
    this.seq = -row.seq;
  }

  ack(): void {
    this.source.finish(this, "acked");
  }

  nak(): void {}

  working(): void {}

  /** Dead again: the machine has already returned it to the dead letters. */
  term(): void {
    this.source.finish(this, "dead");
  }
}

export class ReplaySource implements ArrivalSource {
  readonly name = "replay";
  readonly redelivers = false;
  private readonly o: ReplayOptions;
  /** Rows being replayed now, by store seq: not picked up twice. */
  private readonly active = new Set<number>();
  private poller: NodeJS.Timeout | undefined;

  constructor(o: ReplayOptions) {
    this.o = o;
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

  recordDeadLetter(msg: InboundMessage, attempts: number, reason: string): Promise<void> {
    return this.o.store.returnDeadLetter(-msg.seq, attempts, `replay failed: ${reason}`);
  }

  finish(msg: ReplayedMessage, how: "acked" | "dead"): void {
    if (how === "dead") {
      this.active.delete(msg.row.seq);
      return;
    }
    // Stays active until the row is gone, so a poll in between cannot deliver it again.
    this.o.store.removeDeadLetter(msg.row.seq).then(
      () => this.active.delete(msg.row.seq),
      (err: unknown) => {
        this.active.delete(msg.row.seq);
        this.o.logger.error({ err: (err as Error).message, id: msg.id }, "could not remove an acked replayed dead letter; it may be delivered again");
      },
    );
  }

  private poll(): void {
    let rows: DeadLetter[];
    try {
      rows = this.o.store.replayRequests(POLL_BATCH);
    } catch (err) {
      this.o.logger.warn({ err: (err as Error).message }, "cannot read replay requests; will look again");
      return;
    }
    for (const row of rows) {
      if (this.active.has(row.seq)) continue;
      this.active.add(row.seq);
      if (row.origin === this.o.instanceId) {
        this.o.republish(row).then(
          () => this.active.delete(row.seq),
          (err: unknown) => {
            this.active.delete(row.seq);
            this.o.logger.error({ err: (err as Error).message, id: row.id }, "could not queue a replayed dead letter of this relay's own publish; will try again");
          },
        );
        continue;
      }
      this.o.offer(new ReplayedMessage(row, this), this);
    }
  }
}
