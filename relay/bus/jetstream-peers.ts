// Peers and clock skew read from the stream itself, never by consuming: published counts per
// origin from the stream's per-subject counts (stream info with subjects_filter, 2.9 and later),
// last activity from each consumer's info, and clock skew from direct reads of a peer's latest
// messages (STREAM.MSG.GET: nothing is delivered to any controller, no consumer is touched).

import type { JetStreamManager } from "@nats-io/jetstream";
import { mergePeers, type Peer } from "../peers.js";
import { SUBJECT_FILTER, parseSubject, subjectFor } from "./jetstream-wire.js";

const HDR_PUBLISHED_AT = "Uptrakit-Published-At";
/** Latest messages read per origin for its clock skew (one per subject, the busiest first). */
const SKEW_SAMPLES = 8;

/** Message counts per subject, grouped by the origin token of the subject. */
async function subjectCounts(jsm: JetStreamManager, stream: string): Promise<Map<string, Map<string, number>>> {
  const si = await jsm.streams.info(stream, { subjects_filter: SUBJECT_FILTER });
  const byOrigin = new Map<string, Map<string, number>>();
  for (const [subject, n] of Object.entries(si.state.subjects ?? {})) {
    const parsed = parseSubject(subject);
    if (!parsed) continue;
    let m = byOrigin.get(parsed.origin);
    if (!m) byOrigin.set(parsed.origin, (m = new Map()));
    m.set(subject, n);
  }
  return byOrigin;
}

export async function readJetStreamPeers(jsm: JetStreamManager, stream: string, self: string): Promise<Peer[]> {
  const counts = await subjectCounts(jsm, stream);
  const published = new Map([...counts].map(([origin, subjects]) => [origin, [...subjects.values()].reduce((a, b) => a + b, 0)]));
  const consumers = new Map<string, Omit<Peer, "published" | "self">>();
  for await (const ci of jsm.consumers.list(stream)) {
    // The server sends RFC 3339 times (typed as nanos by nats.js); absent until the first delivery/ack.
    const times = [ci.delivered?.last_active, ci.ack_floor?.last_active, ci.created]
      .map((t) => (t === undefined ? NaN : Date.parse(String(t))))
      .filter((t) => Number.isFinite(t));
    consumers.set(ci.name, {
      name: ci.name,
      hasConsumer: true,
      lastActive: times.length ? new Date(Math.max(...times)).toISOString() : undefined,
      pending: ci.num_pending,
    });
  }
  return mergePeers(consumers, published, self);
}

export interface ClockSkew {
  origin: string;
  /** Its clock minus the NATS server's, in ms (positive: ahead); undefined without a readable sample. */
  skewMs?: number;
  samples: number;
}

/**
 * Per origin: the stream's own timestamp of its latest messages against their publishedAt
 * header. publishedAt - stored = skew - latency, and latency is at least 0 (far more for a
 * message that waited in an outbox): the largest difference is the best estimate of the skew.
 */
export async function readClockSkew(jsm: JetStreamManager, stream: string, origins?: string[]): Promise<ClockSkew[]> {
  const counts = await subjectCounts(jsm, stream);
  const out: ClockSkew[] = [];
  for (const origin of origins ?? [...counts.keys()]) {
    const subjects = [...(counts.get(origin) ?? new Map<string, number>())].sort((a, b) => b[1] - a[1]).slice(0, SKEW_SAMPLES);
    let best: number | undefined;
    let samples = 0;
    for (const [subject] of subjects) {
      // Gone since the counts were read (retention): no sample. Anything else (a permission) is the caller's.
      const sm = await jsm.streams.getMessage(stream, { last_by_subj: subject }).catch((err: unknown) => {
        if (/no message found|not found/i.test(String((err as Error)?.message ?? err))) return null;
        throw err;
      });
      if (!sm) continue;
      const published = Date.parse(sm.header?.get(HDR_PUBLISHED_AT) ?? "");
      const stored = sm.time.getTime();
      if (!Number.isFinite(published) || !Number.isFinite(stored)) continue;
      samples++;
      best = best === undefined ? published - stored : Math.max(best, published - stored);
    }
    out.push({ origin, skewMs: best, samples });
  }
  return out;
}

/** The subject a relay publishes on (for the permissions check). */
export const ownSubject = (origin: string, kind: string): string => subjectFor(origin, kind);
