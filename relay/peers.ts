// The other relays on the same stream (or bus file), as `doctor`, `peers` and the status page
// show them. A peer is an instance id seen as a consumer on the stream or as the origin of
// messages in it.

export interface Peer {
  /** Instance id: its consumer's name and the origin of what it publishes. */
  name: string;
  /** This relay itself (listed so the counts add up; never counted as a peer). */
  self: boolean;
  /** It has a consumer on the stream (a relay creates one at start). */
  hasConsumer: boolean;
  /** ISO time of its consumer's last delivery or ack (its creation when it never had one). */
  lastActive?: string;
  /** Messages it published that the stream still holds (the retention window). */
  published: number;
  /** Messages its consumer has not been given yet. */
  pending?: number;
}

/** Peers first by name, self last; every name once. */
export function mergePeers(consumers: Map<string, Omit<Peer, "published" | "self">>, published: Map<string, number>, self: string): Peer[] {
  const names = new Set([...consumers.keys(), ...published.keys()]);
  return [...names]
    .map((name): Peer => {
      const c = consumers.get(name);
      return { name, self: name === self, hasConsumer: c !== undefined, lastActive: c?.lastActive, pending: c?.pending, published: published.get(name) ?? 0 };
    })
    .sort((a, b) => Number(a.self) - Number(b.self) || a.name.localeCompare(b.name));
}

/** "3 s ago", "4 min ago", "2 h ago". */
export function ago(iso: string | undefined, now = Date.now()): string {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172_800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86_400)} d ago`;
}

/** The peers table: one row per instance. */
export function formatPeersTable(peers: Peer[], now = Date.now()): string {
  const rows = peers.map((p) => [
    p.self ? `${p.name} (this relay)` : p.name,
    p.hasConsumer ? ago(p.lastActive, now) : "no consumer",
    String(p.published),
    p.pending === undefined ? "-" : String(p.pending),
  ]);
  const head = ["instance", "last active", "published (retention)", "pending"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(head), ...rows.map(line)].join("\n") + "\n";
}
