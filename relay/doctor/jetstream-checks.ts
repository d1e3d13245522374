// doctor on JetStream: connection, credentials, JetStream, limits, the stream, this relay's
// consumer, permissions, peers and their clocks. Uses the bus's own connection options (one place
// builds them), its own short-lived connection, and never creates, changes or consumes anything.

import { headers, type NatsConnection } from "@nats-io/transport-node";
import type { ConsumerConfig, JetStreamManager, StreamConfig, StreamInfo } from "@nats-io/jetstream";
import type { RelayConfig } from "../config.js";
import type { Logger } from "../log.js";
import { busSettings } from "../bus/create.js";
import { JetStreamBus, isAuthError } from "../bus/jetstream.js";
import { SUBJECT_FILTER, subjectFor } from "../bus/jetstream-wire.js";
import { readClockSkew, readJetStreamPeers } from "../bus/jetstream-peers.js";
import { formatPeersTable, type Peer } from "../peers.js";
import type { Checks } from "./report.js";

/** A peer whose clock differs from the NATS server's by more than this is reported. */
export const SKEW_LIMIT_MS = 2_000;
/** The kind of the permissions probe (never stored, see permissionChecks). */
const PROBE_KIND = "RelayDoctorProbe";
/**
 * No stream can have this name (streams cannot contain spaces): a publish that expects it is
 * refused by JetStream after the permission check, before anything is stored.
 */
const NO_SUCH_STREAM = "uptrakit doctor probe: never stored";
const REQUEST_TIMEOUT_MS = 4_000;
const GUIDE_NO_PEERS =
  "if other controllers run, they point to another NATS server or another --stream (the guide's \"cross-controller messages not delivered\"): give every relay the same --nats-url and --stream";

const seconds = (ns: number | undefined): string => (ns === undefined ? "?" : `${ns / 1e9} s`);

export async function jetStreamChecks(cfg: RelayConfig, log: Logger, checks: Checks): Promise<Peer[] | undefined> {
  const bus = new JetStreamBus({ ...busSettings(cfg), urls: cfg.natsUrls, replicas: cfg.replicas, auth: cfg.natsAuth, logger: log });
  const where = cfg.natsUrls.join(", ");
  let nc: NatsConnection;
  try {
    nc = await bus.diagnosticConnection();
  } catch (err) {
    const cause = (err as Error).cause;
    if (isAuthError(cause) || isAuthError(err)) {
      checks.pass("nats.reachable", "NATS reachable", `${where} answered`);
      checks.fail("nats.credentials", "credentials accepted", (err as Error).message, "check the NATS credentials (--nats-user/--nats-pass, --nats-token, --nats-creds, --nats-nkey-seed-file, or the ones in --nats-url) against the server's accounts");
    } else
      checks.fail(
        "nats.reachable",
        "NATS reachable",
        (err as Error).message,
        "check --nats-url, that nats-server runs and listens there, and the network between (the guide's \"controller fails to start with NATS error\")",
      );
    return undefined;
  }
  try {
    const info = nc.info;
    checks.pass("nats.reachable", "NATS reachable", `${nc.getServer()} (nats-server ${info?.version ?? "?"}${info?.server_name ? `, ${info.server_name}` : ""}${info?.cluster ? `, cluster ${info.cluster}` : ""})`);
    checks.pass("nats.credentials", "credentials accepted", describeAuth(cfg));
    let jsm: JetStreamManager;
    try {
      jsm = await bus.checkJetStream(nc);
    } catch (err) {
      checks.fail("jetstream.enabled", "JetStream enabled", (err as Error).message, "start nats-server with -js (or jetstream {} in its config) and give this account JetStream (the guide's \"controller fails to start with NATS error\")");
      return undefined;
    }
    const account = await jsm.getAccountInfo();
    checks.pass("jetstream.enabled", "JetStream enabled", `${account.streams} streams, ${account.consumers} consumers in this account`);
    const lim = account.limits;
    if (lim.max_storage === 0) checks.fail("jetstream.limits", "account storage limits", "this account may not store on disk (max_storage 0)", "give the account file storage in the server's account config");
    else if (lim.max_storage > 0 && account.storage >= lim.max_storage * 0.9)
      checks.fail("jetstream.limits", "account storage limits", `${account.storage} of ${lim.max_storage} bytes of file storage used`, "raise the account's max_storage, or shorten --max-age");
    else checks.pass("jetstream.limits", "account storage limits", `${account.storage} bytes used of ${lim.max_storage < 0 ? "unlimited" : `${lim.max_storage} bytes`} file storage`);

    const want = bus.expectedConfig();
    let si: StreamInfo;
    try {
      si = await jsm.streams.info(cfg.stream);
    } catch (err) {
      checks.fail(
        "stream.exists",
        "stream",
        `stream ${cfg.stream} does not exist on ${nc.getServer()} (${(err as Error).message})`,
        `a relay creates it when it starts: start one, or check --stream; ${GUIDE_NO_PEERS}`,
      );
      return undefined;
    }
    checks.pass("stream.exists", "stream", `${cfg.stream}: ${si.state.messages} messages, ${si.state.bytes} bytes`);
    streamConfigCheck(si, want.stream, checks);
    replicasCheck(cfg, si, checks);
    await consumerCheck(cfg, jsm, want.consumer, checks);
    await permissionChecks(cfg, nc, checks);
    let peers: Peer[];
    try {
      peers = await peersCheck(cfg, jsm, checks);
    } catch (err) {
      checks.fail("peers", "peers", `cannot list the stream's consumers: ${(err as Error).message}`, `grant this relay's NATS user publish on $JS.API.CONSUMER.LIST.${cfg.stream} (read-only; see deploy/nats/least-privilege.conf), or run doctor with an operator's credentials`);
      return undefined;
    }
    try {
      await clockCheck(cfg, jsm, peers, checks);
    } catch (err) {
      checks.fail("clock", "clock skew", `cannot read the stream's messages: ${(err as Error).message}`, `grant this relay's NATS user publish on $JS.API.STREAM.MSG.GET.${cfg.stream} (read-only; see deploy/nats/least-privilege.conf)`);
    }
    return peers;
  } finally {
    await nc.close().catch(() => undefined);
  }
}

function describeAuth(cfg: RelayConfig): string {
  const a = cfg.natsAuth;
  const ways = [
    a.user !== undefined && `user ${a.user}`,
    a.token !== undefined && "token",
    a.nkeySeedFile && "NKey",
    a.credsFile && ".creds file",
    (a.tlsCert || a.tlsCa) && "TLS",
  ].filter(Boolean);
  return ways.length ? `connected with ${ways.join(", ")}` : "connected without credentials (the server asks for none)";
}

function streamConfigCheck(si: StreamInfo, want: Partial<StreamConfig>, checks: Checks): void {
  const have = si.config;
  const diffs: string[] = [];
  const same = (a: string[] = [], b: string[] = []): boolean => a.length === b.length && a.every((x) => b.includes(x));
  if (!same(have.subjects, want.subjects)) diffs.push(`subjects [${(have.subjects ?? []).join(", ")}], expected [${SUBJECT_FILTER}]`);
  if (have.retention !== want.retention) diffs.push(`retention ${have.retention}, expected ${want.retention}`);
  if (have.storage !== want.storage) diffs.push(`storage ${have.storage}, expected ${want.storage}`);
  if (have.max_age !== want.max_age) diffs.push(`retention (max_age) ${seconds(have.max_age)}, expected ${seconds(want.max_age)} (--max-age)`);
  if (have.duplicate_window !== want.duplicate_window) diffs.push(`duplicate window ${seconds(have.duplicate_window)}, expected ${seconds(want.duplicate_window)}`);
  if (have.discard !== want.discard) diffs.push(`discard ${have.discard}, expected ${want.discard}`);
  if (diffs.length === 0)
    checks.pass("stream.config", "stream configuration", `subjects ${SUBJECT_FILTER}, ${have.storage} storage, ${have.retention} retention of ${seconds(have.max_age)}, duplicate window ${seconds(have.duplicate_window)}`);
  else
    checks.fail(
      "stream.config",
      "stream configuration",
      diffs.join("; "),
      "a starting relay updates retention, duplicate window and discard to its own settings (give every relay the same --max-age); different subjects, storage or retention policy it refuses: use another --stream or delete that stream",
    );
}

function replicasCheck(cfg: RelayConfig, si: StreamInfo, checks: Checks): void {
  const n = si.config.num_replicas;
  const peers = si.cluster?.replicas ?? [];
  const lagging = peers.filter((p) => !p.current || p.offline);
  const holds = `${1 + peers.length} of ${n} replicas placed${si.cluster?.leader ? `, leader ${si.cluster.leader}` : ""}`;
  if (n !== cfg.replicas)
    checks.fail("stream.replicas", "stream replicas", `the stream has ${n}, this relay asks for ${cfg.replicas} (--replicas)`, "a starting relay sets the stream to its own --replicas: give every relay the same UPTRAKIT_STREAM_REPLICAS");
  else if (1 + peers.length < n || lagging.length > 0)
    checks.fail(
      "stream.replicas",
      "stream replicas",
      `${holds}${lagging.length ? `; not current: ${lagging.map((p) => p.name).join(", ")}` : ""}`,
      "the cluster cannot hold this many replicas right now: check that every JetStream server is up and routed (or lower --replicas to the number of servers)",
    );
  else checks.pass("stream.replicas", "stream replicas", n === 1 && !si.cluster?.leader ? "1 (single server)" : holds);
}

async function consumerCheck(cfg: RelayConfig, jsm: JetStreamManager, want: Partial<ConsumerConfig>, checks: Checks): Promise<void> {
  let ci;
  try {
    ci = await jsm.consumers.info(cfg.stream, cfg.instanceId);
  } catch (err) {
    checks.fail(
      "consumer",
      "this relay's consumer",
      `no consumer ${cfg.instanceId} on stream ${cfg.stream} (${(err as Error).message})`,
      "a relay creates its consumer when it starts: if this relay runs, check --instance-id (the pod name by default: run doctor inside the relay container)",
    );
    return;
  }
  const c = ci.config;
  const diffs: string[] = [];
  if (c.ack_policy !== want.ack_policy) diffs.push(`ack policy ${c.ack_policy}, expected ${want.ack_policy}`);
  if (c.max_deliver !== want.max_deliver) diffs.push(`max deliver ${c.max_deliver}, expected ${want.max_deliver} (unlimited: the relay dead-letters past --max-deliver ${cfg.maxDeliver})`);
  if (c.ack_wait !== want.ack_wait) diffs.push(`ack wait ${seconds(c.ack_wait)}, expected ${seconds(want.ack_wait)} (--ack-wait)`);
  if ((c.filter_subject ?? "") !== want.filter_subject) diffs.push(`filter ${c.filter_subject ?? "none"}, expected ${want.filter_subject}`);
  const counts = `${ci.num_pending} pending, ${ci.num_ack_pending} awaiting ack, ${ci.num_redelivered} redelivered`;
  if (diffs.length > 0)
    checks.fail("consumer", "this relay's consumer", `${cfg.instanceId}: ${diffs.join("; ")}; ${counts}`, "the relay brings its consumer to its own settings when it starts: restart it with the settings you want, or run doctor with the relay's settings");
  else
    checks.pass(
      "consumer",
      "this relay's consumer",
      // Unlimited on purpose: the relay shows at most --max-deliver attempts and turns any later
      // arrival into a dead letter (docs/delivery.md).
      `${cfg.instanceId}: explicit acks, max deliver unlimited (the relay dead-letters after --max-deliver ${cfg.maxDeliver} attempts), ack wait ${seconds(c.ack_wait)}; ${counts}`,
    );
}

/**
 * Can this relay publish on its own origin's subject and create and pull its consumer? Checked
 * with requests the server authorises first and then refuses, so nothing is stored, created or
 * delivered: a publish that expects a stream name no stream can have (JetStream answers
 * "expected stream does not match" and stores nothing), and a consumer create and a pull whose
 * bodies are broken JSON (answered "invalid JSON" / "400 Bad Request"). The body must start with
 * "{": a pull body that does not is read as a batch size, i.e. as a real pull request. A subject
 * the user may not publish on is answered "Permissions Violation" by the server itself.
 */
const BROKEN_JSON = "{not json";
async function permissionChecks(cfg: RelayConfig, nc: NatsConnection, checks: Checks): Promise<void> {
  const subject = subjectFor(cfg.instanceId, PROBE_KIND);
  const h = headers();
  h.set("Nats-Expected-Stream", NO_SUCH_STREAM);
  const denied = (err: unknown): boolean => /permissions violation/i.test(String((err as Error)?.message ?? err));
  const problems: string[] = [];
  const granted: string[] = [];
  try {
    const m = await nc.request(subject, new Uint8Array(0), { headers: h, timeout: REQUEST_TIMEOUT_MS });
    const ack = JSON.parse(m.string() || "{}") as { stream?: string; error?: { err_code?: number; description?: string } };
    if (ack.error?.err_code === 10060 && ack.stream === cfg.stream) granted.push(`publish on ${subject}`);
    else problems.push(`a publish on ${subject} was answered ${m.string() || `status ${m.headers?.code}`}`);
  } catch (err) {
    problems.push(denied(err) ? `may not publish on ${subject}` : `publish on ${subject}: ${(err as Error).message}`);
  }
  const create = `$JS.API.CONSUMER.CREATE.${cfg.stream}.${cfg.instanceId}.${SUBJECT_FILTER}`;
  try {
    const m = await nc.request(create, BROKEN_JSON, { timeout: REQUEST_TIMEOUT_MS });
    if (/invalid JSON|10025/.test(m.string())) granted.push("create its consumer");
    else problems.push(`${create} answered ${m.string()}`);
  } catch (err) {
    problems.push(denied(err) ? `may not create its consumer (${create})` : `consumer create: ${(err as Error).message}`);
  }
  const pull = `$JS.API.CONSUMER.MSG.NEXT.${cfg.stream}.${cfg.instanceId}`;
  try {
    const m = await nc.request(pull, BROKEN_JSON, { timeout: REQUEST_TIMEOUT_MS });
    const code = m.headers?.code;
    if (code === 400) granted.push("pull from its consumer");
    else if (code === 503) granted.push("pull (not checked: the consumer does not exist yet)");
    else problems.push(`a pull answered status ${code ?? "?"} ${m.headers?.description ?? ""}`);
  } catch (err) {
    problems.push(denied(err) ? `may not pull from its consumer (${pull})` : `pull: ${(err as Error).message}`);
  }
  if (problems.length === 0) checks.pass("permissions", "permissions", `may ${granted.join(", ")} (checked with requests the server refuses after authorising them: nothing stored or delivered)`);
  else
    checks.fail(
      "permissions",
      "permissions",
      problems.join("; "),
      `grant this relay's NATS user publish on ${subjectFor(cfg.instanceId, ">")}, $JS.API.> (or at least $JS.API.CONSUMER.CREATE.${cfg.stream}.${cfg.instanceId}.> and $JS.API.CONSUMER.MSG.NEXT.${cfg.stream}.${cfg.instanceId}) and subscribe on _INBOX.>`,
    );
}

async function peersCheck(cfg: RelayConfig, jsm: JetStreamManager, checks: Checks): Promise<Peer[]> {
  const peers = await readJetStreamPeers(jsm, cfg.stream, cfg.instanceId);
  const others = peers.filter((p) => !p.self);
  const table = formatPeersTable(peers).trimEnd().split("\n");
  if (others.length === 0)
    checks.fail("peers", "peers", `no other relay has a consumer on stream ${cfg.stream} or published to it in the retention window`, `a single relay has nobody to notify; ${GUIDE_NO_PEERS}`, table);
  else checks.pass("peers", "peers", `${others.length} other relay${others.length === 1 ? "" : "s"} on stream ${cfg.stream}`, table);
  return peers;
}

async function clockCheck(cfg: RelayConfig, jsm: JetStreamManager, peers: Peer[], checks: Checks): Promise<void> {
  const skews = await readClockSkew(jsm, cfg.stream, peers.filter((p) => p.published > 0).map((p) => p.name));
  const measured = skews.filter((s) => s.skewMs !== undefined);
  if (measured.length === 0) {
    checks.pass("clock", "clock skew", "no recent messages to compare (skew is measured on messages in the stream)");
    return;
  }
  const fmt = (ms: number): string => `${ms >= 0 ? "+" : ""}${(ms / 1000).toFixed(3)} s`;
  const lines = measured.map((s) => `${s.origin}: ${fmt(s.skewMs!)} against the NATS server (${s.samples} message${s.samples === 1 ? "" : "s"})`);
  const off = measured.filter((s) => Math.abs(s.skewMs!) > SKEW_LIMIT_MS);
  if (off.length === 0) checks.pass("clock", "clock skew", `within ${SKEW_LIMIT_MS / 1000} s for ${measured.length} origin${measured.length === 1 ? "" : "s"}`, lines);
  else
    checks.fail(
      "clock",
      "clock skew",
      off.map((s) => `${s.origin} is ${fmt(s.skewMs!)} off`).join(", "),
      "delivery-latency figures lie while clocks differ: run NTP (chrony, systemd-timesyncd) on those hosts. (A clock behind can also be messages that waited in that relay's outbox: check again after fresh traffic)",
      lines,
    );
}

