// `uptrakit-relay peers`: the peers table alone, read-only, on either bus.

import fs from "node:fs";
import Database from "better-sqlite3";
import type { RelayConfig } from "../config.js";
import type { Logger } from "../log.js";
import { busSettings } from "../bus/create.js";
import { JetStreamBus } from "../bus/jetstream.js";
import { readJetStreamPeers } from "../bus/jetstream-peers.js";
import { readSqlitePeers } from "../bus/sqlite-peers.js";
import type { Peer } from "../peers.js";

/** The peers of this relay; rejects with a message fit to print. */
export async function readPeers(cfg: RelayConfig, log: Logger): Promise<Peer[]> {
  if (cfg.natsUrls.length === 0) {
    if (!fs.existsSync(cfg.busFile)) throw new Error(`the bus file ${cfg.busFile} does not exist (check --bus and --data-dir)`);
    const db = new Database(cfg.busFile, { readonly: true, fileMustExist: true, timeout: 5_000 });
    try {
      return readSqlitePeers(db, cfg.stream, cfg.instanceId);
    } finally {
      db.close();
    }
  }
  const bus = new JetStreamBus({ ...busSettings(cfg), urls: cfg.natsUrls, replicas: cfg.replicas, auth: cfg.natsAuth, logger: log });
  const nc = await bus.diagnosticConnection();
  try {
    const jsm = await bus.checkJetStream(nc);
    return await readJetStreamPeers(jsm, cfg.stream, cfg.instanceId);
  } finally {
    await nc.close().catch(() => undefined);
  }
}
