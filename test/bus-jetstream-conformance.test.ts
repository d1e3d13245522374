// The Bus conformance suite (test/helpers/bus-conformance.ts) against JetStreamBus: each subtest
// gets a fresh nats-server (temp store, free ports); its buses are relays sharing that server.

import t from "tap";
import pino from "pino";
import { JetStreamBus } from "../relay/bus/jetstream.js";
import { runBusConformance } from "./helpers/bus-conformance.js";
import { startNatsServer, type NatsServer } from "./helpers/nats-server.js";

const logger = pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" });

await runBusConformance<NatsServer>(t, {
  name: "jetstream",
  newShared: () => startNatsServer(),
  async create(settings, server) {
    return new JetStreamBus({
      stream: "UPTRAKIT_PUSH",
      ackWaitMs: 30_000,
      maxDeliver: 5,
      maxInFlight: 256,
      maxAgeMs: 24 * 60 * 60 * 1000,
      inactiveThresholdMs: 48 * 60 * 60 * 1000,
      ...settings,
      urls: [server.url],
      replicas: 1,
      auth: {},
      logger: logger.child({ instanceId: settings.instanceId }),
    });
  },
  cleanupShared: (server) => server.stop(),
});
