// A fake Clock for in-process state-machine tests: time moves only when the test advances it,
// and timers fire in deadline order (ties in the order they were set).

import type { Clock, TimerHandle } from "../../relay/clock.js";

interface FakeTimer extends TimerHandle {
  at: number;
  order: number;
  fn: () => void;
  ms: number;
  live: boolean;
}

export class FakeClock implements Clock {
  private t = 0;
  private order = 0;
  private timers: FakeTimer[] = [];

  now(): number {
    return this.t;
  }

  setTimer(fn: () => void, ms: number): TimerHandle {
    const timer: FakeTimer = {
      at: this.t + Math.max(0, ms),
      order: this.order++,
      fn,
      ms: Math.max(0, ms),
      live: true,
      refresh: () => {
        timer.at = this.t + timer.ms;
        timer.order = this.order++;
        if (!timer.live) {
          timer.live = true;
          this.timers.push(timer);
        }
      },
    };
    this.timers.push(timer);
    return timer;
  }

  clearTimer(handle: TimerHandle | undefined): void {
    if (!handle) return;
    const timer = handle as FakeTimer;
    timer.live = false;
    this.timers = this.timers.filter((x) => x !== timer);
  }

  get pendingTimers(): number {
    return this.timers.length;
  }

  /** The next timer's due time, or undefined. */
  nextAt(): number | undefined {
    let best: FakeTimer | undefined;
    for (const x of this.timers) if (!best || x.at < best.at || (x.at === best.at && x.order < best.order)) best = x;
    return best?.at;
  }

  /**
   * Advances to `until`, firing every timer due on the way in order; after each, lets promise
   * callbacks run (the machine awaits its store) before the next.
   */
  async advanceTo(until: number): Promise<void> {
    for (;;) {
      let best: FakeTimer | undefined;
      for (const x of this.timers) if (!best || x.at < best.at || (x.at === best.at && x.order < best.order)) best = x;
      if (!best || best.at > until) break;
      this.timers = this.timers.filter((x) => x !== best);
      best.live = false;
      this.t = Math.max(this.t, best.at);
      best.fn();
      await settle();
    }
    this.t = Math.max(this.t, until);
    await settle();
  }

  advance(ms: number): Promise<void> {
    return this.advanceTo(this.t + ms);
  }
}

/** Lets every queued promise callback and nextTick run. */
export function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
