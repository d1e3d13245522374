// `uptrakit-relay doctor`: every check for the configured bus, then the data dir.

import type { RelayConfig } from "../config.js";
import type { Logger } from "../log.js";
import { dataDirChecks } from "./data-dir-checks.js";
import { jetStreamChecks } from "./jetstream-checks.js";
import { Checks, type DoctorReport } from "./report.js";
import { sqliteChecks } from "./sqlite-checks.js";

export async function runDoctor(cfg: RelayConfig, log: Logger): Promise<DoctorReport> {
  const checks = new Checks();
  const jetstream = cfg.natsUrls.length > 0;
  const peers = jetstream ? await jetStreamChecks(cfg, log, checks) : sqliteChecks(cfg, checks);
  dataDirChecks(cfg, checks);
  return { bus: jetstream ? "jetstream" : "sqlite", instanceId: cfg.instanceId, ok: checks.ok, checks: checks.list, ...(peers ? { peers } : {}) };
}
