// npm run chaos: the randomized fault checker. A seeded fast-check generator builds scenarios
// (scripts/lib/chaos-scenario.ts: 2–4 relays on one JetStream node, a 3-node cluster or the
// SQLite bus; publishes; a behaviour per delivery; faults at random moments), each is played
// against real processes (scripts/lib/chaos-run.ts) and its history checked
// (scripts/lib/chaos-check.ts): no silent loss, at most --max-deliver attempts, no echo, no
// forbidden kind, no crash but the injected ones. A failing scenario is shrunk by fast-check
// (each step a real run again, bounded by --shrink-budget) and printed with its seed.
//
// Scenario i of a run has the seed <seed>+i, so `--seed <s>` alone replays scenario s, and
// `--scenario <file>` replays a printed (e.g. shrunk) scenario exactly.
//
//   npm run chaos -- --runs 200 --json chaos.json
//   npm run chaos -- --seed 1234            # replay one scenario
//   npm run chaos -- --budget 60 --seed 100 # as many scenarios as start within 60 s

import fs from "node:fs";
import { Command, InvalidArgumentError } from "commander";
import fc from "fast-check";
import { checkHistory, type CheckCounts, type Violation } from "./lib/chaos-check.js";
import { runScenario, type RunResult } from "./lib/chaos-run.js";
import { describeScenario, scenarioArb, type BusKind, type Scenario } from "./lib/chaos-scenario.js";

function int(min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    return n;
  };
}

const cli = new Command("chaos")
  .description("randomized fault checker: scenarios of relays, publishes, controller behaviours and faults against real processes; exits 1 on a violation")
  .option("--seed <n>", "seed of the first scenario (scenario i has seed + i); alone, replays that one scenario", int(0, 2 ** 31 - 1))
  .option("--runs <n>", "scenarios to run (default 20, or 1 with --seed)", int(1, 100_000))
  .option("--budget <seconds>", "start no new scenario after this many seconds", int(1, 10 ** 7))
  .option("--json <file>", "write the counts (and any failure) as JSON")
  .option("--scenario <file>", "replay this scenario (JSON, as printed on a failure) instead of generating")
  .option("--buses <list>", "buses to draw from: jetstream, cluster, sqlite", "jetstream,cluster,sqlite")
  .option("--shrink-budget <seconds>", "how long to spend shrinking a failing scenario (0: do not shrink)", int(0, 10 ** 6), 300)
  .option("--relay-main <file>", "run another build of the relay (e.g. an older commit's dist/relay/main.js)")
  .option("--verbose", "print each fault as it is injected")
  .option("--trace <file>", "append every relay log line and controller event of the first play of each scenario (JSON lines)")
  .parse();
const opts = cli.opts<{ seed?: number; runs?: number; budget?: number; json?: string; scenario?: string; buses: string; shrinkBudget: number; verbose?: boolean; trace?: string; relayMain?: string }>();

const buses = opts.buses.split(",").map((b) => b.trim()) as BusKind[];
if (buses.length === 0 || buses.some((b) => !["jetstream", "cluster", "sqlite"].includes(b))) {
  process.stderr.write("chaos: --buses takes jetstream, cluster and/or sqlite\n");
  process.exit(2);
}
const baseSeed = opts.seed ?? Math.floor(Math.random() * 2 ** 30);
const runs = opts.scenario ? 1 : (opts.runs ?? (opts.seed !== undefined ? 1 : 20));
const arb = scenarioArb({ buses });
const say = (line: string): void => void process.stdout.write(`${line}\n`);

interface Totals {
  scenarios: number;
  faults: Record<string, number>;
  messages: number;
  queued: number;
  deliveries: number;
  deadLetters: number;
  duplicates: number;
  violations: number;
  startRetries: number;
  unsettled: number;
  errors: number;
  byBus: Record<string, number>;
}

const totals: Totals = { scenarios: 0, faults: {}, messages: 0, queued: 0, deliveries: 0, deadLetters: 0, duplicates: 0, violations: 0, startRetries: 0, unsettled: 0, errors: 0, byBus: {} };
const failures: Array<{ seed: number; scenario: Scenario; minimal: Scenario; violations: Violation[]; shrinkRuns: number }> = [];
const errors: Array<{ seed: number; error: string }> = [];

function add(r: RunResult, c: CheckCounts, bus: string): void {
  totals.scenarios++;
  totals.byBus[bus] = (totals.byBus[bus] ?? 0) + 1;
  for (const f of r.faults) totals.faults[f.kind] = (totals.faults[f.kind] ?? 0) + 1;
  totals.messages += c.messages;
  totals.queued += c.queued;
  totals.deliveries += c.deliveries;
  totals.deadLetters += c.deadLetters;
  totals.duplicates += c.duplicates;
  totals.startRetries += r.startRetries;
  if (!r.settled) totals.unsettled++;
}

/** Plays one scenario and checks it; the first play counts in the totals, shrinking plays do not. */
async function play(s: Scenario, seed: number, first: boolean): Promise<Violation[]> {
  const r = await runScenario(s, { log: opts.verbose ? say : undefined, traceFile: first ? opts.trace : undefined, relayMain: opts.relayMain });
  const { violations, counts } = checkHistory(r.history);
  if (first) {
    add(r, counts, s.bus);
    totals.violations += violations.length;
    say(
      `[seed ${seed}] ${describeScenario(s)}: ${violations.length === 0 ? "ok" : `${violations.length} VIOLATION(S)`} — ` +
        `${counts.messages} messages (${counts.queued} queued), ${counts.deliveries} deliveries, ${counts.duplicates} duplicates, ` +
        `${counts.deadLetters} dead letters, ${r.faults.length} faults; settled ${r.settled ? `in ${r.settleMs} ms` : "NOT within the timeout"}; ${(r.wallMs / 1000).toFixed(1)} s`,
    );
  }
  for (const v of violations.slice(0, first ? 20 : 0)) say(`    ${v.kind}: ${v.detail}`);
  return violations;
}

/** Neighbouring fast-check seeds give related first values: spread them (deterministically, so --seed replays). */
function mixSeed(seed: number): number {
  let x = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) | 0;
}

async function one(seed: number): Promise<void> {
  let first = true;
  let original: Scenario | undefined;
  let firstViolations: Violation[] = [];
  let shrinkRuns = 0;
  let shrinkUntil = 0;
  const property = fc.asyncProperty(opts.scenario ? fc.constant(JSON.parse(fs.readFileSync(opts.scenario, "utf8")) as Scenario) : arb, async (s) => {
    if (first) {
      first = false;
      original = s;
      try {
        firstViolations = await play(s, seed, true);
      } catch (err) {
        totals.errors++;
        const error = (err as Error).stack ?? String(err);
        errors.push({ seed, error });
        say(`[seed ${seed}] ${describeScenario(s)}: HARNESS ERROR (not a verdict on the relay)\n${error}`);
        return true;
      }
      if (firstViolations.length > 0) {
        shrinkUntil = Date.now() + opts.shrinkBudget * 1000;
        if (opts.shrinkBudget > 0) say(`    shrinking (up to ${opts.shrinkBudget} s; each step is a real run)…`);
      }
      return firstViolations.length === 0;
    }
    // Shrinking: past the budget every candidate "passes", so the smallest failure so far stands.
    if (Date.now() > shrinkUntil) return true;
    shrinkRuns++;
    try {
      return (await play(s, seed, false)).length === 0;
    } catch {
      return true; // a harness error says nothing about this candidate
    }
  });
  const out = await fc.check(property, { seed: mixSeed(seed), numRuns: 1, endOnFailure: opts.shrinkBudget === 0 });
  if (out.failed && original) {
    const minimal = (out.counterexample?.[0] as Scenario | undefined) ?? original;
    failures.push({ seed, scenario: original, minimal, violations: firstViolations, shrinkRuns });
    say(`    FAILED: seed ${seed}; replay with: npm run chaos -- --seed ${seed}`);
    say(`    minimal scenario after ${shrinkRuns} shrinking runs (replay exactly with --scenario <file holding it>):`);
    say(`    ${JSON.stringify(minimal)}`);
  }
}

async function main(): Promise<number> {
  const startedAt = Date.now();
  const budgetEnd = opts.budget ? startedAt + opts.budget * 1000 : Infinity;
  say(
    `chaos: ${opts.scenario ? `scenario from ${opts.scenario}` : `${runs} scenario(s), seeds ${baseSeed}..${baseSeed + runs - 1}`}` +
      `${opts.budget ? `, budget ${opts.budget} s` : ""}, buses ${buses.join("/")}`,
  );
  let lastSeed = baseSeed - 1;
  for (let i = 0; i < runs; i++) {
    if (Date.now() >= budgetEnd) {
      say(`budget of ${opts.budget} s reached: no new scenario started`);
      break;
    }
    lastSeed = baseSeed + i;
    await one(lastSeed);
  }
  const faultsTotal = Object.values(totals.faults).reduce((a, b) => a + b, 0);
  say("");
  say(`seeds: ${baseSeed}..${lastSeed}`);
  say(`scenarios: ${totals.scenarios} (${Object.entries(totals.byBus).map(([b, n]) => `${b}=${n}`).join(" ")})`);
  say(`faults injected: ${faultsTotal} (${Object.entries(totals.faults).sort().map(([k, n]) => `${k}=${n}`).join(" ") || "none"})`);
  say(`messages: ${totals.messages} (queued ${totals.queued})`);
  say(`deliveries: ${totals.deliveries}`);
  say(`dead letters: ${totals.deadLetters}`);
  say(`duplicates: ${totals.duplicates}`);
  say(`relay start retries: ${totals.startRetries}; scenarios not settled within the timeout: ${totals.unsettled}; harness errors: ${totals.errors}`);
  say(`violations: ${totals.violations}`);
  for (const f of failures) say(`failed seed ${f.seed}: ${f.violations.length} violation(s); minimal: ${JSON.stringify(f.minimal)}`);
  if (opts.json)
    fs.writeFileSync(
      opts.json,
      JSON.stringify({ seeds: { first: baseSeed, last: lastSeed }, wallSeconds: Math.round((Date.now() - startedAt) / 1000), ...totals, faultsTotal, failures, errors }, null, 2) + "\n",
    );
  return totals.violations > 0 ? 1 : totals.errors > 0 ? 2 : 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`chaos: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(2);
  },
);
