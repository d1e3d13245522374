// Acks to JetStream, a few at a time. At fan-out rates every delivery arrives in an event-loop turn
// of its own, and so does its ack (after the controller's) or, for an echo, its immediate ack:
// each cost a write to the NATS socket, the relay's largest cost after the controller's socket in
// its profile. An ack is not on any latency path (the ack wait is 30 s), so each waits up to
// delayMs for company — more acks, or a publish or pull going out anyway (flush() is called
// first, and the socket is corked for the turn) — and they leave in one write. At most `max`
// wait, so a busy consumer's max_ack_pending window is never held up by more than one batch.

export interface AckBatcherOptions {
  delayMs: number;
  max: number;
  /** Sends one ack (a +ACK to a reply subject); may throw (closed connection). */
  send(reply: string): void;
  /** A send threw: the message will be redelivered. */
  failed(err: unknown, reply: string): void;
}

export class AckBatcher {
  private pending: string[] = [];
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly o: AckBatcherOptions) {}

  get size(): number {
    return this.pending.length;
  }

  add(reply: string): void {
    this.pending.push(reply);
    if (this.pending.length >= this.o.max) this.flush();
    else this.timer ??= setTimeout(() => this.flush(), this.o.delayMs);
  }

  /** Sends everything waiting, now (before another write, and before closing). */
  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.pending.length === 0) return;
    const batch = this.pending;
    this.pending = [];
    for (const reply of batch) {
      try {
        this.o.send(reply);
      } catch (err) {
        this.o.failed(err, reply);
      }
    }
  }
}
