// Spans over OTLP: two relays on a real nats-server export to an OTLP/HTTP receiver this test runs
// itself. One publish (carrying the controller's trace context) gives one trace: alpha's publish
// span is a child of the controller's span; bravo's receive and process spans are children of
// alpha's publish span and link to it; the ack's settle span is a child of the process span; the
// deliver frame carries the process span's context. And a relay without the OTLP variables does
// not even load the tracing code (its static import graph reaches no @opentelemetry package).

import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { tracingWanted } from "../relay/trace-loader.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { startRelay, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";
import { staticImports } from "./helpers/import-graph.js";

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind: number;
  attributes: Array<{ key: string; value: Record<string, unknown> }>;
  links?: Array<{ traceId: string; spanId: string }>;
  service: string;
}
// OTLP's SpanKind numbers.
const CLIENT = 3;
const PRODUCER = 4;
const CONSUMER = 5;

const attr = (s: OtlpSpan, key: string): unknown => {
  const v = s.attributes.find((a) => a.key === key)?.value;
  return v === undefined ? undefined : (v.stringValue ?? v.intValue ?? v.boolValue);
};

/** A plain OTLP/HTTP JSON receiver: collects spans, tagged with their resource's service.instance.id. */
async function otlpReceiver(): Promise<{ url: string; spans: OtlpSpan[]; until(pred: (s: OtlpSpan[]) => boolean, ms: number): Promise<void>; close(): Promise<void> }> {
  const spans: OtlpSpan[] = [];
  const waiters: Array<() => void> = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      if (req.url === "/v1/traces" && req.method === "POST") {
        const body = JSON.parse(Buffer.concat(chunks).toString()) as {
          resourceSpans: Array<{ resource: { attributes: OtlpSpan["attributes"] }; scopeSpans: Array<{ spans: OtlpSpan[] }> }>;
        };
        for (const rs of body.resourceSpans) {
          const service = String(rs.resource.attributes.find((a) => a.key === "service.instance.id")?.value.stringValue);
          for (const ss of rs.scopeSpans) for (const s of ss.spans) spans.push({ ...s, service });
        }
        for (const w of waiters.splice(0)) w();
      }
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    spans,
    async until(pred, ms) {
      const deadline = Date.now() + ms;
      while (!pred(spans)) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`spans not as expected within ${ms} ms: ${JSON.stringify(spans.map((s) => [s.service, s.name]))}`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, left);
          waiters.push(() => (clearTimeout(timer), resolve()));
        });
      }
    },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

t.test("one publish through two relays is one trace, with the messaging attributes and links", async (tt) => {
  const receiver = await otlpReceiver();
  const server = await startNatsServer();
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await server.stop();
    await receiver.close();
  });
  const env = { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_BSP_SCHEDULE_DELAY: "100" };
  for (const id of ["alpha", "bravo"]) relays.push(await startRelay({ instanceId: id, args: ["--nats-url", server.url], env }));
  const [ra, rb] = relays as [RelayProcess, RelayProcess];
  const [ca, cb] = await Promise.all([TestController.connect(ra.wsUrl), TestController.connect(rb.wsUrl)]);
  controllers.push(ca, cb);

  const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
  const controllerSpan = "00f067aa0ba902b7";
  ca.send({ type: "publish", id: "traced-1", kind: "CertificateRenewed", payload: { cn: "a" }, traceparent: `00-${traceId}-${controllerSpan}-01`, tracestate: "vendor=x" });
  tt.same(await ca.next((f) => f.id === "traced-1" && f.type !== "deliver"), { type: "published", id: "traced-1" });
  const d = await cb.next((f) => f.type === "deliver" && f.id === "traced-1");
  cb.ack(d);

  const subject = "uptrakit.push.alpha.CertificateRenewed";
  const named = (s: OtlpSpan[], service: string, name: string) => s.find((x) => x.service === service && x.name === name);
  await receiver.until((s) => ["publish", "receive", "process", "ack"].every((op) => named(s, op === "publish" ? "alpha" : "bravo", `${op} ${subject}`)), 30_000);
  const spans = receiver.spans;
  const pub = named(spans, "alpha", `publish ${subject}`)!;
  const rec = named(spans, "bravo", `receive ${subject}`)!;
  const proc = named(spans, "bravo", `process ${subject}`)!;
  const settle = named(spans, "bravo", `ack ${subject}`)!;

  tt.same(new Set([pub, rec, proc, settle].map((s) => s.traceId)), new Set([traceId]), "all four in the controller's trace");
  tt.equal(pub.parentSpanId, controllerSpan, "publish is a child of the controller's span");
  tt.equal(pub.kind, PRODUCER);
  for (const [s, op, kind] of [[pub, "publish", PRODUCER], [rec, "receive", CONSUMER], [proc, "process", CONSUMER], [settle, "settle", CLIENT]] as const) {
    tt.equal(s.kind, kind, `${s.name}: span kind`);
    tt.equal(attr(s, "messaging.system"), "nats", `${s.name}: messaging.system`);
    tt.equal(attr(s, "messaging.destination.name"), subject, `${s.name}: destination = subject`);
    tt.equal(attr(s, "messaging.operation.type"), op, `${s.name}: operation type`);
    tt.equal(attr(s, "messaging.message.id"), "traced-1");
  }
  for (const s of [rec, proc]) {
    tt.equal(s.parentSpanId, pub.spanId, `${s.name}: child of alpha's publish span`);
    tt.same(s.links?.map((l) => [l.traceId, l.spanId]), [[traceId, pub.spanId]], `${s.name}: linked to the producer's context`);
  }
  tt.equal(settle.parentSpanId, proc.spanId, "the ack's settle span is a child of the process span");
  tt.equal(attr(proc, "uptrakit.settlement"), "ack");
  tt.equal(d.traceparent, `00-${traceId}-${proc.spanId}-01`, "the deliver frame carries the process span's context");
  tt.equal(d.tracestate, "vendor=x", "and the tracestate as it came");
});

t.test("tracing is off, and its code not even loaded, without the OTLP variables", async (tt) => {
  tt.notOk(tracingWanted({}), "no variables: off");
  tt.ok(tracingWanted({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://x:4318" }));
  tt.ok(tracingWanted({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://x:4318/v1/traces" }));
  tt.ok(tracingWanted({ OTEL_TRACES_EXPORTER: "otlp" }));
  tt.notOk(tracingWanted({ OTEL_TRACES_EXPORTER: "none", OTEL_EXPORTER_OTLP_ENDPOINT: "http://x:4318" }), "none wins");
  const here = path.dirname(fileURLToPath(import.meta.url));
  const graph = staticImports(path.resolve(here, "../relay/main.js"));
  tt.ok(graph.files.some((f) => f.endsWith("relay/trace-loader.js")), "the walk reaches the loader");
  tt.notOk(graph.files.some((f) => f.endsWith("relay/tracing.js")), "relay/tracing.js is not statically imported");
  tt.same(graph.packages.filter((p) => p.startsWith("@opentelemetry/")), [], "no OpenTelemetry package is statically imported by the relay");
});
