/**
 * How every request of a client goes out: one {@linkcode WaitQueue} for
 * the slots of every connection, one watch per request on the caller's
 * signal for its whole life (queued, then sent), and requests over the
 * server's maximum split into pieces made as slots free up; and the close
 * that drains them. The checks on arguments are the client's; this only
 * sends.
 *
 * @module
 */

import { COMMAND_NAMES, nameOrNumber } from "./constants.ts";
import type { Connections } from "./connections.ts";
import { deadline, untilAborted, within } from "./_deadline.ts";
import { abortReason, NbdConnectionClosedError } from "./errors.ts";
import type { Command, ExtentsById } from "./transmission.ts";
import {
  type AbortTarget,
  type Waiter,
  WaitQueue,
  type Watch,
  watchAbort,
} from "./_wait_queue.ts";

/**
 * How long `close()` waits, without a signal, for replies owed to callers
 * who gave up, and then for `NBD_CMD_DISC` to be written.
 */
const DRAIN_MS = 2000;
const DISCONNECT_MS = 2000;

/** What a request resolves with. */
export type Reply = Promise<ExtentsById>;

/** Where requests go once they hold a slot. */
export interface Carrier {
  submit(cmd: Command): Reply;
}

/** A watch that only keeps a signal's listener in place. */
const IGNORE_ABORT: AbortTarget = { onAbort(): void {} };

/** Sends a client's requests; see the module doc. */
export class Requests {
  /** Requests in flight over every connection, and their callers' waits. */
  readonly queue: WaitQueue;
  #carrier: Carrier;
  #open: () => boolean;
  #release = (): void => this.queue.release();

  /**
   * @param max Requests in flight at once, over every connection.
   * @param carrier The connections.
   * @param open Whether the client still takes requests (not closing).
   */
  constructor(max: number, carrier: Carrier, open: () => boolean) {
    this.queue = new WaitQueue(max);
    this.#carrier = carrier;
    this.#open = open;
  }

  /**
   * Sends one command. The caller's signal ends the wait, not the request:
   * its reply stays counted until it arrives, so that `close()` can drain.
   */
  send(cmd: Command, signal: AbortSignal | undefined): Reply {
    // A split request's later pieces may come after close() began.
    if (!this.#open()) return Promise.reject(closingError(cmd));
    if (signal === undefined) {
      // The hot path: a free slot, nothing to race.
      if (this.queue.tryTake()) {
        const reply = this.#carrier.submit(cmd);
        reply.then(this.#release, this.#release);
        return reply;
      }
    } else {
      cmd.hold = signal;
    }
    return this.#sendWaiting(cmd, signal);
  }

  async #sendWaiting(cmd: Command, signal: AbortSignal | undefined): Reply {
    if (signal?.aborted) throw abortReason(signal);
    if (!signal) {
      if (!this.queue.tryTake()) {
        await this.queue.take();
        this.#throwIfClosing(cmd);
      }
      const reply = this.#carrier.submit(cmd);
      reply.then(this.#release, this.#release);
      return await reply;
    }
    // One watch on the signal for the request's whole life, queued or sent.
    const caller = new Caller(this.queue, signal);
    if (!this.queue.tryTake()) {
      await caller.slot();
      if (!this.#open()) caller.cancel();
      this.#throwIfClosing(cmd);
    }
    return await caller.follow(this.#carrier.submit(cmd));
  }

  /** A request that waited for a slot while close() began must not go out. */
  #throwIfClosing(cmd: Command): void {
    if (this.#open()) return;
    this.queue.release();
    throw closingError(cmd);
  }

  /**
   * Splits [offset, offset+length) into requests of at most `step` bytes.
   * The pieces are made as slots free up, not all at once: a trim of 2^50
   * bytes holds a few dozen requests, not a quarter of a million.
   */
  split(
    offset: number,
    length: number,
    step: number,
    signal: AbortSignal | undefined,
    make: (offset: number, length: number, rel: number) => Command,
  ): Promise<unknown> {
    // One request: its own promise, with none wrapped around it.
    if (length <= step) return this.send(make(offset, length, 0), signal);
    return this.#splitMany(offset, length, step, signal, make);
  }

  /**
   * A command without data over [offset, offset+length), split into
   * requests of at most `step` bytes.
   */
  splitRange(
    cmd: Command & { offset: number; length: number },
    step: number,
    signal: AbortSignal | undefined,
  ): Promise<unknown> {
    const { type, flags } = cmd;
    return this.split(
      cmd.offset,
      cmd.length,
      step,
      signal,
      (offset, length) => ({ type, flags, offset, length }),
    );
  }

  async #splitMany(
    offset: number,
    length: number,
    step: number,
    signal: AbortSignal | undefined,
    make: (offset: number, length: number, rel: number) => Command,
  ): Promise<void> {
    let next = 0;
    // The first piece, by offset, that failed; no piece starts after one.
    let failedAt = Infinity;
    let failure: unknown;
    const lane = async (): Promise<void> => {
      while (next < length && failedAt === Infinity) {
        const rel = next;
        next += step;
        try {
          await this.send(
            make(offset + rel, Math.min(step, length - rel), rel),
            signal,
          );
        } catch (e) {
          if (rel < failedAt) {
            failedAt = rel;
            failure = e;
          }
        }
      }
    };
    const lanes = Math.min(this.queue.max, Math.ceil(length / step));
    const running: Promise<void>[] = [];
    // Its pieces come and go; this watch keeps the signal's one listener
    // in place between them. The pieces' own watches do the aborting.
    const hold = signal && !signal.aborted
      ? watchAbort(signal, IGNORE_ABORT)
      : undefined;
    try {
      for (let i = 0; i < lanes; i++) running.push(lane());
      await Promise.all(running);
    } finally {
      hold?.cancel();
    }
    if (failedAt !== Infinity) throw failure;
  }
}

/**
 * A caller with a signal: first waiting for a slot, then for the reply to
 * the request that holds it. Its signal is watched once, for both. It ends
 * the wait, not the request, whose reply stays owed until it arrives.
 */
class Caller implements AbortTarget {
  #queue: WaitQueue;
  #signal: AbortSignal;
  #watch: Watch | undefined;
  #waiter: Waiter | undefined = undefined;
  #reply: PromiseWithResolvers<ExtentsById> | undefined = undefined;
  #abandoned = false;

  constructor(queue: WaitQueue, signal: AbortSignal) {
    this.#queue = queue;
    this.#signal = signal;
    this.#watch = watchAbort(signal, this);
  }

  /** Waits for a slot behind the callers already queued. */
  slot(): Promise<void> {
    this.#waiter = this.#queue.enqueue();
    return this.#waiter.promise;
  }

  /**
   * Follows the reply of the request sent with the slot this caller holds.
   *
   * @returns The reply, or a rejection as soon as the signal aborts.
   */
  follow(reply: Reply): Reply {
    this.#waiter = undefined;
    const out = this.#reply = Promise.withResolvers<ExtentsById>();
    // Aborted after its slot was granted, before it went out.
    if (this.#signal.aborted) this.#abandon();
    reply.then(
      (value) => {
        this.#done();
        out.resolve(value);
      },
      (e) => {
        this.#done();
        out.reject(e);
      },
    );
    return out.promise;
  }

  /** Stops watching: the request will not go out. */
  cancel(): void {
    this.#watch?.cancel();
    this.#watch = undefined;
  }

  onAbort(signal: AbortSignal): void {
    this.#watch = undefined;
    if (this.#reply) this.#abandon();
    else this.#waiter?.leave(abortReason(signal));
  }

  /** The caller gave up: reject now; the slot stays taken until the reply. */
  #abandon(): void {
    if (this.#abandoned) return;
    this.#abandoned = true;
    this.#queue.abandon();
    this.#reply!.reject(abortReason(this.#signal));
  }

  #done(): void {
    this.#watch?.cancel();
    this.#queue.release(this.#abandoned);
  }
}

/** A request that came too late: `close()` has begun. */
function closingError(cmd: Command): NbdConnectionClosedError {
  return new NbdConnectionClosedError(
    `Cannot send ${
      nameOrNumber(COMMAND_NAMES, cmd.type)
    }: the connection is closing`,
  );
}

/**
 * The close sequence: requests held for a reconnect fail; then it waits
 * for the callers who still wait, drains what is owed to callers who gave
 * up (at most 2 s), and disconnects (at most 2 s); when `signal` aborts or
 * the server stops reading, it tears the connections down instead.
 *
 * @param tx The connections.
 * @param queue The client's requests.
 * @param signal Bounds the whole close.
 * @param cleanup Runs last (a server subprocess to stop).
 */
export async function shutDown(
  tx: Connections,
  queue: WaitQueue,
  signal: AbortSignal | undefined,
  cleanup: (() => Promise<void>) | undefined,
): Promise<void> {
  // Transmission's own wait is already done here: it only sends.
  const now = AbortSignal.abort();
  // Requests held for a reconnect fail now; none is dialled any more.
  tx.halt();
  try {
    await untilAborted(queue.whenNoneWaiting(), signal);
    {
      using drain = deadline(
        signal,
        DRAIN_MS,
        () => new Error("The drain took too long"),
      );
      try {
        await untilAborted(queue.whenNoneOwed(), drain.signal);
      } catch (e) {
        // The drain's own limit: disconnect anyway. The caller's: cut.
        if (signal?.aborted) throw e;
      }
    }
    using bye = deadline(
      signal,
      DISCONNECT_MS,
      () => new Error("NBD_CMD_DISC could not be written"),
    );
    await untilAborted(tx.disconnect(now), bye.signal);
  } catch {
    // The signal fired, or the server stopped reading: tear down. The
    // disconnect then ends at once, failing what still waits.
    tx.tearDown();
    await within(tx.disconnect(now).catch(() => {}), DISCONNECT_MS);
  } finally {
    await cleanup?.();
  }
}
