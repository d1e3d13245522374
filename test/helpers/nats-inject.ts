// A raw nats.js connection that writes straight to the stream's subjects, as any client with
// publish rights on uptrakit.push.> could: any subject, any payload bytes, and header blocks
// built by hand (nats.js's headers() refuses CR/LF, duplicates need care, non-UTF-8 is impossible).
// Each publish waits for the stream's PubAck, so a test knows exactly what was stored.

import { MsgHdrsImpl, connect, type NatsConnection } from "@nats-io/transport-node";

/** Header block bytes sent as they are (nats.js's publish() sends whatever encode() returns). */
class RawHeaders extends MsgHdrsImpl {
  constructor(private readonly bytes: Uint8Array) {
    super();
  }

  override encode(): Uint8Array {
    return this.bytes;
  }
}

export type HeaderLines = Array<[string, string]>;

export interface Injected {
  /** The stream took it (and it was not a duplicate of a stored message). */
  stored: boolean;
  duplicate: boolean;
  seq?: number;
  error?: string;
}

/** The relay's four headers, as a relay writes them. */
export function relayHeaders(h: { origin: string; id: string; kind: string; publishedAt?: string }): HeaderLines {
  return [
    ["Uptrakit-Origin", h.origin],
    ["Uptrakit-Id", h.id],
    ["Uptrakit-Kind", h.kind],
    ["Uptrakit-Published-At", h.publishedAt ?? new Date().toISOString()],
  ];
}

/** NATS/1.0 + "Key: value" lines, joined exactly as given (no trimming, no checks). */
export function headerBlock(lines: HeaderLines | Uint8Array): Uint8Array {
  if (lines instanceof Uint8Array) return lines;
  return Buffer.from(`NATS/1.0\r\n${lines.map(([k, v]) => `${k}: ${v}\r\n`).join("")}\r\n`, "utf8");
}

export class NatsInjector {
  private constructor(readonly nc: NatsConnection) {}

  static async connect(url: string): Promise<NatsInjector> {
    return new NatsInjector(await connect({ servers: url, name: "test-injector" }));
  }

  /** Publishes with a reply for the PubAck; headers: lines, a raw block (from "NATS/1.0"), or none. */
  async publish(subject: string, payload: string | Uint8Array, headers?: HeaderLines | Uint8Array): Promise<Injected> {
    const data = typeof payload === "string" ? Buffer.from(payload, "utf8") : payload;
    try {
      const reply = await this.nc.request(subject, data, { timeout: 10_000, ...(headers ? { headers: new RawHeaders(headerBlock(headers)) } : {}) });
      const ack = JSON.parse(reply.string()) as { stream?: string; seq?: number; duplicate?: boolean; error?: { description?: string } };
      if (ack.error || !ack.stream) return { stored: false, duplicate: false, error: ack.error?.description ?? "no stream in PubAck" };
      return { stored: ack.duplicate !== true, duplicate: ack.duplicate === true, seq: ack.seq };
    } catch (err) {
      return { stored: false, duplicate: false, error: (err as Error).message };
    }
  }

  async close(): Promise<void> {
    await this.nc.close();
  }
}
