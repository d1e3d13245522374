// RelayClient's optional OpenTelemetry glue: when @opentelemetry/api can be imported, a publish
// carries the active span's W3C context and a handler runs inside the context a delivery carried.
// Without the package (or without an SDK registered in the application) nothing is sent or set.

type Api = typeof import("@opentelemetry/api");

let api: Api | undefined;

/** Resolves once the optional import has been tried (it never rejects). */
export const traceApiLoaded: Promise<void> = import("@opentelemetry/api").then(
  (m) => {
    api = m;
  },
  () => undefined,
);

/** `,"traceparent":…,"tracestate":…` for the active span, or "" (no API, no active span). */
export function activeTraceFields(): string {
  if (api === undefined) return "";
  const sc = api.trace.getSpanContext(api.context.active());
  if (sc === undefined || !api.isSpanContextValid(sc)) return "";
  const traceparent = `00-${sc.traceId}-${sc.spanId}-${(sc.traceFlags & 0xff).toString(16).padStart(2, "0")}`;
  const tracestate = sc.traceState?.serialize();
  return `,"traceparent":"${traceparent}"${tracestate ? `,"tracestate":${JSON.stringify(tracestate)}` : ""}`;
}

const TRACEPARENT = /^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})/;

/** Runs fn inside the delivered context (a remote parent), or just runs it. */
export function runInTraceContext<T>(traceparent: string | undefined, tracestate: string | undefined, fn: () => T): T {
  if (api === undefined || traceparent === undefined) return fn();
  const m = TRACEPARENT.exec(traceparent);
  if (!m) return fn();
  const sc = {
    traceId: m[1]!,
    spanId: m[2]!,
    traceFlags: parseInt(m[3]!, 16),
    isRemote: true,
    ...(tracestate ? { traceState: api.createTraceState(tracestate) } : {}),
  };
  if (!api.isSpanContextValid(sc)) return fn();
  return api.context.with(api.trace.setSpanContext(api.context.active(), sc), fn);
}
