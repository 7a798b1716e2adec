/**
 * Incremental copies: the extents a metadata context marks (the dirty
 * blocks of `qemu:dirty-bitmap:NAME`), walked over the whole source, and
 * the plan that copies only those onto an earlier full copy.
 *
 * @module
 */

import { UsageError } from "../_cli.ts";
import type { Item, Source } from "./endpoint.ts";
import { alignDown, alignUp, planRange } from "./plan.ts";

/**
 * How much one block status request asks about. The server may answer for
 * less, and the walk goes on from where its answer ended.
 */
export const STATUS_WINDOW = 1024 * 1024 * 1024;

/** One extent as a context describes it. */
export interface StatusExtent {
  length: number;
  flags: number;
}

/** Asks the source about `[offset, offset + length)` in one context. */
export type StatusQuery = (
  offset: number,
  length: number,
  signal: AbortSignal,
) => Promise<StatusExtent[]>;

/**
 * The extents to copy, in offset order, adjacent ones merged. Two arrays
 * of numbers rather than one object per extent: a badly fragmented bitmap
 * of a large disk has millions of them.
 */
export interface DirtyMap {
  offsets: number[];
  lengths: number[];
  /** The sum of `lengths`. */
  bytes: number;
}

/**
 * Parses `--dirty-flags`: a decimal or `0x` hexadecimal 32-bit mask.
 *
 * @throws {UsageError} If it is not a number from 1 to 0xffffffff.
 */
export function parseMask(text: string): number {
  const n = /^0x[0-9a-f]{1,8}$/i.test(text)
    ? Number.parseInt(text.slice(2), 16)
    : /^\d{1,10}$/.test(text)
    ? Number(text)
    : NaN;
  if (!(n >= 1 && n <= 0xffffffff)) {
    throw new UsageError(
      `--dirty-flags: expected a mask from 1 to 0xffffffff, got "${text}"`,
    );
  }
  return n;
}

/**
 * Checks a `--dirty` context name as far as the spec allows without asking
 * the server: `namespace:name`, at most 4096 bytes.
 *
 * @throws {UsageError} If it cannot be a context name.
 */
export function checkContext(name: string): void {
  const colon = name.indexOf(":");
  if (colon <= 0 || colon === name.length - 1) {
    throw new UsageError(
      `--dirty: "${name}" is not a metadata context (namespace:name, e.g. qemu:dirty-bitmap:b0)`,
    );
  }
  if (new TextEncoder().encode(name).length > 4096) {
    throw new UsageError("--dirty: a context name has at most 4096 bytes");
  }
}

/** Appends an extent, merging it into the last one when they touch. */
function push(map: DirtyMap, offset: number, length: number): void {
  const last = map.offsets.length - 1;
  if (last >= 0 && map.offsets[last]! + map.lengths[last]! === offset) {
    map.lengths[last]! += length;
  } else {
    map.offsets.push(offset);
    map.lengths.push(length);
  }
  map.bytes += length;
}

/**
 * Walks the context over `[0, size)` and keeps the extents whose flags meet
 * `mask`. Every reply must move the walk forward, so the number of requests
 * is bounded by the size; an answer past the end is cut at the end.
 *
 * @throws {Error} When a reply describes nothing, or a request fails.
 */
export async function walkDirty(
  query: StatusQuery,
  size: number,
  mask: number,
  signal: AbortSignal,
): Promise<DirtyMap> {
  const map: DirtyMap = { offsets: [], lengths: [], bytes: 0 };
  let pos = 0;
  while (pos < size) {
    const extents = await query(
      pos,
      Math.min(size - pos, STATUS_WINDOW),
      signal,
    );
    const before = pos;
    for (const e of extents) {
      if (pos >= size) break;
      const end = Math.min(pos + e.length, size);
      if ((e.flags & mask) !== 0) push(map, pos, end - pos);
      pos = end;
    }
    if (pos === before) {
      throw new Error(`no extents returned at offset ${pos}`);
    }
  }
  return map;
}

/**
 * The map with every extent widened to `align` (the block size both ends
 * require) and merged again. A qemu bitmap's granularity is a multiple of
 * any block size, so this changes nothing there; for another context the
 * few bytes added are the source's own, which the copy already holds.
 */
export function alignMap(map: DirtyMap, align: number, size: number): DirtyMap {
  if (align <= 1) return map;
  const out: DirtyMap = { offsets: [], lengths: [], bytes: 0 };
  let pending: { a: number; b: number } | undefined;
  for (let i = 0; i < map.offsets.length; i++) {
    const a = alignDown(map.offsets[i]!, align);
    const b = Math.min(alignUp(map.offsets[i]! + map.lengths[i]!, align), size);
    if (pending && a <= pending.b) {
      pending.b = Math.max(pending.b, b);
      continue;
    }
    if (pending) push(out, pending.a, pending.b - pending.a);
    pending = { a, b };
  }
  if (pending) push(out, pending.a, pending.b - pending.a);
  return out;
}

/** The work for an incremental copy: the map's extents as data items. */
export async function* planDirty(
  map: DirtyMap,
  requestSize: number,
): AsyncGenerator<Item> {
  for (let i = 0; i < map.offsets.length; i++) {
    const end = map.offsets[i]! + map.lengths[i]!;
    for (let o = map.offsets[i]!; o < end; o += requestSize) {
      yield { offset: o, length: Math.min(requestSize, end - o), zero: false };
    }
  }
}

/**
 * The work for an incremental copy split by the source's block status:
 * each dirty extent is planned as a full copy plans its range, so what
 * reads as zero becomes a zero item (write zeroes on the destination) and
 * only the rest is read. Without `base:allocation`, {@linkcode planDirty}.
 */
export async function* planDirtyExtents(
  src: Source,
  map: DirtyMap,
  requestSize: number,
  align: number,
  signal: AbortSignal,
): AsyncGenerator<Item> {
  if (!src.hasExtents) {
    yield* planDirty(map, requestSize);
    return;
  }
  for (let i = 0; i < map.offsets.length; i++) {
    const start = map.offsets[i]!;
    const end = start + map.lengths[i]!;
    yield* planRange(src, end, requestSize, align, true, signal, start);
  }
}

/**
 * The map as `--map-only` prints it: one `offset length` line per extent,
 * or with `json` one JSON array of `{offset, length}`.
 */
export function formatMap(map: DirtyMap, json: boolean): string {
  if (json) {
    const items = map.offsets.map((o, i) =>
      JSON.stringify({ offset: o, length: map.lengths[i]! })
    );
    return items.length === 0 ? "[]\n" : `[\n${items.join(",\n")}\n]\n`;
  }
  const last = map.offsets.length - 1;
  const width = last < 0
    ? 1
    : String(map.offsets[last]! + map.lengths[last]!).length;
  return map.offsets.map((o, i) =>
    `${String(o).padStart(width)} ${String(map.lengths[i]!).padStart(width)}\n`
  ).join("");
}
