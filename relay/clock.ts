// Time as the relay's state machines see it: a monotonic now() and one-shot timers. The real
// clock in the daemon; a fake one in tests, which drive thousands of transitions in microseconds.

export interface TimerHandle {
  /** Restarts the timer with its original delay. */
  refresh(): void;
}

export interface Clock {
  /** Monotonic milliseconds. */
  now(): number;
  setTimer(fn: () => void, ms: number): TimerHandle;
  clearTimer(handle: TimerHandle | undefined): void;
}

/** performance.now() and Node timers, unref'd: the relay's servers keep the process alive, not its timers. */
export const systemClock: Clock = {
  now: () => performance.now(),
  setTimer(fn, ms) {
    const t = setTimeout(fn, Math.max(0, ms));
    t.unref();
    return t;
  },
  clearTimer(handle) {
    if (handle) clearTimeout(handle as unknown as NodeJS.Timeout);
  },
};

/** Retry delays for a failing operation: 10 ms doubling to at most maxMs. */
export function backoffMs(failures: number, maxMs = 1_000, firstMs = 10): number {
  return Math.min(maxMs, firstMs * 2 ** Math.min(failures, 20));
}
