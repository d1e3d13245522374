// Whether the relay exports spans, and the one place that loads the code that does: relay/tracing.ts
// and the OpenTelemetry SDK are imported only when the standard OTLP variables ask for them, so a
// relay without them loads and runs nothing of it (a field check per message at most).

import type { BusMessage, InboundMessage } from "./bus/bus.js";
import type { BusName } from "./protocol.js";
import type { Logger } from "./log.js";

/** The publish span: the context to carry with the message, and its end. */
export interface PublishSpan {
  readonly traceparent: string;
  readonly tracestate: string | undefined;
  end(outcome: "published" | "queued" | "unavailable" | "refused"): void;
}

/** The process span of one delivery to the controller, ended by its settlement. */
export interface ProcessSpan {
  readonly traceparent: string;
  end(outcome: "ack" | "nack" | "reject" | "timeout" | "handed_back"): void;
}

export interface RelayTracing {
  publish(msg: BusMessage): PublishSpan;
  /** A message arrived from the bus. */
  receive(msg: InboundMessage): void;
  /** A message goes to the controller as this attempt. */
  process(msg: InboundMessage, attempt: number): ProcessSpan;
  /** Exports what is buffered and stops. */
  shutdown(): Promise<void>;
}

export interface TracingOptions {
  instanceId: string;
  bus: BusName;
  logger: Logger;
}

/** The standard switches: an OTLP endpoint, or OTEL_TRACES_EXPORTER=otlp; "none" turns it off. */
export function tracingWanted(env: NodeJS.ProcessEnv = process.env): boolean {
  const exporter = env.OTEL_TRACES_EXPORTER?.trim().toLowerCase();
  if (exporter === "none" || env.OTEL_SDK_DISABLED?.trim().toLowerCase() === "true") return false;
  return exporter === "otlp" || !!env.OTEL_EXPORTER_OTLP_ENDPOINT || !!env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
}

export async function loadTracing(o: TracingOptions): Promise<RelayTracing | undefined> {
  if (!tracingWanted()) return undefined;
  const { startTracing } = await import("./tracing.js");
  return startTracing(o);
}
