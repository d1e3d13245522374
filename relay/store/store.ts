// The relay's own data-dir store (<data-dir>/relay.db): the outbox of publishes waiting for the
// bus, and the dead letters. One SQLite file per relay, never shared between relays.
//
// Durable means fsynced: WAL with synchronous = FULL, so a commit is on disk when it returns.
// The daemon's writes go through a group commit (one transaction, one fsync, per event-loop
// turn) and resolve only once committed; the operator commands (dlq replay, purge) write
// directly, and may wait on a busy store, since they block nobody.

import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import type { BusMessage } from "../bus/bus.js";
import { GroupCommitter } from "./group-commit.js";

export interface DeadLetter extends BusMessage {
  /** Row key, unique in this store. */
  seq: number;
  attempts: number;
  reason: string;
  deadAt: string;
  /** True while an operator's replay is waiting to be delivered. */
  replayRequested: boolean;
}

export interface OutboxEntry extends BusMessage {
  seq: number;
}

/** Raised when the data dir cannot be used; the message is fit to print as a start-up error. */
export interface StoreOpenOptions {
  /**
   * How long one statement may wait for a lock held by another connection. The daemon keeps it
   * short (its group commit retries without blocking the event loop); the CLI may wait.
   */
  busyTimeoutMs?: number;
  /** Told when a group commit finds the store busy and will retry (the daemon logs it). */
  onBusy?: (err: Error, failures: number) => void;
}

/** The daemon's busy timeout: a blocked event loop is worse than a retry. */
export const DAEMON_BUSY_TIMEOUT_MS = 20;
const CLI_BUSY_TIMEOUT_MS = 5_000;

export class StoreOpenError extends Error {
  override name = "StoreOpenError";
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL,
  traceparent TEXT, tracestate TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL,
  attempts INTEGER NOT NULL, reason TEXT NOT NULL, dead_at TEXT NOT NULL,
  replay_requested INTEGER NOT NULL DEFAULT 0,
  traceparent TEXT, tracestate TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_id ON dead_letters(id);
`;

/** Columns added after the first release: a store from an older relay gets them on open. */
const ADDED_COLUMNS: Array<[table: string, column: string]> = [
  ["outbox", "traceparent"], ["outbox", "tracestate"], ["dead_letters", "traceparent"], ["dead_letters", "tracestate"],
];

function migrate(db: Database.Database): void {
  for (const [table, column] of ADDED_COLUMNS) {
    const have = (db.pragma(`table_info(${table})`) as Array<{ name: string }>).some((c) => c.name === column);
    if (!have) db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} TEXT`);
  }
}

interface DeadRow {
  seq: number; id: string; kind: string; origin: string; published_at: string; payload: string;
  attempts: number; reason: string; dead_at: string; replay_requested: number;
  traceparent: string | null; tracestate: string | null;
}
interface OutboxRow {
  seq: number; id: string; kind: string; origin: string; published_at: string; payload: string;
  traceparent: string | null; tracestate: string | null;
}

const toDeadLetter = (r: DeadRow): DeadLetter => ({
  seq: r.seq, id: r.id, kind: r.kind, origin: r.origin, publishedAt: r.published_at, payloadJson: r.payload,
  attempts: r.attempts, reason: r.reason, deadAt: r.dead_at, replayRequested: r.replay_requested === 1,
  ...traceOf(r),
});
const toOutboxEntry = (r: OutboxRow): OutboxEntry => ({
  seq: r.seq, id: r.id, kind: r.kind, origin: r.origin, publishedAt: r.published_at, payloadJson: r.payload,
  ...traceOf(r),
});

function traceOf(r: { traceparent: string | null; tracestate: string | null }): Pick<BusMessage, "traceparent" | "tracestate"> {
  if (r.traceparent === null) return {};
  return r.tracestate === null ? { traceparent: r.traceparent } : { traceparent: r.traceparent, tracestate: r.tracestate };
}

/** A dead letter as operators' views show it: never the payload. */
export type DeadLetterBrief = Pick<DeadLetter, "seq" | "id" | "kind" | "origin" | "attempts" | "reason" | "deadAt">;

export interface DeadLetterSummary {
  count: number;
  oldestDeadAt?: string;
  /** The most recent few, newest first. */
  latest: DeadLetterBrief[];
}

const DEAD_SUMMARY_SQL = {
  count: "SELECT count(*) AS n, min(dead_at) AS oldest FROM dead_letters",
  latest: "SELECT seq, id, kind, origin, attempts, reason, dead_at FROM dead_letters ORDER BY seq DESC LIMIT ?",
};

function deadLetterSummary(db: Database.Database, limit: number): DeadLetterSummary {
  const c = db.prepare(DEAD_SUMMARY_SQL.count).get() as { n: number; oldest: string | null };
  const latest = (db.prepare(DEAD_SUMMARY_SQL.latest).all(limit) as DeadRow[]).map((r) => ({
    seq: r.seq, id: r.id, kind: r.kind, origin: r.origin, attempts: r.attempts, reason: r.reason, deadAt: r.dead_at,
  }));
  return { count: c.n, oldestDeadAt: c.oldest ?? undefined, latest };
}

export interface StoreInspection extends DeadLetterSummary {
  file: string;
  /** What PRAGMA integrity_check says ("ok" when sound). */
  integrity: string;
  outboxDepth: number;
}

/**
 * A read-only look at a data dir's store for `doctor`: opens nothing for writing, creates
 * nothing. Throws StoreOpenError when there is no store or it cannot be read.
 */
export function inspectStore(dataDir: string, latest = 5): StoreInspection {
  const file = path.join(dataDir, "relay.db");
  if (!fs.existsSync(file)) throw new StoreOpenError(`there is no relay store at ${file} (a relay creates it when it starts with this --data-dir)`);
  let db: Database.Database | undefined;
  try {
    db = new Database(file, { readonly: true, fileMustExist: true, timeout: CLI_BUSY_TIMEOUT_MS });
    const rows = db.pragma("integrity_check") as Array<{ integrity_check: string }>;
    const integrity = rows.map((r) => r.integrity_check).join("; ");
    const outboxDepth = (db.prepare("SELECT count(*) AS n FROM outbox").get() as { n: number }).n;
    return { file, integrity, outboxDepth, ...deadLetterSummary(db, latest) };
  } catch (err) {
    throw new StoreOpenError(`cannot read the relay store ${file}: ${(err as Error).message}`);
  } finally {
    db?.close();
  }
}

export class RelayStore {
  readonly file: string;
  private readonly db: Database.Database;
  private readonly stmts;
  private readonly committer: GroupCommitter;

  private constructor(file: string, db: Database.Database, onBusy: StoreOpenOptions["onBusy"]) {
    this.file = file;
    this.db = db;
    this.committer = new GroupCommitter(db, onBusy);
    this.stmts = {
      outboxAdd: db.prepare("INSERT INTO outbox (id, kind, origin, published_at, payload, traceparent, tracestate) VALUES (?, ?, ?, ?, ?, ?, ?)"),
      outboxHead: db.prepare("SELECT * FROM outbox ORDER BY seq LIMIT ?"),
      outboxRemove: db.prepare("DELETE FROM outbox WHERE seq = ?"),
      outboxCount: db.prepare("SELECT count(*) AS n FROM outbox"),
      // The same message (origin, id, publishedAt) is recorded once: a relay that crashed between
      // writing a dead letter and settling it meets the message again after its restart.
      deadAdd: db.prepare(
        `INSERT INTO dead_letters (id, kind, origin, published_at, payload, attempts, reason, dead_at, traceparent, tracestate)
         SELECT $id, $kind, $origin, $publishedAt, $payload, $attempts, $reason, $deadAt, $traceparent, $tracestate
         WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE id = $id AND origin = $origin AND published_at = $publishedAt AND replay_requested = 0)`,
      ),
      deadAll: db.prepare("SELECT * FROM dead_letters ORDER BY seq"),
      deadReplayable: db.prepare("SELECT * FROM dead_letters WHERE replay_requested = 1 ORDER BY seq LIMIT ?"),
      deadRequestReplay: db.prepare("UPDATE dead_letters SET replay_requested = 1 WHERE id = ? OR CAST(seq AS TEXT) = ?"),
      deadRemove: db.prepare("DELETE FROM dead_letters WHERE seq = ?"),
      deadToOutbox: db.prepare(
        `INSERT INTO outbox (id, kind, origin, published_at, payload, traceparent, tracestate)
         SELECT id, kind, origin, published_at, payload, traceparent, tracestate FROM dead_letters WHERE seq = ?`,
      ),
      deadReturn: db.prepare("UPDATE dead_letters SET replay_requested = 0, attempts = attempts + ?, reason = ?, dead_at = ? WHERE seq = ?"),
      deadPurgeAll: db.prepare("DELETE FROM dead_letters"),
      deadPurgeBefore: db.prepare("DELETE FROM dead_letters WHERE dead_at < ?"),
    };
  }

  /** Opens (creating if needed) the store in dataDir. Throws StoreOpenError with a clear reason. */
  static open(dataDir: string, opts: StoreOpenOptions = {}): RelayStore {
    const file = path.join(dataDir, "relay.db");
    try {
      fs.mkdirSync(dataDir, { recursive: true });
      fs.accessSync(dataDir, fs.constants.W_OK);
    } catch (err) {
      throw new StoreOpenError(`data dir ${dataDir} is not a writable directory: ${(err as Error).message}`);
    }
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: opts.busyTimeoutMs ?? CLI_BUSY_TIMEOUT_MS });
      db.pragma("journal_mode = WAL");
      db.pragma("synchronous = FULL");
      db.exec(SCHEMA);
      migrate(db);
      // A store that opens but is damaged would lose what it holds later: find out now.
      const check = db.pragma("quick_check", { simple: true });
      if (check !== "ok") throw new Error(`integrity check says: ${String(check)}`);
      return new RelayStore(file, db, opts.onBusy);
    } catch (err) {
      db?.close();
      throw new StoreOpenError(`cannot use the relay store ${file}: ${(err as Error).message} (move the file away to start afresh)`);
    }
  }

  // ---- outbox ----

  /** Queues a publish; resolves once it is fsynced. */
  enqueue(m: BusMessage): Promise<void> {
    return this.committer.write(() => this.stmts.outboxAdd.run(m.id, m.kind, m.origin, m.publishedAt, m.payloadJson, m.traceparent ?? null, m.tracestate ?? null));
  }

  outboxHead(limit: number): OutboxEntry[] {
    return (this.stmts.outboxHead.all(limit) as OutboxRow[]).map(toOutboxEntry);
  }

  /** Removes sent entries. */
  outboxRemove(seqs: number[]): Promise<void> {
    return this.committer.write(() => {
      for (const seq of seqs) this.stmts.outboxRemove.run(seq);
    });
  }

  /** Atomically moves an outbox entry the bus will never take to the dead letters (1 attempt). */
  setAsideOutboxEntry(m: OutboxEntry, reason: string): Promise<void> {
    return this.committer.write(() => {
      this.insertDeadLetter(m, 1, reason);
      this.stmts.outboxRemove.run(m.seq);
    });
  }

  outboxDepth(): number {
    return (this.stmts.outboxCount.get() as { n: number }).n;
  }

  // ---- dead letters ----

  /** Records a dead letter; resolves once it is fsynced. */
  addDeadLetter(m: BusMessage, attempts: number, reason: string): Promise<void> {
    return this.committer.write(() => this.insertDeadLetter(m, attempts, reason));
  }

  private insertDeadLetter(m: BusMessage, attempts: number, reason: string): void {
    this.stmts.deadAdd.run({
      id: m.id, kind: m.kind, origin: m.origin, publishedAt: m.publishedAt, payload: m.payloadJson,
      attempts, reason, deadAt: new Date().toISOString(),
      traceparent: m.traceparent ?? null, tracestate: m.tracestate ?? null,
    });
  }

  /** Count, oldest and the latest few, without payloads (the status page). */
  deadLetterSummary(limit: number): DeadLetterSummary {
    return deadLetterSummary(this.db, limit);
  }

  deadLetters(): DeadLetter[] {
    return (this.stmts.deadAll.all() as DeadRow[]).map(toDeadLetter);
  }


  /** Marks dead letters for replay by message id or by seq; returns how many matched. */
  requestReplay(idOrSeq: string): number {
    return this.stmts.deadRequestReplay.run(idOrSeq, idOrSeq).changes;
  }

  /** Dead letters an operator asked to replay, oldest first. */
  replayRequests(limit: number): DeadLetter[] {
    return (this.stmts.deadReplayable.all(limit) as DeadRow[]).map(toDeadLetter);
  }

  /** A replayed dead letter was acked: it is done. */
  removeDeadLetter(seq: number): Promise<void> {
    return this.committer.write(() => this.stmts.deadRemove.run(seq));
  }

  /** Atomically moves a dead letter this relay published back into its outbox, to be sent again. */
  requeueDeadLetter(seq: number): Promise<void> {
    return this.committer.write(() => {
      this.stmts.deadToOutbox.run(seq);
      this.stmts.deadRemove.run(seq);
    });
  }

  /** A replay failed again: back to the dead letters, counting the new attempts. */
  returnDeadLetter(seq: number, extraAttempts: number, reason: string): Promise<void> {
    return this.committer.write(() => this.stmts.deadReturn.run(extraAttempts, reason, new Date().toISOString(), seq));
  }


  /** Removes all dead letters, or those that died before `before`; returns how many. */
  purgeDeadLetters(before?: Date): number {
    return before ? this.stmts.deadPurgeBefore.run(before.toISOString()).changes : this.stmts.deadPurgeAll.run().changes;
  }

  /** Commits what is still queued, then closes. */
  close(): void {
    if (!this.db.open) return;
    this.committer.flushNow();
    this.db.close();
  }
}
