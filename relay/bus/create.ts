// Picks the bus from the config: JetStream when NATS URLs are given, the embedded SQLite bus otherwise.

import type { Bus, BusHooks, BusSettings } from "./bus.js";
import { JetStreamBus } from "./jetstream.js";
import { SqliteBus } from "./sqlite.js";
import { inactiveThresholdMs, type RelayConfig } from "../config.js";
import type { Logger } from "../log.js";

export function busSettings(cfg: RelayConfig): BusSettings {
  return {
    instanceId: cfg.instanceId,
    stream: cfg.stream,
    ackWaitMs: cfg.ackWaitMs,
    // One arrival more than the controller is shown: the last is the crash-safety arrival that
    // turns an unsettled last attempt into a dead letter (see relay/delivery.ts).
    maxDeliver: cfg.maxDeliver + 1,
    maxInFlight: cfg.maxInFlight,
    maxAgeMs: cfg.maxAgeMs,
    inactiveThresholdMs: inactiveThresholdMs(cfg),
  };
}

export function createBus(cfg: RelayConfig, logger: Logger, hooks: BusHooks = {}): Bus {
  const settings = { ...busSettings(cfg), hooks };
  if (cfg.natsUrls.length > 0)
    return new JetStreamBus({ ...settings, urls: cfg.natsUrls, replicas: cfg.replicas, auth: cfg.natsAuth, fastPaths: cfg.fastPaths, logger });
  return new SqliteBus({ ...settings, file: cfg.busFile, logger });
}
