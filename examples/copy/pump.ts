/**
 * The pump: moves the plan's items from a source to a destination, with
 * many requests in flight.
 *
 * @module
 */

import {
  type Destination,
  type Item,
  MAX_ZERO,
  type Source,
} from "./endpoint.ts";
import { blockTester } from "./sparse.ts";
import type { Blkhasher } from "../../mod.ts";
import type { RateLimiter } from "./rate.ts";

/** Totals for `--verbose`. */
export interface Stats {
  read: number;
  written: number;
  zeroed: number;
}

/** Where the pump counts the bytes it has finished. */
export interface Counter {
  add(bytes: number): void;
}

/**
 * Copies everything `plan` yields from `src` to `dst`, with up to `limit`
 * items in flight spread over `lanes` connections. Stops at the first
 * failure and waits for everything in flight before throwing it.
 *
 * Each of the `limit` slots is one loop with its own buffer, allocated
 * once: it takes the plan's next item, reads it into that buffer, writes
 * it, and takes the next, so that nothing is allocated per request.
 */
export async function pump(
  src: Source,
  dst: Destination,
  plan: AsyncGenerator<Item>,
  opts: {
    lanes: number;
    limit: number;
    requestSize: number;
    sparse: number;
    progress: Counter;
    stats: Stats;
    signal: AbortSignal;
    abort: (reason: unknown) => void;
    /** `--blkhash`: hashes what is read, and zero items unread. */
    hash?: Blkhasher | undefined;
    /** `--rate`: what data items wait for before they are read. */
    limiter?: RateLimiter | undefined;
  },
): Promise<number> {
  const { lanes, limit, requestSize, sparse, progress, stats, signal } = opts;
  const { hash, limiter } = opts;
  const zeroes = dst.zeroMode === "write"
    ? new Uint8Array(requestSize)
    : new Uint8Array(0);
  // Zero detection only where the destination gains from it: a file's
  // holes, a server's WRITE_ZEROES; never where zeroes are written anyway
  // (null:, stdout, a device).
  const detect = sparse !== 0 && dst.zeroMode !== "write";

  const putZero = async (offset: number, length: number, lane: number) => {
    stats.zeroed += length;
    if (dst.zeroMode === "skip") return;
    if (dst.zeroMode === "command") {
      for (let o = offset; o < offset + length; o += MAX_ZERO) {
        await dst.zero(
          o,
          Math.min(MAX_ZERO, offset + length - o),
          lane,
          signal,
        );
      }
      return;
    }
    for (let o = offset; o < offset + length; o += requestSize) {
      const n = Math.min(requestSize, offset + length - o);
      await dst.write(o, zeroes.subarray(0, n), lane, signal);
    }
  };

  const putData = async (
    offset: number,
    data: Uint8Array,
    lane: number,
    zeroBlock: ((from: number, to: number) => boolean) | undefined,
  ) => {
    if (!zeroBlock) {
      stats.written += data.length;
      await dst.write(offset, data, lane, signal);
      return;
    }
    // Runs of all-zero blocks become zero requests (or holes).
    let i = 0;
    while (i < data.length) {
      const zero = zeroBlock(i, Math.min(i + sparse, data.length));
      let j = Math.min(i + sparse, data.length);
      while (
        j < data.length &&
        zeroBlock(j, Math.min(j + sparse, data.length)) === zero
      ) {
        j = Math.min(j + sparse, data.length);
      }
      if (zero) {
        await putZero(offset + i, j - i, lane);
      } else {
        stats.written += j - i;
        await dst.write(offset + i, data.subarray(i, j), lane, signal);
      }
      i = j;
    }
  };

  let failure: { error: unknown } | undefined;
  const fail = (error: unknown) => {
    failure ??= { error };
    opts.abort(error);
  };
  // Writes to a sequential destination go in the order items were taken.
  let turn: Promise<void> = Promise.resolve();
  let end = 0;

  const slot = async (lane: number) => {
    // The slot's buffer: reused for every item, dropped after a failure
    // (an abandoned write may still hold it).
    let buffer: Uint8Array | undefined;
    // The word view for zero detection, made once per buffer.
    let tester: ((from: number, to: number) => boolean) | undefined;
    while (!failure) {
      let next: IteratorResult<Item>;
      try {
        next = await plan.next();
      } catch (error) {
        fail(wrap(`reading ${src.name}`, error));
        return;
      }
      if (next.done || failure) return;
      const item = next.value;
      end = Math.max(end, item.offset + item.length);
      let release: (() => void) | undefined;
      let after: Promise<void> | undefined;
      if (dst.sequential) {
        after = turn;
        turn = new Promise<void>((r) => release = r);
      }
      try {
        let data = item.data;
        if (!item.zero && limiter) await limiter.take(item.length, signal);
        if (!item.zero && data === undefined) {
          if (item.length <= requestSize && !buffer) {
            buffer = new Uint8Array(requestSize);
            tester = detect ? blockTester(buffer) : undefined;
          }
          try {
            data = await src.read(
              item.offset,
              item.length,
              lane,
              signal,
              item.length <= requestSize ? buffer : undefined,
            );
          } catch (e) {
            throw wrap(`reading ${src.name}`, e);
          }
        }
        // The slot's tester serves any data at the start of its buffer.
        const zeroBlock = !detect || data === undefined
          ? undefined
          : buffer && data.buffer === buffer.buffer &&
              data.byteOffset === buffer.byteOffset
          ? tester
          : blockTester(data);
        if (data !== undefined) stats.read += data.length;
        // The hash takes its copy of the bytes at once, so it runs beside
        // the write that holds the buffer.
        const hashed = !hash
          ? undefined
          : item.zero
          ? hash.zero(item.offset, item.length)
          : hash.update(item.offset, data!);
        // Awaited after the write; a failed write must not leave it unheard.
        hashed?.catch(() => {});
        if (after) await after;
        signal.throwIfAborted();
        try {
          if (item.zero) await putZero(item.offset, item.length, lane);
          else await putData(item.offset, data!, lane, zeroBlock);
        } catch (e) {
          throw wrap(`writing ${dst.name}`, e);
        }
        await hashed;
        progress.add(item.length);
      } catch (error) {
        fail(error);
        return;
      } finally {
        release?.();
      }
    }
  };

  const slots: Promise<void>[] = [];
  for (let i = 0; i < limit; i++) slots.push(slot(i % lanes));
  await Promise.all(slots);
  if (failure) {
    // Lets the plan run its own cleanup; it has nothing more to give.
    await plan.return(undefined).catch(() => {});
    throw failure.error;
  }
  return end;
}

/**
 * An error that says what was being done (`reading …`, `writing …`); an
 * abort stays as it is, so that the caller can tell it apart.
 */
export function wrap(what: string, e: unknown): Error {
  if (e instanceof DOMException && e.name === "AbortError") return e;
  const message = e instanceof Error ? e.message : String(e);
  return new Error(`${what}: ${message}`, { cause: e });
}
