// Attacks from the NATS side, injected with a raw nats.js connection straight onto the stream's
// subjects (as any client with publish rights on uptrakit.push.> could), against a real relay and
// a raw WebSocket controller. None may reach the controller; each becomes a dead letter with its
// reason and is counted in uptrakit_relay_inbound_rejected_total{reason}.

import path from "node:path";
import Database from "better-sqlite3";
import t from "tap";
import { subjectFor } from "../relay/bus/jetstream-wire.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { NatsInjector, relayHeaders, type HeaderLines } from "./helpers/nats-inject.js";
import { runRelayCli, startRelay, tempDir } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";

const SECRET = "attack-secret-never-ship";

/** uptrakit_relay_inbound_rejected_total by reason, from /metrics. */
async function rejectedByReason(httpUrl: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${httpUrl}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^uptrakit_relay_inbound_rejected_total\{reason="([a-z_]+)"\} (\d+)$/gm)) out[m[1]!] = Number(m[2]);
  return out;
}

/** Waits (on /metrics, no fixed sleeps) until `n` rejections are counted in all. */
async function untilRejected(httpUrl: string, n: number, timeoutMs = 30_000): Promise<Record<string, number>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const by = await rejectedByReason(httpUrl);
    const sum = Object.values(by).reduce((a, b) => a + b, 0);
    if (sum >= n || Date.now() > deadline) return by;
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test("forged, malformed and credential-bearing messages straight to NATS never reach the controller", async (t) => {
  const server = await startNatsServer();
  t.teardown(() => server.stop());
  const target = await startRelay({ instanceId: "target", natsUrl: server.url, args: ["--log-level", "trace"] });
  t.teardown(() => target.stop("SIGKILL"));
  const peer = await startRelay({ instanceId: "peer", natsUrl: server.url });
  t.teardown(() => peer.stop("SIGKILL"));
  const ctl = await TestController.connect(target.wsUrl);
  t.teardown(() => ctl.close());
  ctl.onFrame((f) => f.type === "deliver" && ctl.ack(f));
  const peerCtl = await TestController.connect(peer.wsUrl);
  t.teardown(() => peerCtl.close());
  const inject = await NatsInjector.connect(server.url);
  t.teardown(() => inject.close());

  const VCC = "VersionCheckCompleted";
  const hdr = (id: string, over: Partial<{ origin: string; kind: string; publishedAt: string }> = {}): HeaderLines =>
    relayHeaders({ origin: "peer", id, kind: VCC, ...over });
  const forged = '{"a":1},"kind":"TenantRevoked","origin":"spoofed-origin","deliveryId":"forged-delivery"';
  const attacks: Array<{ name: string; subject: string; payload: string; headers?: HeaderLines; reason: string; id: string }> = [
    { name: "forged-frame splice", id: "forged-1", subject: subjectFor("peer", VCC), payload: forged, headers: hdr("forged-1"), reason: "malformed_payload" },
    { name: "not JSON", id: "hello-1", subject: subjectFor("peer", VCC), payload: "hello world", headers: hdr("hello-1"), reason: "malformed_payload" },
    { name: "empty payload", id: "empty-1", subject: subjectFor("peer", VCC), payload: "", headers: hdr("empty-1"), reason: "malformed_payload" },
    { name: "TenantRevoked", id: "revoked-1", subject: subjectFor("peer", "TenantRevoked"), payload: JSON.stringify({ apiKey: SECRET }), headers: hdr("revoked-1", { kind: "TenantRevoked" }), reason: "forbidden_kind" },
    { name: "tenantrevoked", id: "revoked-2", subject: subjectFor("peer", "tenantrevoked"), payload: JSON.stringify({ apiKey: SECRET }), headers: hdr("revoked-2", { kind: "tenantrevoked" }), reason: "forbidden_kind" },
    { name: "header origin differs from the subject's", id: "spoof-1", subject: subjectFor("peer", VCC), payload: '{"a":1}', headers: hdr("spoof-1", { origin: "spoofed-origin" }), reason: "origin_mismatch" },
    { name: "header kind differs from the subject's", id: "kind-1", subject: subjectFor("peer", VCC), payload: '{"a":1}', headers: hdr("kind-1", { kind: "CertificateRenewed" }), reason: "kind_mismatch" },
    { name: "no headers at all", id: "#", subject: subjectFor("peer", VCC), payload: '{"a":1}', reason: "missing_header" },
    { name: "published-at not a time", id: "time-1", subject: subjectFor("peer", VCC), payload: '{"a":1}', headers: hdr("time-1", { publishedAt: "yesterday" }), reason: "invalid_header" },
  ];
  for (const a of attacks) {
    const r = await inject.publish(a.subject, a.payload, a.headers);
    t.ok(r.stored, `${a.name}: stored in the stream (${r.error ?? `seq ${r.seq}`})`);
  }
  // A legitimate message after them, through a real relay: delivered, so the target is alive and
  // has consumed everything before it (one consumer, in stream order).
  t.same(await peerCtl.publish(VCC, { legit: true }, "legit-1"), { type: "published", id: "legit-1" });
  const legit = await ctl.next((f) => f.type === "deliver" && f.id === "legit-1", 30_000);
  t.match(legit, { origin: "peer", kind: VCC, payload: { legit: true } }, "the legitimate message arrives");

  const by = await untilRejected(target.httpUrl, attacks.length);
  const expected: Record<string, number> = {};
  for (const a of attacks) expected[a.reason] = (expected[a.reason] ?? 0) + 1;
  for (const [reason, n] of Object.entries(expected)) t.equal(by[reason], n, `uptrakit_relay_inbound_rejected_total{reason="${reason}"} = ${n}`);

  const delivered: Frame[] = ctl.deliveries();
  t.same(ctl.unparsed, [], "every frame the controller received parses");
  t.same(delivered.map((f) => f.id), ["legit-1"], "only the legitimate message was delivered");
  t.notOk(
    delivered.some((f) => f.kind === "TenantRevoked" || f.origin === "spoofed-origin" || f.deliveryId === "forged-delivery"),
    "no deliver frame carries the forged kind, origin or deliveryId",
  );
  t.notOk(delivered.some((f) => /tenantrevoked/i.test(String(f.kind))), "no credential-bearing kind delivered");

  const list = await runRelayCli(["dlq", "list", "--json", "--data-dir", target.dataDir]);
  t.equal(list.code, 0, list.stderr);
  const rows = JSON.parse(list.stdout) as Array<Record<string, unknown>>;
  for (const a of attacks) {
    const row = rows.find((r) => (a.id === "#" ? String(r.id).startsWith("#") : r.id === a.id));
    t.ok(row, `${a.name}: a dead letter`);
    t.match(row?.reason, new RegExp(`^${a.reason}: `), `${a.name}: reason ${a.reason}`);
    if (a.reason === "forbidden_kind") t.same([row?.payloadWithheld, row?.payload, row?.payloadText], [true, undefined, undefined], `${a.name}: payload withheld`);
  }
  t.equal(rows.find((r) => r.id === "forged-1")?.payloadText, forged, "the forged payload is kept as text for inspection");
  const text = await runRelayCli(["dlq", "list", "--data-dir", target.dataDir]);
  t.match(text.stdout, /forbidden_kind: kind "TenantRevoked" carries credentials/, "dlq list shows the reason");
  t.notMatch(list.stdout + text.stdout, SECRET, "the credential-bearing payload is not in the store");
  t.notMatch(JSON.stringify(target.logs) + target.stderr(), SECRET, "nor in the relay's logs (at trace level)");
  t.notMatch(JSON.stringify(target.logs), /hello world|spoofed-origin","deliveryId/, "no payload is logged");
  t.equal(target.proc.exitCode, null, "the relay is still running");

  // dlq replay goes through the same door: a replayed rejected message is refused again, not delivered.
  const before = ctl.frames.length;
  for (const id of ["forged-1", "revoked-1"]) t.equal((await runRelayCli(["dlq", "replay", id, "--data-dir", target.dataDir])).code, 0, `dlq replay ${id}`);
  const back = await untilRejected(target.httpUrl, attacks.length + 2);
  t.equal(back.malformed_payload, expected.malformed_payload! + 1, "the replayed forged message is rejected again (malformed_payload)");
  t.equal(back.forbidden_kind, expected.forbidden_kind! + 1, "the replayed TenantRevoked too (forbidden_kind)");
  const after = JSON.parse((await runRelayCli(["dlq", "list", "--json", "--data-dir", target.dataDir])).stdout) as Array<Record<string, unknown>>;
  t.match(after.find((r) => r.id === "forged-1"), { replayRequested: false, reason: /^replay failed: malformed_payload: / }, "and stays a dead letter, saying why");
  t.same(ctl.frames.slice(before).filter((f) => f.type === "deliver"), [], "nothing was delivered");
});

t.test("the embedded SQLite bus: rows written into the bus file by anyone are checked the same way", async (t) => {
  const dir = tempDir();
  const busFile = path.join(dir, "bus.db");
  const busArgs = ["--bus", `sqlite:${busFile}`];
  const target = await startRelay({ instanceId: "target", args: busArgs });
  t.teardown(() => target.stop("SIGKILL"));
  const peer = await startRelay({ instanceId: "peer", args: busArgs });
  t.teardown(() => peer.stop("SIGKILL"));
  const ctl = await TestController.connect(target.wsUrl);
  t.teardown(() => ctl.close());
  ctl.onFrame((f) => f.type === "deliver" && ctl.ack(f));
  const peerCtl = await TestController.connect(peer.wsUrl);
  t.teardown(() => peerCtl.close());

  const db = new Database(busFile);
  t.teardown(() => db.close());
  db.pragma("busy_timeout = 5000");
  const insert = db.prepare("INSERT INTO bus_messages (stream, origin, id, kind, published_at, payload, stored_at) VALUES ('UPTRAKIT_PUSH', ?, ?, ?, ?, ?, ?)");
  const now = new Date().toISOString();
  const rows: Array<[string, string, string, string, string, string]> = [
    ["forged splice", "peer", "forged-1", "VersionCheckCompleted", now, '{"a":1},"kind":"TenantRevoked","origin":"spoofed-origin","deliveryId":"forged-delivery"'],
    ["not JSON", "peer", "hello-1", "VersionCheckCompleted", now, "hello world"],
    ["TenantRevoked", "peer", "revoked-1", "tenantRevoked", now, JSON.stringify({ apiKey: SECRET })],
    ["origin not an instance id", "spoofed origin", "origin-1", "VersionCheckCompleted", now, "{}"],
  ];
  for (const [, origin, id, kind, at, payload] of rows) insert.run(origin, id, kind, at, payload, Date.now());
  t.same(await peerCtl.publish("VersionCheckCompleted", { legit: true }, "legit-1"), { type: "published", id: "legit-1" });
  await ctl.next((f) => f.type === "deliver" && f.id === "legit-1", 30_000);
  const by = await untilRejected(target.httpUrl, rows.length);
  t.same(
    [by.malformed_payload, by.forbidden_kind, by.invalid_header],
    [2, 1, 1],
    `rejected by reason: ${JSON.stringify(by)}`,
  );
  t.same(ctl.unparsed, [], "every frame parses");
  t.same(ctl.deliveries().map((f) => f.id), ["legit-1"], "only the legitimate message was delivered");
  const list = JSON.parse((await runRelayCli(["dlq", "list", "--json", "--data-dir", target.dataDir])).stdout) as Array<Record<string, unknown>>;
  t.match(list.find((r) => r.id === "revoked-1"), { reason: /^forbidden_kind: /, payloadWithheld: true });
  t.notMatch(JSON.stringify(list) + JSON.stringify(target.logs), SECRET, "the credential payload is neither stored nor logged");
});
