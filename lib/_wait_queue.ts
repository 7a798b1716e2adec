/**
 * Waiting, in one place: a count of requests in flight with a FIFO of
 * callers waiting for a free slot ({@linkcode WaitQueue}), and abort
 * watching that adds one listener per distinct `AbortSignal`, however many
 * requests share it ({@linkcode watchAbort}).
 *
 * Adding and removing a listener costs time linear in the listeners a
 * signal already has, so a listener per request makes 40,000 requests on
 * one signal quadratic. Here every watcher of a signal hangs off one
 * listener in a doubly linked list, and every waiter off the queue's list:
 * joining and leaving either is constant time.
 *
 * A request is counted from the moment it takes a slot until its reply
 * arrives (or its connection ends). A caller that gives up (its signal
 * aborts) stops waiting at once, but its reply is still owed: it stays
 * counted as owed, no longer as live, so that `close()` can first wait for
 * the callers who still wait and then drain what the server still owes, as
 * the spec asks ("the client SHOULD wait until no requests are in flight").
 *
 * @module
 */

import { abortReason } from "./errors.ts";

/** What a signal's abort reaches. */
export interface AbortTarget {
  /** The signal aborted; called once, in the order the watches were made. */
  onAbort(signal: AbortSignal): void;
}

/** One watcher of one signal; {@linkcode Watch.cancel} unhooks it. */
export class Watch {
  /** Neighbours in the signal's list. */
  prev: Watch | undefined = undefined;
  next: Watch | undefined = undefined;

  /**
   * @param group The signal's list, or `undefined` once unhooked.
   * @param target What the abort reaches.
   */
  constructor(
    public group: SignalWatchers | undefined,
    readonly target: AbortTarget,
  ) {}

  /** Stops watching, in constant time; a no-op once fired or cancelled. */
  cancel(): void {
    this.group?.remove(this);
  }
}

/**
 * Every watcher of one signal, behind the one listener this module adds to
 * it. The listener goes once the last watcher leaves.
 */
class SignalWatchers implements EventListenerObject {
  head: Watch | undefined = undefined;
  tail: Watch | undefined = undefined;

  constructor(readonly signal: AbortSignal) {}

  add(w: Watch): void {
    if (this.tail) {
      this.tail.next = w;
      w.prev = this.tail;
    } else {
      this.head = w;
      this.signal.addEventListener("abort", this);
      groups.set(this.signal, this);
    }
    this.tail = w;
  }

  remove(w: Watch): void {
    if (w.prev) w.prev.next = w.next;
    else this.head = w.next;
    if (w.next) w.next.prev = w.prev;
    else this.tail = w.prev;
    w.prev = w.next = w.group = undefined;
    if (!this.head) this.#detach();
  }

  #detach(): void {
    this.signal.removeEventListener("abort", this);
    groups.delete(this.signal);
  }

  /** The signal aborted: every watcher, in order, each once. */
  handleEvent(): void {
    let w = this.head;
    this.head = this.tail = undefined;
    this.#detach();
    while (w) {
      const next = w.next;
      w.prev = w.next = w.group = undefined;
      w.target.onAbort(this.signal);
      w = next;
    }
  }
}

/** The watchers of each signal watched now; a signal leaves with its last. */
const groups = new Map<AbortSignal, SignalWatchers>();

/**
 * Calls `target.onAbort(signal)` when `signal` aborts, through one listener
 * per distinct signal.
 *
 * @param signal A signal that has not aborted yet.
 * @param target What to tell.
 * @returns The watch, to cancel once the wait is over.
 */
export function watchAbort(signal: AbortSignal, target: AbortTarget): Watch {
  const group = groups.get(signal) ?? new SignalWatchers(signal);
  const w = new Watch(group, target);
  group.add(w);
  return w;
}

/** How many signals have a listener from this module now (for tests). */
export function watchedSignals(): number {
  return groups.size;
}

/** A caller waiting for a slot, in the queue's list. */
export class Waiter implements AbortTarget {
  prev: Waiter | undefined = undefined;
  next: Waiter | undefined = undefined;
  watch: Watch | undefined = undefined;
  /** Still in the list: neither granted nor gone. */
  queued = true;
  /** Settles once a slot is granted, or rejects once the waiter leaves. */
  readonly promise: Promise<void>;
  readonly resolve: () => void;
  readonly #reject: (e: Error) => void;
  readonly #queue: WaitQueue;

  constructor(queue: WaitQueue) {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    this.promise = promise;
    this.resolve = resolve;
    this.#reject = reject;
    this.#queue = queue;
  }

  /** Leaves the queue in constant time, rejecting with `reason`; a no-op once granted. */
  leave(reason: Error): void {
    if (!this.queued) return;
    this.watch?.cancel();
    this.watch = undefined;
    this.#queue.unlink(this);
    this.#reject(reason);
  }

  onAbort(signal: AbortSignal): void {
    this.watch = undefined;
    this.leave(abortReason(signal));
  }
}

/**
 * Requests in flight, at most `max` at once, and the callers waiting for a
 * slot, first come first served. Counts only: the caller says when a
 * request it counted ends ({@linkcode WaitQueue.release}) or when its
 * caller gave up on it ({@linkcode WaitQueue.abandon}).
 */
export class WaitQueue {
  readonly #max: number;
  #owed = 0;
  #live = 0;
  #head: Waiter | undefined = undefined;
  #tail: Waiter | undefined = undefined;
  #waiting = 0;
  #idle: Array<{ live: boolean; wake: () => void }> = [];

  /** @param max Requests in flight at once. */
  constructor(max: number) {
    this.#max = max;
  }

  /** Requests in flight at once, at most. */
  get max(): number {
    return this.#max;
  }

  /** Requests counted: replies owed, to callers who wait or gave up. */
  get owed(): number {
    return this.#owed;
  }

  /** Requests counted whose callers still wait. */
  get live(): number {
    return this.#live;
  }

  /** Callers waiting for a slot. */
  get waiting(): number {
    return this.#waiting;
  }

  /**
   * Takes a slot at once, if one is free and nobody is queued for it.
   * Synchronous, so that a request made just before `close()` counts as
   * made before it.
   */
  tryTake(): boolean {
    if (this.#owed >= this.#max || this.#head) return false;
    this.#owed++;
    this.#live++;
    return true;
  }

  /**
   * Waits for a slot, behind the callers already waiting.
   *
   * @param signal Stops the wait (the caller leaves the queue at once).
   * @throws the signal's reason when it aborts while waiting.
   */
  take(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    if (this.tryTake()) return Promise.resolve();
    const w = this.enqueue();
    if (signal) w.watch = watchAbort(signal, w);
    return w.promise;
  }

  /**
   * Joins the end of the queue, for a caller that watches its own signal
   * (one watch for the whole life of a request) and calls
   * {@linkcode Waiter.leave} when it gives up.
   *
   * @returns The waiter, whose `promise` settles once a slot is granted.
   */
  enqueue(): Waiter {
    const w = new Waiter(this);
    if (this.#tail) {
      this.#tail.next = w;
      w.prev = this.#tail;
    } else {
      this.#head = w;
    }
    this.#tail = w;
    this.#waiting++;
    return w;
  }

  /** Takes `w` out of the list (it was granted, or it gave up). */
  unlink(w: Waiter): void {
    if (!w.queued) return;
    w.queued = false;
    if (w.prev) w.prev.next = w.next;
    else this.#head = w.next;
    if (w.next) w.next.prev = w.prev;
    else this.#tail = w.prev;
    w.prev = w.next = undefined;
    this.#waiting--;
  }

  /** The caller of a counted request stopped waiting; its reply is owed. */
  abandon(): void {
    this.#live--;
    this.#changed();
  }

  /**
   * A counted request ended: its reply arrived or its connection did.
   *
   * @param abandoned Whether {@linkcode WaitQueue.abandon} was called for it.
   */
  release(abandoned = false): void {
    this.#owed--;
    if (!abandoned) this.#live--;
    this.#changed();
  }

  /**
   * Grants every waiter a slot, over the limit if need be: the connection
   * failed, and each will find that out when it tries to send.
   */
  grantAll(): void {
    while (this.#head) this.#grant(this.#head);
  }

  /** Wakes whoever waits for the queue to empty, empty or not. */
  wakeIdle(): void {
    for (const w of this.#idle.splice(0)) w.wake();
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

  #grant(w: Waiter): void {
    this.unlink(w);
    w.watch?.cancel();
    w.watch = undefined;
    // Counted here, so the slot cannot be handed out twice.
    this.#owed++;
    this.#live++;
    w.resolve();
  }

  #changed(): void {
    // Free slots go to the longest waiters first.
    while (this.#owed < this.#max && this.#head) this.#grant(this.#head);
    if (this.#idle.length === 0) return;
    this.#idle = this.#idle.filter((w) => {
      const done = (w.live ? this.#live : this.#owed) === 0;
      if (done) w.wake();
      return !done;
    });
  }
}
