// Peers on the embedded bus: the other relays using the same bus file, read from its tables
// (consumers, and messages counted by origin). Read-only.

import type Database from "better-sqlite3";
import { mergePeers, type Peer } from "../peers.js";

export function readSqlitePeers(db: Database.Database, stream: string, self: string): Peer[] {
  const read = db.transaction(() => {
    const consumers = new Map<string, Omit<Peer, "published" | "self">>();
    const rows = db
      .prepare(
        `SELECT c.name AS name, c.last_active AS last_active,
           (SELECT count(*) FROM bus_messages m WHERE m.stream = c.stream AND m.seq > c.cursor) AS pending
         FROM bus_consumers c WHERE c.stream = ?`,
      )
      .all(stream) as Array<{ name: string; last_active: number; pending: number }>;
    for (const r of rows) consumers.set(r.name, { name: r.name, hasConsumer: true, lastActive: new Date(r.last_active).toISOString(), pending: r.pending });
    const counts = db.prepare("SELECT origin, count(*) AS n FROM bus_messages WHERE stream = ? GROUP BY origin").all(stream) as Array<{ origin: string; n: number }>;
    return mergePeers(consumers, new Map(counts.map((c) => [c.origin, c.n])), self);
  });
  return read.deferred();
}
