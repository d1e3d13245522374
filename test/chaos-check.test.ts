// The chaos checker's judge, in-process: synthetic histories that must be flagged (a lost
// message, a 4th attempt, an echo, a forbidden kind, an unexpected crash, a dead letter without
// its attempts or reason) and ones that must pass (duplicates, dead letters after 3 attempts,
// queued-then-delivered, an ack lost with a crash and then a dead letter, injected kills). This is
// what shows that `npm run chaos` can fail. Then a property: dropping any one outcome of a
// passing history is caught as a loss.

import fc from "fast-check";
import t from "tap";
import { checkHistory, type History } from "../scripts/lib/chaos-check.js";

const A = "chaos-r0";
const B = "chaos-r1";
const C = "chaos-r2";

/** A published at A, delivered once to B and C and acked by both. */
function base(): History {
  return {
    maxDeliver: 3,
    relays: [A, B, C],
    publishes: [{ origin: A, id: "m0", kind: "VersionCheckCompleted", outcome: "published" }],
    deliveries: [
      { relay: B, deliveryId: "b1", id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: 1 },
      { relay: C, deliveryId: "c1", id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: 1 },
    ],
    acks: [
      { relay: B, deliveryId: "b1", id: "m0", origin: A, effective: true },
      { relay: C, deliveryId: "c1", id: "m0", origin: A, effective: true },
    ],
    deadLetters: [],
    exits: [
      { relay: A, code: 0, signal: null, injected: "stop" },
      { relay: B, code: 0, signal: null, injected: "stop" },
      { relay: C, code: 0, signal: null, injected: "stop" },
    ],
  };
}

const kinds = (h: History): string[] => checkHistory(h).violations.map((v) => v.kind);

t.test("a clean history passes", async (t) => {
  const r = checkHistory(base());
  t.same(r.violations, []);
  t.equal(r.counts.messages, 1);
  t.equal(r.counts.deliveries, 2);
});

t.test("must be flagged", async (t) => {
  t.test("a lost message: published, delivered, never acked nor dead-lettered", async (t) => {
    const h = base();
    h.acks = h.acks.filter((a) => a.relay !== C);
    t.same(kinds(h), ["lost"]);
    t.match(checkHistory(h).violations[0]!.detail, /m0.*chaos-r2/);
  });
  t.test("a lost message: never delivered at all", async (t) => {
    const h = base();
    h.deliveries = h.deliveries.filter((d) => d.relay !== B);
    h.acks = h.acks.filter((a) => a.relay !== B);
    t.same(kinds(h), ["lost"]);
  });
  t.test("a queued publish that never arrives is lost too", async (t) => {
    const h = base();
    h.publishes[0]!.outcome = "queued";
    h.acks = h.acks.filter((a) => a.relay !== B);
    t.same(kinds(h), ["lost"]);
  });
  t.test("an ack the relay refused (unknown_delivery) settles nothing", async (t) => {
    const h = base();
    h.acks[0]!.effective = false;
    t.same(kinds(h), ["lost"]);
  });
  t.test("a dead letter at another relay does not count", async (t) => {
    const h = base();
    h.acks = h.acks.filter((a) => a.relay !== B);
    h.deadLetters.push({ relay: C, id: "m0", origin: A, kind: "VersionCheckCompleted", attempts: 3, reason: "not acked within 1500 ms" });
    t.same(kinds(h), ["lost"]);
  });
  t.test("a 4th attempt", async (t) => {
    const h = base();
    h.deliveries.push({ relay: B, deliveryId: "b4", id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: 4 });
    t.same(kinds(h), ["too_many_attempts"]);
  });
  t.test("an echo: a relay delivers its own controller's message", async (t) => {
    const h = base();
    h.deliveries.push({ relay: A, deliveryId: "a1", id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: 1 });
    t.same(kinds(h), ["echo"]);
  });
  t.test("a forbidden kind delivered", async (t) => {
    const h = base();
    h.publishes.push({ origin: A, id: "m1", kind: "TenantRevoked", outcome: "error:forbidden_kind" });
    h.deliveries.push({ relay: B, deliveryId: "b2", id: "m1", origin: A, kind: "TenantRevoked", attempt: 1 });
    t.same(kinds(h), ["forbidden_kind"]);
  });
  t.test("a forbidden kind accepted (answered published), however dressed up", async (t) => {
    const h = base();
    h.publishes.push({ origin: A, id: "m1", kind: "tenant_config_updated", outcome: "queued" });
    t.same(kinds(h), ["forbidden_kind"]);
  });
  t.test("a crash nobody injected", async (t) => {
    const h = base();
    h.exits.push({ relay: B, code: 1, signal: null });
    t.same(kinds(h), ["unexpected_exit"]);
  });
  t.test("SIGTERM that does not end in exit 0", async (t) => {
    const h = base();
    h.exits.push({ relay: B, code: 1, signal: null, injected: "SIGTERM" });
    t.same(kinds(h), ["unexpected_exit"]);
  });
  t.test("a final stop that ends by a signal", async (t) => {
    const h = base();
    h.exits[0] = { relay: A, code: null, signal: "SIGABRT", injected: "stop" };
    t.same(kinds(h), ["unexpected_exit"]);
  });
  t.test("a dead letter without its attempts or a reason", async (t) => {
    const h = base();
    h.acks = h.acks.filter((a) => a.relay !== B);
    h.deadLetters.push({ relay: B, id: "m0", origin: A, kind: "VersionCheckCompleted", attempts: 0, reason: "" });
    t.same(kinds(h), ["bad_dead_letter", "bad_dead_letter"]);
  });
  t.test("a delivery nobody published", async (t) => {
    const h = base();
    h.deliveries.push({ relay: B, deliveryId: "b9", id: "ghost", origin: C, kind: "VersionCheckCompleted", attempt: 1 });
    t.same(kinds(h), ["unknown_message"]);
  });
});

t.test("must pass", async (t) => {
  t.test("duplicates (redeliveries after a disconnect, acked twice)", async (t) => {
    const h = base();
    h.deliveries.push({ relay: B, deliveryId: "b2", id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: 1 });
    h.acks.push({ relay: B, deliveryId: "b2", id: "m0", origin: A, effective: true });
    const r = checkHistory(h);
    t.same(r.violations, []);
    t.equal(r.counts.duplicates, 1);
  });
  t.test("a dead letter after 3 attempts", async (t) => {
    const h = base();
    h.acks = h.acks.filter((a) => a.relay !== B);
    for (const n of [2, 3]) h.deliveries.push({ relay: B, deliveryId: `b${n}`, id: "m0", origin: A, kind: "VersionCheckCompleted", attempt: n });
    h.deadLetters.push({ relay: B, id: "m0", origin: A, kind: "VersionCheckCompleted", attempts: 3, reason: "nacked by the controller" });
    const r = checkHistory(h);
    t.same(r.violations, []);
    t.equal(r.counts.deadLetteredPairs, 1);
  });
  t.test("queued, then delivered and acked", async (t) => {
    const h = base();
    h.publishes[0]!.outcome = "queued";
    const r = checkHistory(h);
    t.same(r.violations, []);
    t.equal(r.counts.queued, 1);
  });
  t.test("an ack lost with a SIGKILL, then the extra arrival's dead letter", async (t) => {
    const h = base();
    h.exits.push({ relay: B, code: null, signal: "SIGKILL", injected: "SIGKILL" });
    h.deadLetters.push({ relay: B, id: "m0", origin: A, kind: "VersionCheckCompleted", attempts: 3, reason: "attempt 3 of 3 was never settled" });
    const r = checkHistory(h);
    t.same(r.violations, []);
    t.equal(r.counts.ackedAndDead, 1);
  });
  t.test("injected SIGTERM (exit 0) and SIGKILL", async (t) => {
    const h = base();
    h.exits.push({ relay: B, code: 0, signal: null, injected: "SIGTERM" }, { relay: C, code: null, signal: "SIGKILL", injected: "SIGKILL" });
    t.same(checkHistory(h).violations, []);
  });
  t.test("a refused forbidden kind and an unanswered publish expect nothing", async (t) => {
    const h = base();
    h.publishes.push({ origin: A, id: "m1", kind: "TenantRevoked", outcome: "error:forbidden_kind" }, { origin: B, id: "m2", kind: "VersionCheckCompleted", outcome: "unanswered" });
    t.same(checkHistory(h).violations, []);
  });
  t.test("a dead letter of a relay's own refused publish is not a delivery", async (t) => {
    const h = base();
    h.deadLetters.push({ relay: A, id: "m0", origin: A, kind: "VersionCheckCompleted", attempts: 1, reason: "refused by NATS" });
    t.same(checkHistory(h).violations, []);
  });
});

t.test("property: any outcome dropped from a passing history is a loss", async (t) => {
  const relays = [A, B, C, "chaos-r3"];
  const historyArb = fc
    .record({
      n: fc.integer({ min: 2, max: 4 }),
      msgs: fc.array(fc.record({ from: fc.nat({ max: 3 }), queued: fc.boolean(), dead: fc.array(fc.boolean(), { minLength: 4, maxLength: 4 }) }), { minLength: 1, maxLength: 20 }),
    })
    .map(({ n, msgs }) => {
      const h: History = { maxDeliver: 3, relays: relays.slice(0, n), publishes: [], deliveries: [], acks: [], deadLetters: [], exits: [] };
      msgs.forEach((m, i) => {
        const origin = relays[m.from % n]!;
        const id = `m${i}`;
        h.publishes.push({ origin, id, kind: "VersionCheckCompleted", outcome: m.queued ? "queued" : "published" });
        h.relays.forEach((r, j) => {
          if (r === origin) return;
          h.deliveries.push({ relay: r, deliveryId: `${r}-${id}`, id, origin, kind: "VersionCheckCompleted", attempt: 1 });
          if (m.dead[j]) h.deadLetters.push({ relay: r, id, origin, kind: "VersionCheckCompleted", attempts: 1, reason: "rejected by the controller" });
          else h.acks.push({ relay: r, deliveryId: `${r}-${id}`, id, origin, effective: true });
        });
      });
      return h;
    });
  fc.assert(
    fc.property(historyArb, fc.nat(), (h, pick) => {
      if (checkHistory(h).violations.length !== 0) return false;
      const outcomes = h.acks.length + h.deadLetters.length;
      const k = pick % outcomes;
      const cut: History = {
        ...h,
        acks: h.acks.filter((_, i) => i !== k),
        deadLetters: h.deadLetters.filter((_, i) => i !== k - h.acks.length),
      };
      const v = checkHistory(cut).violations;
      return v.length === 1 && v[0]!.kind === "lost";
    }),
    { numRuns: 500, seed: 9 },
  );
  t.pass("500 histories: each passes whole and fails with one outcome removed");
});
