// The embedded bus: one SQLite file shared by the relays (processes) of one host, with the
// semantics of a JetStream durable pull consumer (see bus.ts). Used when no NATS URL is given.
//
// Tables (all keyed by the logical stream, so one file can hold several streams):
// - bus_messages: the stream. `seq` is an AUTOINCREMENT key, so sequences only ever grow, even
//   after retention deletes rows. UNIQUE (stream, origin, id) suppresses duplicates: a publish
//   of a held (origin, id) within DUPLICATE_WINDOW_MS answers {duplicate: true}; outside the
//   window the old copy is replaced by a new one with a new seq (JetStream would store a second
//   copy; replacing it means a consumer that had not yet seen the old copy sees it once).
// - bus_consumers: one row per consumer (name = instanceId): `cursor` = the highest seq handed
//   to it for the first time ("deliver new": created at the stream's last seq), last_active.
// - bus_deliveries: one row per (consumer, seq) delivered and not yet finished: how many times
//   it was delivered and when it becomes visible again (the ack-wait deadline or the end of a
//   nak delay). ack()/term() delete the row; so does the expiry of the maxDeliver-th delivery
//   (when there is a limit: the relay asks for none, UNLIMITED_DELIVERIES).
//   The rows of a consumer are its unsettled messages (JetStream's "ack pending"): there are at
//   most maxInFlight of them.
//
// Concurrency: WAL mode, a busy timeout, and every read-modify-write in a BEGIN IMMEDIATE
// transaction (a deferred transaction that upgrades to a writer can fail with SQLITE_BUSY
// without waiting). Single-statement writes (the settles) take the write lock at their start.
//
// Noticing new rows. Measured by test/bus-sqlite.test.ts (a child process publishes every 7 ms,
// the test process consumes; publish() call → onMessage, 150 messages, 2-vCPU VM, ext4):
//   WAL watch + poll (the default): p50 1.5 ms, p99 2-5 ms, max 2-8 ms
//   WAL watch alone:                p50 1.4 ms, max 2-5 ms
//   data_version poll alone (40 ms): p50 ≈ 21 ms, max ≈ 41 ms
// 1. In-process: a publish wakes every SqliteBus of this process on the same file at once.
// 2. fs.watch (inotify) on the `-wal` file: every commit by any process writes to the WAL. The
//    event comes before the commit is visible (the writer fsyncs, then publishes the commit in
//    the -shm wal-index, which inotify does not see), so an event starts a short series of
//    data_version checks (after ~1 ms, then +1, +2, +4, +8, +16 ms): one check alone missed
//    the last message of a burst in testing.
// 3. Fallback: PRAGMA data_version every POLL_INTERVAL_MS while consuming (about 1 µs a call),
//    for file systems where inotify says nothing (network or some overlay mounts).
// A wake-up first runs a read-only check (is there a new message and room in the window, or a
// delivery due?) and takes the write lock only when there is something to deliver, so the
// commits of other relays (their acks) cost one cheap read here and never ping-pong.
// Redeliveries (nak delays, ack-wait expiries) are driven by a timer set for the earliest
// deadline of this consumer.

import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import {
  BusStartError,
  BusUnavailableError,
  UNLIMITED_DELIVERIES,
  type Bus,
  type BusMessage,
  type BusSettings,
  type BusStatus,
  type Consumption,
  type InboundMessage,
  type PublishResult,
  type StreamInfo,
} from "./bus.js";
import type { Logger } from "../log.js";
import { readSqlitePeers } from "./sqlite-peers.js";
import type { Peer } from "../peers.js";
import { SCHEMA, migrate, prepareStatements, type CheckRow, type DeliveryRow, type SettleKind, type Statements } from "./sqlite-schema.js";

/** Like JetStream's duplicate_window. */
/** A settle waiting for its turn's transaction; `at` is when it was asked for. */
interface PendingSettle {
  kind: SettleKind;
  seq: number;
  attempt: number;
  delayMs: number;
  at: number;
}

export const DUPLICATE_WINDOW_MS = 2 * 60 * 1000;
/** The data_version fallback poll, while consuming. */
export const POLL_INTERVAL_MS = 40;
/** After a WAL event, data_version is checked at once and again after these pauses. */
const WAL_EVENT_RECHECK_MS = [1, 2, 4, 8, 16];
const BUSY_TIMEOUT_MS = 5000;
/** After an unexpected SQLite error while pulling, try again after this long. */
const RETRY_MS = 500;
/** setTimeout cannot wait longer than this. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface SqliteBusOptions extends BusSettings {
  file: string;
  logger: Logger;
  /** Overrides DUPLICATE_WINDOW_MS (tests). */
  duplicateWindowMs?: number;
  /** Overrides POLL_INTERVAL_MS; 0 turns the fallback poll off (tests, measurements). */
  pollIntervalMs?: number;
  /** false turns the fs.watch of the WAL off (tests, measurements). Default true. */
  watchWal?: boolean;
}

// ---- in-process wake-ups: every SqliteBus of this process, by bus file ----------------------

const neighbours = new Map<string, Set<SqliteBus>>();

function sqliteCode(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" ? code : "";
}

const isBusy = (err: unknown): boolean => /^SQLITE_(BUSY|LOCKED)/.test(sqliteCode(err));

export class SqliteBus implements Bus {
  readonly name = "sqlite" as const;
  readonly file: string;

  private readonly settings: SqliteBusOptions;
  private readonly log: Logger;
  private readonly stream: string;
  private readonly consumerName: string;
  private readonly dupWindowMs: number;
  private readonly pollIntervalMs: number;
  private readonly watchWal: boolean;

  private db: Database.Database | undefined;
  // Prepared statements, made in start().
  private st!: Statements;
  /** Stores a batch of publishes in one transaction. */
  private publishTx!: (batch: BusMessage[], now: number) => PublishResult[];
  /** Publishes waiting for the next group commit (see publish()). */
  private publishQueue: Array<{ msg: BusMessage; resolve(r: PublishResult): void; reject(err: Error): void }> = [];
  private publishScheduled = false;
  private fetchTx!: (now: number) => { batch: DeliveryRow[]; nextDue: number | null };
  /** Applies a batch of settles in one transaction (see settle()). */
  private settleTx!: (batch: PendingSettle[]) => void;
  /** Settles waiting for the end of this event-loop turn. */
  private settleQueue: PendingSettle[] = [];
  private settleScheduled = false;
  /** keepSelf false (at start): this consumer too goes if it has been idle too long. */
  private maintainTx!: (now: number, keepSelf: boolean) => { pruned: number; consumersRemoved: number };

  private state: BusStatus = { state: "disconnected", reason: "not started" };
  private readonly statusListeners = new Set<(s: BusStatus) => void>();

  private handler: ((msg: InboundMessage) => void) | undefined;
  private pumpQueued = false;
  private pumping = false;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private deadlineAt = Infinity;
  private pollTimer: NodeJS.Timeout | undefined;
  private watcher: fs.FSWatcher | undefined;
  private maintenanceTimer: NodeJS.Timeout | undefined;
  private lastDataVersion = -1;
  private burstTimer: NodeJS.Timeout | undefined;
  private burstStep = 0;

  constructor(settings: SqliteBusOptions) {
    this.settings = settings;
    this.file = path.resolve(settings.file);
    this.log = settings.logger;
    this.stream = settings.stream;
    this.consumerName = settings.instanceId;
    this.dupWindowMs = settings.duplicateWindowMs ?? DUPLICATE_WINDOW_MS;
    this.pollIntervalMs = settings.pollIntervalMs ?? POLL_INTERVAL_MS;
    this.watchWal = settings.watchWal ?? true;
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  async start(): Promise<void> {
    if (this.db) return;
    if (this.state.state === "closed") throw new BusStartError(`the SQLite bus ${this.file} was closed`);
    const db = await this.open();
    if (this.isClosed()) {
      db.close();
      throw new BusStartError(`the SQLite bus ${this.file} was closed while starting`);
    }
    this.db = db;
    this.st = prepareStatements(db);
    this.makeTransactions(db);
    try {
      const now = Date.now();
      // Consumers idle too long go first, so a relay that was away longer than the threshold
      // starts afresh ("deliver new"), as with JetStream, whose server would have removed it.
      this.maintainTx(now, false);
      this.immediate(() => {
        const created = this.st.consumerCreate.run(this.stream, this.consumerName, this.stream, now, now).changes > 0;
        if (created) this.log.info({ bus: "sqlite", file: this.file, consumer: this.consumerName }, "bus consumer created");
        else this.st.consumerTouch.run(now, this.stream, this.consumerName);
      });
      this.lastDataVersion = this.st.dataVersion.get() as number;
    } catch (err) {
      this.db = undefined;
      db.close();
      throw new BusStartError(`cannot use the SQLite bus file ${this.file}: ${(err as Error).message}`);
    }
    let set = neighbours.get(this.file);
    if (!set) neighbours.set(this.file, (set = new Set()));
    set.add(this);
    const every = Math.min(60_000, Math.max(100, Math.floor(Math.min(this.settings.maxAgeMs, this.settings.inactiveThresholdMs) / 4)));
    this.maintenanceTimer = setInterval(() => this.maintain(), every);
    this.maintenanceTimer.unref();
    this.setStatus({ state: "connected" });
    this.log.debug({ bus: "sqlite", file: this.file, stream: this.stream }, "bus started");
  }

  /** Opens the file, switches it to WAL and creates the schema; any failure is a BusStartError. */
  private async open(): Promise<Database.Database> {
    const fail = (why: string): never => {
      throw new BusStartError(`cannot use the SQLite bus file ${this.file}: ${why}`);
    };
    try {
      fs.mkdirSync(path.dirname(this.file), { recursive: true });
    } catch (err) {
      fail(`cannot create its directory: ${(err as Error).message}`);
    }
    let db: Database.Database | undefined;
    const deadline = Date.now() + BUSY_TIMEOUT_MS * 2;
    for (;;) {
      try {
        db = new Database(this.file, { timeout: BUSY_TIMEOUT_MS });
        // Switching a fresh file to WAL needs an exclusive lock for a moment; relays starting
        // at once on a fresh file may see SQLITE_BUSY here despite the busy timeout: retry.
        const mode = db.pragma("journal_mode = WAL", { simple: true });
        if (String(mode).toLowerCase() !== "wal") fail(`cannot switch it to WAL mode (journal mode stays ${String(mode)})`);
        db.pragma("synchronous = NORMAL");
        db.transaction(() => {
          db!.exec(SCHEMA);
          migrate(db!);
        }).immediate();
        // A bus that opens but is damaged would lose messages later: find out now.
        const check = db.pragma("quick_check", { simple: true });
        if (check !== "ok") fail(`the integrity check says: ${String(check)} (move the file away to start afresh)`);
        return db;
      } catch (err) {
        db?.close();
        db = undefined;
        if (err instanceof BusStartError) throw err;
        if (isBusy(err) && Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 10 + Math.floor(Math.random() * 20)));
          continue;
        }
        const code = sqliteCode(err);
        const hint = code === "SQLITE_NOTADB" || code.startsWith("SQLITE_CORRUPT") ? " (move the file away to start afresh)" : "";
        fail(`${(err as Error).message}${hint}`);
      }
    }
  }

  async close(): Promise<void> {
    if (this.state.state === "closed") return;
    this.commitPublishes(); // what was asked for before close() is stored (or refused), not dropped
    this.commitSettles(); // and the settles of this last turn are written
    this.stopConsuming();
    if (this.maintenanceTimer) clearInterval(this.maintenanceTimer);
    this.maintenanceTimer = undefined;
    const set = neighbours.get(this.file);
    set?.delete(this);
    if (set?.size === 0) neighbours.delete(this.file);
    if (this.db?.open) this.db.close();
    this.db = undefined;
    this.setStatus({ state: "closed" });
    this.log.debug({ bus: "sqlite", file: this.file }, "bus closed");
  }

  private isClosed(): boolean {
    return this.state.state === "closed";
  }

  status(): BusStatus {
    return { ...this.state };
  }

  onStatus(listener: (s: BusStatus) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  private setStatus(s: BusStatus): void {
    if (s.state === this.state.state && s.reason === this.state.reason) return;
    this.state = s;
    for (const l of this.statusListeners) {
      try {
        l({ ...s });
      } catch (err) {
        this.log.error({ err }, "bus status listener failed");
      }
    }
  }

  // ---- transactions ------------------------------------------------------------------------

  private immediate<T>(fn: () => T): T {
    return this.db!.transaction(fn).immediate();
  }

  private makeTransactions(db: Database.Database): void {
    const st = this.st;
    const { stream, consumerName: consumer } = this;
    const { maxDeliver, maxInFlight, ackWaitMs } = this.settings;

    const publishOne = (m: BusMessage, now: number): PublishResult => {
      const held = st.dupFind.get(stream, m.origin, m.id) as { seq: number; stored_at: number } | undefined;
      if (held) {
        if (now - held.stored_at < this.dupWindowMs) return { duplicate: true };
        st.deliveriesOfSeq.run(stream, held.seq);
        st.msgDelete.run(held.seq);
      }
      st.msgInsert.run(stream, m.origin, m.id, m.kind, m.publishedAt, m.payloadJson, now, m.traceparent ?? null, m.tracestate ?? null);
      return { duplicate: false };
    };
    const publish = db.transaction((batch: BusMessage[], now: number): PublishResult[] => batch.map((m) => publishOne(m, now)));
    this.publishTx = (batch, now) => publish.immediate(batch, now);

    const fetch = db.transaction((now: number) => {
      let cursor = st.consumerGet.get(stream, consumer) as number | undefined;
      if (cursor === undefined) {
        // Removed behind our back (idle past the threshold while this process was stalled):
        // recreate it, "deliver new", as a JetStream relay recreates a vanished consumer.
        this.log.warn({ bus: "sqlite", consumer }, "bus consumer was removed; recreating it (deliver new)");
        st.consumerCreate.run(stream, consumer, stream, now, now);
        cursor = st.consumerGet.get(stream, consumer) as number;
      }
      if (maxDeliver !== UNLIMITED_DELIVERIES) st.expireExhausted.run(stream, consumer, now, maxDeliver);
      const batch = st.due.all(stream, consumer, now) as DeliveryRow[];
      const deadline = now + ackWaitMs;
      for (const r of batch) {
        st.redeliver.run(deadline, stream, consumer, r.seq);
        r.delivered += 1;
      }
      const free = maxInFlight - (st.inflight.get(stream, consumer) as number);
      if (free > 0) {
        const fresh = st.fresh.all(stream, cursor, free) as DeliveryRow[];
        for (const r of fresh) {
          st.deliver.run(stream, consumer, r.seq, deadline);
          r.delivered = 1;
          batch.push(r);
        }
        if (fresh.length > 0) cursor = fresh[fresh.length - 1]!.seq;
      }
      st.consumerAdvance.run(cursor, now, stream, consumer);
      batch.sort((a, b) => a.seq - b.seq);
      return { batch, nextDue: st.nextDue.get(stream, consumer) as number | null };
    });
    this.fetchTx = (now) => fetch.immediate(now);

    const settle = db.transaction((batch: PendingSettle[]) => {
      for (const x of batch) this.applySettle(x);
    });
    this.settleTx = (batch) => settle.immediate(batch);

    const maintain = db.transaction((now: number, keepSelf: boolean) => {
      const idleBefore = now - this.settings.inactiveThresholdMs;
      const keep = keepSelf ? consumer : null; // `name IS NOT NULL` spares none
      st.idleDeliveries.run(stream, stream, idleBefore, keep);
      const consumersRemoved = st.idleConsumers.run(stream, idleBefore, keep).changes;
      if (keepSelf) st.consumerTouch.run(now, stream, consumer);
      const pruned = st.pruneOld.run(stream, now - this.settings.maxAgeMs).changes;
      if (pruned > 0) st.pruneOrphans.run(stream);
      return { pruned, consumersRemoved };
    });
    this.maintainTx = (now, keepSelf) => {
      const r = maintain.immediate(now, keepSelf);
      if (r.pruned > 0) this.log.debug({ bus: "sqlite", pruned: r.pruned }, "bus retention pruned messages");
      if (r.consumersRemoved > 0) this.log.info({ bus: "sqlite", removed: r.consumersRemoved }, "bus removed idle consumers");
      return r;
    };
  }

  /** Retention, idle consumers, and this consumer's last-active time. */
  private maintain(): void {
    if (!this.db) return;
    try {
      this.maintainTx(Date.now(), true);
    } catch (err) {
      this.log.warn({ bus: "sqlite", err: (err as Error).message }, "bus maintenance failed; will retry");
    }
  }

  // ---- publish -----------------------------------------------------------------------------

  /**
   * Resolves once the message is fsynced. Publishes of one event-loop turn are stored in one
   * transaction under synchronous = FULL (group commit: one fsync for the batch); every other
   * write of this connection stays NORMAL — a lost settle means a redelivery, which
   * at-least-once allows. (The pragma is set with db.pragma each time: a prepared PRAGMA
   * statement applies its setting when it is prepared, not when it runs.)
   */
  publish(msg: BusMessage): Promise<PublishResult> {
    if (!this.db)
      return Promise.reject(new BusUnavailableError(this.state.state === "closed" ? "the SQLite bus is closed" : "the SQLite bus is not started"));
    return new Promise<PublishResult>((resolve, reject) => {
      this.publishQueue.push({ msg, resolve, reject });
      if (this.publishScheduled) return;
      this.publishScheduled = true;
      setImmediate(this.commitPublishes);
    });
  }

  private readonly commitPublishes = (): void => {
    this.publishScheduled = false;
    const batch = this.publishQueue;
    this.publishQueue = [];
    if (batch.length === 0) return;
    const db = this.db;
    let results: PublishResult[];
    try {
      if (!db) throw new Error("the bus was closed");
      db.pragma("synchronous = FULL");
      try {
        results = this.publishTx(batch.map((p) => p.msg), Date.now());
      } finally {
        db.pragma("synchronous = NORMAL");
      }
    } catch (err) {
      const e = new BusUnavailableError(`the SQLite bus ${this.file} cannot take the message: ${(err as Error).message}`);
      for (const p of batch) p.reject(e);
      return;
    }
    batch.forEach((p, i) => p.resolve(results[i]!));
    if (results.some((r) => !r.duplicate)) for (const b of neighbours.get(this.file) ?? []) b.wake();
  };

  // ---- consume -----------------------------------------------------------------------------

  consume(onMessage: (msg: InboundMessage) => void): Consumption {
    if (!this.db) throw new Error(`the SQLite bus is ${this.state.state === "closed" ? "closed" : "not started"}`);
    if (this.handler) throw new Error("the SQLite bus is already consuming");
    this.handler = onMessage;
    const mine = onMessage;
    if (this.watchWal) this.startWatch();
    if (this.pollIntervalMs > 0) {
      this.lastDataVersion = this.st.dataVersion.get() as number;
      this.pollTimer = setInterval(() => this.poll(), this.pollIntervalMs);
    }
    this.wake();
    return {
      stop: async () => {
        if (this.handler === mine) this.stopConsuming();
      },
    };
  }

  private stopConsuming(): void {
    this.handler = undefined;
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = undefined;
    this.watcher?.close();
    this.watcher = undefined;
    if (this.burstTimer) clearTimeout(this.burstTimer);
    this.burstTimer = undefined;
    this.clearDeadline();
  }

  private startWatch(): void {
    try {
      this.watcher = fs.watch(`${this.file}-wal`, { persistent: false }, (event) => {
        this.onWalEvent();
        if (event === "rename") {
          // The WAL was removed or replaced (cannot happen while we hold the file open, but a
          // hand-moved file might): watch the new one; the poll covers the gap.
          this.watcher?.close();
          this.watcher = undefined;
          setTimeout(() => {
            if (this.handler && !this.watcher) this.startWatch();
          }, this.pollIntervalMs || 100).unref();
        }
      });
      this.watcher.on("error", (err) => {
        this.log.debug({ bus: "sqlite", err: err.message }, "bus WAL watch failed; relying on the poll");
        this.watcher?.close();
        this.watcher = undefined;
      });
    } catch (err) {
      this.log.debug({ bus: "sqlite", err: (err as Error).message }, "cannot watch the bus WAL; relying on the poll");
    }
  }

  /**
   * The WAL was written to. The writer makes its commit visible (the wal-index in the -shm
   * file, which inotify does not see) only after writing the frames and, for a publish,
   * fsyncing them: checking at once would often miss it. So check data_version now and again
   * over the next ~30 ms, restarting the series on each event.
   */
  private onWalEvent(): void {
    this.burstStep = 0;
    if (this.burstTimer) clearTimeout(this.burstTimer);
    this.burstTimer = setTimeout(() => this.burst(), 0);
  }

  private burst(): void {
    this.burstTimer = undefined;
    this.poll();
    const delay = WAL_EVENT_RECHECK_MS[this.burstStep++];
    if (delay !== undefined && this.handler) this.burstTimer = setTimeout(() => this.burst(), delay);
  }

  private poll(): void {
    if (!this.db) return;
    try {
      const v = this.st.dataVersion.get() as number;
      if (v !== this.lastDataVersion) {
        this.lastDataVersion = v;
        this.wake();
      }
    } catch {
      this.wake(); // let pump() report it
    }
  }

  /** Something may have changed: pull soon (coalesced). */
  wake(): void {
    if (!this.handler || this.pumpQueued) return;
    this.pumpQueued = true;
    setImmediate(() => {
      this.pumpQueued = false;
      this.pump();
    });
  }

  private clearDeadline(): void {
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    this.deadlineTimer = undefined;
    this.deadlineAt = Infinity;
  }

  private armDeadline(at: number | null): void {
    if (at === null) {
      this.clearDeadline();
      return;
    }
    if (this.deadlineTimer && this.deadlineAt === at) return;
    this.clearDeadline();
    this.deadlineAt = at;
    // +1: timers may fire a hair before Date.now() reaches the deadline.
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at - Date.now() + 1));
    this.deadlineTimer = setTimeout(() => {
      this.deadlineTimer = undefined;
      this.deadlineAt = Infinity;
      this.pump();
    }, delay);
  }

  /** Delivers what is due and what is new, up to the in-flight window. */
  private pump(): void {
    const handler = this.handler;
    if (!handler || !this.db || this.pumping) return;
    this.pumping = true;
    let batch: DeliveryRow[] = [];
    try {
      const now = Date.now();
      // Read-only first: most wake-ups (other relays' acks) find nothing for us.
      const c = this.st.check.get({ stream: this.stream, consumer: this.consumerName }) as CheckRow | undefined;
      const hasNew = c !== undefined && c.last !== null && c.last > c.cursor && c.inflight < this.settings.maxInFlight;
      const hasDue = c !== undefined && c.next_due !== null && c.next_due <= now;
      if (c && !hasNew && !hasDue) {
        this.armDeadline(c.next_due);
      } else {
        const r = this.fetchTx(now);
        batch = r.batch;
        this.armDeadline(r.nextDue);
      }
      if (this.state.state !== "connected") this.setStatus({ state: "connected" });
    } catch (err) {
      this.log.warn({ bus: "sqlite", err: (err as Error).message }, "bus pull failed; retrying");
      this.setStatus({ state: "disconnected", reason: `SQLite bus ${this.file}: ${(err as Error).message}` });
      this.clearDeadline();
      this.deadlineAt = Date.now() + RETRY_MS;
      this.deadlineTimer = setTimeout(() => {
        this.deadlineTimer = undefined;
        this.deadlineAt = Infinity;
        this.pump();
      }, RETRY_MS);
    } finally {
      this.pumping = false;
    }
    // Every row fetched is handed over, even if a handler stops consuming meanwhile: the rows
    // count as delivered already, and only the relay can turn a last arrival into a dead letter.
    for (const row of batch) {
      try {
        handler(this.inbound(row));
      } catch (err) {
        this.log.error({ bus: "sqlite", err: (err as Error).message, id: row.id }, "bus message handler threw");
      }
    }
  }

  private inbound(row: DeliveryRow): InboundMessage {
    const attempt = row.delivered;
    const seq = row.seq;
    let settled = false;
    const settle = (kind: SettleKind, delayMs = 0): void => {
      if (settled) return;
      if (kind !== "working") settled = true;
      this.settle(kind, seq, attempt, delayMs);
    };
    return {
      id: row.id,
      kind: row.kind,
      origin: row.origin,
      publishedAt: row.published_at,
      payloadJson: row.payload,
      traceparent: row.traceparent ?? undefined,
      tracestate: row.tracestate ?? undefined,
      attempt,
      seq,
      ack: () => settle("ack"),
      nak: (delayMs: number) => settle("nak", delayMs),
      working: () => settle("working"),
      term: () => settle("term"),
    };
  }

  /**
   * ack/term finish the message whichever delivery they come from; nak/working act only on the
   * current delivery (a late call from a delivery that already expired is ignored). The settles
   * of one event-loop turn (a controller's burst of acks, a batch of echoes) are written in one
   * transaction at its end: one commit instead of one per message — the commit was the
   * receiving relay's largest cost, and each one also woke every other relay on the file.
   */
  private settle(kind: SettleKind, seq: number, attempt: number, delayMs: number): void {
    if (!this.db) return; // closed: the delivery will be redelivered to the next run
    this.settleQueue.push({ kind, seq, attempt, delayMs, at: Date.now() });
    if (this.settleScheduled) return;
    this.settleScheduled = true;
    setImmediate(this.commitSettles);
  }

  private readonly commitSettles = (): void => {
    this.settleScheduled = false;
    const batch = this.settleQueue;
    this.settleQueue = [];
    if (batch.length === 0 || !this.db) return;
    try {
      this.settleTx(batch);
    } catch (err) {
      // A lost settle means a redelivery (at-least-once), never a lost message.
      this.log.debug({ bus: "sqlite", err: (err as Error).message, settles: batch.length }, "bus settles failed");
      for (const x of batch) this.settings.hooks?.settleFailed?.(x.kind, (err as Error).message);
    }
    this.wake();
  };

  private applySettle({ kind, seq, attempt, delayMs, at }: PendingSettle): void {
    const { stream, consumerName: consumer } = this;
    if (kind === "ack" || kind === "term") {
      this.st.settleDelete.run(stream, consumer, seq);
    } else if (kind === "nak" && this.settings.maxDeliver !== UNLIMITED_DELIVERIES && attempt >= this.settings.maxDeliver) {
      // The last delivery failed: nothing will redeliver it.
      this.st.settleDeleteAttempt.run(stream, consumer, seq, attempt);
    } else {
      const wait = kind === "nak" ? Math.max(0, Number.isFinite(delayMs) ? delayMs : 0) : this.settings.ackWaitMs;
      this.st.settleDelay.run(at + wait, stream, consumer, seq, attempt);
    }
  }

  // ---- info --------------------------------------------------------------------------------

  async peers(): Promise<Peer[]> {
    if (!this.db) throw new BusUnavailableError(`the SQLite bus is ${this.state.state === "closed" ? "closed" : "not started"}`);
    return readSqlitePeers(this.db, this.stream, this.consumerName);
  }

  location(): string {
    return this.file;
  }

  async info(): Promise<StreamInfo> {
    if (!this.db) throw new BusUnavailableError(`the SQLite bus is ${this.state.state === "closed" ? "closed" : "not started"}`);
    this.commitSettles(); // the figures include this turn's settles
    return this.readInfo(this.db, this.st);
  }

  /**
   * Read-only (see Bus.inspect): the file is opened read-only and only read; no schema, no
   * consumer, no maintenance. On a started bus, the same as info().
   */
  async inspect(): Promise<StreamInfo> {
    if (this.db) return this.info();
    const fail = (why: string): never => {
      throw new BusStartError(`cannot read the SQLite bus file ${this.file}: ${why}`);
    };
    if (!fs.existsSync(this.file))
      fail("it does not exist: no relay has used it yet (check --bus and --data-dir; the default is <data-dir>/bus.db)");
    let db: Database.Database | undefined;
    try {
      db = new Database(this.file, { readonly: true, fileMustExist: true, timeout: BUSY_TIMEOUT_MS });
      return this.readInfo(db, prepareStatements(db));
    } catch (err) {
      if (err instanceof BusStartError) throw err;
      const code = sqliteCode(err);
      const message = (err as Error).message;
      if (code === "SQLITE_NOTADB") fail("it is not an SQLite database");
      if (/no such table/i.test(message)) fail(`it is not a relay bus file (${message})`);
      return fail(message);
    } finally {
      db?.close();
    }
  }

  private readInfo(db: Database.Database, st: Statements): StreamInfo {
    const read = db.transaction(() => {
      const s = st.infoStream.get(this.stream) as { messages: number; bytes: number; first_seq: number; last_seq: number };
      const cursor = st.consumerGet.get(this.stream, this.consumerName) as number | undefined;
      let consumer: StreamInfo["consumer"] = null;
      if (cursor !== undefined) {
        const a = st.infoAckPending.get(this.stream, this.consumerName) as { ack_pending: number; redelivered: number };
        consumer = {
          name: this.consumerName,
          pending: st.infoPending.get(this.stream, cursor) as number,
          ackPending: a.ack_pending,
          redelivered: a.redelivered,
        };
      }
      return {
        bus: this.name,
        stream: this.stream,
        messages: s.messages,
        bytes: s.bytes,
        firstSeq: s.first_seq,
        lastSeq: s.last_seq,
        consumer,
      } satisfies StreamInfo;
    });
    return read.deferred();
  }
}
