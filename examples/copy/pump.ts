/**
 * The pump: moves the plan's items from a source to a destination, with
 * many requests in flight.
 *
 * @module
 */

import type { Progress } from "../_cli.ts";
import {
  type Destination,
  type Item,
  MAX_ZERO,
  type Source,
} from "./endpoint.ts";
import { blockTester } from "./sparse.ts";

/** Totals for `--verbose`. */
export interface Stats {
  read: number;
  written: number;
  zeroed: number;
}

/**
 * Copies everything `plan` yields from `src` to `dst`, with up to `limit`
 * items in flight spread over `lanes` connections. Stops at the first
 * failure and waits for everything in flight before throwing it.
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
    progress: Progress;
    stats: Stats;
    signal: AbortSignal;
    abort: (reason: unknown) => void;
  },
): Promise<number> {
  const { lanes, limit, requestSize, sparse, progress, stats, signal } = opts;
  const zeroes = dst.zeroMode === "write"
    ? new Uint8Array(requestSize)
    : new Uint8Array(0);
  // Read buffers are reused once their data has been written; a buffer whose
  // item failed is dropped, since an abandoned write may still hold it.
  const pool: Uint8Array[] = [];

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

  const putData = async (offset: number, data: Uint8Array, lane: number) => {
    if (sparse === 0 || dst.zeroMode === "write") {
      stats.written += data.length;
      await dst.write(offset, data, lane, signal);
      return;
    }
    // Runs of all-zero blocks become zero requests (or holes).
    const zeroBlock = blockTester(data);
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

  const active = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let turn: Promise<void> = Promise.resolve();
  let index = 0;
  let end = 0;

  const run = async (item: Item, lane: number, after: Promise<void> | null) => {
    let data = item.data;
    let pooled: Uint8Array | undefined;
    if (!item.zero && data === undefined) {
      if (item.length <= requestSize) {
        pooled = pool.pop() ?? new Uint8Array(requestSize);
      }
      try {
        data = await src.read(item.offset, item.length, lane, signal, pooled);
      } catch (e) {
        throw wrap(`reading ${src.name}`, e);
      }
      stats.read += data.length;
    } else if (data !== undefined) {
      stats.read += data.length;
    }
    if (after) await after;
    signal.throwIfAborted();
    try {
      if (item.zero) await putZero(item.offset, item.length, lane);
      else await putData(item.offset, data!, lane);
    } catch (e) {
      throw wrap(`writing ${dst.name}`, e);
    }
    if (pooled) pool.push(pooled);
    progress.add(item.length);
  };

  try {
    for await (const item of plan) {
      while (active.size >= limit && !failure) await Promise.race(active);
      if (failure) break;
      const lane = index++ % lanes;
      end = Math.max(end, item.offset + item.length);
      let release: () => void = () => {};
      const after = dst.sequential ? turn : null;
      if (dst.sequential) turn = new Promise<void>((r) => release = r);
      const p: Promise<void> = run(item, lane, after)
        .catch((error) => {
          failure ??= { error };
          opts.abort(error);
        })
        .finally(() => {
          release();
          active.delete(p);
        });
      active.add(p);
    }
  } catch (error) {
    failure ??= { error: wrap(`reading ${src.name}`, error) };
    opts.abort(error);
  }
  await Promise.all(active);
  if (failure) throw failure.error;
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
