// Picks the bus from the config: JetStream when NATS URLs are given, the embedded SQLite bus otherwise.

import { UNLIMITED_DELIVERIES, type Bus, type BusHooks, type BusSettings } from "./bus.js";
import { JetStreamBus } from "./jetstream.js";
import { SqliteBus } from "./sqlite.js";
import { inactiveThresholdMs, type RelayConfig } from "../config.js";
import type { Logger } from "../log.js";

export function busSettings(cfg: RelayConfig): BusSettings {
  return {
    instanceId: cfg.instanceId,
    stream: cfg.stream,
    ackWaitMs: cfg.ackWaitMs,
    // The bus redelivers without limit; the relay shows the controller at most --max-deliver
    // attempts and turns any later arrival into the dead letter (docs/delivery.md). A cap on the
    // bus would let arrivals lost on the way — a crash during the last attempt, pulls into a
    // silently cut connection — use the message up with nobody left to record it.
    maxDeliver: UNLIMITED_DELIVERIES,
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
