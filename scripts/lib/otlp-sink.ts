// A local OTLP/HTTP endpoint for `npm run bench -- --tracing`: accepts /v1/traces and counts what
// arrives (requests, bytes, spans), so the relays' span export is measured without a collector.

import http from "node:http";

export interface OtlpSink {
  url: string;
  stats(): { requests: number; bytes: number; spans: number };
  close(): Promise<void>;
}

const SPAN_ID = /"spanId":/g;

export async function startOtlpSink(): Promise<OtlpSink> {
  let requests = 0;
  let bytes = 0;
  let spans = 0;
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString();
      requests++;
      bytes += body.length;
      // Each span has one "spanId" of its own; links hold one each as well (one per consumer span).
      spans += (body.match(SPAN_ID) ?? []).length - (body.match(/"links":\[\{/g) ?? []).length;
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    stats: () => ({ requests, bytes, spans }),
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
