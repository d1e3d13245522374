// The two buses a relay can run on, as test media: each gives the relay arguments that put
// several relays on one shared bus, fresh per test.

import fs from "node:fs";
import path from "node:path";
import { startNatsServer } from "./nats-server.js";
import { tempDir } from "./relay-process.js";

export interface Medium {
  /** Arguments that put a relay on this medium. */
  args: string[];
  stop(): Promise<void>;
}

export interface RelayBackend {
  name: "jetstream" | "jetstream-public-api" | "sqlite";
  /** The bus the relay reports in its ready frame. */
  bus: "jetstream" | "sqlite";
  create(): Promise<Medium>;
}

export const jetstreamBackend: RelayBackend = {
  name: "jetstream",
  bus: "jetstream",
  async create() {
    const server = await startNatsServer();
    return { args: ["--nats-url", server.url], stop: () => server.stop() };
  },
};

export const sqliteBackend: RelayBackend = {
  name: "sqlite",
  bus: "sqlite",
  async create() {
    const dir = tempDir("uptrakit-bus-");
    return {
      args: ["--bus", `sqlite:${path.join(dir, "bus.db")}`],
      stop: async () => fs.rmSync(dir, { recursive: true, force: true }),
    };
  },
};

/** JetStream with every shortcut through nats.js internals off (relay/bus/nats-internals.ts). */
export const jetstreamPublicApiBackend: RelayBackend = {
  name: "jetstream-public-api",
  bus: "jetstream",
  async create() {
    const m = await jetstreamBackend.create();
    return { ...m, args: [...m.args, "--fast-paths", "off"] };
  },
};

export const backends: RelayBackend[] = [jetstreamBackend, sqliteBackend];

/** For the delivery conformance suite: the relay on nats.js's public API alone must pass it too. */
export const conformanceBackends: RelayBackend[] = [...backends, jetstreamPublicApiBackend];
