// Group commit for the relay's store: writes asked for in the same event-loop turn go into one
// transaction, so one fsync (synchronous = FULL) makes them all durable. Each write's promise
// resolves only after that commit. A store held busy by another process (an operator's
// `dlq purge`) is retried with back-off instead of blocking the event loop, and the writes stay
// queued in order meanwhile.

import type Database from "better-sqlite3";
import { backoffMs } from "../clock.js";

interface Op {
  run(): void;
  resolve(): void;
  reject(err: Error): void;
}

const BUSY_RETRY_MAX_MS = 1_000;

export const isBusy = (err: unknown): boolean => /^SQLITE_(BUSY|LOCKED)/.test(String((err as { code?: unknown } | null)?.code ?? ""));

export class GroupCommitter {
  private queue: Op[] = [];
  private scheduled = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private busyFailures = 0;
  private readonly commit: (ops: Op[]) => void;

  constructor(
    private readonly db: Database.Database,
    /** Told once per busy retry: the caller logs it. */
    private readonly onBusy: (err: Error, failures: number) => void = () => undefined,
  ) {
    const tx = db.transaction((ops: Op[]) => {
      for (const op of ops) op.run();
    });
    this.commit = (ops) => tx.immediate(ops);
  }

  /** Runs `run` (synchronous SQLite statements) in the next group commit; resolves once it is durable. */
  write(run: () => void): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ run, resolve, reject });
      this.schedule();
    });
  }

  get pending(): number {
    return this.queue.length;
  }

  /** Commits what is queued now, synchronously (close()); what cannot be written is rejected. */
  flushNow(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.runBatch(false);
    for (const op of this.queue.splice(0)) op.reject(new Error("the relay store was closed"));
  }

  private schedule(): void {
    if (this.scheduled || this.retryTimer) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.runBatch(true);
    });
  }

  private runBatch(retryWhenBusy: boolean): void {
    const ops = this.queue;
    if (ops.length === 0 || !this.db.open) return;
    this.queue = [];
    try {
      this.commit(ops);
    } catch (err) {
      if (isBusy(err) && retryWhenBusy) {
        this.queue = ops.concat(this.queue); // keep the order
        this.onBusy(err as Error, ++this.busyFailures);
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          this.runBatch(true);
        }, backoffMs(this.busyFailures, BUSY_RETRY_MAX_MS));
        return;
      }
      // Some other failure: find the write at fault by committing each alone; the rest still land.
      if (ops.length > 1) return this.runEach(ops);
      ops[0]!.reject(err as Error);
      return;
    }
    this.busyFailures = 0;
    for (const op of ops) op.resolve();
    if (this.queue.length > 0) this.schedule();
  }

  private runEach(ops: Op[]): void {
    for (const op of ops) {
      try {
        this.commit([op]);
        op.resolve();
      } catch (err) {
        op.reject(err as Error);
      }
    }
    if (this.queue.length > 0) this.schedule();
  }
}
