// Durable means fsynced: under strace, the relay must fsync (or fdatasync) after it reads a
// publish frame and before it answers `published` — on the outbox path (NATS down: "queued":true)
// and on the embedded bus. The order is read off the system calls themselves: the answer to a
// /healthz request made just before the publish marks "the frame is about to arrive".

import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import t from "tap";
import { startNatsServer } from "./helpers/nats-server.js";
import { RELAY_MAIN, tempDir } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";

function hasStrace(): boolean {
  return ["/usr/bin/strace", "/bin/strace"].some((p) => fs.existsSync(p));
}

interface Traced {
  proc: ChildProcess;
  port: number;
  traceFile: string;
  waitLog(pred: (l: Record<string, unknown>) => boolean, ms?: number): Promise<void>;
  stop(): Promise<void>;
}

/** The relay under `strace -f`, tracing fsync, fdatasync and the writes that carry answers. */
async function tracedRelay(args: string[], dir: string): Promise<Traced> {
  const traceFile = path.join(dir, "strace.txt");
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("UPTRAKIT_")));
  const proc = spawn(
    "strace",
    ["-f", "-qq", "-e", "trace=fsync,fdatasync,write,writev", "-e", "signal=none", "-s", "300", "-o", traceFile,
      process.execPath, RELAY_MAIN, "run", "--instance-id", "fsync-probe", "--data-dir", path.join(dir, "data"), "--listen", "127.0.0.1:0", ...args],
    { env, stdio: ["ignore", "pipe", "pipe"] },
  );
  const lines: Array<Record<string, unknown>> = [];
  const waiters: Array<{ pred: (l: Record<string, unknown>) => boolean; done: () => void }> = [];
  let buf = "";
  proc.stdout!.setEncoding("utf8").on("data", (c: string) => {
    buf += c;
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let l: Record<string, unknown>;
      try {
        l = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      lines.push(l);
      for (const w of [...waiters]) if (w.pred(l)) (waiters.splice(waiters.indexOf(w), 1), w.done());
    }
  });
  const waitLog = (pred: (l: Record<string, unknown>) => boolean, ms = 20_000): Promise<void> =>
    lines.some(pred)
      ? Promise.resolve()
      : new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error("no matching relay log line")), ms);
          waiters.push({ pred, done: () => (clearTimeout(timer), resolve()) });
        });
  await waitLog((l) => l.msg === "relay running");
  const running = lines.find((l) => l.msg === "relay running")!;
  const port = Number(String(running.listen).split(":").pop());
  return {
    proc,
    port,
    traceFile,
    waitLog,
    stop: async () => {
      if (proc.exitCode !== null) return;
      const exited = new Promise((r) => proc.once("exit", r));
      // Kill the traced relay itself (strace's child): killing strace alone would leave it running.
      let children: number[] = [];
      try {
        children = fs.readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
      } catch {
        // strace already gone
      }
      for (const pid of children) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // already exited
        }
      }
      proc.kill("SIGKILL");
      await exited;
    },
  };
}

/** Line numbers in the strace log: the marker answer, the publish answer, and the fsyncs between them. */
function order(trace: string, answer: RegExp): { marker: number; answer: number; syncsBetween: number } {
  const lines = trace.split("\n");
  const marker = lines.findIndex((l) => /^\d+\s+write(v)?\(/.test(l) && l.includes('\\"status\\":\\"ok\\"'));
  const answerAt = lines.findIndex((l, i) => i > marker && /^\d+\s+write(v)?\(/.test(l) && answer.test(l));
  const syncsBetween = lines.slice(marker + 1, answerAt < 0 ? undefined : answerAt).filter((l) => /^\d+\s+f(data)?sync\(/.test(l)).length;
  return { marker, answer: answerAt, syncsBetween };
}

async function publishAfterMarker(port: number, id: string): Promise<Record<string, unknown>> {
  const c = await TestController.connect(`ws://127.0.0.1:${port}/ws`);
  try {
    const health = await fetch(`http://127.0.0.1:${port}/healthz`);
    await health.text();
    return await c.publish("VersionCheckCompleted", { n: 1 }, id);
  } finally {
    await c.close();
  }
}

t.test("fsync before the answer", { skip: hasStrace() ? false : "strace is not installed (apt-get install strace)" }, async (t) => {
  t.test("outbox (NATS down): fsync between reading the publish and answering queued", async (tt) => {
    const dir = tempDir();
    const nats = await startNatsServer();
    const relay = await tracedRelay(["--nats-url", nats.url], dir);
    tt.teardown(async () => {
      await relay.stop();
      await nats.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    await nats.stop();
    await relay.waitLog((l) => l.msg === "bus disconnected");
    const answer = await publishAfterMarker(relay.port, "fsync-queued");
    tt.match(answer, { type: "published", id: "fsync-queued", queued: true });
    const o = order(fs.readFileSync(relay.traceFile, "utf8"), /queued\\":true/);
    tt.ok(o.marker >= 0 && o.answer > o.marker, `marker and answer found in the trace (${o.marker}, ${o.answer})`);
    tt.ok(o.syncsBetween >= 1, `fsync/fdatasync between the publish and its answer (${o.syncsBetween})`);
  });

  t.test("embedded bus: fsync between reading the publish and answering published", async (tt) => {
    const dir = tempDir();
    const relay = await tracedRelay(["--bus", `sqlite:${path.join(dir, "bus.db")}`], dir);
    tt.teardown(async () => {
      await relay.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const answer = await publishAfterMarker(relay.port, "fsync-bus");
    tt.match(answer, { type: "published", id: "fsync-bus" });
    const o = order(fs.readFileSync(relay.traceFile, "utf8"), /published\\",\\"id\\":\\"fsync-bus/);
    tt.ok(o.marker >= 0 && o.answer > o.marker, `marker and answer found in the trace (${o.marker}, ${o.answer})`);
    tt.ok(o.syncsBetween >= 1, `fsync/fdatasync between the publish and its answer (${o.syncsBetween})`);
  });
});
