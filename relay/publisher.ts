// The publish path: straight to the bus while it is up, into the durable outbox while it is
// not. Queued messages are flushed in order, with the same (origin, id) so that a flush after
// an unclear acknowledgement is stored once (the bus's duplicate window).

import { BusUnavailableError, type Bus, type BusMessage } from "./bus/bus.js";
import type { DeadLetter, OutboxEntry, RelayStore } from "./store/store.js";
import type { RelayMetrics } from "./metrics.js";
import type { Logger } from "./log.js";

export type PublishOutcome =
  | { status: "published" }
  | { status: "queued" }
  /** Not now: retry later with the same id. */
  | { status: "unavailable"; reason: string }
  /** Never: the bus refused this message itself. */
  | { status: "refused"; reason: string };

export interface PublisherOptions {
  bus: Bus;
  store: RelayStore;
  outboxMax: number;
  metrics: RelayMetrics;
  logger: Logger;
}

const FLUSH_BATCH = 256;
const FLUSH_RETRY_MS = 1000;

export class Publisher {
  private readonly o: PublisherOptions;
  /** Rows in the outbox, and those being written to it (kept in step by recount() and enqueue()). */
  private depth = 0;
  /** Outbox writes awaiting their group commit. */
  private enqueuing = 0;
  private flushing: Promise<void> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Direct publishes awaiting their PubAck: any of them may yet fail and be queued. */
  private direct = 0;
  /** Publishes that must queue, waiting for those direct ones to settle first (in arrival order). */
  private queuers: Array<() => void> = [];
  private waiting = 0;
  /** Why the outbox cannot be written right now (the last write failed); undefined when it can. */
  private _storeProblem: string | undefined;

  constructor(o: PublisherOptions) {
    this.o = o;
    this.recount();
  }

  get outboxDepth(): number {
    return this.depth;
  }

  /** Set while the last outbox write failed (readiness reports it). */
  get storeProblem(): string | undefined {
    return this._storeProblem;
  }

  async publish(msg: BusMessage): Promise<PublishOutcome> {
    // While anything is queued, new messages queue behind it: the outbox keeps publish order.
    if (this.depth === 0 && this.waiting === 0 && this.o.bus.status().state === "connected") {
      const started = performance.now();
      this.direct++;
      try {
        await this.o.bus.publish(msg);
        this.o.metrics.publishLatency.observe((performance.now() - started) / 1000);
        return { status: "published" };
      } catch (err) {
        if (!(err instanceof BusUnavailableError)) {
          this.o.logger.error({ err, id: msg.id, kind: msg.kind }, "publish failed");
          return { status: "refused", reason: `the bus refused the message: ${(err as Error).message}` };
        }
        this.o.logger.warn({ id: msg.id, reason: (err as Error).message }, "bus unavailable; queueing in the outbox");
        return this.enqueue(msg);
      } finally {
        if (--this.direct === 0) this.wakeQueuers();
      }
    }
    // A publish sent before the bus went away may still be awaiting its PubAck; if that fails it
    // is queued, and must stay ahead of this one.
    if (this.direct > 0) {
      this.waiting++;
      await new Promise<void>((resolve) => this.queuers.push(resolve));
      this.waiting--;
    }
    return this.enqueue(msg);
  }

  private wakeQueuers(): void {
    const waiting = this.queuers;
    this.queuers = [];
    for (const resolve of waiting) resolve();
  }

  /** Starts a flush if there is something to flush and none is running. */
  kick(): void {
    if (this.closed || this.flushing || this.depth === 0) return;
    this.flushing = this.flush()
      .catch((err: unknown) => {
        // The store itself failed (disk full, I/O error): what is queued stays queued; try again.
        this.o.logger.error({ err }, "outbox flush failed; will retry");
        this.retryLater();
      })
      .finally(() => {
        this.flushing = undefined;
      });
  }

  /** Puts a dead letter of this relay's own publish back into the outbox, to be sent again. */
  async requeueDeadLetter(row: DeadLetter): Promise<void> {
    await this.o.store.requeueDeadLetter(row.seq);
    this.o.logger.info({ id: row.id, kind: row.kind }, "dead letter of this relay's own publish queued to be published again");
    this.recount();
    this.kick();
  }

  /** Waits for a running flush to finish (used by drain). */
  async settle(): Promise<void> {
    await this.flushing;
  }

  /**
   * Shutdown: gives the outbox until timeoutMs to reach the bus (a pod being replaced may lose
   * its data dir). Resolves with what is still queued.
   */
  async flushBeforeStop(timeoutMs: number): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && this.depth > 0 && Date.now() < deadline) {
      const left = deadline - Date.now();
      if (this.o.bus.status().state !== "connected") {
        // The bus may come back within the drain timeout (a NATS restart during a rollout).
        await this.untilConnected(left);
        continue;
      }
      this.kick();
      await Promise.race([this.flushing, new Promise((r) => setTimeout(r, Math.max(0, left)).unref())]);
    }
    return this.depth;
  }

  private untilConnected(timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        unsubscribe();
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, timeoutMs));
      const unsubscribe = this.o.bus.onStatus((s) => {
        if (s.state === "connected") done();
      });
    });
  }

  close(): void {
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
  }

  /** Queues a publish in the outbox; answered `queued` only once the row is fsynced. */
  private async enqueue(msg: BusMessage): Promise<PublishOutcome> {
    if (this.depth >= this.o.outboxMax) {
      return { status: "unavailable", reason: `the bus is unreachable and the outbox is full (${this.o.outboxMax} messages)` };
    }
    // Counted from now, so concurrent publishes respect the limit and queue behind this one.
    this.depth++;
    this.enqueuing++;
    this.o.metrics.outboxDepth.set(this.depth);
    try {
      await this.o.store.enqueue(msg);
      this._storeProblem = undefined;
    } catch (err) {
      this._storeProblem = `the relay store cannot be written: ${(err as Error).message}`;
      this.depth--;
      this.o.metrics.outboxDepth.set(this.depth);
      this.o.logger.error({ err: (err as Error).message, id: msg.id }, "could not write to the outbox");
      return { status: "unavailable", reason: "the bus is unreachable and the outbox could not be written" };
    } finally {
      this.enqueuing--;
    }
    this.kick();
    return { status: "queued" };
  }

  private async flush(): Promise<void> {
    while (!this.closed && this.depth > 0) {
      if (this.o.bus.status().state !== "connected") return this.retryLater();
      const batch = this.o.store.outboxHead(FLUSH_BATCH);
      if (batch.length === 0) {
        this.depth = this.enqueuing; // those kick a flush once committed
        break;
      }
      // Pipelined, and settled strictly in order: the first row the bus cannot take right now
      // stops the batch, so nothing behind it overtakes it. A row the bus will never take (e.g.
      // larger than the server's max_payload, which a publish made while disconnected could not
      // be checked against) would block everything behind it for ever: it becomes a dead letter.
      const results = await Promise.allSettled(batch.map((m) => this.o.bus.publish(m)));
      const sentSeqs: number[] = [];
      let interrupted: Error | undefined;
      for (const [i, r] of results.entries()) {
        const m = batch[i]!;
        if (r.status === "fulfilled") sentSeqs.push(m.seq);
        else if (r.reason instanceof BusUnavailableError) {
          interrupted = r.reason;
          break;
        } else await this.setAside(m, r.reason as Error);
      }
      await this.o.store.outboxRemove(sentSeqs);
      const sent = sentSeqs.length;
      this.recount();
      this.o.metrics.outboxFlushed.inc(sent);
      if (interrupted) {
        this.o.logger.warn({ err: interrupted.message, left: this.depth }, "outbox flush interrupted; will retry");
        return this.retryLater();
      }
      if (sent > 0) this.o.logger.info({ sent, left: this.depth }, "outbox flushed");
    }
    this.o.metrics.outboxDepth.set(this.depth);
  }

  /** Moves a queued publish the bus refused for good from the outbox to the dead letters. */
  private async setAside(m: OutboxEntry, err: Error): Promise<void> {
    const reason = `the bus refused this queued publish: ${err.message}`;
    await this.o.store.setAsideOutboxEntry(m, reason);
    this.o.metrics.deadLettered.inc();
    this.o.metrics.refused.inc();
    // Never the payload: it may be anything the controller sent.
    this.o.logger.error({ id: m.id, kind: m.kind, reason }, "queued publish refused by the bus; recorded as a dead letter");
  }

  /** The outbox depth from the store, and its gauge. */
  private recount(): void {
    this.depth = this.o.store.outboxDepth() + this.enqueuing;
    this.o.metrics.outboxDepth.set(this.depth);
  }

  private retryLater(): void {
    if (this.closed || this.retryTimer) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.kick();
    }, FLUSH_RETRY_MS);
    this.retryTimer.unref();
  }
}
