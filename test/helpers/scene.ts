// What one test starts — nats-servers, proxies, relays, controllers — stopped at its teardown in
// reverse: controllers closed, relays SIGKILLed, then whatever was registered with onStop, last
// registered first (a proxy before the server behind it).

import type { TapTest } from "./bus-conformance.js";
import { startRelay, type RelayProcess, type StartRelayOptions } from "./relay-process.js";
import { TestController } from "./test-controller.js";

export class Scene {
  readonly relays: RelayProcess[] = [];
  readonly controllers: TestController[] = [];
  private readonly cleanups: Array<() => Promise<unknown>> = [];

  constructor(t: TapTest) {
    t.teardown(() => this.stop());
  }

  /** Runs at teardown, after the relays and before what was registered earlier. */
  onStop(fn: () => Promise<unknown>): void {
    this.cleanups.unshift(fn);
  }

  async relay(o: StartRelayOptions): Promise<RelayProcess> {
    const r = await startRelay(o);
    this.relays.push(r);
    return r;
  }

  async controller(url: string, opts?: Parameters<typeof TestController.connect>[1]): Promise<TestController> {
    const c = await TestController.connect(url, opts);
    this.controllers.push(c);
    return c;
  }

  private async stop(): Promise<void> {
    await Promise.all(this.controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(this.relays.map((r) => r.stop("SIGKILL")));
    for (const fn of this.cleanups) await fn();
  }
}
