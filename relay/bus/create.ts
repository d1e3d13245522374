// Picks the bus from the config: JetStream when NATS URLs are given, the embedded SQLite bus otherwise.

import type { Bus, BusSettings } from "./bus.js";
import { JetStreamBus } from "./jetstream.js";
import { SqliteBus } from "./sqlite.js";
import { inactiveThresholdMs, type RelayConfig } from "../config.js";
import type { Logger } from "../log.js";

export function busSettings(cfg: RelayConfig): BusSettings {
  return {
    instanceId: cfg.instanceId,
    stream: cfg.stream,
    ackWaitMs: cfg.ackWaitMs,
    maxDeliver: cfg.maxDeliver,
    maxInFlight: cfg.maxInFlight,
    maxAgeMs: cfg.maxAgeMs,
    inactiveThresholdMs: inactiveThresholdMs(cfg),
  };
}

export function createBus(cfg: RelayConfig, logger: Logger): Bus {
  const settings = busSettings(cfg);
  if (cfg.natsUrls.length > 0)
    return new JetStreamBus({ ...settings, urls: cfg.natsUrls, replicas: cfg.replicas, auth: cfg.natsAuth, logger });
  return new SqliteBus({ ...settings, file: cfg.busFile, logger });
}
