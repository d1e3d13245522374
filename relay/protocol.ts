// The wire contract between a controller and its relay: JSON text frames on ws://<listen>/ws.
// This module is the single source of truth for it; docs/protocol.md describes the same frames and
// docs/asyncapi.yaml is the machine-readable contract (test/contract.test.ts keeps them in step).

import { kindProblem } from "./kinds.js";
import { parseTraceContext } from "./trace-context.js";

/**
 * Every error code the relay sends. "refused": the bus refused this message for good (e.g. over
 * NATS's max_payload), a retry cannot help.
 */
export const ERROR_CODES = ["invalid_frame", "frame_too_large", "forbidden_kind", "unavailable", "refused", "unknown_delivery"] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

// ---- controller → relay -------------------------------------------------------------------

export interface PublishFrame {
  type: "publish";
  id: string;
  kind: string;
  /** The payload as JSON text: parsed once to validate the frame, then carried as text. */
  payloadJson: string;
  /** W3C trace context, when the frame carried a well-formed one. */
  traceparent?: string;
  tracestate?: string;
  /** Why a trace context the frame carried was dropped (the publish goes ahead without it). */
  traceDropped?: string;
}
export interface AckFrame {
  type: "ack";
  deliveryId: string;
}
export interface NackFrame {
  type: "nack";
  deliveryId: string;
  delayMs?: number;
}
export interface WorkingFrame {
  type: "working";
  deliveryId: string;
}
export interface RejectFrame {
  type: "reject";
  deliveryId: string;
  reason?: string;
}
export type ClientFrame = PublishFrame | AckFrame | NackFrame | WorkingFrame | RejectFrame;

// The contract as lists, compared with docs/asyncapi.yaml by test/contract.test.ts: every frame
// type in each direction with every field it may carry (on the wire, so "payload", not payloadJson).
export const CLIENT_FRAME_FIELDS = {
  publish: ["type", "id", "kind", "payload", "traceparent", "tracestate"],
  ack: ["type", "deliveryId"],
  nack: ["type", "deliveryId", "delayMs"],
  working: ["type", "deliveryId"],
  reject: ["type", "deliveryId", "reason"],
} as const satisfies { [K in ClientFrame["type"]]: readonly string[] };

export const RELAY_FRAME_FIELDS = {
  ready: ["type", "instanceId", "bus"],
  published: ["type", "id", "queued"],
  deliver: ["type", "deliveryId", "id", "kind", "origin", "attempt", "publishedAt", "payload", "traceparent", "tracestate"],
  error: ["type", "id", "code", "message"],
} as const;

export interface FrameError {
  code: ErrorCode;
  message: string;
  /** The publish id, when the frame got far enough to have one. */
  id?: string;
}

export const MAX_ID_LENGTH = 128;
export const MAX_DELIVERY_ID_LENGTH = 128;
/** Longest nack delay a controller may ask for: a day, so a typo cannot park a message for ever. */
export const MAX_NACK_DELAY_MS = 24 * 60 * 60 * 1000;
/** JSON nested deeper than this is refused: it has no business in a notification. */
export const MAX_PAYLOAD_DEPTH = 64;

export type ParseResult = { ok: true; frame: ClientFrame } | { ok: false; error: FrameError };

const fail = (code: ErrorCode, message: string, id?: string): ParseResult => ({
  ok: false,
  error: id === undefined ? { code, message } : { code, message, id },
});

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A UTF-16 surrogate without its other half (u-mode: a well-formed pair is one code point). */
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

/** At most max code points (what JSON Schema's maxLength counts), without allocating. */
function codePointsAtMost(v: string, max: number): boolean {
  if (v.length <= max) return true;
  if (v.length > 2 * max) return false;
  let n = 0;
  for (let i = 0; i < v.length; i++, n++) {
    const c = v.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < v.length) {
      const d = v.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
  }
  return n <= max;
}

// An id must survive the bus's header encoding and a round trip through the outbox (UTF-8): a
// lone surrogate does neither, so it is refused here rather than answered 'unavailable' for ever.
function validId(v: unknown): v is string {
  return typeof v === "string" && v.length >= 1 && codePointsAtMost(v, MAX_ID_LENGTH) && !LONE_SURROGATE.test(v);
}

function validDeliveryId(v: unknown): v is string {
  return typeof v === "string" && v.length >= 1 && codePointsAtMost(v, MAX_DELIVERY_ID_LENGTH);
}

/**
 * Depth of nested arrays/objects, stopping early once past the limit. Recursive (at most
 * limit + 1 frames deep) and allocation-free: it runs on every publish.
 */
export function depthExceeds(value: unknown, limit: number, depth = 1): boolean {
  if (typeof value !== "object" || value === null) return false;
  if (depth > limit) return true;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const child: unknown = value[i];
      if (typeof child === "object" && child !== null && depthExceeds(child, limit, depth + 1)) return true;
    }
    return false;
  }
  for (const key in value) {
    if (!Object.hasOwn(value, key)) continue; // own keys only, as Object.values had it
    const child: unknown = (value as Record<string, unknown>)[key];
    if (typeof child === "object" && child !== null && depthExceeds(child, limit, depth + 1)) return true;
  }
  return false;
}

/** kindProblem() per kind seen: a controller uses a handful of kinds, checked on every publish. */
const kindVerdicts = new Map<string, ReturnType<typeof kindProblem> | null>();
const KIND_VERDICTS_MAX = 1024;

function cachedKindProblem(kind: string): ReturnType<typeof kindProblem> {
  const known = kindVerdicts.get(kind);
  if (known !== undefined) return known ?? undefined;
  const problem = kindProblem(kind);
  if (kindVerdicts.size >= KIND_VERDICTS_MAX) kindVerdicts.clear();
  kindVerdicts.set(kind, problem ?? null);
  return problem;
}

/**
 * Parses one text frame. Never throws: every problem becomes a FrameError that the caller
 * sends back as an error frame, keeping the connection open.
 */
export function parseClientFrame(text: string): ParseResult {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return fail("invalid_frame", "frame is not valid JSON");
  }
  if (!isPlainObject(raw)) return fail("invalid_frame", "frame must be a JSON object");
  const type = raw.type;
  switch (type) {
    case "publish":
      return parsePublish(raw);
    case "ack":
    case "working":
      if (!validDeliveryId(raw.deliveryId))
        return fail("invalid_frame", `${type}: "deliveryId" must be a string of 1-${MAX_DELIVERY_ID_LENGTH} characters`);
      return { ok: true, frame: { type, deliveryId: raw.deliveryId } };
    case "nack": {
      if (!validDeliveryId(raw.deliveryId))
        return fail("invalid_frame", `nack: "deliveryId" must be a string of 1-${MAX_DELIVERY_ID_LENGTH} characters`);
      const d = raw.delayMs;
      if (d !== undefined && (typeof d !== "number" || !Number.isInteger(d) || d < 0 || d > MAX_NACK_DELAY_MS))
        return fail("invalid_frame", `nack: "delayMs" must be an integer from 0 to ${MAX_NACK_DELAY_MS}`);
      return { ok: true, frame: d === undefined ? { type, deliveryId: raw.deliveryId } : { type, deliveryId: raw.deliveryId, delayMs: d } };
    }
    case "reject": {
      if (!validDeliveryId(raw.deliveryId))
        return fail("invalid_frame", `reject: "deliveryId" must be a string of 1-${MAX_DELIVERY_ID_LENGTH} characters`);
      const r = raw.reason;
      if (r !== undefined && typeof r !== "string") return fail("invalid_frame", `reject: "reason" must be a string`);
      return { ok: true, frame: { type, deliveryId: raw.deliveryId, reason: r === undefined ? undefined : r.slice(0, 1024) } };
    }
    default:
      return fail(
        "invalid_frame",
        typeof type === "string"
          ? `unknown frame type ${JSON.stringify(type.slice(0, 32))}`
          : `frame needs a string "type" (publish, ack, nack, working, reject)`,
      );
  }
}

function parsePublish(raw: Record<string, unknown>): ParseResult {
  const id = raw.id;
  if (!validId(id)) return fail("invalid_frame", `publish: "id" must be a string of 1-${MAX_ID_LENGTH} characters (well-formed Unicode)`);
  const kind = raw.kind;
  if (typeof kind !== "string") return fail("invalid_frame", `publish: "kind" must be a string`, id);
  const problem = cachedKindProblem(kind);
  if (problem) return fail(problem.code, `publish: ${problem.message}`, id);
  if (!("payload" in raw) || raw.payload === undefined) return fail("invalid_frame", `publish: "payload" is required`, id);
  if (depthExceeds(raw.payload, MAX_PAYLOAD_DEPTH))
    return fail("invalid_frame", `publish: "payload" is nested deeper than ${MAX_PAYLOAD_DEPTH} levels`, id);
  const frame: PublishFrame = { type: "publish", id, kind, payloadJson: JSON.stringify(raw.payload) };
  if (raw.traceparent !== undefined || raw.tracestate !== undefined) {
    const tc = parseTraceContext(raw.traceparent, raw.tracestate);
    if (tc.traceparent !== undefined) frame.traceparent = tc.traceparent;
    if (tc.tracestate !== undefined) frame.tracestate = tc.tracestate;
    if (tc.dropped !== undefined) frame.traceDropped = tc.dropped;
  }
  return { ok: true, frame };
}

/**
 * Best-effort publish id of a frame too large to parse, so the error can name it.
 * Looks only at the frame's head; a miss just means the error carries no id.
 */
export function sniffPublishId(head: string): string | undefined {
  const m = /"id"\s*:\s*"((?:[^"\\]|\\.){1,128})"/.exec(head.slice(0, 512));
  if (!m) return undefined;
  try {
    return JSON.parse(`"${m[1]}"`) as string;
  } catch {
    return undefined;
  }
}

// ---- relay → controller -------------------------------------------------------------------

export type BusName = "jetstream" | "sqlite";

export function readyFrame(instanceId: string, bus: BusName): string {
  return JSON.stringify({ type: "ready", instanceId, bus });
}

export function publishedFrame(id: string, queued = false): string {
  // The same text as JSON.stringify of the object, without building it: one per publish.
  return `{"type":"published","id":${JSON.stringify(id)}${queued ? `,"queued":true` : ""}}`;
}

export function errorFrame(error: FrameError): string {
  return JSON.stringify(
    error.id === undefined
      ? { type: "error", code: error.code, message: error.message }
      : { type: "error", id: error.id, code: error.code, message: error.message },
  );
}

export interface DeliverFields {
  deliveryId: string;
  id: string;
  kind: string;
  origin: string;
  attempt: number;
  publishedAt: string;
  /** JSON text, spliced in as it is: inboundVerdict (inbound-policy.ts) has verified it to be exactly one JSON value, so it cannot add or override the fields before it. */
  payloadJson: string;
  traceparent?: string;
  tracestate?: string;
}

export function deliverFrame(d: DeliverFields): string {
  return (
    `{"type":"deliver","deliveryId":${JSON.stringify(d.deliveryId)},"id":${JSON.stringify(d.id)}` +
    `,"kind":${JSON.stringify(d.kind)},"origin":${JSON.stringify(d.origin)},"attempt":${d.attempt}` +
    `,"publishedAt":${JSON.stringify(d.publishedAt)}` +
    (d.traceparent === undefined ? "" : `,"traceparent":${JSON.stringify(d.traceparent)}`) +
    (d.tracestate === undefined ? "" : `,"tracestate":${JSON.stringify(d.tracestate)}`) +
    `,"payload":${d.payloadJson}}`
  );
}

// Close codes the relay uses on /ws (4000-4999 is the application range).
export const CLOSE_NORMAL = 1000;
/** Sent by the WebSocket library itself when a text frame is not valid UTF-8. */
export const CLOSE_INVALID_UTF8 = 1007;
export const CLOSE_TOO_BIG = 1009;
export const CLOSE_SUPERSEDED = 4001;
export const CLOSE_CODES = [CLOSE_NORMAL, CLOSE_INVALID_UTF8, CLOSE_TOO_BIG, CLOSE_SUPERSEDED] as const;
