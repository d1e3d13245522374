// RelayClient and OpenTelemetry: with @opentelemetry/api and a context manager registered (as an
// application's SDK does), a publish made inside a span carries that span's W3C context, and the
// receiving controller's handler runs inside the context its delivery carried. With
// propagateTrace: false nothing is sent.

import { AsyncLocalStorage } from "node:async_hooks";
import path from "node:path";
import t from "tap";
import { ROOT_CONTEXT, context, trace, TraceFlags, createTraceState, type Context, type ContextManager } from "@opentelemetry/api";
import { RelayClient, type Delivery } from "../controller-stub/client.js";
import { startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";

/** What an SDK's AsyncLocalStorageContextManager does, in a few lines. */
class AlsContextManager implements ContextManager {
  private readonly als = new AsyncLocalStorage<Context>();
  active(): Context {
    return this.als.getStore() ?? ROOT_CONTEXT;
  }
  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(ctx: Context, fn: F, thisArg?: ThisParameterType<F>, ...args: A): ReturnType<F> {
    return this.als.run(ctx, () => fn.call(thisArg, ...args));
  }
  bind<T>(_ctx: Context, target: T): T {
    return target;
  }
  enable(): this {
    return this;
  }
  disable(): this {
    this.als.disable();
    return this;
  }
}

t.test("RelayClient sends the active trace context and runs handlers inside the delivered one", async (tt) => {
  tt.ok(context.setGlobalContextManager(new AlsContextManager()), "context manager registered");
  const bus = `sqlite:${path.join(tempDir(), "bus.db")}`;
  const relays: RelayProcess[] = [];
  for (const id of ["alpha", "bravo"]) relays.push(await startRelay({ instanceId: id, args: ["--bus", bus] }));
  const [a, b] = relays.map((r) => new RelayClient({ url: r.wsUrl })) as [RelayClient, RelayClient];
  tt.teardown(async () => {
    await Promise.all([a.close(), b.close()]);
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    context.disable();
  });
  await Promise.all([a.connect(), b.connect()]);

  const seen: Array<{ d: Delivery; active: string | undefined; state: string | undefined }> = [];
  let arrived!: () => void;
  const two = new Promise<void>((resolve) => (arrived = resolve));
  b.onMessage((d) => {
    const sc = trace.getSpanContext(context.active());
    seen.push({ d, active: sc && `${sc.traceId}-${sc.spanId}-${sc.isRemote}`, state: sc?.traceState?.serialize() });
    if (seen.length === 2) arrived();
  });

  const sc = { traceId: "0af7651916cd43dd8448eb211c80319c", spanId: "b7ad6b7169203331", traceFlags: TraceFlags.SAMPLED, traceState: createTraceState("vendor=v1") };
  await context.with(trace.setSpanContext(ROOT_CONTEXT, sc), () => a.publish("CertificateRenewed", { n: 1 }, "in-span"));
  await a.publish("CertificateRenewed", { n: 2 }, "no-span");
  await two;
  const inSpan = seen.find((s) => s.d.id === "in-span")!;
  const noSpan = seen.find((s) => s.d.id === "no-span")!;
  tt.equal(inSpan.d.traceparent, `00-${sc.traceId}-${sc.spanId}-01`, "the publish carried the active span's context");
  tt.equal(inSpan.d.tracestate, "vendor=v1", "and its tracestate");
  tt.equal(inSpan.active, `${sc.traceId}-${sc.spanId}-true`, "the handler ran inside the delivered (remote) context");
  tt.equal(inSpan.state, "vendor=v1");
  tt.equal(noSpan.d.traceparent, undefined, "no active span, no traceparent");
  tt.equal(noSpan.active, undefined, "and the handler runs in no span");

  const quiet = new RelayClient({ url: relays[0]!.wsUrl, propagateTrace: false });
  await quiet.connect();
  let got!: (d: Delivery) => void;
  const third = new Promise<Delivery>((resolve) => (got = resolve));
  b.onMessage((d) => got(d));
  await context.with(trace.setSpanContext(ROOT_CONTEXT, sc), () => quiet.publish("CertificateRenewed", { n: 3 }, "quiet"));
  tt.equal((await third).traceparent, undefined, "propagateTrace: false sends none");
  await quiet.close();
});
