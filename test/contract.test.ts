// docs/asyncapi.yaml is the contract a controller in any language is written against. Here: it is
// a valid AsyncAPI 3.0 document (@asyncapi/parser, no errors); it names exactly the frame types,
// fields, error codes, close codes and patterns relay/protocol.ts knows; its examples match its
// schemas; every frame the relay builds matches them; and for generated frames the schemas and the
// relay's parser agree (fast-check). The conformance and fuzz tests check every frame they send
// and receive against the same schemas (test/helpers/frame-schemas.ts via test-controller.ts).

import fs from "node:fs";
import t from "tap";
import fc from "fast-check";
import { Parser } from "@asyncapi/parser";
import {
  CLIENT_FRAME_FIELDS, CLOSE_CODES, ERROR_CODES, MAX_DELIVERY_ID_LENGTH, MAX_ID_LENGTH, MAX_NACK_DELAY_MS, RELAY_FRAME_FIELDS,
  deliverFrame, errorFrame, parseClientFrame, publishedFrame, readyFrame,
} from "../relay/protocol.js";
import { KIND_PATTERN } from "../relay/kinds.js";
import { TRACEPARENT_MAX, TRACEPARENT_PATTERN, TRACESTATE_MAX, TRACESTATE_PATTERN } from "../relay/trace-context.js";
import { ASYNCAPI_FILE, ContractViolation, asyncapi, checkReceivedFrame, checkSentFrame, clientFrameProblem, relayFrameProblem, validatorFor } from "./helpers/frame-schemas.js";

const schemas = asyncapi.components.schemas;
const sorted = (xs: Iterable<string>): string[] => [...xs].sort();

t.test("docs/asyncapi.yaml is a valid AsyncAPI 3.0 document", async (tt) => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(ASYNCAPI_FILE, "utf8"));
  const errors = diagnostics.filter((d) => d.severity === 0);
  tt.same(errors.map((d) => `${d.code}: ${d.message} at ${d.path.join(".")}`), [], "no errors");
  tt.ok(document, "parsed");
  tt.equal(asyncapi.asyncapi, "3.0.0");
  tt.same(document!.securitySchemes().all().map((s) => [s.type(), s.scheme()]), [["http", "bearer"]], "the bearer-token scheme");
});

t.test("the document names exactly what relay/protocol.ts knows", async (tt) => {
  const ops = asyncapi.operations as Record<string, { action: string; messages: Array<{ $ref: string }> }>;
  const typesBy = (action: string): string[] =>
    sorted(Object.values(ops).filter((o) => o.action === action).flatMap((o) => o.messages.map((m) => m.$ref.split("/").at(-1)!)));
  tt.same(typesBy("receive"), sorted(Object.keys(CLIENT_FRAME_FIELDS)), "controller → relay frame types");
  tt.same(typesBy("send"), sorted(Object.keys(RELAY_FRAME_FIELDS)), "relay → controller frame types");
  tt.same(sorted(Object.keys(asyncapi.channels.ws.messages)), sorted([...Object.keys(CLIENT_FRAME_FIELDS), ...Object.keys(RELAY_FRAME_FIELDS)]), "the channel's messages");
  for (const [type, fields] of [...Object.entries(CLIENT_FRAME_FIELDS), ...Object.entries(RELAY_FRAME_FIELDS)]) {
    tt.same(sorted(Object.keys(schemas[type].properties)), sorted(fields), `${type}: fields`);
    tt.equal(schemas[type].properties.type.const, type, `${type}: its type`);
    tt.equal(asyncapi.components.messages[type].payload.$ref, `#/components/schemas/${type}`, `${type}: message payload`);
  }
  for (const type of Object.keys(RELAY_FRAME_FIELDS)) tt.equal(schemas[type].additionalProperties, false, `${type}: no field the document does not list`);
  tt.same(sorted(schemas.error.properties.code.enum), sorted(ERROR_CODES), "error codes");
  tt.same(asyncapi.channels.ws["x-close-codes"].map((c: { code: number }) => c.code), [...CLOSE_CODES], "close codes");
  tt.equal(schemas.kind.pattern, KIND_PATTERN.source, "kind pattern");
  tt.equal(schemas.traceparent.pattern, TRACEPARENT_PATTERN, "traceparent pattern");
  tt.equal(schemas.tracestate.pattern, TRACESTATE_PATTERN, "tracestate pattern");
  tt.equal(schemas.traceparent.maxLength, TRACEPARENT_MAX);
  tt.equal(schemas.tracestate.maxLength, TRACESTATE_MAX);
  tt.equal(schemas.publishId.maxLength, MAX_ID_LENGTH);
  tt.equal(schemas.deliveryId.maxLength, MAX_DELIVERY_ID_LENGTH);
  tt.equal(schemas.nack.properties.delayMs.maximum, MAX_NACK_DELAY_MS);
});

t.test("every example matches its schema", async (tt) => {
  for (const [type, message] of Object.entries(asyncapi.components.messages as Record<string, { examples: Array<{ payload: unknown }> }>)) {
    tt.ok(message.examples.length > 0, `${type} has examples`);
    for (const ex of message.examples) {
      const v = validatorFor(type);
      tt.ok(v(ex.payload), `${type} example: ${JSON.stringify(v.errors)}`);
      if (type in CLIENT_FRAME_FIELDS) tt.ok(parseClientFrame(JSON.stringify(ex.payload)).ok, `the relay accepts the ${type} example`);
    }
  }
});

// Generated frames, close to valid and not: for each, the document and the relay's parser must agree.
const KIND_OK = fc.stringMatching(/^[A-Za-z][A-Za-z0-9_]{0,10}$/);
const IDISH = fc.oneof(fc.string({ minLength: 0, maxLength: 130 }), fc.string({ unit: "binary", maxLength: 70 }), fc.constant("\ud800"), fc.integer(), fc.constant(null));
const TRACEPARENTISH = fc.oneof(
  fc.constant("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
  fc.constant("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x"),
  fc.constant("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
  fc.string({ maxLength: 60 }),
  fc.integer(),
);
const TRACESTATEISH = fc.oneof(fc.constant("a=b,c@d=e"), fc.constant(" k=v , "), fc.string({ maxLength: 30 }), fc.constant(true));
const opt = <T>(a: fc.Arbitrary<T>) => fc.option(a, { nil: undefined });
const clientFrames = fc.oneof(
  fc.record(
    { type: fc.constant("publish"), id: IDISH, kind: fc.oneof(KIND_OK, fc.string({ maxLength: 8 })), payload: fc.jsonValue({ maxDepth: 3 }), traceparent: opt(TRACEPARENTISH), tracestate: opt(TRACESTATEISH) },
    { requiredKeys: ["type"] },
  ),
  fc.record(
    { type: fc.constantFrom("ack", "nack", "working", "reject"), deliveryId: IDISH, delayMs: opt(fc.oneof(fc.integer({ min: -5, max: MAX_NACK_DELAY_MS + 5 }), fc.double(), fc.string())), reason: opt(fc.oneof(fc.string(), fc.integer())) },
    { requiredKeys: ["type"] },
  ),
  fc.record({ type: fc.oneof(fc.string({ maxLength: 10 }), fc.integer()) }),
);

t.test("for generated frames, the document and the relay's parser agree", async (tt) => {
  let accepted = 0;
  fc.assert(
    fc.property(clientFrames, (f) => {
      const text = JSON.stringify(f);
      checkSentFrame(text); // throws on disagreement
      if (parseClientFrame(text).ok) accepted++;
    }),
    { numRuns: 3000 },
  );
  tt.ok(accepted > 300, `a good share was valid (${accepted} of 3000)`);
});

t.test("every frame the relay builds matches the document", async (tt) => {
  const tp = fc.constant("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  fc.assert(
    fc.property(
      fc.record({
        deliveryId: fc.string({ minLength: 1, maxLength: 20 }), id: fc.string({ minLength: 1, maxLength: 128 }), kind: KIND_OK, origin: fc.string({ minLength: 1, maxLength: 20 }),
        attempt: fc.integer({ min: 1, max: 10 }), publishedAt: fc.date({ noInvalidDate: true, min: new Date(0), max: new Date(4e12) }).map((d) => d.toISOString()),
        payload: fc.jsonValue(), traceparent: opt(tp), tracestate: opt(fc.constant("a=b")),
      }),
      fc.constantFrom(...ERROR_CODES), fc.string(), fc.boolean(),
      (d, code, message, queued) => {
        const frames = [
          deliverFrame({ ...d, payloadJson: JSON.stringify(d.payload) }),
          readyFrame(d.origin, queued ? "jetstream" : "sqlite"),
          publishedFrame(d.id, queued),
          errorFrame({ code, message }),
          errorFrame({ code, message, id: d.id }),
        ];
        for (const text of frames) {
          const why = relayFrameProblem(JSON.parse(text));
          if (why) throw new Error(`${why}: ${text}`);
        }
      },
    ),
    { numRuns: 500 },
  );
  tt.pass("all frames valid");
  // The checks the tests' frames go through do fail: a field, type or code the document lacks.
  const deliver = JSON.parse(deliverFrame({ deliveryId: "d", id: "i", kind: "K", origin: "o", attempt: 1, publishedAt: new Date().toISOString(), payloadJson: "1" })) as Record<string, unknown>;
  tt.throws(() => checkReceivedFrame(JSON.stringify({ ...deliver, priority: 1 })), ContractViolation, "a deliver field the document does not list");
  tt.throws(() => checkReceivedFrame(JSON.stringify({ type: "error", code: "teapot", message: "x" })), ContractViolation, "an error code the document does not list");
  tt.throws(() => checkReceivedFrame(JSON.stringify({ type: "hello" })), ContractViolation, "a frame type the document does not list");
  tt.match(clientFrameProblem({ type: "deliver" }), /no such frame type/, "a relay frame is not a controller frame");
});
