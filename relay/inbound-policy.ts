// Inbound policy: what a bus hands the relay may reach the controller only if this says "ok".
// Anything with publish rights on uptrakit.push.> can write to the stream (another service, a
// misconfigured tool, an intruder with one leaked credential), so every field of a message is a
// claim until checked here. One pure function, for JetStream, the SQLite bus and replayed dead
// letters alike (they all enter through Relay.admit()).
//
// Cheap on purpose: it runs on every message. One JSON.parse of the payload (which also proves it
// is exactly one JSON value, so splicing it into a deliver frame cannot inject keys), char loops
// instead of regexes, and a small cache for the kind verdicts.

import { parseSubject } from "./bus/jetstream-wire.js";
import { KIND_PATTERN, isCredentialBearing } from "./kinds.js";
import { MAX_ID_LENGTH, MAX_PAYLOAD_DEPTH, depthExceeds } from "./protocol.js";

export const INBOUND_REJECT_REASONS = [
  "forbidden_kind",
  "missing_header",
  "invalid_header",
  "invalid_subject",
  "origin_mismatch",
  "kind_mismatch",
  "malformed_payload",
] as const;
export type InboundRejectReason = (typeof INBOUND_REJECT_REASONS)[number];

export interface InboundRejection {
  reason: InboundRejectReason;
  /** For the dead letter and the log: names fields and limits, never quotes the payload. */
  detail: string;
}

/** "echo": this relay's own message, coming back (acked quietly, not delivered). */
export type InboundVerdict = "ok" | "echo" | InboundRejection;

/** The fields the policy reads (an InboundMessage has them all). */
export interface InboundCandidate {
  readonly id: string;
  readonly kind: string;
  readonly origin: string;
  readonly publishedAt: string;
  readonly payloadJson: string;
  readonly subject?: string;
  readonly duplicatedHeader?: string;
  readonly payloadUtf8?: boolean;
}

const MAX_ORIGIN_LENGTH = 64;

const reject = (reason: InboundRejectReason, detail: string): InboundRejection => ({ reason, detail });
/** A claimed value in a detail: quoted, escaped, and short. */
const quote = (v: string): string => JSON.stringify(v.length > 64 ? `${v.slice(0, 64)}…` : v);

/**
 * The verdict on one inbound message. Checks run in this order: a credential-bearing kind first
 * (in the header or the subject), so its payload is never even read; then the headers, the
 * subject, the echo filter, and last the payload.
 */
export function inboundVerdict(m: InboundCandidate, ownInstanceId: string): InboundVerdict {
  const subject = m.subject;
  const parsed = subject === undefined ? undefined : parseSubject(subject);
  if (isForbidden(m.kind) || (parsed !== undefined && isForbidden(parsed.kind)))
    return reject("forbidden_kind", `kind ${quote(parsed && isForbidden(parsed.kind) ? parsed.kind : m.kind)} carries credentials and is never delivered from the bus; payload withheld`);

  const missing = m.origin === "" ? "origin" : m.id === "" ? "id" : m.kind === "" ? "kind" : m.publishedAt === "" ? "published-at" : undefined;
  if (missing !== undefined) return reject("missing_header", `no ${missing} header`);
  if (m.duplicatedHeader) return reject("invalid_header", `header ${m.duplicatedHeader} given more than once`);
  if (!isInstanceId(m.origin)) return reject("invalid_header", `origin ${quote(m.origin)} is not an instance id (1-${MAX_ORIGIN_LENGTH} letters, digits, '_' or '-')`);
  if (!isWellFormedId(m.id)) return reject("invalid_header", `id is not 1-${MAX_ID_LENGTH} characters of well-formed Unicode`);
  if (!kindOk(m.kind)) return reject("invalid_header", `kind ${quote(m.kind)} does not match ${KIND_PATTERN.source}`);
  if (!isIsoTime(m.publishedAt)) return reject("invalid_header", `published-at ${quote(m.publishedAt)} is not an ISO-8601 time`);

  if (subject !== undefined) {
    if (parsed === undefined || !isInstanceId(parsed.origin) || !kindOk(parsed.kind))
      return reject("invalid_subject", `subject ${quote(subject)} is not uptrakit.push.<origin>.<kind>`);
    if (parsed.origin !== m.origin) return reject("origin_mismatch", `origin header ${quote(m.origin)} differs from the subject's origin ${quote(parsed.origin)}`);
    if (parsed.kind !== m.kind) return reject("kind_mismatch", `kind header ${quote(m.kind)} differs from the subject's kind ${quote(parsed.kind)}`);
  }

  if (m.origin === ownInstanceId) return "echo";

  if (m.payloadUtf8 === false) return reject("malformed_payload", "payload is not UTF-8");
  const text = m.payloadJson;
  if (text.length === 0) return reject("malformed_payload", "payload is empty");
  let value: unknown;
  try {
    value = JSON.parse(text); // refuses trailing text: exactly one JSON value
  } catch {
    return reject("malformed_payload", "payload is not exactly one JSON value");
  }
  if (typeof value === "object" && value !== null && depthExceeds(value, MAX_PAYLOAD_DEPTH))
    return reject("malformed_payload", `payload is nested deeper than ${MAX_PAYLOAD_DEPTH} levels`);
  return "ok";
}

// ---- the checks -----------------------------------------------------------------------------------

/** Kinds seen: a deployment uses a handful, checked on every message. Bounded against floods. */
const kindCache = new Map<string, number>();
const KIND_CACHE_MAX = 1024;
const KIND_OK = 1;
const KIND_FORBIDDEN = 2;

function kindFlags(kind: string): number {
  let f = kindCache.get(kind);
  if (f === undefined) {
    f = (isCredentialBearing(kind) ? KIND_FORBIDDEN : 0) | (KIND_PATTERN.test(kind) ? KIND_OK : 0);
    if (kind.length > 128) return f; // no kind is that long: not worth remembering
    if (kindCache.size >= KIND_CACHE_MAX) kindCache.clear();
    kindCache.set(kind, f);
  }
  return f;
}

const isForbidden = (kind: string): boolean => kind !== "" && (kindFlags(kind) & KIND_FORBIDDEN) !== 0;
const kindOk = (kind: string): boolean => (kindFlags(kind) & KIND_OK) !== 0;

/** 1-64 of [A-Za-z0-9_-]: what --instance-id accepts, and a valid subject token. */
export function isInstanceId(s: string): boolean {
  const n = s.length;
  if (n === 0 || n > MAX_ORIGIN_LENGTH) return false;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (!((c >= 97 && c <= 122) || (c >= 65 && c <= 90) || (c >= 48 && c <= 57) || c === 95 || c === 45)) return false;
  }
  return true;
}

/** What a publish id may be (protocol.ts validId): 1-128 UTF-16 units, no lone surrogate. */
function isWellFormedId(s: string): boolean {
  const n = s.length;
  if (n === 0 || n > MAX_ID_LENGTH) return false;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c < 0xd800 || c > 0xdfff) continue;
    if (c > 0xdbff) return false; // a low surrogate first
    const d = i + 1 < n ? s.charCodeAt(i + 1) : 0;
    if (d < 0xdc00 || d > 0xdfff) return false;
    i++;
  }
  return true;
}

const digit = (s: string, i: number): number => {
  const c = s.charCodeAt(i) - 48;
  return c >= 0 && c <= 9 ? c : -100;
};
const two = (s: string, i: number): number => digit(s, i) * 10 + digit(s, i + 1);

/**
 * YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM), the shape toISOString() and RFC 3339 produce, with
 * fields in range. (Date.parse accepts far more, and costs more.)
 */
export function isIsoTime(s: string): boolean {
  const n = s.length;
  if (n < 20 || n > 35) return false;
  if (s.charCodeAt(4) !== 45 || s.charCodeAt(7) !== 45 || s.charCodeAt(10) !== 84 || s.charCodeAt(13) !== 58 || s.charCodeAt(16) !== 58) return false;
  if (digit(s, 0) < 0 || digit(s, 1) < 0 || digit(s, 2) < 0 || digit(s, 3) < 0) return false;
  const month = two(s, 5);
  const day = two(s, 8);
  const hour = two(s, 11);
  const minute = two(s, 14);
  const second = two(s, 17);
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 || minute < 0 || minute > 59 || second < 0 || second > 60) return false;
  let i = 19;
  if (s.charCodeAt(i) === 46) {
    i++;
    const start = i;
    while (i < n && digit(s, i) >= 0) i++;
    if (i === start || i - start > 9) return false;
  }
  if (i === n - 1) return s.charCodeAt(i) === 90; // Z
  if (i !== n - 6) return false;
  const sign = s.charCodeAt(i);
  if ((sign !== 43 && sign !== 45) || s.charCodeAt(i + 3) !== 58) return false;
  const oh = two(s, i + 1);
  const om = two(s, i + 4);
  return oh >= 0 && oh <= 23 && om >= 0 && om <= 59;
}
