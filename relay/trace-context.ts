// W3C Trace Context (https://www.w3.org/TR/trace-context/) as a publish frame carries it: the
// `traceparent` and `tracestate` strings, validated here and carried verbatim by the relay (NATS
// headers, the SQLite bus, the outbox, dead letters) to the `deliver` frame. A malformed value is
// dropped, never a reason to refuse the publish: tracing must not cost a notification.

export interface TraceContext {
  traceparent?: string;
  tracestate?: string;
}

/** What parseTraceContext() kept, and why it dropped what it did not. */
export interface TraceContextResult extends TraceContext {
  dropped?: string;
}

// version-traceid-parentid-flags, lower-case hex, ids not all zeros; version ff is invalid, and
// a version after 00 may append fields (the spec's forward compatibility). docs/asyncapi.yaml
// carries these very patterns (test/contract.test.ts compares them).
const HEAD = "-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}";
export const TRACEPARENT_PATTERN = `^(?:00${HEAD}|(?!00|ff)[0-9a-f]{2}${HEAD}(?:-[\\x21-\\x7e]*)?)$`;
export const TRACEPARENT_MAX = 256;

// Up to 32 comma-separated list-members key=value (empty ones allowed), optional spaces/tabs
// around each; key: simple-key or tenant@system; value: printable ASCII but "," and "=", not
// ending in a space.
const KEY = "(?:[a-z][a-z0-9_*/-]{0,255}|[a-z0-9][a-z0-9_*/-]{0,240}@[a-z][a-z0-9_*/-]{0,13})";
const VALUE = "[\\x20-\\x2b\\x2d-\\x3c\\x3e-\\x7e]{0,255}[\\x21-\\x2b\\x2d-\\x3c\\x3e-\\x7e]";
const ENTRY = `[ \\t]*(?:${KEY}=${VALUE})?[ \\t]*`;
export const TRACESTATE_PATTERN = `^${ENTRY}(?:,${ENTRY}){0,31}$`;
export const TRACESTATE_MAX = 512;

const TRACEPARENT = new RegExp(TRACEPARENT_PATTERN, "u");
const TRACESTATE = new RegExp(TRACESTATE_PATTERN, "u");

export function validTraceparent(v: unknown): v is string {
  return typeof v === "string" && v.length <= TRACEPARENT_MAX && TRACEPARENT.test(v);
}

export function validTracestate(v: unknown): v is string {
  return typeof v === "string" && v.length <= TRACESTATE_MAX && TRACESTATE.test(v);
}

/**
 * The trace context of a publish frame. tracestate without a valid traceparent means nothing
 * (the spec says to ignore it), so it goes with it.
 */
export function parseTraceContext(traceparent: unknown, tracestate: unknown): TraceContextResult {
  if (traceparent === undefined) return tracestate === undefined ? {} : { dropped: "tracestate without traceparent" };
  if (!validTraceparent(traceparent)) return { dropped: "malformed traceparent" };
  if (tracestate === undefined) return { traceparent };
  if (!validTracestate(tracestate)) return { traceparent, dropped: "malformed tracestate" };
  return { traceparent, tracestate };
}
