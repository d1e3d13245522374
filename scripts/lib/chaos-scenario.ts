// The chaos checker's generator: a fast-check arbitrary for one scenario — which bus, how many
// relays, a schedule of publishes, what each controller does with each delivery, and faults at
// moments in the publish window. Plain data (JSON), so that a failing scenario can be printed,
// shrunk by fast-check and replayed as it is (`--scenario <file>`).

import fc from "fast-check";

export type BusKind = "jetstream" | "cluster" | "sqlite";

/** What a controller does with one delivery. */
export type Behaviour =
  | { do: "ack" }
  | { do: "nack"; delayMs: number }
  /** `working` every 400 ms for ms, then ack. */
  | { do: "working"; ms: number }
  | { do: "reject" }
  /** Never answer: the ack wait runs out. */
  | { do: "silence" }
  /** Ack after ms (past the ack wait, the ack finds a retired delivery). */
  | { do: "slow"; ms: number }
  /** Close the WebSocket with this delivery unsettled; reconnect after downMs. */
  | { do: "disconnect"; downMs: number }
  /** Open a second connection that supersedes the first (4001); this delivery stays unsettled. */
  | { do: "supersede" };

export type FaultKind = "relay-sigterm" | "relay-sigkill" | "nats-restart" | "leader-kill" | "store-busy" | "partition";

export interface Fault {
  /** ms after publishing starts. */
  atMs: number;
  kind: FaultKind;
  /** Relay index (mod the relay count) for relay faults, store-busy and partition; node index for nats-restart. */
  target: number;
  /** How long the fault lasts: down time, lock hold or partition. */
  durationMs: number;
}

export interface PublishStep {
  atMs: number;
  /** Relay index (mod the relay count) whose controller publishes. */
  from: number;
  kind: string;
}

export interface Scenario {
  bus: BusKind;
  relays: number;
  /** ms during which publishes and faults happen; then every fault is healed and everything acked. */
  windowMs: number;
  publishes: PublishStep[];
  /** Per relay: the n-th delivery its controller gets takes behaviours[n % length]. */
  behaviours: Behaviour[][];
  faults: Fault[];
}

export const FAULTS_BY_BUS: Record<BusKind, FaultKind[]> = {
  jetstream: ["relay-sigterm", "relay-sigkill", "nats-restart", "store-busy", "partition"],
  cluster: ["relay-sigterm", "relay-sigkill", "nats-restart", "leader-kill", "store-busy", "partition"],
  sqlite: ["relay-sigterm", "relay-sigkill", "store-busy"],
};

const KINDS = ["VersionCheckCompleted", "CertificateRenewed", "DomainVerified"];
/** Credential-bearing kinds, dressed up: each must be refused and never delivered. */
const FORBIDDEN = ["TenantRevoked", "tenant_config_updated", "TENANTASSIGNMENTS"];

const behaviourArb: fc.Arbitrary<Behaviour> = fc.oneof(
  { arbitrary: fc.constant<Behaviour>({ do: "ack" }), weight: 4 },
  { arbitrary: fc.integer({ min: 0, max: 400 }).map<Behaviour>((delayMs) => ({ do: "nack", delayMs })), weight: 3 },
  { arbitrary: fc.integer({ min: 500, max: 3_000 }).map<Behaviour>((ms) => ({ do: "working", ms })), weight: 1 },
  { arbitrary: fc.constant<Behaviour>({ do: "reject" }), weight: 1 },
  { arbitrary: fc.constant<Behaviour>({ do: "silence" }), weight: 2 },
  { arbitrary: fc.integer({ min: 100, max: 2_500 }).map<Behaviour>((ms) => ({ do: "slow", ms })), weight: 1 },
  { arbitrary: fc.integer({ min: 50, max: 1_000 }).map<Behaviour>((downMs) => ({ do: "disconnect", downMs })), weight: 1 },
  { arbitrary: fc.constant<Behaviour>({ do: "supersede" }), weight: 1 },
);

function faultArb(bus: BusKind, windowMs: number): fc.Arbitrary<Fault> {
  return fc.record({
    atMs: fc.integer({ min: 0, max: windowMs }),
    kind: fc.constantFrom(...FAULTS_BY_BUS[bus]),
    target: fc.nat({ max: 3 }),
    durationMs: fc.integer({ min: 200, max: 4_000 }),
  });
}

export interface ScenarioLimits {
  maxPublishes?: number;
  maxFaults?: number;
  buses?: BusKind[];
}

export function scenarioArb(limits: ScenarioLimits = {}): fc.Arbitrary<Scenario> {
  const buses = limits.buses ?? ["jetstream", "cluster", "sqlite"];
  return fc
    .record({ bus: fc.constantFrom(...buses), relays: fc.integer({ min: 2, max: 4 }), windowMs: fc.integer({ min: 1_500, max: 5_000 }) })
    .chain(({ bus, relays, windowMs }) =>
      fc.record({
        bus: fc.constant(bus),
        relays: fc.constant(relays),
        windowMs: fc.constant(windowMs),
        publishes: fc.array(
          fc.record({
            atMs: fc.integer({ min: 0, max: windowMs }),
            from: fc.nat({ max: 3 }),
            kind: fc.oneof({ arbitrary: fc.constantFrom(...KINDS), weight: 12 }, { arbitrary: fc.constantFrom(...FORBIDDEN), weight: 1 }),
          }),
          { minLength: 1, maxLength: limits.maxPublishes ?? 24 },
        ),
        behaviours: fc.array(fc.array(behaviourArb, { minLength: 1, maxLength: 6 }), { minLength: relays, maxLength: relays }),
        faults: fc.array(faultArb(bus, windowMs), { minLength: 0, maxLength: limits.maxFaults ?? 3 }),
      }),
    );
}

/** One line for logs: bus, relays, publishes, behaviours used, faults. */
export function describeScenario(s: Scenario): string {
  const faults = s.faults.map((f) => `${f.kind}@${f.atMs}ms/${f.durationMs}ms→${f.target % (f.kind === "nats-restart" ? 3 : s.relays)}`).join(", ");
  const kinds = new Set(s.behaviours.flat().map((b) => b.do));
  return `${s.bus}, ${s.relays} relays, ${s.publishes.length} publishes in ${s.windowMs} ms, behaviours {${[...kinds].join(",")}}, faults [${faults || "none"}]`;
}
