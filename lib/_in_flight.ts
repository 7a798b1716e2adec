/**
 * The client's count of replies the server still owes. A caller that gives
 * up on a request (its signal aborts) stops waiting at once, but its reply
 * is still on its way: the request stays counted here until that reply
 * arrives (or the connection ends), so that `close()` can drain the
 * connection before `NBD_CMD_DISC`, as the spec asks ("the client SHOULD
 * wait until no requests are in flight"). Servers do not all cope with a
 * disconnect while they still owe replies (nbdkit 1.32 aborts).
 *
 * @module
 */

import { abortReason } from "./errors.ts";

/** One request counted from its send to its reply. */
export interface Ticket {
  /** The reply arrived, or the connection ended. */
  settle(): void;
  /** The caller stopped waiting; the reply is still owed. */
  abandon(): void;
}

/** Counts requests in flight and lets callers wait for a free slot or for none. */
export class InFlight {
  #max: number;
  #owed = 0;
  #live = 0;
  #slots: Array<() => void> = [];
  #idle: Array<{ live: boolean; wake: () => void }> = [];

  /** @param max Requests in flight at once. */
  constructor(max: number) {
    this.#max = max;
  }

  /** Replies still owed, to callers who wait and to callers who gave up. */
  get owed(): number {
    return this.#owed;
  }

  /**
   * Takes a free slot at once, if there is one and nobody is queued for it.
   * Synchronous, so that a request made just before `close()` still counts
   * as made before it.
   */
  tryTake(): Ticket | undefined {
    if (this.#owed >= this.#max || this.#slots.length > 0) return undefined;
    this.#owed++;
    return this.#ticket();
  }

  /**
   * Waits for a slot while `max` replies are owed (abandoned requests hold
   * theirs until their replies arrive).
   *
   * @throws the signal's reason when it aborts while waiting.
   */
  async take(signal: AbortSignal | undefined): Promise<Ticket> {
    if (signal?.aborted) throw abortReason(signal);
    const now = this.tryTake();
    if (now) return now;
    await new Promise<void>((resolve, reject) => {
      const grant = () => {
        signal?.removeEventListener("abort", onAbort);
        // Counted here, so the slot cannot be handed out twice.
        this.#owed++;
        resolve();
      };
      const onAbort = () => {
        const i = this.#slots.indexOf(grant);
        if (i >= 0) this.#slots.splice(i, 1);
        reject(abortReason(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#slots.push(grant);
    });
    return this.#ticket();
  }

  /** A ticket for a slot already counted as owed. */
  #ticket(): Ticket {
    this.#live++;
    let live = true;
    let settled = false;
    return {
      settle: () => {
        if (settled) return;
        settled = true;
        this.#owed--;
        if (live) {
          live = false;
          this.#live--;
        }
        this.#changed();
      },
      abandon: () => {
        if (settled || !live) return;
        live = false;
        this.#live--;
        this.#changed();
      },
    };
  }

  /** Resolves once no caller waits for a reply (abandoned ones aside). */
  whenNoneWaiting(): Promise<void> {
    return this.#when(true);
  }

  /** Resolves once no reply at all is owed, to anyone. */
  whenNoneOwed(): Promise<void> {
    return this.#when(false);
  }

  #when(live: boolean): Promise<void> {
    if ((live ? this.#live : this.#owed) === 0) return Promise.resolve();
    return new Promise((wake) => this.#idle.push({ live, wake }));
  }

  #changed(): void {
    // Free slots go to the longest waiters first.
    while (this.#owed < this.#max && this.#slots.length > 0) {
      this.#slots.shift()!();
    }
    if (this.#idle.length === 0) return;
    this.#idle = this.#idle.filter((w) => {
      const done = (w.live ? this.#live : this.#owed) === 0;
      if (done) w.wake();
      return !done;
    });
  }
}
