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
  name: "jetstream" | "sqlite";
  create(): Promise<Medium>;
}

export const jetstreamBackend: RelayBackend = {
  name: "jetstream",
  async create() {
    const server = await startNatsServer();
    return { args: ["--nats-url", server.url], stop: () => server.stop() };
  },
};

export const sqliteBackend: RelayBackend = {
  name: "sqlite",
  async create() {
    const dir = tempDir("uptrakit-bus-");
    return {
      args: ["--bus", `sqlite:${path.join(dir, "bus.db")}`],
      stop: async () => fs.rmSync(dir, { recursive: true, force: true }),
    };
  },
};

export const backends: RelayBackend[] = [jetstreamBackend, sqliteBackend];
