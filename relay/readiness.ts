// What /readyz answers, from the relay's state. In the default mode ("degraded") readiness means
// "this relay can take its controller's publishes": with the bus down it still can, into the
// outbox, and delivers them once the bus is back, so it stays ready (200) and says why it is
// degraded. A NATS outage then does not take every controller pod out of its Service at once.
// "strict" is the old behaviour: not ready whenever the bus is not connected.

import type { Readiness as ReadinessMode } from "./config.js";
import type { BusStatus } from "./bus/bus.js";

export interface ReadinessInput {
  mode: ReadinessMode;
  /** The relay's lifecycle state ("running" is the only one that can be ready). */
  state: string;
  busName: string;
  bus: BusStatus;
  outboxDepth: number;
  outboxMax: number;
  /** Set while the relay's store cannot be written (the last outbox write failed). */
  storeProblem?: string;
}

export interface ReadinessReport {
  /** /readyz answers 200 (ready or degraded). */
  ready: boolean;
  /** Ready, but not at full strength: the reason says why. */
  degraded: boolean;
  reason?: string;
}

export function readiness(i: ReadinessInput): ReadinessReport {
  if (i.state !== "running") return { ready: false, degraded: false, reason: `relay is ${i.state}` };
  const busUp = i.bus.state === "connected";
  const busText = `bus ${i.busName} is ${i.bus.state}${i.bus.reason ? `: ${i.bus.reason}` : ""}`;
  if (i.mode === "strict") {
    if (!busUp) return { ready: false, degraded: false, reason: busText };
    return i.storeProblem ? { ready: true, degraded: true, reason: i.storeProblem } : { ready: true, degraded: false };
  }
  if (busUp) return i.storeProblem ? { ready: true, degraded: true, reason: i.storeProblem } : { ready: true, degraded: false };
  if (i.storeProblem) return { ready: false, degraded: false, reason: `${busText}, and ${i.storeProblem}` };
  if (i.outboxDepth >= i.outboxMax)
    return { ready: false, degraded: false, reason: `${busText}, and the outbox is full (${i.outboxDepth} of --outbox-max ${i.outboxMax})` };
  return {
    ready: true,
    degraded: true,
    reason: `${busText}; publishes are queued in the outbox (${i.outboxDepth} of ${i.outboxMax}) and sent when it is back`,
  };
}

/** The JSON body of /readyz. */
export function readinessBody(r: ReadinessReport): { status: "ready" | "degraded" | "not ready"; reason?: string } {
  if (!r.ready) return { status: "not ready", reason: r.reason };
  return r.degraded ? { status: "degraded", reason: r.reason } : { status: "ready" };
}
