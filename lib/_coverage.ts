/**
 * A read's coverage: which bytes of its buffer the reply's chunks have
 * filled, so that an overlap or a gap is a protocol error, in time linear in
 * the bytes whatever order and size the chunks come in. Pure: no I/O.
 *
 * @module
 */

/**
 * The parts of a read's buffer that chunks have filled so far. The first
 * range is kept in two numbers, so that a reply in one chunk (the common
 * case) allocates nothing; a few more are kept as merged ranges; past
 * {@linkcode MAX_RANGES} of them, one bit per byte of the read. Each chunk
 * then costs time in proportion to its own length, whatever the order the
 * chunks come in (a server may send a read's chunks in any order, one byte
 * each, highest offset first).
 */
export interface ReadCoverage {
  /** Bytes covered so far. */
  coveredBytes: number;
  /** The first range received, relative to the request's offset. */
  firstStart: number;
  firstEnd: number;
  /**
   * Every range, sorted, disjoint and with touching neighbours merged,
   * once there are two or more chunks, until there are too many.
   */
  ranges: Array<[number, number]> | undefined;
  /** One bit per byte of the read, set where covered, after `ranges`. */
  bitmap?: Uint32Array | undefined;
}

/**
 * How many separate ranges a read's coverage keeps before it switches to a
 * bitmap: enough for any real server's data and holes, small enough that
 * inserting into the sorted array costs little.
 */
export const MAX_RANGES = 64;

/**
 * Records `[start, end)` in a read's coverage.
 *
 * @param length The read's length: the size of the bitmap, should one be
 *   needed.
 * @returns `false` (and records nothing) when it overlaps a range already
 *   there.
 */
export function claimRange(
  cov: ReadCoverage,
  start: number,
  end: number,
  length: number,
): boolean {
  if (cov.bitmap) {
    if (!claimBits(cov.bitmap, start, end)) return false;
  } else if (cov.coveredBytes === 0) {
    cov.firstStart = start;
    cov.firstEnd = end;
  } else {
    const ranges = cov.ranges ??= [[cov.firstStart, cov.firstEnd]];
    if (!addRange(ranges, start, end)) return false;
    if (ranges.length > MAX_RANGES) {
      const bitmap = new Uint32Array(Math.ceil(length / 32));
      for (const [from, to] of ranges) claimBits(bitmap, from, to);
      cov.bitmap = bitmap;
      cov.ranges = undefined;
    }
  }
  cov.coveredBytes += end - start;
  return true;
}

/**
 * Inserts [start, end) into sorted disjoint ranges, merged with a
 * neighbour it touches; false on overlap.
 */
export function addRange(
  ranges: Array<[number, number]>,
  start: number,
  end: number,
): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (ranges[mid]![0] < start) lo = mid + 1;
    else hi = mid;
  }
  const before = ranges[lo - 1];
  const after = ranges[lo];
  if (before && before[1] > start) return false;
  if (after && after[0] < end) return false;
  const joinsBefore = before !== undefined && before[1] === start;
  const joinsAfter = after !== undefined && after[0] === end;
  if (joinsBefore && joinsAfter) {
    before[1] = after[1];
    ranges.splice(lo, 1);
  } else if (joinsBefore) before[1] = end;
  else if (joinsAfter) after[0] = start;
  else ranges.splice(lo, 0, [start, end]);
  return true;
}

/**
 * Sets the bits of [start, end) in `bitmap` (bit `i % 32` of word
 * `i / 32` stands for byte `i`), a word at a time.
 *
 * @returns `false` (and sets nothing) when one of them is set already.
 */
export function claimBits(
  bitmap: Uint32Array,
  start: number,
  end: number,
): boolean {
  // Division, not `>>> 5`, which would wrap past 2^32 bytes.
  const first = Math.floor(start / 32);
  const last = Math.floor((end - 1) / 32);
  for (let w = first; w <= last; w++) {
    if ((bitmap[w]! & wordMask(w, first, last, start, end)) !== 0) {
      return false;
    }
  }
  for (let w = first; w <= last; w++) {
    bitmap[w]! |= wordMask(w, first, last, start, end);
  }
  return true;
}

/** The bits of word `w` that [start, end) covers. */
function wordMask(
  w: number,
  first: number,
  last: number,
  start: number,
  end: number,
): number {
  const lo = w === first ? start & 31 : 0;
  const hi = w === last ? ((end - 1) & 31) + 1 : 32;
  return hi - lo === 32 ? -1 : ((1 << (hi - lo)) - 1) << lo;
}
