// doctor's data-dir checks: the relay's own store, read-only (integrity, outbox, dead letters).

import type { RelayConfig } from "../config.js";
import { inspectStore } from "../store/store.js";
import type { Checks } from "./report.js";

export function dataDirChecks(cfg: RelayConfig, checks: Checks): void {
  let s;
  try {
    s = inspectStore(cfg.dataDir);
  } catch (err) {
    checks.fail("store.integrity", "relay store", (err as Error).message, "check --data-dir / UPTRAKIT_DATA_DIR: it must be the running relay's data dir (in Kubernetes, run doctor inside the relay container)");
    return;
  }
  if (s.integrity === "ok") checks.pass("store.integrity", "relay store", `${s.file}: integrity check ok`);
  else
    checks.fail(
      "store.integrity",
      "relay store",
      `${s.file}: integrity check says ${s.integrity}`,
      "stop the relay, keep a copy of the file, then move it away: the relay starts afresh (its outbox and dead letters are in the copy)",
    );
  if (s.outboxDepth >= cfg.outboxMax)
    checks.fail(
      "store.outbox",
      "outbox",
      `${s.outboxDepth} publishes queued, the limit (--outbox-max) is ${cfg.outboxMax}: new publishes are answered unavailable`,
      "the relay cannot reach the bus: fix the NATS connection (see the checks above); the outbox is sent in order once it is back. Raise --outbox-max only if the disk allows",
    );
  else checks.pass("store.outbox", "outbox", s.outboxDepth === 0 ? "empty" : `${s.outboxDepth} publishes queued of ${cfg.outboxMax} (sent once the bus takes them)`);
  if (s.count === 0) checks.pass("store.dead_letters", "dead letters", "none");
  else {
    const latest = s.latest.map((d) => `#${d.seq} ${d.deadAt} ${d.kind} id=${d.id} origin=${d.origin} attempts=${d.attempts}: ${d.reason}`);
    checks.fail(
      "store.dead_letters",
      "dead letters",
      `${s.count} (oldest ${s.oldestDeadAt})`,
      "look at them with `uptrakit-relay dlq list`; `dlq replay <id>` delivers one again once its cause is fixed, `dlq purge` drops them",
      latest,
    );
  }
}
