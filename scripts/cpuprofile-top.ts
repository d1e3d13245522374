// Summarises a .cpuprofile (node --cpu-prof; `npm run bench -- --profile <dir>` writes one per relay):
// the functions with the most self time, and the most inclusive time.
//
//   node dist/scripts/cpuprofile-top.js <file.cpuprofile> [--top 30] [--window <from>-<to>]
//
// --window: only the samples taken from <from> to <to> seconds after the profile started (e.g.
// 0-2 for a relay's start-up and first traffic, 5-10 for the same process warmed up).

import fs from "node:fs";
import path from "node:path";

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile {
  nodes: Node[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

const args = process.argv.slice(2);
const file = args.find((a, i) => !a.startsWith("--") && !["--top", "--window"].includes(args[i - 1] ?? ""));
const topIdx = args.indexOf("--top");
const top = topIdx >= 0 ? Number(args[topIdx + 1]) : 30;
const winIdx = args.indexOf("--window");
const win = winIdx >= 0 ? /^([\d.]+)-([\d.]+)$/.exec(args[winIdx + 1] ?? "") : null;
if (winIdx >= 0 && !win) {
  process.stderr.write("--window wants <from>-<to> in seconds, e.g. 0-2\n");
  process.exit(2);
}
if (!file) {
  process.stderr.write("usage: cpuprofile-top <file.cpuprofile> [--top N]\n");
  process.exit(2);
}
const prof = JSON.parse(fs.readFileSync(file, "utf8")) as Profile;

// Time per node from the sample deltas.
const selfUs = new Map<number, number>();
let at = 0; // µs since the profile started
for (let i = 0; i < prof.samples.length; i++) {
  at += prof.timeDeltas[i] ?? 0;
  if (win && (at < Number(win[1]) * 1e6 || at >= Number(win[2]) * 1e6)) continue;
  const id = prof.samples[i]!;
  selfUs.set(id, (selfUs.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0));
}
const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

const label = (n: Node): string => {
  const f = n.callFrame;
  const where = f.url ? `${path.basename(f.url.replace(/^file:\/\//, ""))}:${f.lineNumber + 1}` : "";
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(f.url)?.[1];
  return `${f.functionName || "(anonymous)"} ${pkg ? `[${pkg}] ` : ""}${where}`.trim();
};

const self = new Map<string, number>();
const incl = new Map<string, number>();
let total = 0;
for (const [id, us] of selfUs) {
  total += us;
  const n = byId.get(id)!;
  self.set(label(n), (self.get(label(n)) ?? 0) + us);
  // Inclusive: each distinct label on the stack once.
  const seen = new Set<string>();
  for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
    const l = label(byId.get(cur)!);
    if (seen.has(l)) continue;
    seen.add(l);
    incl.set(l, (incl.get(l) ?? 0) + us);
  }
}

const print = (title: string, m: Map<string, number>): void => {
  process.stdout.write(`\n${title} (of ${(total / 1000).toFixed(0)} ms sampled)\n`);
  for (const [l, us] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top))
    process.stdout.write(`${(us / 1000).toFixed(1).padStart(9)} ms ${((100 * us) / total).toFixed(1).padStart(5)}%  ${l}\n`);
};
print("self time", self);
print("inclusive time", incl);
