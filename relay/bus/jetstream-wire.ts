// The relay's wire format on NATS: its subjects, the five headers every message carries (and the
// W3C trace context headers, traceparent and tracestate, when the publish had one), and the
// JetStream ack subject. nats.js builds and parses headers generically (a Map of arrays, key
// canonicalisation and value validation per header, one string split per message); both showed in
// the relay's profile, so the relay encodes and reads its own.

import { headers, type MsgHdrs } from "@nats-io/transport-node";
import type { JsMsg } from "@nats-io/jetstream";
import type { BusMessage } from "./bus.js";
import { handEncodedHeaders, type WireCodec } from "./nats-internals.js";

export const SUBJECT_PREFIX = "uptrakit.push";
export const SUBJECT_FILTER = `${SUBJECT_PREFIX}.>`;

// A message's subject is uptrakit.push.<origin>.<kind>: the origin is in the subject so that NATS
// itself can enforce it (each relay's user may publish on uptrakit.push.<own-id>.> only). These
// two are the only places that know the layout.
const PREFIX_DOT = `${SUBJECT_PREFIX}.`;

/** The subject of a message of `kind` published by relay `origin` (both valid subject tokens). */
export function subjectFor(origin: string, kind: string): string {
  return `${PREFIX_DOT}${origin}.${kind}`;
}

/**
 * (origin, kind) from a subject, or undefined when it is not uptrakit.push.<origin>.<kind> with two
 * non-empty tokens. The tokens themselves are the inbound policy's to judge.
 */
export function parseSubject(subject: string): { origin: string; kind: string } | undefined {
  if (!subject.startsWith(PREFIX_DOT)) return undefined;
  const start = PREFIX_DOT.length;
  const dot = subject.indexOf(".", start);
  if (dot <= start || dot === subject.length - 1 || subject.indexOf(".", dot + 1) >= 0) return undefined;
  return { origin: subject.slice(start, dot), kind: subject.slice(dot + 1) };
}

const HDR_ORIGIN = "Uptrakit-Origin";
const HDR_ID = "Uptrakit-Id";
const HDR_KIND = "Uptrakit-Kind";
const HDR_PUBLISHED_AT = "Uptrakit-Published-At";
// The W3C names, as OpenTelemetry's propagators use them on NATS: other tools can follow them too.
const HDR_TRACEPARENT = "traceparent";
const HDR_TRACESTATE = "tracestate";

const CR_OR_LF = /[\r\n]/;

/**
 * The relay's headers for msg. `encoded` makes headers that send given bytes as they are (the
 * header-encode fast path, relay/bus/nats-internals.ts); without it, nats.js's headers().
 */
export function publishHeaders(msg: BusMessage, encoded?: (bytes: Uint8Array) => MsgHdrs | undefined): MsgHdrs {
  const id = encodeHeader(msg.id); // percent-encoded: never holds CR or LF
  if (!encoded || CR_OR_LF.test(msg.origin) || CR_OR_LF.test(msg.kind) || CR_OR_LF.test(msg.publishedAt)) {
    // Not a relay-made message (those have validated ids, kinds and ISO times): the generic way,
    // which refuses such values.
    const h = headers();
    h.set(HDR_ORIGIN, msg.origin);
    h.set(HDR_ID, id);
    h.set(HDR_KIND, msg.kind);
    h.set(HDR_PUBLISHED_AT, msg.publishedAt);
    h.set("Nats-Msg-Id", `${msg.origin}:${id}`);
    if (msg.traceparent !== undefined) h.set(HDR_TRACEPARENT, msg.traceparent);
    if (msg.tracestate !== undefined) h.set(HDR_TRACESTATE, msg.tracestate);
    return h;
  }
  // The wire format of MsgHdrsImpl.encode(): values trimmed, as it trims them.
  const origin = msg.origin.trim();
  const text =
    `NATS/1.0\r\n${HDR_ORIGIN}: ${origin}\r\n${HDR_ID}: ${id}\r\n${HDR_KIND}: ${msg.kind.trim()}\r\n` +
    `${HDR_PUBLISHED_AT}: ${msg.publishedAt.trim()}\r\nNats-Msg-Id: ${origin}:${id}\r\n` +
    // Validated W3C values: printable ASCII, never CR or LF.
    (msg.traceparent === undefined ? "" : `${HDR_TRACEPARENT}: ${msg.traceparent.trim()}\r\n`) +
    (msg.tracestate === undefined ? "" : `${HDR_TRACESTATE}: ${msg.tracestate.trim()}\r\n`) +
    "\r\n";
  return encoded(Buffer.from(text)) ?? publishHeaders(msg);
}

interface RelayHeaders {
  origin: string;
  id: string;
  kind: string;
  publishedAt: string;
  msgId: string;
  /** The first relay header that was given more than once ("" when none was): a forgery sign. */
  duplicated: string;
  traceparent: string;
  tracestate: string;
}

const RELAY_KEYS = [HDR_ORIGIN, HDR_ID, HDR_KIND, HDR_PUBLISHED_AT] as const;

/**
 * The relay's headers of a delivered message ("" when absent), with the semantics of nats.js's
 * MsgHdrsImpl.decode() + get(): exact key match, first value wins, values trimmed. Reads the raw
 * header block when given (the header-read fast path, relay/bus/nats-internals.ts), else m.headers.
 */
export function readHeaders(m: Pick<JsMsg, "headers">, block?: Uint8Array): RelayHeaders {
  const out: RelayHeaders = { origin: "", id: "", kind: "", publishedAt: "", msgId: "", duplicated: "", traceparent: "", tracestate: "" };
  if (block === undefined) {
    const h = m.headers;
    if (h) {
      out.origin = h.get(HDR_ORIGIN);
      out.id = h.get(HDR_ID);
      out.kind = h.get(HDR_KIND);
      out.publishedAt = h.get(HDR_PUBLISHED_AT);
      out.msgId = h.get("Nats-Msg-Id");
      out.duplicated = RELAY_KEYS.find((k) => h.values(k).length > 1) ?? "";
      out.traceparent = h.get(HDR_TRACEPARENT);
      out.tracestate = h.get(HDR_TRACESTATE);
    }
    return out;
  }
  if (block.length === 0) return out;
  const text = Buffer.from(block.buffer, block.byteOffset, block.byteLength).toString("utf8");
  let pos = text.indexOf("\r\n"); // past the status line, NATS/1.0
  if (pos < 0) return out;
  pos += 2;
  let seen = 0; // one bit per field: the first value of a key wins, even an empty one
  while (pos < text.length) {
    let end = text.indexOf("\r\n", pos);
    if (end < 0) end = text.length;
    const colon = text.indexOf(":", pos);
    if (colon > pos && colon < end) {
      const key = text.slice(pos, colon);
      let field: keyof RelayHeaders | undefined;
      let bit = 0;
      if (key === HDR_ORIGIN) (field = "origin"), (bit = 1);
      else if (key === HDR_ID) (field = "id"), (bit = 2);
      else if (key === HDR_KIND) (field = "kind"), (bit = 4);
      else if (key === HDR_PUBLISHED_AT) (field = "publishedAt"), (bit = 8);
      else if (key === "Nats-Msg-Id") (field = "msgId"), (bit = 16);
      else if (key === HDR_TRACEPARENT) (field = "traceparent"), (bit = 32);
      else if (key === HDR_TRACESTATE) (field = "tracestate"), (bit = 64);
      if (field !== undefined) {
        if ((seen & bit) === 0) {
          seen |= bit;
          out[field] = text.slice(colon + 1, end).trim();
        } else if (bit <= 8 && out.duplicated === "") out.duplicated = key; // a relay header twice
      }
    }
    pos = end + 2;
  }
  return out;
}

// Header values cannot hold CR/LF and nats.js trims them: percent-encode a publish id (a no-op for
// ordinary ids) so every id travels and comes back exactly.
function encodeHeader(v: string): string {
  return encodeURIComponent(v);
}

export function decodeHeader(v: string): string {
  try {
    return decodeURIComponent(v);
  } catch {
    return v;
  }
}

/**
 * Delivery count and stream sequence from an ack subject, without nats.js's parseInfo (which
 * splits it into a dozen strings): $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
 * or, since 2.9's domains, $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.…
 * Undefined when the subject has neither shape (then m.info decides, or throws as before).
 */
export function ackInfo(reply: string): { deliveryCount: number; streamSequence: number } | undefined {
  if (!reply.startsWith("$JS.ACK.")) return undefined;
  const dots: number[] = [];
  for (let i = reply.indexOf("."); i >= 0; i = reply.indexOf(".", i + 1)) dots.push(i);
  // tokens = dots + 1; the delivered count is token 4 (9 tokens) or token 6 (11 or more).
  const first = dots.length === 8 ? 4 : dots.length >= 10 ? 6 : -1;
  if (first < 0) return undefined;
  const deliveryCount = Number(reply.slice(dots[first - 1]! + 1, dots[first]!));
  const streamSequence = Number(reply.slice(dots[first]! + 1, dots[first + 1]!));
  if (!Number.isSafeInteger(deliveryCount) || !Number.isSafeInteger(streamSequence)) return undefined;
  return { deliveryCount, streamSequence };
}

/** The start-up check's view of this format (NatsFastPaths.check): a sample message, both encodings. */
export const wireCodec: WireCodec = {
  encode: (fast) => publishHeaders(CHECK_SAMPLE, fast ? handEncodedHeaders : undefined),
  readPublic: (h) => ({ ...readHeaders({ headers: h }) }),
  parseBlock: (block) => ({ ...readHeaders({ headers: undefined }, block) }),
};

const CHECK_SAMPLE: BusMessage = {
  id: "fast-path check/1 ü",
  kind: "FastPathCheck",
  origin: "fast-path-check",
  publishedAt: "2026-01-01T00:00:00.000Z",
  payloadJson: "{}",
  // The optional headers too, so the check covers every header the relay writes.
  traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
  tracestate: "congo=t61rcWkgMzE",
};
