// The chaos checker's judge: a pure function from a recorded history (what the controllers saw
// and did, what each relay's store lists as dead letters, how each relay process ended) to the
// violations of the relay's promises. No processes, no clock: test/chaos-check.test.ts feeds it
// synthetic histories that must fail and must pass, which is what shows the checker can fail.

import { isCredentialBearing } from "../../relay/kinds.js";

/** How a publish ended for the controller that sent it. */
export type PublishOutcome = "published" | "queued" | "unanswered" | `error:${string}`;

export interface PublishRecord {
  origin: string;
  id: string;
  kind: string;
  outcome: PublishOutcome;
}

export interface DeliveryRecord {
  /** The relay (instance id) whose controller received the frame. */
  relay: string;
  deliveryId: string;
  id: string;
  origin: string;
  kind: string;
  attempt: number;
}

export interface AckRecord {
  relay: string;
  deliveryId: string;
  id: string;
  origin: string;
  /** False when the relay answered unknown_delivery: the ack settled nothing. */
  effective: boolean;
}

export interface DeadLetterRecord {
  /** The relay whose store lists it (`dlq list --json`). */
  relay: string;
  id: string;
  origin: string;
  kind: string;
  attempts: number;
  reason: string;
}

/** Why the runner expected a relay process to end, if it did. */
export type ExitCause = "SIGKILL" | "SIGTERM" | "stop";

export interface ExitRecord {
  relay: string;
  code: number | null;
  signal: string | null;
  /** The fault (or the final stop) the runner had just sent it; undefined: nobody asked it to end. */
  injected?: ExitCause;
}

export interface History {
  maxDeliver: number;
  /** Instance ids of every relay; each had its consumer before the first publish. */
  relays: string[];
  publishes: PublishRecord[];
  deliveries: DeliveryRecord[];
  acks: AckRecord[];
  deadLetters: DeadLetterRecord[];
  exits: ExitRecord[];
}

export type ViolationKind = "lost" | "too_many_attempts" | "echo" | "forbidden_kind" | "unexpected_exit" | "unknown_message" | "bad_dead_letter";

export interface Violation {
  kind: ViolationKind;
  detail: string;
}

export interface CheckCounts {
  /** Publishes answered `published` (queued or not): each must reach every other relay. */
  messages: number;
  queued: number;
  deliveries: number;
  /** Deliveries of a (message, relay) pair beyond its first. */
  duplicates: number;
  deadLetters: number;
  /** (message, relay) pairs that ended as a dead letter rather than an ack. */
  deadLetteredPairs: number;
  /** Pairs that were acked and are also a dead letter (an ack lost with a crash): allowed. */
  ackedAndDead: number;
}

export interface CheckResult {
  violations: Violation[];
  counts: CheckCounts;
}

const key = (origin: string, id: string): string => `${origin}\u0000${id}`;

/** What a relay process may end with after each cause. */
function exitExpected(e: ExitRecord): boolean {
  if (e.injected === "SIGKILL") return e.signal === "SIGKILL";
  if (e.injected === "SIGTERM" || e.injected === "stop") return e.code === 0;
  return false;
}

export function checkHistory(h: History): CheckResult {
  const violations: Violation[] = [];
  const add = (kind: ViolationKind, detail: string): void => void violations.push({ kind, detail });
  const relays = new Set(h.relays);

  const published = new Map<string, PublishRecord>();
  const everSent = new Set<string>();
  let queued = 0;
  for (const p of h.publishes) {
    everSent.add(key(p.origin, p.id));
    const ok = p.outcome === "published" || p.outcome === "queued";
    if (ok && isCredentialBearing(p.kind)) add("forbidden_kind", `${p.origin}/${p.id}: a ${p.kind} publish was answered ${p.outcome}`);
    if (!ok) continue;
    if (!published.has(key(p.origin, p.id)) && p.outcome === "queued") queued++;
    published.set(key(p.origin, p.id), p);
  }

  // Deliveries: the controller's view of each attempt.
  const seen = new Map<string, number>(); // relay + message → deliver frames
  let duplicates = 0;
  for (const d of h.deliveries) {
    const where = `${d.origin}/${d.id} at ${d.relay} (attempt ${d.attempt})`;
    if (d.attempt > h.maxDeliver) add("too_many_attempts", `${where}: more than --max-deliver ${h.maxDeliver}`);
    if (d.attempt < 1 || !Number.isInteger(d.attempt)) add("too_many_attempts", `${where}: not a valid attempt number`);
    if (d.origin === d.relay) add("echo", `${where}: a relay delivered its own controller's message`);
    if (isCredentialBearing(d.kind)) add("forbidden_kind", `${where}: a ${d.kind} was delivered`);
    if (!everSent.has(key(d.origin, d.id))) add("unknown_message", `${where}: no controller ever published it`);
    const k = `${d.relay}\u0000${key(d.origin, d.id)}`;
    const n = seen.get(k) ?? 0;
    if (n > 0) duplicates++;
    seen.set(k, n + 1);
  }

  // Outcomes per (message, receiving relay).
  const acked = new Set<string>();
  for (const a of h.acks) if (a.effective) acked.add(`${a.relay}\u0000${key(a.origin, a.id)}`);
  const dead = new Map<string, DeadLetterRecord>();
  for (const dl of h.deadLetters) {
    const where = `dead letter ${dl.origin}/${dl.id} at ${dl.relay}`;
    if (!Number.isInteger(dl.attempts) || dl.attempts < 1 || dl.attempts > h.maxDeliver)
      add("bad_dead_letter", `${where}: attempts ${dl.attempts} (expected 1..${h.maxDeliver})`);
    if (!dl.reason || !dl.reason.trim()) add("bad_dead_letter", `${where}: no reason`);
    if (dl.origin === dl.relay) continue; // a publish of its own the bus refused: not a delivery
    if (!everSent.has(key(dl.origin, dl.id))) add("unknown_message", `${where}: no controller ever published it`);
    dead.set(`${dl.relay}\u0000${key(dl.origin, dl.id)}`, dl);
  }

  let deadLetteredPairs = 0;
  let ackedAndDead = 0;
  for (const p of published.values()) {
    if (isCredentialBearing(p.kind)) continue; // already a violation; it must not arrive anywhere
    for (const r of relays) {
      if (r === p.origin) continue;
      const k = `${r}\u0000${key(p.origin, p.id)}`;
      const isAcked = acked.has(k);
      const isDead = dead.has(k);
      if (isAcked && isDead) ackedAndDead++;
      else if (isDead) deadLetteredPairs++;
      if (!isAcked && !isDead) {
        const tries = seen.get(k) ?? 0;
        add("lost", `${p.origin}/${p.id} (${p.outcome}) at ${r}: neither acked by its controller nor a dead letter in its store (${tries} deliver frame${tries === 1 ? "" : "s"} seen)`);
      }
    }
  }

  for (const e of h.exits) {
    if (!relays.has(e.relay)) continue;
    if (!exitExpected(e))
      add("unexpected_exit", `relay ${e.relay} exited with code ${e.code}, signal ${e.signal}${e.injected ? ` after ${e.injected}` : " unasked"}`);
  }

  return {
    violations,
    counts: {
      messages: published.size,
      queued,
      deliveries: h.deliveries.length,
      duplicates,
      deadLetters: h.deadLetters.length,
      deadLetteredPairs,
      ackedAndDead,
    },
  };
}
