// Faults on a real 3-node JetStream cluster: the stream (replicas 3) loses its leader mid-run.
// Three relays, each given all three node URLs, publish steadily through their controllers;
// every acknowledged message must still reach every other controller, and the killed node, once
// back, must catch up with the stream.

import t from "tap";
import { setTimeout as sleep } from "node:timers/promises";
import { startNatsCluster, type ClusterNode } from "./helpers/nats-server.js";
import { startRelay, type RelayProcess } from "./helpers/relay-process.js";
import { rssMb, startControllers } from "../scripts/lib/fault-harness.js";

const STREAM = "UPTRAKIT_PUSH";
const RATE = 40; // per controller, messages a second

interface StreamState {
  messages: number;
  last_seq: number;
}

/** The stream's state as stored on one node (its own replica), from its monitoring /jsz. */
async function streamStateOn(node: ClusterNode): Promise<StreamState | undefined> {
  try {
    const res = await fetch(`http://127.0.0.1:${node.monitorPort}/jsz?streams=true`, { signal: AbortSignal.timeout(2_000) });
    const jsz = (await res.json()) as { account_details?: { stream_detail?: { name: string; state: StreamState }[] }[] };
    for (const acct of jsz.account_details ?? []) {
      const s = acct.stream_detail?.find((x) => x.name === STREAM);
      if (s) return s.state;
    }
  } catch {
    // not up (yet)
  }
  return undefined;
}

/** Polls (nothing to subscribe to: /jsz is the node's own view) until pred holds or time runs out. */
async function pollUntil<T>(what: string, probe: () => Promise<T>, pred: (v: T) => boolean, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (pred(v)) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms (last: ${JSON.stringify(v)})`);
    await sleep(100);
  }
}

t.test("stream leader killed mid-run: nothing acknowledged is lost, the node catches up after restart", async (t) => {
  const started = Date.now();
  const cluster = await startNatsCluster(3);
  const relays: RelayProcess[] = [];
  t.teardown(async () => {
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await cluster.stop();
  });
  const natsUrl = cluster.urls.join(",");
  relays.push(
    ...(await Promise.all(
      ["c-alpha", "c-bravo", "c-charlie"].map((id) => startRelay({ instanceId: id, natsUrl, args: ["--replicas", "3", "--ack-wait", "5s"] })),
    )),
  );
  const { ledger, controllers } = await startControllers(
    relays.map((r) => ({ instanceId: r.instanceId, wsUrl: r.wsUrl })),
    { rate: RATE },
  );
  t.teardown(() => Promise.all(controllers.map((c) => c.close())));

  for (const c of controllers) c.startPublishing();
  t.ok(await ledger.waitAcked(150, 20_000), "steady publishing is acknowledged before the fault");

  const leaderName = await cluster.streamLeader(STREAM);
  const leader = cluster.nodes.find((n) => n.name === leaderName);
  if (!leader) throw new Error(`no stream leader known (got ${leaderName})`);
  const beforeKill = ledger.counts();
  await leader.kill("SIGKILL");
  t.comment(`killed stream leader ${leader.name} after ${beforeKill.acked} acknowledged publishes`);

  // Publishing goes on through the election: into the outbox at worst, then to the new leader.
  t.ok(await ledger.waitAcked(200, 30_000), "publishes are still acknowledged after the leader died");
  const survivors = cluster.nodes.filter((n) => n !== leader);
  const newLeader = await pollUntil("a new stream leader", () => cluster.streamLeader(STREAM), (l) => l !== undefined && l !== leader.name, 30_000);
  t.comment(`new stream leader: ${newLeader}`);
  t.ok(await ledger.waitAcked(100, 30_000), "and keep being acknowledged under the new leader");

  await leader.restart();
  t.comment(`restarted ${leader.name}`);
  t.ok(await ledger.waitAcked(100, 30_000), "publishing continues with the node back");

  for (const c of controllers) c.stopPublishing();
  await Promise.all(controllers.map((c) => c.settled()));
  const drain = await ledger.waitDrained(90_000);
  const counts = drain.counts;
  t.comment(ledger.summary());
  t.comment(`drained in ${drain.ms} ms`);
  t.ok(drain.drained, `every acknowledged message reached every other controller; missing: ${JSON.stringify(drain.missing)}`);
  t.equal(counts.lost, 0, "lost = 0");
  t.equal(counts.echoes, 0, "no echoes");
  t.equal(counts.foreign, 0, "no unknown messages");
  t.ok(counts.acked > beforeKill.acked + 300, "messages were acknowledged after the kill too");
  if (counts.duplicates > 0) t.comment(`duplicates (at-least-once, not a failure): ${counts.duplicates}`);

  // Catch-up: the restarted node's replica holds what the leader holds.
  const reference = await pollUntil("stream state on a surviving node", () => streamStateOn(survivors[0]!), (s) => s !== undefined, 10_000);
  const caughtUp = await pollUntil(
    `${leader.name} catching up to last_seq ${reference!.last_seq}`,
    () => streamStateOn(leader),
    (s) => s !== undefined && s.last_seq === reference!.last_seq && s.messages === reference!.messages,
    30_000,
  );
  t.same(caughtUp, { ...caughtUp, last_seq: reference!.last_seq, messages: reference!.messages }, `${leader.name} caught up: ${JSON.stringify(caughtUp)}`);
  for (const n of survivors.slice(1)) t.match(await streamStateOn(n), { last_seq: reference!.last_seq }, `${n.name} agrees`);

  for (const r of relays) t.comment(`${r.instanceId}: RSS ${await rssMb(r.proc.pid)} MB`);
  for (const r of relays) t.equal(r.proc.exitCode, null, `${r.instanceId} still running`);
  t.comment(`test took ${Date.now() - started} ms`);
});
