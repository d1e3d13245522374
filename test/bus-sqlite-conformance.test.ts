// The Bus conformance suite (test/helpers/bus-conformance.ts) against the embedded SQLite bus:
// each subtest gets a fresh bus file in a fresh temp dir; its buses are relays sharing it.

import t from "tap";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { SqliteBus } from "../relay/bus/sqlite.js";
import { runBusConformance } from "./helpers/bus-conformance.js";

const logger = pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" });

await runBusConformance(t, {
  name: "sqlite",
  async newShared() {
    return await fs.mkdtemp(path.join(os.tmpdir(), "uptrakit-sqlite-bus-"));
  },
  async create(settings, dir) {
    return new SqliteBus({
      stream: "uptrakit",
      ackWaitMs: 30_000,
      maxDeliver: 5,
      maxInFlight: 256,
      maxAgeMs: 24 * 60 * 60 * 1000,
      inactiveThresholdMs: 24 * 60 * 60 * 1000,
      ...settings,
      file: path.join(dir, "bus.db"),
      logger: logger.child({ instanceId: settings.instanceId }),
    });
  },
  async cleanupShared(dir) {
    await fs.rm(dir, { recursive: true, force: true });
  },
});
