// doctor on the embedded bus: the bus file, this relay's consumer in it, and the other relays on
// the same file. Read-only: the file is opened read-only and nothing is created.

import fs from "node:fs";
import Database from "better-sqlite3";
import type { RelayConfig } from "../config.js";
import { readSqlitePeers } from "../bus/sqlite-peers.js";
import { formatPeersTable, type Peer } from "../peers.js";
import type { Checks } from "./report.js";

export function sqliteChecks(cfg: RelayConfig, checks: Checks): Peer[] | undefined {
  const file = cfg.busFile;
  if (!fs.existsSync(file)) {
    checks.fail("bus.file", "bus file", `${file} does not exist`, "a relay creates it when it starts: check --bus and --data-dir (the default is <data-dir>/bus.db); relays that talk to each other must use the same file");
    return undefined;
  }
  let db: Database.Database | undefined;
  try {
    db = new Database(file, { readonly: true, fileMustExist: true, timeout: 5_000 });
    const integrity = (db.pragma("quick_check") as Array<{ quick_check: string }>).map((r) => r.quick_check).join("; ");
    if (integrity !== "ok") {
      checks.fail("bus.file", "bus file", `${file}: integrity check says ${integrity}`, "stop every relay on this file, keep a copy and move it away: the relays start afresh");
      return undefined;
    }
    const s = db.prepare("SELECT count(*) AS n FROM bus_messages WHERE stream = ?").get(cfg.stream) as { n: number };
    checks.pass("bus.file", "bus file", `${file}: integrity ok, ${s.n} messages in stream ${cfg.stream}`);
    const peers = readSqlitePeers(db, cfg.stream, cfg.instanceId);
    const self = peers.find((p) => p.self && p.hasConsumer);
    if (self) checks.pass("consumer", "this relay's consumer", `${cfg.instanceId}: ${self.pending ?? 0} pending, last active ${self.lastActive}`);
    else checks.fail("consumer", "this relay's consumer", `no consumer ${cfg.instanceId} in ${file}`, "a relay creates its consumer when it starts: if this relay runs, check --instance-id and --bus");
    const others = peers.filter((p) => !p.self);
    const table = formatPeersTable(peers).trimEnd().split("\n");
    if (others.length === 0)
      checks.fail("peers", "peers", `no other relay uses ${file}`, "relays on the embedded bus share one bus file on one host: give every relay the same --bus (use NATS across hosts)", table);
    else checks.pass("peers", "peers", `${others.length} other relay${others.length === 1 ? "" : "s"} on the same bus file`, table);
    return peers;
  } catch (err) {
    checks.fail("bus.file", "bus file", `cannot read ${file}: ${(err as Error).message}`, "is it a relay bus file? check --bus");
    return undefined;
  } finally {
    db?.close();
  }
}
