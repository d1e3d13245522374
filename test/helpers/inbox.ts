// A queue with awaitable, predicate-matched takes, so tests wait on events rather than sleeps.

interface Waiter<T> {
  match: (v: T) => boolean;
  resolve: (v: T) => void;
}

export class Inbox<T> {
  private items: T[] = [];
  private waiters: Waiter<T>[] = [];

  constructor(private readonly defaultTimeoutMs = 5_000) {}

  /** Hands v to the oldest waiter it matches, or keeps it for a later take(). */
  push = (v: T): void => {
    const i = this.waiters.findIndex((w) => w.match(v));
    if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(v);
    else this.items.push(v);
  };

  /** The first kept or future item that matches; rejects after timeoutMs naming `what`. */
  take(match: (v: T) => boolean = () => true, timeoutMs = this.defaultTimeoutMs, what = "item"): Promise<T> {
    const i = this.items.findIndex(match);
    if (i >= 0) return Promise.resolve(this.items.splice(i, 1)[0]!);
    return new Promise<T>((resolve, reject) => {
      const w: Waiter<T> = {
        match,
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** True if nothing matching arrives within ms (a deliberate "nothing happens" check). */
  async none(match: (v: T) => boolean, ms: number): Promise<boolean> {
    return this.take(match, ms).then(
      () => false,
      () => true,
    );
  }

  /** Items kept, not yet taken. */
  get size(): number {
    return this.items.length;
  }
}
