// `uptrakit-relay doctor` and `peers` against real servers: every ✗ it can print is provoked for
// real (NATS down, JetStream off, wrong credentials, missing stream, a stream with another config,
// a user without permissions, no peers, a peer with a skewed clock, a full outbox, dead letters,
// an embedded bus alone on its file), and a healthy fleet passes every check while doctor
// stores, creates and delivers nothing.

import t, { type Test } from "tap";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { connect, headers, nanos } from "@nats-io/transport-node";
import { jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import { startNatsServer, type NatsServer, type NatsServerOptions } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";
import { subjectFor } from "../relay/bus/jetstream-wire.js";
import { RelayStore } from "../relay/store/store.js";
import type { DoctorReport } from "../relay/doctor/report.js";

const STREAM = "UPTRAKIT_PUSH";

interface Env {
  nats(o?: NatsServerOptions): Promise<NatsServer>;
  relay(id: string, natsUrl: string | undefined, args?: string[], dataDir?: string): Promise<RelayProcess>;
  controller(r: RelayProcess): Promise<TestController>;
  dir(): string;
}

function setup(tt: Test): Env {
  const servers: NatsServer[] = [];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  const dirs: string[] = [];
  const env: Env = {
    async nats(o) {
      const s = await startNatsServer(o);
      servers.push(s);
      return s;
    },
    async relay(id, natsUrl, args = [], dataDir) {
      const r = await startRelay({ instanceId: id, natsUrl, dataDir: dataDir ?? env.dir(), args });
      relays.push(r);
      return r;
    },
    async controller(r) {
      const c = await TestController.connect(r.wsUrl);
      controllers.push(c);
      // A controller that handles everything it is given.
      c.onFrame((f) => f.type === "deliver" && c.ack(f));
      return c;
    },
    dir() {
      const d = tempDir("uptrakit-doctor-");
      dirs.push(d);
      return d;
    },
  };
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await Promise.all(servers.map((s) => s.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });
  return env;
}

async function doctor(args: string[]): Promise<{ code: number | null; report: DoctorReport; text: string }> {
  const json = await runRelayCli(["doctor", "--json", ...args], { timeoutMs: 60_000 });
  if (json.code === 2) throw new Error(`doctor could not run: ${json.stderr}`);
  const text = await runRelayCli(["doctor", ...args], { timeoutMs: 60_000 });
  t.equal(text.code, json.code, "the text and the JSON run agree on the exit code");
  return { code: json.code, report: JSON.parse(json.stdout) as DoctorReport, text: text.stdout };
}

const check = (r: DoctorReport, id: string) => r.checks.find((c) => c.id === id);
const failed = (r: DoctorReport) => r.checks.filter((c) => !c.ok).map((c) => c.id);

/** Every ✗ line is followed by a → line saying what to do; every check has exactly one ✓/✗ line. */
function textShape(tt: Test, text: string, report: DoctorReport): void {
  const lines = text.split("\n");
  const marks = lines.filter((l) => /^[✓✗] /.test(l));
  tt.equal(marks.length, report.checks.length, "one ✓/✗ line per check");
  for (const [i, l] of lines.entries()) {
    if (!l.startsWith("✗ ")) continue;
    const rest = lines.slice(i + 1);
    const next = rest.findIndex((x) => !x.startsWith("    ") || x.startsWith("    → "));
    tt.ok(next >= 0 && rest[next]!.startsWith("    → "), `a ✗ says what to do: ${l}`);
  }
}

t.test("a healthy pair passes; peers, counts and last activity are listed; doctor stores, creates and delivers nothing", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  const [a, b] = await Promise.all([env.relay("doc-a", nats.url), env.relay("doc-b", nats.url)]);
  const [ca, cb] = await Promise.all([env.controller(a), env.controller(b)]);
  for (let i = 0; i < 3; i++) await ca.publish("VersionCheckCompleted", { i }, `a-${i}`);
  await cb.publish("ScanFinished", {}, "b-0");
  await cb.nextN((f) => f.type === "deliver", 3, 20_000);
  await ca.next((f) => f.type === "deliver" && f.id === "b-0", 20_000);

  const nc = await connect({ servers: nats.url });
  tt.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  const before = { stream: (await jsm.streams.info(STREAM)).state, consumers: await Promise.all(["doc-a", "doc-b"].map((c) => jsm.consumers.info(STREAM, c))) };
  const framesBefore = [ca.frames.length, cb.frames.length];

  const { code, report, text } = await doctor(["--nats-url", nats.url, "--instance-id", "doc-a", "--data-dir", a.dataDir]);
  tt.comment(text);
  tt.equal(code, 0, "exit 0");
  tt.same(failed(report), [], "no check fails");
  for (const id of ["nats.reachable", "nats.credentials", "jetstream.enabled", "jetstream.limits", "stream.exists", "stream.config", "stream.replicas", "consumer", "permissions", "peers", "clock", "store.integrity", "store.outbox", "store.dead_letters"])
    tt.ok(check(report, id), `check ${id} is there`);
  tt.match(check(report, "consumer")!.detail, /max deliver unlimited \(the relay dead-letters after --max-deliver 3 attempts\)/, "an unlimited max_deliver is expected and explained");
  const peerB = report.peers?.find((p) => p.name === "doc-b");
  tt.equal(peerB?.published, 1, "doc-b published 1 in the retention window");
  tt.equal(report.peers?.find((p) => p.name === "doc-a")?.published, 3, "this relay published 3");
  tt.ok(peerB?.hasConsumer && peerB.lastActive && Date.now() - Date.parse(peerB.lastActive) < 120_000, `doc-b was active recently (${peerB?.lastActive})`);
  tt.match(text, /^✓ peers: 1 other relay on stream UPTRAKIT_PUSH\n {4}instance +last active/m, "the peers table is printed under the check");
  textShape(tt, text, report);

  const after = { stream: (await jsm.streams.info(STREAM)).state, consumers: await Promise.all(["doc-a", "doc-b"].map((c) => jsm.consumers.info(STREAM, c))) };
  tt.equal(after.stream.last_seq, before.stream.last_seq, "nothing was stored by the permissions probe");
  tt.same((await jsm.consumers.list(STREAM).next()).map((c) => c.name).sort(), ["doc-a", "doc-b"], "no consumer was created");
  for (const [i, c] of after.consumers.entries()) {
    tt.equal(c.delivered.stream_seq, before.consumers[i]!.delivered.stream_seq, `${c.name}: nothing delivered`);
    tt.equal(c.num_redelivered, before.consumers[i]!.num_redelivered, `${c.name}: nothing redelivered`);
  }
  await ca.publish("VersionCheckCompleted", {}, "after-doctor");
  await cb.next((f) => f.type === "deliver" && f.id === "after-doctor", 20_000);
  tt.same(
    cb.frames.slice(framesBefore[1]).filter((f) => f.type === "deliver").map((f) => f.id),
    ["after-doctor"],
    "the peer's controller got nothing from doctor, only the next real message",
  );
  tt.equal(ca.frames.slice(framesBefore[0]).filter((f) => f.type === "deliver").length, 0, "this relay's controller got nothing");

  const peers = await runRelayCli(["peers", "--json", "--nats-url", nats.url, "--instance-id", "doc-a"]);
  tt.equal(peers.code, 0, "peers exits 0");
  tt.same(
    (JSON.parse(peers.stdout) as Array<{ name: string; published: number; self: boolean }>).map((p) => [p.name, p.published, p.self]),
    [["doc-b", 1, false], ["doc-a", 4, true]],
    "peers --json: the peer, then this relay",
  );
  const table = await runRelayCli(["peers", "--nats-url", nats.url, "--instance-id", "doc-a"]);
  tt.match(table.stdout, /^instance +last active +published \(retention\) +pending\ndoc-b +\d+ s ago +1 +\d+\ndoc-a \(this relay\)/, `peers prints the table:\n${table.stdout}`);

  // A peer with a skewed clock: a message straight into the stream, its publishedAt a minute ahead.
  const h = headers();
  h.set("Uptrakit-Origin", "skewed-c");
  h.set("Uptrakit-Id", "skew-1");
  h.set("Uptrakit-Kind", "VersionCheckCompleted");
  h.set("Uptrakit-Published-At", new Date(Date.now() + 60_000).toISOString());
  h.set("Nats-Msg-Id", "skewed-c:skew-1");
  await nc.request(subjectFor("skewed-c", "VersionCheckCompleted"), "{}", { headers: h, timeout: 5_000 });
  const skewed = await doctor(["--nats-url", nats.url, "--instance-id", "doc-a", "--data-dir", a.dataDir]);
  tt.equal(skewed.code, 1, "exit 1 with a skewed peer");
  tt.same(failed(skewed.report), ["clock"], "only the clock check fails");
  tt.match(check(skewed.report, "clock")!.detail, /skewed-c is \+(59|60)\.\d{3} s off/, `the skewed peer is named with its skew: ${check(skewed.report, "clock")!.detail}`);
  tt.match(check(skewed.report, "clock")!.fix!, /NTP/, "and what to do");
  tt.ok(check(skewed.report, "clock")!.lines!.some((l) => /^doc-b: [+-]0\.\d{3} s/.test(l)), "the healthy peer's skew is small");
  textShape(tt, skewed.text, skewed.report);
});

t.test("no peers: says what the guide says (another NATS server or stream?)", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  const a = await env.relay("alone-a", nats.url);
  const { code, report, text } = await doctor(["--nats-url", nats.url, "--instance-id", "alone-a", "--data-dir", a.dataDir]);
  tt.equal(code, 1, "exit 1");
  tt.same(failed(report), ["peers"]);
  tt.match(check(report, "peers")!.fix!, /another NATS server or another --stream/, "points at the guide's cause");
  textShape(tt, text, report);
});

t.test("NATS down, JetStream off, wrong credentials", async (tt) => {
  const env = setup(tt);
  const dataDir = env.dir();
  RelayStore.open(dataDir).close();
  const down = await env.nats();
  const url = down.url;
  await down.stop();
  const r1 = await doctor(["--nats-url", url, "--instance-id", "x", "--data-dir", dataDir]);
  tt.equal(r1.code, 1, "NATS down: exit 1");
  tt.same(failed(r1.report), ["nats.reachable"], "NATS down: NATS reachable ✗");
  tt.match(check(r1.report, "nats.reachable")!.detail, /cannot reach NATS at nats:\/\/127\.0\.0\.1:\d+/, "names the URL");
  tt.match(check(r1.report, "nats.reachable")!.fix!, /--nats-url/);
  textShape(tt, r1.text, r1.report);

  const nojs = await env.nats({ jetstream: false });
  const r2 = await doctor(["--nats-url", nojs.url, "--instance-id", "x", "--data-dir", dataDir]);
  tt.equal(r2.code, 1, "JetStream off: exit 1");
  tt.same(failed(r2.report), ["jetstream.enabled"], "JetStream enabled ✗");
  tt.match(check(r2.report, "jetstream.enabled")!.fix!, /-js/, "says to start nats-server with -js");

  const auth = await env.nats({ args: ["--user", "relay", "--pass", "right"] });
  const r3 = await doctor(["--nats-url", auth.url, "--nats-user", "relay", "--nats-pass", "wrong-secret", "--instance-id", "x", "--data-dir", dataDir]);
  tt.equal(r3.code, 1, "wrong credentials: exit 1");
  tt.ok(check(r3.report, "nats.reachable")!.ok, "the server is reachable");
  tt.same(failed(r3.report), ["nats.credentials"], "credentials accepted ✗");
  tt.notMatch(r3.text + JSON.stringify(r3.report), /wrong-secret/, "the password is never printed");
});

t.test("missing stream, a stream with another config, a user without permissions", async (tt) => {
  const env = setup(tt);
  const dataDir = env.dir();
  RelayStore.open(dataDir).close();
  const nats = await env.nats();
  const r1 = await doctor(["--nats-url", nats.url, "--instance-id", "x", "--data-dir", dataDir]);
  tt.equal(r1.code, 1, "missing stream: exit 1");
  tt.same(failed(r1.report), ["stream.exists"], "stream ✗");
  tt.match(check(r1.report, "stream.exists")!.fix!, /a relay creates it when it starts/);

  const nc = await connect({ servers: nats.url });
  tt.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({
    name: STREAM, subjects: ["uptrakit.push.>"], storage: StorageType.File, retention: RetentionPolicy.Limits,
    max_age: nanos(3_600_000), duplicate_window: nanos(30_000),
  });
  const r2 = await doctor(["--nats-url", nats.url, "--instance-id", "x", "--data-dir", dataDir]);
  tt.equal(r2.code, 1, "other config: exit 1");
  tt.ok(failed(r2.report).includes("stream.config"), "stream configuration ✗");
  tt.match(check(r2.report, "stream.config")!.detail, /max_age\) 3600 s, expected 86400 s.*duplicate window 30 s, expected 120 s/, `names each difference: ${check(r2.report, "stream.config")!.detail}`);
  tt.ok(failed(r2.report).includes("consumer"), "no consumer for instance x either");
  await nats.stop();

  // A user that may use the JetStream API but not publish on its own subject nor pull.
  const conf = path.join(env.dir(), "nats.conf");
  fs.writeFileSync(
    conf,
    `authorization { users = [
      { user: admin, password: admin }
      { user: relay, password: relay, permissions: { publish: { allow: ["$JS.API.>", "_INBOX.>"], deny: ["$JS.API.CONSUMER.MSG.NEXT.>"] }, subscribe: { allow: ["_INBOX.>"] } } }
    ] }\n`,
  );
  const locked = await env.nats({ args: ["-c", conf] });
  const admin = await connect({ servers: locked.url, user: "admin", pass: "admin" });
  tt.teardown(() => admin.close());
  const r = await env.relay("perm-a", `nats://admin:admin@127.0.0.1:${locked.port}`);
  await env.relay("perm-b", `nats://admin:admin@127.0.0.1:${locked.port}`);
  const r3 = await doctor(["--nats-url", locked.url, "--nats-user", "relay", "--nats-pass", "relay", "--instance-id", "perm-a", "--data-dir", r.dataDir]);
  tt.equal(r3.code, 1, "no permissions: exit 1");
  tt.same(failed(r3.report), ["permissions"], "permissions ✗, everything else ✓");
  tt.match(check(r3.report, "permissions")!.detail, /may not publish on uptrakit\.push\.perm-a\.RelayDoctorProbe; may not pull/, check(r3.report, "permissions")!.detail);
  tt.match(check(r3.report, "permissions")!.fix!, /uptrakit\.push\.perm-a\.>/, "says which subject to grant");
});

t.test("the data dir: a full outbox and dead letters", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  const a = await env.relay("full-a", nats.url, ["--outbox-max", "2"]);
  await env.relay("full-b", nats.url);
  const c = await env.controller(a);
  await nats.kill();
  // Wait until the relay knows (the outbox takes publishes only then).
  await a.waitForLog((l) => l.msg === "bus disconnected", 20_000);
  for (const id of ["q1", "q2"]) tt.same(await c.publish("VersionCheckCompleted", {}, id), { type: "published", id, queued: true });
  await a.stop("SIGKILL"); // the outbox stays in the data dir
  const store = RelayStore.open(a.dataDir);
  await store.addDeadLetter({ id: "poison-1", kind: "ScanFinished", origin: "full-b", publishedAt: new Date().toISOString(), payloadJson: '{"secret":"never-shown"}' }, 3, "rejected by the controller: bad payload");
  store.close();
  await nats.restart();
  const { code, report, text } = await doctor(["--nats-url", nats.url, "--instance-id", "full-a", "--data-dir", a.dataDir, "--outbox-max", "2"]);
  tt.equal(code, 1, "exit 1");
  tt.same(failed(report).sort(), ["store.dead_letters", "store.outbox"], "outbox ✗ and dead letters ✗");
  tt.match(check(report, "store.outbox")!.detail, /2 publishes queued, the limit \(--outbox-max\) is 2/);
  tt.match(check(report, "store.dead_letters")!.detail, /^1 \(oldest \d{4}-/);
  tt.match(check(report, "store.dead_letters")!.lines![0]!, /ScanFinished id=poison-1 origin=full-b attempts=3: rejected by the controller/);
  tt.notMatch(text, /never-shown/, "never a payload");
  tt.match(check(report, "store.integrity")!.detail, /integrity check ok/);
  textShape(tt, text, report);
});

t.test("embedded bus: the bus file, peers on the same file, and alone on another", async (tt) => {
  const env = setup(tt);
  const shared = path.join(env.dir(), "bus.db");
  const a = await env.relay("emb-a", undefined, ["--bus", `sqlite:${shared}`]);
  await env.relay("emb-b", undefined, ["--bus", `sqlite:${shared}`]);
  const c = await env.controller(a);
  await c.publish("VersionCheckCompleted", {}, "e-1");
  const ok = await doctor(["--bus", `sqlite:${shared}`, "--instance-id", "emb-a", "--data-dir", a.dataDir]);
  tt.comment(ok.text);
  tt.equal(ok.code, 0, "exit 0 with a peer on the same file");
  tt.same(ok.report.checks.map((x) => x.id), ["bus.file", "consumer", "peers", "store.integrity", "store.outbox", "store.dead_letters"], "the checks that apply to the embedded bus");
  tt.equal(ok.report.peers?.find((p) => p.name === "emb-a")?.published, 1);
  tt.ok(ok.report.peers?.some((p) => p.name === "emb-b" && p.hasConsumer), "emb-b is a peer");

  const other = path.join(env.dir(), "bus.db");
  const lone = await env.relay("emb-c", undefined, ["--bus", `sqlite:${other}`]);
  const alone = await doctor(["--bus", `sqlite:${other}`, "--instance-id", "emb-c", "--data-dir", lone.dataDir]);
  tt.equal(alone.code, 1, "exit 1 alone on a file");
  tt.same(failed(alone.report), ["peers"]);
  tt.match(check(alone.report, "peers")!.fix!, /same --bus/);

  const missing = await doctor(["--bus", `sqlite:${path.join(env.dir(), "nope.db")}`, "--instance-id", "emb-c", "--data-dir", lone.dataDir]);
  tt.same(failed(missing.report), ["bus.file"], "a missing bus file is a ✗");
});

t.test("with deploy/nats/least-privilege.conf's own users every check passes; without the read-only rights, peers says which", async (tt) => {
  const env = setup(tt);
  const example = fs.readFileSync(path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../deploy/nats/least-privilege.conf"), "utf8");
  const confFrom = (text: string): string => {
    const dir = env.dir();
    const file = path.join(dir, "nats.conf");
    fs.writeFileSync(file, text.replace(/store_dir: "[^"]*"/, `store_dir: "${path.join(dir, "js")}"`).replace(/^port: \d+$/m, "port: -1").replace(/^http_port: \d+$/m, ""));
    return file;
  };
  const creds = (u: string): string[] => ["--nats-user", u, "--nats-pass", `change-me-${u}`];
  const s = await env.nats({ jetstream: false, args: ["-c", confFrom(example)] });
  const a = await env.relay("relay-a", s.url, creds("relay-a"));
  await env.relay("relay-b", s.url, creds("relay-b"));
  const c = await env.controller(a);
  await c.publish("VersionCheckCompleted", {}, "lp-1");
  const ok = await doctor(["--nats-url", s.url, ...creds("relay-a"), "--instance-id", "relay-a", "--data-dir", a.dataDir]);
  tt.equal(ok.code, 0, `exit 0 with the relay's own least-privilege user:\n${ok.text}`);
  tt.match(check(ok.report, "permissions")!.detail, /may publish on uptrakit\.push\.relay-a\.RelayDoctorProbe, create its consumer, pull from its consumer/);
  await s.stop();

  // The same users without the two read-only rights: the relay runs, doctor says what is missing.
  const narrow = example.replace(/^\s*"\$JS\.API\.(CONSUMER\.LIST|STREAM\.MSG\.GET)\.UPTRAKIT_PUSH"\n/gm, "");
  tt.not(narrow, example, "the example grants the two read-only rights");
  const s2 = await env.nats({ jetstream: false, args: ["-c", confFrom(narrow)] });
  const a2 = await env.relay("relay-a", s2.url, creds("relay-a"));
  const r = await doctor(["--nats-url", s2.url, ...creds("relay-a"), "--instance-id", "relay-a", "--data-dir", a2.dataDir]);
  tt.equal(r.code, 1, "exit 1");
  tt.same(failed(r.report), ["peers"], "peers ✗");
  tt.match(check(r.report, "peers")!.fix!, /\$JS\.API\.CONSUMER\.LIST\.UPTRAKIT_PUSH/, "names the permission to grant");
});

t.test("exit 2 when doctor cannot run (an invalid option)", async (tt) => {
  const r = await runRelayCli(["doctor", "--max-deliver", "0"]);
  tt.equal(r.code, 2, "exit 2");
  tt.match(r.stderr, /max-deliver/);
});
