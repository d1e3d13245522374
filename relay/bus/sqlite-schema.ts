// The embedded bus's tables and its prepared statements: one SQLite file, shared by every relay on
// the host that points at it (see sqlite.ts for how they use it).

import type Database from "better-sqlite3";

export const SCHEMA = `
CREATE TABLE IF NOT EXISTS bus_messages (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  stream TEXT NOT NULL,
  origin TEXT NOT NULL,
  id TEXT NOT NULL,
  kind TEXT NOT NULL,
  published_at TEXT NOT NULL,
  payload TEXT NOT NULL,
  stored_at INTEGER NOT NULL,
  traceparent TEXT,
  tracestate TEXT,
  UNIQUE (stream, origin, id)
);
CREATE INDEX IF NOT EXISTS bus_messages_stream_seq ON bus_messages (stream, seq);
CREATE INDEX IF NOT EXISTS bus_messages_stream_stored ON bus_messages (stream, stored_at);
CREATE TABLE IF NOT EXISTS bus_consumers (
  stream TEXT NOT NULL,
  name TEXT NOT NULL,
  cursor INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  last_active INTEGER NOT NULL,
  PRIMARY KEY (stream, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bus_deliveries (
  stream TEXT NOT NULL,
  consumer TEXT NOT NULL,
  seq INTEGER NOT NULL,
  delivered INTEGER NOT NULL,
  visible_at INTEGER NOT NULL,
  PRIMARY KEY (stream, consumer, seq)
) WITHOUT ROWID;
`;

/**
 * Brings a bus file made by an older relay up to SCHEMA (inside the same transaction as SCHEMA):
 * columns added since are nullable, so older relays sharing the file keep working with it.
 */
export function migrate(db: Database.Database): void {
  const have = new Set((db.pragma("table_info(bus_messages)") as Array<{ name: string }>).map((c) => c.name));
  for (const column of ["traceparent", "tracestate"]) if (!have.has(column)) db.exec(`ALTER TABLE bus_messages ADD COLUMN ${column} TEXT`);
}

export interface MessageRow {
  seq: number;
  origin: string;
  id: string;
  kind: string;
  published_at: string;
  payload: string;
  traceparent: string | null;
  tracestate: string | null;
}
export interface DeliveryRow extends MessageRow {
  delivered: number;
}
export interface CheckRow {
  cursor: number;
  last: number | null;
  inflight: number;
  next_due: number | null;
}

export type SettleKind = "ack" | "nak" | "working" | "term";

export function prepareStatements(db: Database.Database) {
  return {
    dataVersion: db.prepare("PRAGMA data_version").pluck(),
    dupFind: db.prepare("SELECT seq, stored_at FROM bus_messages WHERE stream = ? AND origin = ? AND id = ?"),
    msgDelete: db.prepare("DELETE FROM bus_messages WHERE seq = ?"),
    deliveriesOfSeq: db.prepare("DELETE FROM bus_deliveries WHERE stream = ? AND seq = ?"),
    msgInsert: db.prepare(
      "INSERT INTO bus_messages (stream, origin, id, kind, published_at, payload, stored_at, traceparent, tracestate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    consumerCreate: db.prepare(
      `INSERT OR IGNORE INTO bus_consumers (stream, name, cursor, created_at, last_active)
       VALUES (?, ?, (SELECT coalesce(max(seq), 0) FROM bus_messages WHERE stream = ?), ?, ?)`,
    ),
    consumerGet: db.prepare("SELECT cursor FROM bus_consumers WHERE stream = ? AND name = ?").pluck(),
    consumerTouch: db.prepare("UPDATE bus_consumers SET last_active = ? WHERE stream = ? AND name = ?"),
    consumerAdvance: db.prepare("UPDATE bus_consumers SET cursor = ?, last_active = ? WHERE stream = ? AND name = ?"),
    check: db.prepare(
      `SELECT c.cursor AS cursor,
         (SELECT max(seq) FROM bus_messages WHERE stream = $stream) AS last,
         (SELECT count(*) FROM bus_deliveries WHERE stream = $stream AND consumer = $consumer) AS inflight,
         (SELECT min(visible_at) FROM bus_deliveries WHERE stream = $stream AND consumer = $consumer) AS next_due
       FROM bus_consumers c WHERE c.stream = $stream AND c.name = $consumer`,
    ),
    expireExhausted: db.prepare(
      "DELETE FROM bus_deliveries WHERE stream = ? AND consumer = ? AND visible_at <= ? AND delivered >= ?",
    ),
    due: db.prepare(
      `SELECT m.seq, m.origin, m.id, m.kind, m.published_at, m.payload, m.traceparent, m.tracestate, d.delivered
       FROM bus_deliveries d JOIN bus_messages m ON m.seq = d.seq
       WHERE d.stream = ? AND d.consumer = ? AND d.visible_at <= ? ORDER BY d.seq`,
    ),
    redeliver: db.prepare(
      "UPDATE bus_deliveries SET delivered = delivered + 1, visible_at = ? WHERE stream = ? AND consumer = ? AND seq = ?",
    ),
    inflight: db.prepare("SELECT count(*) FROM bus_deliveries WHERE stream = ? AND consumer = ?").pluck(),
    fresh: db.prepare(
      `SELECT seq, origin, id, kind, published_at, payload, traceparent, tracestate, 0 AS delivered
       FROM bus_messages WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?`,
    ),
    deliver: db.prepare(
      "INSERT OR REPLACE INTO bus_deliveries (stream, consumer, seq, delivered, visible_at) VALUES (?, ?, ?, 1, ?)",
    ),
    nextDue: db.prepare("SELECT min(visible_at) FROM bus_deliveries WHERE stream = ? AND consumer = ?").pluck(),
    settleDelete: db.prepare("DELETE FROM bus_deliveries WHERE stream = ? AND consumer = ? AND seq = ?"),
    settleDeleteAttempt: db.prepare(
      "DELETE FROM bus_deliveries WHERE stream = ? AND consumer = ? AND seq = ? AND delivered = ?",
    ),
    settleDelay: db.prepare(
      "UPDATE bus_deliveries SET visible_at = ? WHERE stream = ? AND consumer = ? AND seq = ? AND delivered = ?",
    ),
    pruneOld: db.prepare("DELETE FROM bus_messages WHERE stream = ? AND stored_at < ?"),
    pruneOrphans: db.prepare(
      "DELETE FROM bus_deliveries WHERE stream = ? AND NOT EXISTS (SELECT 1 FROM bus_messages m WHERE m.seq = bus_deliveries.seq)",
    ),
    idleDeliveries: db.prepare(
      `DELETE FROM bus_deliveries WHERE stream = ? AND consumer IN
         (SELECT name FROM bus_consumers WHERE stream = ? AND last_active < ? AND name IS NOT ?)`,
    ),
    idleConsumers: db.prepare("DELETE FROM bus_consumers WHERE stream = ? AND last_active < ? AND name IS NOT ?"),
    infoStream: db.prepare(
      `SELECT count(*) AS messages,
         coalesce(sum(length(CAST(payload AS BLOB)) + length(CAST(id AS BLOB)) + length(CAST(kind AS BLOB))
                      + length(CAST(origin AS BLOB)) + length(published_at) + 8), 0) AS bytes,
         coalesce(min(seq), 0) AS first_seq, coalesce(max(seq), 0) AS last_seq
       FROM bus_messages WHERE stream = ?`,
    ),
    infoPending: db.prepare("SELECT count(*) FROM bus_messages WHERE stream = ? AND seq > ?").pluck(),
    infoAckPending: db.prepare(
      `SELECT count(*) AS ack_pending, coalesce(sum(delivered > 1), 0) AS redelivered
       FROM bus_deliveries WHERE stream = ? AND consumer = ?`,
    ),
  };
}
export type Statements = ReturnType<typeof prepareStatements>;
