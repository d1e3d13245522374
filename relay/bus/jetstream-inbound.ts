// One JetStream delivery as the relay sees it (JsInbound), settled straight to its reply subject.

import type { JsMsg } from "@nats-io/jetstream";
import type { InboundMessage } from "./bus.js";
import { isUtf8 } from "node:buffer";
import { ackInfo, decodeHeader, readHeaders } from "./jetstream-wire.js";
import { validTracestate, validTraceparent } from "../trace-context.js";

export interface Settler {
  /** The header-read and ack-reply fast paths (relay/bus/nats-internals.ts): undefined / "" when off. */
  headerBlock(m: JsMsg): Uint8Array | undefined;
  reply(m: JsMsg): string;
  cork(): void;
  /** Publishes a settle (+ACK, -NAK, +WPI, +TERM) to a message's reply subject. */
  respond(reply: string, data: Uint8Array): void;
  failed(err: unknown, seq: number, what: string): void;
}

// The JetStream ack protocol, as nats.js's JsMsg sends it.
const ACK = Buffer.from("+ACK");
const NAK = Buffer.from("-NAK");
const WPI = Buffer.from("+WPI");
const TERM = Buffer.from("+TERM");

/**
 * One JetStream delivery as the relay sees it. A class rather than an object of closures (five
 * allocations per message fewer). It keeps nats.js's message only until the payload is read
 * (at once for a delivery; never for an echo, which is acked and dropped at once): an in-flight
 * message then holds its strings, not nats.js's objects and the read buffer they point into,
 * which made in-flight messages expensive for the garbage collector. Settles go to the reply
 * subject, as JsMsg's do.
 */
export class JsInbound implements InboundMessage {
  readonly id: string;
  readonly kind: string;
  readonly origin: string;
  readonly publishedAt: string;
  readonly traceparent: string | undefined;
  readonly tracestate: string | undefined;
  readonly attempt: number;
  readonly seq: number;
  /** The ack subject; "" without the ack-reply fast path (then settles go through `legacy`). */
  private readonly reply: string;
  private readonly legacy: JsMsg | undefined;
  private m: JsMsg | undefined;
  private payload: string | undefined;
  /** ack, nak or term sent: later ones are ignored, as JsMsg ignores them. */
  private settled = false;

  constructor(
    m: JsMsg,
    private readonly settler: Settler,
  ) {
    const h = readHeaders(m, settler.headerBlock(m));
    this.reply = settler.reply(m);
    if (!this.reply) this.legacy = m;
    const info = ackInfo(this.reply) ?? m.info;
    this.seq = info.streamSequence;
    this.attempt = info.deliveryCount;
    // The headers as they came ("" when absent), no fallbacks: a message without them is not a
    // relay's, and the inbound policy (relay/inbound-policy.ts) refuses it for what it is.
    this.id = h.id ? decodeHeader(h.id) : "";
    this.kind = h.kind;
    this.origin = h.origin;
    this.publishedAt = h.publishedAt;
    this.duplicatedHeader = h.duplicated;
    this.subject = m.subject;
    // Anyone may publish on the subject: only a well-formed context is passed on.
    this.traceparent = h.traceparent && validTraceparent(h.traceparent) ? h.traceparent : undefined;
    this.tracestate = this.traceparent && h.tracestate && validTracestate(h.tracestate) ? h.tracestate : undefined;
    this.m = m;
  }

  readonly subject: string;
  readonly duplicatedHeader: string;

  get payloadJson(): string {
    if (this.payload === undefined) this.readPayload();
    return this.payload!;
  }

  /** False when the payload's bytes are not UTF-8 (its text then holds replacement characters). */
  get payloadUtf8(): boolean {
    if (this.payload === undefined) this.readPayload();
    return this.utf8;
  }

  private utf8 = true;

  private readPayload(): void {
    const data = this.m!.data;
    this.utf8 = isUtf8(data);
    // The bytes as sent: nats.js's string() (a TextDecoder) would silently drop a leading BOM.
    this.payload = Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8");
    this.m = undefined;
  }

  ack(): void {
    this.settle("ack");
  }

  nak(delayMs: number): void {
    this.settle("nak", Math.max(0, delayMs));
  }

  working(): void {
    this.settle("working");
  }

  term(): void {
    this.settle("term");
  }

  // Settling on a closed connection throws; the server redelivers anyway, so just note it.
  private settle(what: "ack" | "nak" | "working" | "term", delayMs = 0): void {
    if (this.settled) return;
    if (what !== "working") this.settled = true;
    this.settler.cork();
    try {
      const legacy = this.legacy;
      if (legacy) {
        if (what === "ack") legacy.ack();
        else if (what === "nak") legacy.nak(delayMs);
        else if (what === "working") legacy.working();
        else legacy.term(); // no reason: 2.9 ignores a term with a reason and redelivers
      } else {
        const data =
          what === "ack" ? ACK
          : what === "working" ? WPI
          : what === "term" ? TERM // no reason, as above
          : delayMs > 0 ? Buffer.from(`-NAK ${JSON.stringify({ delay: delayMs * 1_000_000 })}`)
          : NAK;
        this.settler.respond(this.reply, data);
      }
    } catch (err) {
      this.settler.failed(err, this.seq, what);
    }
  }
}
