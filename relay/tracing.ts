// Spans of the relay, following the OpenTelemetry messaging conventions (semconv 1.26:
// messaging.operation.type publish / receive / process / settle). Loaded by trace-loader.ts only
// when OTLP export is configured; the exporter takes its endpoint, headers and timeouts from the
// standard OTEL_EXPORTER_OTLP_* variables.
//
// One notification is one trace: the publish span (PRODUCER) is a child of the context the
// controller sent, and its context travels with the message; on the receiving relay the receive
// and process spans (CONSUMER) are children of that context and also link to it, as the
// conventions ask of consumers; each settle (CLIENT) is a child of its process span.

import { ROOT_CONTEXT, SpanKind, SpanStatusCode, TraceFlags, trace, type Attributes, type Link, type Span, type SpanContext } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { defaultResource, detectResources, envDetector, resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, BatchSpanProcessor } from "@opentelemetry/sdk-trace-base";
import type { BusMessage } from "./bus/bus.js";
import { subjectFor } from "./bus/jetstream-wire.js";
import type { ProcessSpan, PublishSpan, RelayTracing, TracingOptions } from "./trace-loader.js";

/** The traceparent's span context (validated by trace-context.ts before it got here). */
function spanContextOf(traceparent: string | undefined): SpanContext | undefined {
  if (traceparent === undefined) return undefined;
  const [, traceId, spanId, flags] = traceparent.split("-");
  if (!traceId || !spanId || !flags) return undefined;
  // tracestate is carried as text alongside: the relay neither reads nor changes it.
  return { traceId, spanId, traceFlags: parseInt(flags, 16) & TraceFlags.SAMPLED, isRemote: true };
}

function traceparentOf(span: Span): string {
  const sc = span.spanContext();
  return `00-${sc.traceId}-${sc.spanId}-${(sc.traceFlags & 0xff).toString(16).padStart(2, "0")}`;
}

export function startTracing(o: TracingOptions): RelayTracing {
  const system = o.bus === "jetstream" ? "nats" : "sqlite";
  const resource = defaultResource()
    .merge(resourceFromAttributes({ "service.name": process.env.OTEL_SERVICE_NAME || "uptrakit-relay", "service.instance.id": o.instanceId }))
    .merge(detectResources({ detectors: [envDetector] }));
  const provider = new BasicTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())] });
  const tracer = provider.getTracer("uptrakit-relay");
  o.logger.info({ system }, "exporting spans over OTLP");

  const base = (msg: BusMessage, operation: string, type: string): Attributes => ({
    "messaging.system": system,
    "messaging.destination.name": subjectFor(msg.origin, msg.kind),
    "messaging.operation.type": type,
    "messaging.operation.name": operation,
    "messaging.message.id": msg.id,
    "uptrakit.origin": msg.origin,
    "uptrakit.kind": msg.kind,
  });

  /** Parent and links of a consumer span: the producer's context, when the message has one. */
  const consumerStart = (msg: BusMessage): { parent: typeof ROOT_CONTEXT; links: Link[] } => {
    const producer = spanContextOf(msg.traceparent);
    return producer
      ? { parent: trace.setSpanContext(ROOT_CONTEXT, producer), links: [{ context: producer }] }
      : { parent: ROOT_CONTEXT, links: [] };
  };

  return {
    publish(msg): PublishSpan {
      const caller = spanContextOf(msg.traceparent);
      const parent = caller ? trace.setSpanContext(ROOT_CONTEXT, caller) : ROOT_CONTEXT;
      const span = tracer.startSpan(`publish ${subjectFor(msg.origin, msg.kind)}`, { kind: SpanKind.PRODUCER, attributes: base(msg, "publish", "publish") }, parent);
      return {
        traceparent: traceparentOf(span),
        tracestate: msg.tracestate,
        end(outcome) {
          span.setAttribute("uptrakit.publish.outcome", outcome);
          if (outcome === "unavailable" || outcome === "refused") span.setStatus({ code: SpanStatusCode.ERROR, message: outcome });
          span.end();
        },
      };
    },

    receive(msg) {
      const { parent, links } = consumerStart(msg);
      const attributes = { ...base(msg, "receive", "receive"), "uptrakit.attempt": msg.attempt };
      tracer.startSpan(`receive ${subjectFor(msg.origin, msg.kind)}`, { kind: SpanKind.CONSUMER, attributes, links }, parent).end();
    },

    process(msg, attempt): ProcessSpan {
      const { parent, links } = consumerStart(msg);
      const subject = subjectFor(msg.origin, msg.kind);
      const span = tracer.startSpan(`process ${subject}`, { kind: SpanKind.CONSUMER, attributes: { ...base(msg, "process", "process"), "uptrakit.attempt": attempt }, links }, parent);
      return {
        traceparent: traceparentOf(span),
        end(outcome) {
          span.setAttribute("uptrakit.settlement", outcome);
          if (outcome !== "ack") span.setStatus({ code: SpanStatusCode.ERROR, message: outcome });
          if (outcome === "ack" || outcome === "nack" || outcome === "reject") {
            // The settlement as the relay passes it on to the bus (reject → a dead letter, then term).
            const ctx = trace.setSpan(ROOT_CONTEXT, span);
            tracer.startSpan(`${outcome} ${subject}`, { kind: SpanKind.CLIENT, attributes: base(msg, outcome, "settle") }, ctx).end();
          }
          span.end();
        },
      };
    },

    async shutdown() {
      try {
        await provider.shutdown();
      } catch (err) {
        o.logger.warn({ err: (err as Error).message }, "could not export the last spans");
      }
    },
  };
}
