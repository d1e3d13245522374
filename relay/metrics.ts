// Prometheus metrics of one relay. Each relay gets its own registry, so several relays in one
// process (tests, benchmarks) never collide.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import { INBOUND_REJECT_REASONS } from "./inbound-policy.js";

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/**
 * How often the event-loop delay monitor behind nodejs_eventloop_lag_{min,max,mean,p50,p90,p99}
 * wakes the process. prom-client's default (10 ms) was 100 wake-ups a second, about 0.5 % of a
 * core — most of an idle relay's CPU. At 100 ms it is ~0.03 %; a stall of 100 ms or more is still
 * always seen, shorter ones are sampled.
 */
export const EVENT_LOOP_RESOLUTION_MS = 100;
/** The monitor's readings are the time between its ticks: these gauges, less the resolution, are the delay. */
const SHIFTED_LAG_GAUGES = ["min", "max", "mean", "p50", "p90", "p99"].map((s) => `nodejs_eventloop_lag_${s}_seconds`);

export class RelayMetrics {
  readonly registry = new Registry();

  private counter(name: string, help: string): Counter {
    return new Counter({ name: `uptrakit_relay_${name}`, help, registers: [this.registry] });
  }

  readonly published = this.counter("published_total", "Publishes accepted from the controller (durable on the bus or queued in the outbox)");
  readonly delivered = this.counter("delivered_total", "Deliveries sent to the controller, first attempts and redeliveries");
  readonly redelivered = this.counter("redelivered_total", "Deliveries with attempt > 1");
  readonly acked = this.counter("acked_total", "Deliveries acked by the controller");
  readonly nacked = this.counter("nacked_total", "Deliveries nacked by the controller");
  readonly rejected = this.counter("rejected_total", "Deliveries rejected by the controller as poison");
  readonly ackTimeouts = this.counter("ack_timeouts_total", "Deliveries not acked within the ack wait");
  readonly echoFiltered = this.counter("echo_filtered_total", "Messages of this relay's own origin, acked and skipped");
  readonly deadLettered = this.counter("dead_lettered_total", "Messages recorded as dead letters");
  readonly forbiddenKind = this.counter("forbidden_kind_total", "Publishes refused because their kind carries credentials");
  readonly invalidFrames = this.counter("invalid_frames_total", "Frames answered with an error (invalid, too large, unknown delivery)");
  readonly unavailable = this.counter("unavailable_total", "Publishes answered 'unavailable'");
  readonly refused = this.counter("refused_total", "Publishes the bus refused for good (answered 'refused', or set aside from the outbox as dead letters)");
  readonly outboxFlushed = this.counter("outbox_flushed_total", "Queued publishes sent from the outbox to the bus");
  readonly settleFailures = this.counter("settle_failures_total", "Acks, naks, working and terms the bus could not be sent (the message is redelivered)");
  readonly traceContextDropped = this.counter("trace_context_dropped_total", "Publishes whose malformed traceparent/tracestate was dropped (the publish went ahead without it)");
  readonly natsStale = this.counter("nats_stale_total", "Times the NATS connection was found silently cut off (no answer to pings or PubAcks) and given up");

  readonly inboundRejected = (() => {
    const c = new Counter({
      name: "uptrakit_relay_inbound_rejected_total",
      help: "Messages from the bus refused by the inbound policy (never delivered; recorded as dead letters), by reason",
      labelNames: ["reason"],
      registers: [this.registry],
    });
    for (const reason of INBOUND_REJECT_REASONS) c.inc({ reason }, 0); // every reason shows, at 0
    return c;
  })();

  readonly outboxDepth = new Gauge({ name: "uptrakit_relay_outbox_depth", help: "Publishes waiting in the outbox", registers: [this.registry] });
  readonly inFlight = new Gauge({ name: "uptrakit_relay_in_flight", help: "Deliveries awaiting the controller's ack", registers: [this.registry] });
  readonly controllerConnected = new Gauge({ name: "uptrakit_relay_controller_connected", help: "1 while a controller session is open", registers: [this.registry] });
  readonly outboxUnflushedAtStop = new Gauge({
    name: "uptrakit_relay_outbox_unflushed_at_stop",
    help: "Publishes still in the outbox when the relay stopped (set during shutdown; they stay in the data dir)",
    registers: [this.registry],
  });
  /** What /readyz would answer now; the relay sets it, the two gauges below read it at each scrape. */
  readinessSource: () => { ready: boolean; degraded: boolean } = () => ({ ready: false, degraded: false });
  readonly ready: Gauge = new Gauge({
    name: "uptrakit_relay_ready",
    help: "1 while /readyz answers 200 (ready, or degraded with --readiness degraded)",
    registers: [this.registry],
    collect: (): void => this.ready.set(this.readinessSource().ready ? 1 : 0),
  });
  readonly degraded: Gauge = new Gauge({
    name: "uptrakit_relay_degraded",
    help: "1 while the relay is ready but degraded (e.g. NATS down, publishes queued in the outbox); /readyz says why",
    registers: [this.registry],
    collect: (): void => this.degraded.set(this.readinessSource().degraded ? 1 : 0),
  });
  readonly outboxMax = new Gauge({ name: "uptrakit_relay_outbox_max", help: "The outbox's limit (--outbox-max): publishes beyond it are answered unavailable", registers: [this.registry] });
  readonly natsConnected = new Gauge({ name: "uptrakit_relay_nats_connected", help: "1 while the bus (NATS, or the embedded bus) is connected", registers: [this.registry] });

  /** 1 for each nats.js fast path's current state (relay/bus/nats-internals.ts), 0 for the others. */
  readonly fastPaths = new Gauge({
    name: "uptrakit_relay_fast_paths",
    help: "State of each shortcut through nats.js internals: on, off (--fast-paths off), disabled (its start-up check failed: public API), unchecked",
    labelNames: ["path", "state"] as const,
    registers: [this.registry],
  });

  readonly publishLatency = new Histogram({
    name: "uptrakit_relay_publish_latency_seconds",
    help: "From a publish frame to the bus confirming it durable",
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly deliveryLatency = new Histogram({
    name: "uptrakit_relay_delivery_latency_seconds",
    help: "From publishedAt at the origin relay to the first delivery to this controller",
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: EVENT_LOOP_RESOLUTION_MS });
    this.reportLagBeyondResolution();
  }

  /**
   * prom-client sets all the lag gauges from nodejs_eventloop_lag_seconds's collect; run it, then
   * take the resolution off, so a coarser monitor does not read as a 100 ms lag.
   */
  private reportLagBeyondResolution(): void {
    const lag = this.registry.getSingleMetric("nodejs_eventloop_lag_seconds") as (Gauge & { collect?: (this: Gauge) => unknown }) | undefined;
    const shifted = SHIFTED_LAG_GAUGES.map((n) => this.registry.getSingleMetric(n)).filter((g): g is Gauge => g instanceof Gauge);
    const collect = lag?.collect;
    if (!lag || !collect || shifted.length === 0) return;
    const offset = EVENT_LOOP_RESOLUTION_MS / 1000;
    lag.collect = async function (this: Gauge) {
      await collect.call(this);
      for (const g of shifted) for (const v of (await g.get()).values) g.set(v.labels, Math.max(0, v.value - offset));
    };
  }

  setFastPath(path: string, state: string, states: readonly string[]): void {
    for (const s of states) this.fastPaths.set({ path, state: s }, s === state ? 1 : 0);
  }
}
