// The inbound policy as a pure function: every rule, in its order, and the property that makes
// splicing a payload into a deliver frame safe (an admitted payload cannot add or override keys).

import t from "tap";
import fc from "fast-check";
import { inboundVerdict, isIsoTime, type InboundCandidate } from "../relay/inbound-policy.js";
import { deliverFrame } from "../relay/protocol.js";
import { subjectFor } from "../relay/bus/jetstream-wire.js";

const OWN = "relay-own";
const good = (over: Partial<InboundCandidate> = {}): InboundCandidate => ({
  id: "msg-1",
  kind: "VersionCheckCompleted",
  origin: "peer",
  publishedAt: "2026-12-03T12:00:00.123Z",
  payloadJson: '{"a":1}',
  subject: subjectFor("peer", "VersionCheckCompleted"),
  ...over,
});
const reason = (m: InboundCandidate): string => {
  const v = inboundVerdict(m, OWN);
  return typeof v === "string" ? v : v.reason;
};

t.test("a well-formed message from a peer is admitted; from this relay it is an echo", async (t) => {
  t.equal(inboundVerdict(good(), OWN), "ok");
  t.equal(inboundVerdict(good({ subject: undefined }), OWN), "ok", "no subject (SQLite bus, replay): no subject checks");
  t.equal(inboundVerdict(good({ origin: OWN, subject: subjectFor(OWN, "VersionCheckCompleted") }), OWN), "echo");
  t.equal(reason(good({ payloadJson: " \n[1, 2, {\"x\": null}]\t" })), "ok", "any one JSON value, with surrounding whitespace");
  for (const p of ["0", '"text"', "null", "true", "-1.5e3"]) t.equal(reason(good({ payloadJson: p })), "ok", `scalar ${p}`);
});

t.test("credential-bearing kinds are refused first, in any spelling, in the header or the subject", async (t) => {
  for (const k of ["TenantRevoked", "tenantrevoked", "TENANTREVOKED", "Tenant_Revoked", "TenantAssignments", "tenantConfigUpdated"]) {
    t.equal(reason(good({ kind: k, subject: subjectFor("peer", k) })), "forbidden_kind", k);
    t.equal(reason(good({ kind: k, subject: undefined, payloadJson: "not json" })), "forbidden_kind", `${k}: before anything else is looked at`);
  }
  t.equal(reason(good({ subject: subjectFor("peer", "TenantRevoked") })), "forbidden_kind", "a forbidden kind in the subject alone");
  t.equal(reason(good({ kind: "TenantRevoked", origin: "", id: "" })), "forbidden_kind", "even without other headers");
  const v = inboundVerdict(good({ kind: "TenantRevoked", payloadJson: '{"apiKey":"s3cret"}' }), OWN);
  t.notMatch(JSON.stringify(v), /s3cret/, "the verdict never quotes the payload");
});

t.test("headers: present, once, well formed", async (t) => {
  t.equal(reason(good({ origin: "" })), "missing_header");
  t.equal(reason(good({ id: "" })), "missing_header");
  t.equal(reason(good({ kind: "" })), "missing_header");
  t.equal(reason(good({ publishedAt: "" })), "missing_header");
  t.equal(reason(good({ duplicatedHeader: "Uptrakit-Origin" })), "invalid_header");
  for (const o of ["a.b", "a b", "*", ">", "x".repeat(65), "é", "peer\u0000"]) t.equal(reason(good({ origin: o, subject: undefined })), "invalid_header", `origin ${JSON.stringify(o)}`);
  t.equal(reason(good({ id: "x".repeat(129) })), "invalid_header", "id too long");
  t.equal(reason(good({ id: "a\ud800b" })), "invalid_header", "id with a lone surrogate");
  t.equal(reason(good({ id: "emoji-\ud83d\ude00" })), "ok", "a surrogate pair is fine");
  t.equal(reason(good({ kind: "Version.Check", subject: undefined })), "invalid_header", "kind with a dot");
  for (const p of ["yesterday", "2026-12-03", "2026-13-03T12:00:00Z", "2026-12-03T12:00:00", "2026-12-03 12:00:00Z", "2026-12-03T12:00:00.Z", "2026-12-03T12:00:00+0100"])
    t.equal(reason(good({ publishedAt: p })), "invalid_header", `published-at ${JSON.stringify(p)}`);
});

t.test("ISO-8601 times the relay and RFC 3339 write are accepted", async (t) => {
  for (const s of ["2026-12-03T12:00:00Z", "2026-12-03T12:00:00.1Z", "2026-12-03T23:59:60.123456789Z", "2026-12-03T12:00:00+01:00", "2026-12-03T12:00:00.5-05:30"])
    t.ok(isIsoTime(s), s);
  fc.assert(fc.property(fc.date({ min: new Date(0), max: new Date(253402300799000), noInvalidDate: true }), (d) => isIsoTime(d.toISOString())));
});

t.test("subject: uptrakit.push.<origin>.<kind>, agreeing with the headers", async (t) => {
  t.equal(reason(good({ subject: "uptrakit.push.VersionCheckCompleted" })), "invalid_subject", "the old layout");
  t.equal(reason(good({ subject: "uptrakit.push.peer.VersionCheckCompleted.extra" })), "invalid_subject");
  t.equal(reason(good({ subject: "uptrakit.push.pe*er.VersionCheckCompleted" })), "invalid_subject");
  t.equal(reason(good({ subject: subjectFor("other", "VersionCheckCompleted") })), "origin_mismatch");
  t.equal(reason(good({ subject: subjectFor("peer", "CertificateRenewed") })), "kind_mismatch");
  t.equal(reason(good({ origin: OWN, subject: subjectFor("peer", "VersionCheckCompleted") })), "origin_mismatch", "a claimed own origin on a peer's subject is a forgery, not an echo");
});

t.test("payload: exactly one JSON value, UTF-8, at most 64 levels deep", async (t) => {
  const forged = '{"a":1},"kind":"TenantRevoked","origin":"spoofed-origin","deliveryId":"forged-delivery"';
  for (const p of [forged, "", " ", "hello world", '{"a":1}{"b":2}', '{"a":1', "1 2", "\ufeff{}", "[".repeat(65) + "]".repeat(65)])
    t.equal(reason(good({ payloadJson: p })), "malformed_payload", JSON.stringify(p.slice(0, 40)));
  t.equal(reason(good({ payloadUtf8: false })), "malformed_payload", "bytes that are not UTF-8");
  t.equal(reason(good({ payloadJson: "[".repeat(64) + "]".repeat(64) })), "ok", "64 levels is the limit");
});

t.test("property: whatever payload is admitted, the deliver frame parses and its own fields are the relay's", async (t) => {
  const key = fc.constantFrom("type", "deliveryId", "id", "kind", "origin", "attempt", "publishedAt", "payload");
  // Payload texts built to splice: JSON values, fragments with injected keys, and noise.
  const injected = fc.tuple(fc.json(), fc.array(fc.tuple(key, fc.json()), { minLength: 1, maxLength: 4 })).map(
    ([head, kvs]) => `${head},${kvs.map(([k, v]) => `${JSON.stringify(k)}:${v}`).join(",")}`,
  );
  const payload = fc.oneof(fc.json(), injected, fc.string(), fc.json().map((j) => j.slice(0, Math.max(0, j.length - 1))), fc.json().map((j) => `${j}}`));
  let admitted = 0;
  fc.assert(
    fc.property(payload, (p) => {
      const m = good({ payloadJson: p });
      if (inboundVerdict(m, OWN) !== "ok") return true;
      admitted++;
      const frame = JSON.parse(deliverFrame({ deliveryId: "d-1", id: m.id, kind: m.kind, origin: m.origin, attempt: 1, publishedAt: m.publishedAt, payloadJson: p })) as Record<string, unknown>;
      return (
        Object.keys(frame).join() === "type,deliveryId,id,kind,origin,attempt,publishedAt,payload" &&
        frame.type === "deliver" && frame.deliveryId === "d-1" && frame.id === m.id && frame.kind === m.kind &&
        frame.origin === m.origin && frame.attempt === 1 && frame.publishedAt === m.publishedAt &&
        JSON.stringify(frame.payload) === JSON.stringify(JSON.parse(p))
      );
    }),
    { numRuns: 3000 },
  );
  t.ok(admitted > 500, `${admitted} of 3000 payloads admitted and checked`);
});
