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
 * The work for a source of known size, in offset order: data in pieces of
 * at most `requestSize`, and zero extents (from block status) as zero items
 * trimmed inward to `align` so every request stays on block boundaries.
 */
export async function* planRange(
  src: Source,
  size: number,
  requestSize: number,
  align: number,
  useExtents: boolean,
  signal: AbortSignal,
): AsyncGenerator<Item> {
  let dataStart = 0;
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
  let pos = 0;
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
