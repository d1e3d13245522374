// Every use of a nats.js internal, in one place. The JetStream bus's hot path takes four shortcuts
// through nats.js's private fields (each measured in the README's Performance table); none is part
// of nats.js's API, so a new nats.js could move them. Each is therefore checked against the
// installed nats.js before it is used — at start-up against nats.js's own encoder, decoder and
// message class, and on the first delivery for what only a JetStream message has — and when a
// check fails the bus uses the public API instead, logs a warning naming the fast path and
// reports it in uptrakit_relay_fast_paths.
// `--fast-paths off` (UPTRAKIT_RELAY_FAST_PATHS=off) takes all of them out.
//
//   socket-cork    nc.protocol.transport.socket: cork the NATS socket for one event-loop turn
//   header-encode  a MsgHdrsImpl subclass whose encode() returns headers encoded by hand
//   header-read    JsMsg.msg._msg.hdr / ._rdata: the raw header block of a delivery
//   ack-reply      JsMsg.reply: the ack subject (settles go there directly; seq and attempt are
//                  read from it), instead of JsMsg.ack()/nak()/… and JsMsg.info

import type { Writable } from "node:stream";
import { MsgHdrsImpl, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { MsgImpl } from "@nats-io/nats-core/internal";
import type { JsMsg } from "@nats-io/jetstream";
import type { Logger } from "../log.js";

export const FAST_PATHS = ["socket-cork", "header-encode", "header-read", "ack-reply"] as const;
export type FastPath = (typeof FAST_PATHS)[number];
/** on: checked and used; off: forced off by configuration; disabled: a check failed; unchecked: not yet checked. */
export type FastPathState = "on" | "off" | "disabled" | "unchecked";
export const FAST_PATH_STATES: readonly FastPathState[] = ["on", "off", "disabled", "unchecked"];

/** What the start-up check needs of the wire format (relay/bus/jetstream-wire.ts). */
export interface WireCodec {
  /** The relay's headers for a sample message, by hand (fast) or through nats.js's headers() (generic). */
  encode(fast: boolean): MsgHdrs;
  /** The sample's header values as nats.js's public API reads them from a received message. */
  readPublic(h: MsgHdrs | undefined): Record<string, string>;
  /** The same values parsed from a raw header block by the relay's own parser. */
  parseBlock(block: Uint8Array): Record<string, string>;
}

/** Headers encoded once, by hand; nats.js's publish() sends whatever encode() returns. */
class EncodedHeaders extends MsgHdrsImpl {
  constructor(private readonly bytes: Uint8Array) {
    super();
  }

  override encode(): Uint8Array {
    return this.bytes;
  }
}

/** Hand-encoded headers, unconditionally: for the start-up check, which compares them with nats.js's. */
export function handEncodedHeaders(bytes: Uint8Array): MsgHdrs {
  return new EncodedHeaders(bytes);
}

type MsgInternals = { _msg?: { hdr?: unknown }; _rdata?: unknown };

/** The raw header block of a core message (MsgImpl internals); undefined when not found. */
function msgHeaderBlock(msg: unknown): Uint8Array | undefined {
  const inner = msg as MsgInternals | undefined;
  const hdr = inner?._msg?.hdr;
  const data = inner?._rdata;
  if (typeof hdr !== "number" || !(data instanceof Uint8Array) || hdr > data.length) return undefined;
  return hdr > 0 ? data.subarray(0, hdr) : new Uint8Array(0);
}

function natsSocket(nc: NatsConnection | undefined): Writable | undefined {
  return (nc as unknown as { protocol?: { transport?: { socket?: Writable } } } | undefined)?.protocol?.transport?.socket;
}

/** The bytes publish() sends for `h` (MsgHdrsImpl.encode(), which MsgHdrs does not declare). */
function bytesOf(h: MsgHdrs): Uint8Array {
  const encode = (h as Partial<MsgHdrsImpl>).encode;
  if (typeof encode !== "function") throw new Error("nats.js headers have no encode()");
  return encode.call(h);
}

const sameBytes = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
const sameValues = (a: Record<string, string>, b: Record<string, string>): boolean =>
  Object.keys(a).length === Object.keys(b).length && Object.entries(a).every(([k, v]) => b[k] === v);

export interface FastPathsOptions {
  /** false: every fast path off (--fast-paths off). */
  enabled: boolean;
  logger: Logger;
  /** Each state change (for the metric). */
  onState?(path: FastPath, state: FastPathState): void;
}

export class NatsFastPaths {
  private readonly state = new Map<FastPath, FastPathState>();
  private readonly log: Logger;
  private deliveryChecked = false;

  constructor(private readonly opts: FastPathsOptions) {
    this.log = opts.logger;
    for (const p of FAST_PATHS) this.set(p, opts.enabled ? "unchecked" : "off");
  }

  /** Whether a fast path is in use (checked and not failed). */
  on(path: FastPath): boolean {
    return this.state.get(path) === "on";
  }

  states(): Record<FastPath, FastPathState> {
    return Object.fromEntries(this.state) as Record<FastPath, FastPathState>;
  }

  private set(path: FastPath, s: FastPathState): void {
    if (this.state.get(path) === s) return;
    this.state.set(path, s);
    this.opts.onState?.(path, s);
  }

  /** A check failed: the public API from now on. */
  disable(path: FastPath, reason: string): void {
    if (this.state.get(path) === "off" || this.state.get(path) === "disabled") return;
    this.set(path, "disabled");
    this.log.warn({ fastPath: path, reason }, `nats.js fast path ${path} disabled: the installed nats.js does not match it; using the public API`);
  }

  private pass(path: FastPath): void {
    if (this.state.get(path) === "unchecked") this.set(path, "on");
  }

  // ---- the fast paths ------------------------------------------------------------------------

  /** The NATS socket to cork, if socket-cork is on. */
  socket(nc: NatsConnection | undefined): Writable | undefined {
    return this.on("socket-cork") ? natsSocket(nc) : undefined;
  }

  /** Headers that send `bytes` as they are, if header-encode is on. */
  encodedHeaders(bytes: Uint8Array): MsgHdrs | undefined {
    return this.on("header-encode") ? new EncodedHeaders(bytes) : undefined;
  }

  /** The raw header block of a delivery, if header-read is on (and the message has one). */
  headerBlock(m: JsMsg): Uint8Array | undefined {
    return this.on("header-read") ? msgHeaderBlock((m as unknown as { msg?: unknown }).msg) : undefined;
  }

  /** The ack subject of a delivery, if ack-reply is on; "" otherwise. */
  reply(m: JsMsg): string {
    if (!this.on("ack-reply")) return "";
    const r = (m as unknown as { reply?: unknown }).reply;
    return typeof r === "string" ? r : "";
  }

  // ---- checks ----------------------------------------------------------------------------------

  /**
   * At start-up: the live connection's socket has the shape corking needs; the relay's
   * hand-encoded headers are byte for byte what nats.js's own headers() encodes, and nats.js's
   * decoder reads them back to the same values; and a message built as nats.js's parser builds
   * one (MsgImpl) exposes exactly those bytes as its raw header block, parsing to what its public
   * `headers` says. All local: no message is sent, so a relay whose NATS user may publish only on
   * its own subjects (deploy/nats/least-privilege.conf) checks the same way. header-read is
   * turned on, and ack-reply checked, by the first delivery (checkDelivery): only a JetStream
   * delivery shows JsMsg's fields.
   */
  async check(nc: NatsConnection, codec: WireCodec): Promise<void> {
    if (!this.opts.enabled) return;
    const socket = natsSocket(nc);
    if (socket && typeof socket.cork === "function" && typeof socket.uncork === "function" && typeof socket.writableCorked === "number") this.pass("socket-cork");
    else this.disable("socket-cork", "nc.protocol.transport.socket is not a corkable stream");

    const generic = codec.encode(false);
    const want = codec.readPublic(generic);
    try {
      if (typeof MsgHdrsImpl !== "function" || typeof MsgHdrsImpl.prototype.encode !== "function") throw new Error("MsgHdrsImpl has no encode()");
      const fast = codec.encode(true);
      if (!(fast instanceof MsgHdrsImpl)) throw new Error("the hand-encoded headers are not a MsgHdrsImpl");
      if (!sameBytes(bytesOf(fast), bytesOf(generic))) throw new Error("hand-encoded header bytes differ from nats.js's own encoding");
      if (!sameValues(codec.readPublic(MsgHdrsImpl.decode(bytesOf(fast))), want)) throw new Error("nats.js decodes the hand-encoded headers to other values");
      this.pass("header-encode");
    } catch (err) {
      this.disable("header-encode", (err as Error).message);
    }

    try {
      const hdr = bytesOf(generic);
      const payload = Buffer.from("{}");
      const data = new Uint8Array(hdr.length + payload.length);
      data.set(hdr, 0);
      data.set(payload, hdr.length);
      const arg = { subject: Buffer.from("uptrakit.fast-path-check"), sid: 1, hdr: hdr.length, size: data.length };
      const msg = new MsgImpl(arg, data, { publish: () => undefined } as unknown as ConstructorParameters<typeof MsgImpl>[2]);
      const block = msgHeaderBlock(msg);
      if (!block) this.disable("header-read", "MsgImpl has no _msg.hdr / _rdata");
      else if (!sameBytes(block, hdr)) this.disable("header-read", "MsgImpl's raw header block is not the header bytes");
      else if (!sameValues(codec.parseBlock(block), codec.readPublic(msg.headers))) this.disable("header-read", "the raw header block parses differently from nats.js's headers");
      // Passing this, header-read stays unchecked until checkDelivery() sees JsMsg.msg on a delivery.
    } catch (err) {
      this.disable("header-read", `cannot build a nats.js message: ${(err as Error).message}`);
    }
  }

  /**
   * The first delivery: JsMsg.msg must be the core message (its raw headers read as JsMsg.headers
   * does) and JsMsg.reply the ack subject, giving JsMsg.info's sequence and delivery count.
   * `read` parses a raw block; `ackInfo` parses an ack subject (relay/bus/jetstream-wire.ts).
   */
  checkDelivery(
    m: JsMsg,
    read: (block: Uint8Array) => Record<string, string>,
    publicRead: (h: MsgHdrs | undefined) => Record<string, string>,
    ackInfo: (reply: string) => { deliveryCount: number; streamSequence: number } | undefined,
  ): void {
    if (this.deliveryChecked || !this.opts.enabled) return;
    this.deliveryChecked = true;
    if (this.state.get("header-read") === "unchecked") {
      const block = msgHeaderBlock((m as unknown as { msg?: unknown }).msg);
      if (!block) this.disable("header-read", "JsMsg.msg has no _msg.hdr / _rdata");
      else if (!sameValues(read(block), publicRead(m.headers))) this.disable("header-read", "a delivery's raw header block parses differently from JsMsg.headers");
      else this.pass("header-read");
    }
    const r = (m as unknown as { reply?: unknown }).reply;
    const info = typeof r === "string" ? ackInfo(r) : undefined;
    if (typeof r !== "string") this.disable("ack-reply", "JsMsg.reply is not a string");
    else if (!info) this.disable("ack-reply", `JsMsg.reply ${JSON.stringify(r.slice(0, 80))} is not a JetStream ack subject`);
    else if (info.streamSequence !== m.info.streamSequence || info.deliveryCount !== m.info.deliveryCount)
      this.disable("ack-reply", "JsMsg.reply names another sequence or delivery count than JsMsg.info");
    else this.pass("ack-reply");
  }
}
