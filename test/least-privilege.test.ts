// deploy/nats/least-privilege.conf against a real nats-server started from it: each relay's NATS
// user may publish on its own origin only (uptrakit.push.<own-id>.>) and touch only its own
// consumer. The relay must turn the server's refusals into clear answers: `refused` naming the
// permission for a publish (not an `unavailable` after a PubAck timeout), a start-up error naming
// the permission when it may not even create its consumer.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t, { type Test as Tap } from "tap";
import { startNatsServer, type NatsServer } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const EXAMPLE = path.resolve(here, "../../deploy/nats/least-privilege.conf");
const creds = (user: string): string[] => ["--nats-user", user, "--nats-pass", `change-me-${user}`];

/** A temp copy of the example with its store dir (and port, overridden anyway) rewritten. */
function configCopy(t: Tap, edit: (text: string) => string = (x) => x): string {
  const dir = tempDir("uptrakit-lp-");
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const text = edit(fs.readFileSync(EXAMPLE, "utf8"))
    .replace(/store_dir: "[^"]*"/, `store_dir: "${path.join(dir, "js")}"`)
    .replace(/^port: \d+$/m, "port: -1")
    .replace(/^http_port: \d+$/m, "");
  const file = path.join(dir, "nats.conf");
  fs.writeFileSync(file, text);
  return file;
}

async function serverFrom(t: Tap, file: string): Promise<NatsServer> {
  // JetStream and its store dir come from the config (the -js/-sd flags would clash with it).
  const s = await startNatsServer({ jetstream: false, args: ["-c", file] });
  t.teardown(() => s.stop());
  return s;
}


async function relay(t: Tap, s: NatsServer, instanceId: string, user: string): Promise<RelayProcess> {
  const r = await startRelay({ instanceId, natsUrl: s.url, args: creds(user) });
  t.teardown(() => r.stop("SIGKILL"));
  return r;
}

async function controller(t: Tap, r: RelayProcess): Promise<TestController> {
  const c = await TestController.connect(r.wsUrl);
  t.teardown(() => c.close());
  return c;
}

t.test("each relay with its own user: the stream, both consumers, publishing and delivery both ways", async (t) => {
  const s = await serverFrom(t, configCopy(t));
  const a = await relay(t, s, "relay-a", "relay-a");
  const b = await relay(t, s, "relay-b", "relay-b");
  const ca = await controller(t, a);
  const cb = await controller(t, b);
  t.same(await ca.publish("VersionCheckCompleted", { n: 1 }, "a-1"), { type: "published", id: "a-1" }, "relay-a publishes on uptrakit.push.relay-a.>");
  t.same(await cb.publish("CertificateRenewed", { n: 2 }, "b-1"), { type: "published", id: "b-1" }, "relay-b publishes on uptrakit.push.relay-b.>");
  const atB = await cb.next((f) => f.type === "deliver" && f.id === "a-1", 20_000);
  t.match(atB, { origin: "relay-a", kind: "VersionCheckCompleted", payload: { n: 1 } }, "relay-b's controller gets relay-a's message");
  cb.ack(atB);
  const atA = await ca.next((f) => f.type === "deliver" && f.id === "b-1", 20_000);
  t.match(atA, { origin: "relay-b", kind: "CertificateRenewed", payload: { n: 2 } }, "and relay-a's gets relay-b's");
  ca.ack(atA);
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "relay-a", "--nats-url", s.url, ...creds("relay-a")]);
  t.equal(info.code, 0, `stream info works with the relay's own user: ${info.stderr}`);
  t.match(JSON.parse(info.stdout), { stream: "UPTRAKIT_PUSH", consumer: { name: "relay-a" } });
});

t.test("relay-a's user cannot create another relay's consumer: the relay does not start, and names the permission", async (t) => {
  const s = await serverFrom(t, configCopy(t));
  const dataDir = tempDir();
  const r = await runRelayCli(["run", "--instance-id", "relay-b", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--nats-url", s.url, ...creds("relay-a")]);
  t.equal(r.code, 1, "exits 1");
  t.match(r.stderr, /consumer relay-b/, "says which step failed");
  t.match(r.stderr, /[Pp]ermissions [Vv]iolation for [Pp]ublish to "\$JS\.API\.CONSUMER\.[A-Z.]*UPTRAKIT_PUSH\.relay-b/, "names the permission it lacks");
  t.notMatch(r.stderr, /did not finish start-up/, "refused, not given up at the start deadline");
  t.match(r.stderr, /lacks that permission/, "says it is a matter of the user's permissions");
  t.comment(`failed after ${r.ms} ms`);
  t.notMatch(r.stderr, /change-me-relay-a/, "no password in the message");
});

t.test("a publish with origin relay-b from relay-a's user is refused by the server: the controller gets `refused` naming the permission", async (t) => {
  // An operator who scoped only the publish rights (consumers left open): relay-a's user can run a
  // relay that calls itself relay-b, but NATS still refuses its publishes on uptrakit.push.relay-b.>.
  const s = await serverFrom(t, configCopy(t, (text) => text.replaceAll("UPTRAKIT_PUSH.relay-a", "UPTRAKIT_PUSH.*")));
  const honest = await relay(t, s, "relay-a", "relay-a");
  const impostor = await relay(t, s, "relay-b", "relay-a");
  const ch = await controller(t, honest);
  const ci = await controller(t, impostor);
  const t0 = Date.now();
  const answer = await ci.publish("VersionCheckCompleted", { forged: true }, "forged-1");
  const ms = Date.now() - t0;
  t.match(answer, { type: "error", id: "forged-1", code: "refused" }, "answered refused");
  t.match(answer.message, /[Pp]ermissions [Vv]iolation for [Pp]ublish to "uptrakit\.push\.relay-b\.VersionCheckCompleted"/, "naming the permission");
  t.notMatch(answer.message, /no PubAck/, "the server's refusal, not a PubAck timeout");
  t.comment(`answered after ${ms} ms`);
  // The next one is refused too, and nothing was queued for a retry that can never succeed.
  t.match(await ci.publish("CertificateRenewed", {}, "forged-2"), { code: "refused" });
  const metrics = await (await fetch(`${impostor.httpUrl}/metrics`)).text();
  t.match(metrics, /^uptrakit_relay_outbox_depth 0$/m, "nothing left in the outbox");
  t.match(metrics, /^uptrakit_relay_refused_total 2$/m, "counted as refused");
  // The honest relay is unaffected, and never sees the forgeries.
  t.same(await ch.publish("VersionCheckCompleted", { ok: true }, "honest-1"), { type: "published", id: "honest-1" });
  const got = await ci.next((f) => f.type === "deliver" && f.id === "honest-1", 20_000);
  t.equal(got.origin, "relay-a");
  t.same(ch.deliveries().filter((f) => String(f.id).startsWith("forged")), [], "no forged message reached relay-a's controller");
});
