// A userspace TCP proxy for fault tests: forwards loopback connections to a target and can be
// switched to a *silent partition* — it stops forwarding in both directions without closing
// anything, as a dropped route or a dead switch does — and healed again. No privileges needed.
// Loopback only. Scripts do not import from test/, so this lives with them.

import net from "node:net";

export interface TcpProxy {
  /** The port the proxy listens on (127.0.0.1). */
  readonly port: number;
  /** Stop forwarding both ways; connections stay open and bytes are held, not delivered. */
  partition(): void;
  /** Forward again; bytes held during the partition are dropped (a dead link loses them). */
  heal(): void;
  readonly partitioned: boolean;
  /** Connections accepted so far. */
  readonly accepted: number;
  close(): Promise<void>;
}

interface Pair {
  client: net.Socket;
  server: net.Socket;
}

/** Starts a proxy on a free loopback port in front of 127.0.0.1:targetPort. */
export async function startTcpProxy(targetPort: number, listenPort = 0): Promise<TcpProxy> {
  const pairs = new Set<Pair>();
  let partitioned = false;
  let accepted = 0;
  const srv = net.createServer((client) => {
    accepted++;
    const server = net.connect(targetPort, "127.0.0.1");
    const pair: Pair = { client, server };
    pairs.add(pair);
    const end = (): void => {
      pairs.delete(pair);
      client.destroy();
      server.destroy();
    };
    // An error listener on each socket before anything else: a reset must never crash the proxy.
    client.on("error", end).on("close", end);
    server.on("error", end).on("close", end);
    // While partitioned, bytes are read and dropped: the peer sees no error, no close, no answer.
    client.on("data", (b) => {
      if (!partitioned) server.write(b);
    });
    server.on("data", (b) => {
      if (!partitioned) client.write(b);
    });
  });
  srv.on("error", () => undefined);
  await new Promise<void>((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(listenPort, "127.0.0.1", () => resolve());
  });
  const port = (srv.address() as net.AddressInfo).port;
  return {
    port,
    partition() {
      partitioned = true;
    },
    heal() {
      partitioned = false;
    },
    get partitioned() {
      return partitioned;
    },
    get accepted() {
      return accepted;
    },
    async close() {
      for (const p of pairs) {
        p.client.destroy();
        p.server.destroy();
      }
      pairs.clear();
      await new Promise<void>((resolve) => srv.close(() => resolve()));
    },
  };
}
