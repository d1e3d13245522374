// doctor's checks and how they are printed: one line per check, ✓ or ✗, and under a ✗ what to do.

import type { Peer } from "../peers.js";

export interface Check {
  /** Stable id for --json consumers, e.g. "nats.reachable". */
  id: string;
  /** What is checked, e.g. "NATS reachable". */
  title: string;
  ok: boolean;
  /** What was found. */
  detail: string;
  /** For a ✗: what to do. */
  fix?: string;
  /** Extra lines printed under the check (the peers table). */
  lines?: string[];
}

export interface DoctorReport {
  bus: "jetstream" | "sqlite";
  instanceId: string;
  ok: boolean;
  checks: Check[];
  peers?: Peer[];
}

export class Checks {
  readonly list: Check[] = [];

  pass(id: string, title: string, detail: string, lines?: string[]): void {
    this.list.push({ id, title, ok: true, detail, ...(lines ? { lines } : {}) });
  }

  fail(id: string, title: string, detail: string, fix: string, lines?: string[]): void {
    this.list.push({ id, title, ok: false, detail, fix, ...(lines ? { lines } : {}) });
  }

  get ok(): boolean {
    return this.list.every((c) => c.ok);
  }
}

export function renderText(r: DoctorReport): string {
  const out: string[] = [];
  for (const c of r.checks) {
    out.push(`${c.ok ? "✓" : "✗"} ${c.title}: ${c.detail}`);
    for (const l of c.lines ?? []) out.push(`    ${l}`);
    if (!c.ok && c.fix) out.push(`    → ${c.fix}`);
  }
  const failed = r.checks.filter((c) => !c.ok).length;
  out.push(failed === 0 ? `all ${r.checks.length} checks passed` : `${failed} of ${r.checks.length} checks failed`);
  return out.join("\n") + "\n";
}
