// The relay's own data-dir store (<data-dir>/relay.db): the outbox of publishes waiting for the
// bus, and the dead letters. One SQLite file per relay, never shared between relays.

import fs from "node:fs";
import path from "node:path";
import Database from "better-sqlite3";
import type { BusMessage } from "../bus/bus.js";

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
export class StoreOpenError extends Error {
  override name = "StoreOpenError";
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL, kind TEXT NOT NULL, origin TEXT NOT NULL,
  published_at TEXT NOT NULL, payload TEXT NOT NULL,
  attempts INTEGER NOT NULL, reason TEXT NOT NULL, dead_at TEXT NOT NULL,
  replay_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_id ON dead_letters(id);
`;

interface DeadRow {
  seq: number; id: string; kind: string; origin: string; published_at: string; payload: string;
  attempts: number; reason: string; dead_at: string; replay_requested: number;
}
interface OutboxRow { seq: number; id: string; kind: string; origin: string; published_at: string; payload: string }

const toDeadLetter = (r: DeadRow): DeadLetter => ({
  seq: r.seq, id: r.id, kind: r.kind, origin: r.origin, publishedAt: r.published_at, payloadJson: r.payload,
  attempts: r.attempts, reason: r.reason, deadAt: r.dead_at, replayRequested: r.replay_requested === 1,
});
const toOutboxEntry = (r: OutboxRow): OutboxEntry => ({
  seq: r.seq, id: r.id, kind: r.kind, origin: r.origin, publishedAt: r.published_at, payloadJson: r.payload,
});

export class RelayStore {
  readonly file: string;
  private readonly db: Database.Database;
  private readonly stmts;

  private constructor(file: string, db: Database.Database) {
    this.file = file;
    this.db = db;
    this.stmts = {
      outboxAdd: db.prepare("INSERT INTO outbox (id, kind, origin, published_at, payload) VALUES (?, ?, ?, ?, ?)"),
      outboxHead: db.prepare("SELECT * FROM outbox ORDER BY seq LIMIT ?"),
      outboxRemove: db.prepare("DELETE FROM outbox WHERE seq = ?"),
      outboxCount: db.prepare("SELECT count(*) AS n FROM outbox"),
      deadAdd: db.prepare(
        "INSERT INTO dead_letters (id, kind, origin, published_at, payload, attempts, reason, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
      ),
      deadAll: db.prepare("SELECT * FROM dead_letters ORDER BY seq"),
      deadReplayable: db.prepare("SELECT * FROM dead_letters WHERE replay_requested = 1 ORDER BY seq LIMIT ?"),
      deadRequestReplay: db.prepare("UPDATE dead_letters SET replay_requested = 1 WHERE id = ? OR CAST(seq AS TEXT) = ?"),
      deadRemove: db.prepare("DELETE FROM dead_letters WHERE seq = ?"),
      deadToOutbox: db.prepare(
        "INSERT INTO outbox (id, kind, origin, published_at, payload) SELECT id, kind, origin, published_at, payload FROM dead_letters WHERE seq = ?",
      ),
      deadReturn: db.prepare("UPDATE dead_letters SET replay_requested = 0, attempts = attempts + ?, reason = ?, dead_at = ? WHERE seq = ?"),
      deadPurgeAll: db.prepare("DELETE FROM dead_letters"),
      deadPurgeBefore: db.prepare("DELETE FROM dead_letters WHERE dead_at < ?"),
    };
  }

  /** Opens (creating if needed) the store in dataDir. Throws StoreOpenError with a clear reason. */
  static open(dataDir: string): RelayStore {
    const file = path.join(dataDir, "relay.db");
    try {
      fs.mkdirSync(dataDir, { recursive: true });
      fs.accessSync(dataDir, fs.constants.W_OK);
    } catch (err) {
      throw new StoreOpenError(`data dir ${dataDir} is not a writable directory: ${(err as Error).message}`);
    }
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: 5000 });
      db.pragma("journal_mode = WAL");
      db.pragma("synchronous = NORMAL");
      db.exec(SCHEMA);
      // A store that opens but is damaged would lose what it holds later: find out now.
      const check = db.pragma("quick_check", { simple: true });
      if (check !== "ok") throw new Error(`integrity check says: ${String(check)}`);
      return new RelayStore(file, db);
    } catch (err) {
      db?.close();
      throw new StoreOpenError(`cannot use the relay store ${file}: ${(err as Error).message} (move the file away to start afresh)`);
    }
  }

  // ---- outbox ----

  /** Durably queues a publish. */
  enqueue(m: BusMessage): void {
    this.stmts.outboxAdd.run(m.id, m.kind, m.origin, m.publishedAt, m.payloadJson);
  }

  outboxHead(limit: number): OutboxEntry[] {
    return (this.stmts.outboxHead.all(limit) as OutboxRow[]).map(toOutboxEntry);
  }

  outboxRemove(seq: number): void {
    this.stmts.outboxRemove.run(seq);
  }

  /** Atomically moves an outbox entry the bus will never take to the dead letters (1 attempt). */
  setAsideOutboxEntry(m: OutboxEntry, reason: string): void {
    this.db.transaction(() => {
      this.addDeadLetter(m, 1, reason);
      this.outboxRemove(m.seq);
    })();
  }

  outboxDepth(): number {
    return (this.stmts.outboxCount.get() as { n: number }).n;
  }

  // ---- dead letters ----

  addDeadLetter(m: BusMessage, attempts: number, reason: string): void {
    this.stmts.deadAdd.run(m.id, m.kind, m.origin, m.publishedAt, m.payloadJson, attempts, reason, new Date().toISOString());
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
  removeDeadLetter(seq: number): void {
    this.stmts.deadRemove.run(seq);
  }

  /** Atomically moves a dead letter this relay published back into its outbox, to be sent again. */
  requeueDeadLetter(seq: number): void {
    this.db.transaction(() => {
      this.stmts.deadToOutbox.run(seq);
      this.stmts.deadRemove.run(seq);
    })();
  }

  /** A replay failed again: back to the dead letters, counting the new attempts. */
  returnDeadLetter(seq: number, extraAttempts: number, reason: string): void {
    this.stmts.deadReturn.run(extraAttempts, reason, new Date().toISOString(), seq);
  }


  /** Removes all dead letters, or those that died before `before`; returns how many. */
  purgeDeadLetters(before?: Date): number {
    return before ? this.stmts.deadPurgeBefore.run(before.toISOString()).changes : this.stmts.deadPurgeAll.run().changes;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
