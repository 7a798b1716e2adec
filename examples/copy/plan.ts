/**
 * The plan: how the range of a source is split into items of work.
 *
 * @module
 */

import { type Item, MAX_ZERO, type Source } from "./endpoint.ts";

/** `n` rounded up to a multiple of `a`. */
export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** `n` rounded down to a multiple of `a`. */
export function alignDown(n: number, a: number): number {
  return Math.floor(n / a) * a;
}

/**
 * The work for bytes `[start, size)` of a source, in offset order: data in
 * pieces of at most `requestSize`, and zero extents (from block status) as
 * zero items trimmed inward to `align` so every request stays on block
 * boundaries. `start` and `size` are multiples of `align` (or `size` is the
 * source's end).
 */
export async function* planRange(
  src: Source,
  size: number,
  requestSize: number,
  align: number,
  useExtents: boolean,
  signal: AbortSignal,
  start = 0,
): AsyncGenerator<Item> {
  let dataStart = start;
  function* dataUpTo(end: number, wholeOnly: boolean): Generator<Item> {
    while (dataStart < end) {
      const n = Math.min(requestSize, end - dataStart);
      if (wholeOnly && n < requestSize) return;
      yield { offset: dataStart, length: n, zero: false };
      dataStart += n;
    }
  }
  if (!useExtents) {
    yield* dataUpTo(size, false);
    return;
  }
  let pos = start;
  while (pos < size) {
    const extents = await src.extents(
      pos,
      Math.min(size - pos, MAX_ZERO),
      signal,
    );
    const before = pos;
    for (const e of extents) {
      if (pos >= size) break;
      const a = pos;
      const b = Math.min(pos + e.length, size);
      pos = b;
      if (!e.zero) {
        yield* dataUpTo(b, true);
        continue;
      }
      const za = alignUp(a, align);
      const zb = b === size ? size : alignDown(b, align);
      if (za >= zb) continue; // too small to zero alone; read with its data
      yield* dataUpTo(za, false);
      for (let o = za; o < zb; o += MAX_ZERO) {
        yield { offset: o, length: Math.min(MAX_ZERO, zb - o), zero: true };
      }
      dataStart = zb;
    }
    if (pos === before) {
      throw new Error(`${src.name}: no extents returned at offset ${pos}`);
    }
  }
  yield* dataUpTo(size, false);
}

/** Bytes per stripe: the unit of work one connection claims at a time. */
export const STRIPE = 128 * 1024 * 1024;

/**
 * How a range is shared between connections, each in its own thread: the
 * source is cut into stripes of `stripe` bytes (a multiple of the request
 * size and of the alignment), and each connection claims the next one
 * unclaimed through `claim()` (an atomic counter shared by every thread)
 * and copies it as {@linkcode planRange} plans it, until none is left. A
 * connection that runs faster simply claims more stripes.
 *
 * @param claim Returns the index of the next unclaimed stripe.
 */
export async function* planStripes(
  src: Source,
  size: number,
  stripe: number,
  claim: () => number,
  requestSize: number,
  align: number,
  useExtents: boolean,
  signal: AbortSignal,
): AsyncGenerator<Item> {
  for (;;) {
    const start = claim() * stripe;
    if (start >= size) return;
    const end = Math.min(size, start + stripe);
    yield* planRange(src, end, requestSize, align, useExtents, signal, start);
  }
}

/** The stripe size for a request size and alignment: about {@linkcode STRIPE}. */
export function stripeSize(requestSize: number, align: number): number {
  const unit = alignUp(requestSize, align);
  return Math.max(unit, alignDown(STRIPE, unit));
}

/** The work for a stream: read ahead one request at a time. */
export async function* planStream(
  src: Source,
  requestSize: number,
  limit: number | undefined,
): AsyncGenerator<Item> {
  let offset = 0;
  for (;;) {
    const data = await src.next(requestSize);
    if (data === null) return;
    if (limit !== undefined && offset + data.length > limit) {
      throw new Error(
        `destination is too small: ${limit} bytes, the source has more`,
      );
    }
    yield { offset, length: data.length, zero: false, data };
    offset += data.length;
    if (data.length < requestSize) return;
  }
}
