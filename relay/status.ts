// The status page's data (GET /status.json): what the relay is doing, from the same metric
// objects /metrics exports (so the page and Prometheus never disagree), the store's dead letters
// without payloads, and the peers. Never a payload, never a credential.

import type { BusStatus } from "./bus/bus.js";
import type { RelayMetrics } from "./metrics.js";
import type { Peer } from "./peers.js";
import { readinessBody, type ReadinessReport } from "./readiness.js";
import type { DeadLetterSummary } from "./store/store.js";

export interface StatusSources {
  instanceId: string;
  stream: string;
  busName: string;
  readinessMode: string;
  bus(): BusStatus;
  /** The NATS server connected to, or the bus file. */
  location(): string | undefined;
  readiness(): ReadinessReport;
  metrics: RelayMetrics;
  deadLetters(limit: number): DeadLetterSummary;
  peers(): Promise<Peer[]>;
}

/** The counters shown, by their name in /metrics (without the uptrakit_relay_ prefix). */
export const STATUS_COUNTERS = [
  "published_total",
  "delivered_total",
  "acked_total",
  "redelivered_total",
  "nacked_total",
  "rejected_total",
  "ack_timeouts_total",
  "dead_lettered_total",
  "unavailable_total",
  "refused_total",
  "outbox_flushed_total",
  "echo_filtered_total",
  "invalid_frames_total",
] as const;

const DEAD_LETTERS_SHOWN = 10;
/** Peers cost a stream info with subject counts: read them at most this often. */
const PEERS_TTL_MS = 5_000;

export interface StatusSnapshot {
  instanceId: string;
  generatedAt: string;
  bus: { name: string; stream: string; state: string; reason?: string; location?: string };
  readiness: ReturnType<typeof readinessBody> & { mode: string };
  controllerConnected: boolean;
  inFlight: number;
  outbox: { depth: number; max: number };
  deadLetters: DeadLetterSummary;
  counters: Record<string, number>;
  peers: Peer[] | null;
  peersError?: string;
}

export class StatusReporter {
  private peersCache: { at: number; peers: Peer[] | null; error?: string } | undefined;

  constructor(private readonly s: StatusSources) {}

  async snapshot(): Promise<StatusSnapshot> {
    const m = this.s.metrics;
    const value = async (name: string): Promise<number> => {
      const metric = m.registry.getSingleMetric(`uptrakit_relay_${name}`);
      const got = metric ? await metric.get() : undefined;
      return got?.values[0]?.value ?? 0;
    };
    const counters: Record<string, number> = {};
    for (const c of STATUS_COUNTERS) counters[c] = await value(c);
    const bus = this.s.bus();
    const peers = await this.peers();
    return {
      instanceId: this.s.instanceId,
      generatedAt: new Date().toISOString(),
      bus: { name: this.s.busName, stream: this.s.stream, state: bus.state, reason: bus.reason, location: this.s.location() },
      readiness: { ...readinessBody(this.s.readiness()), mode: this.s.readinessMode },
      controllerConnected: (await value("controller_connected")) === 1,
      inFlight: await value("in_flight"),
      outbox: { depth: await value("outbox_depth"), max: await value("outbox_max") },
      deadLetters: this.s.deadLetters(DEAD_LETTERS_SHOWN),
      counters,
      peers: peers.peers,
      ...(peers.error ? { peersError: peers.error } : {}),
    };
  }

  private async peers(): Promise<{ peers: Peer[] | null; error?: string }> {
    const now = Date.now();
    if (this.peersCache && now - this.peersCache.at < PEERS_TTL_MS) return this.peersCache;
    const bus = this.s.bus();
    if (bus.state !== "connected") return { peers: null, error: `the bus is ${bus.state}` };
    try {
      this.peersCache = { at: now, peers: await this.s.peers() };
    } catch (err) {
      // NATS down: the page still shows everything else, and why there are no peers.
      this.peersCache = { at: now, peers: null, error: (err as Error).message };
    }
    return this.peersCache;
  }
}
