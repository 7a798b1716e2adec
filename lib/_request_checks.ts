/**
 * The checks a request's arguments pass before anything is sent, pure
 * functions of what the export negotiated: a range in bounds and aligned,
 * a feature advertised, the contexts named; and the largest pieces a
 * request is split into.
 *
 * @module
 */

import { DEFAULT_MAX_PAYLOAD } from "./constants.ts";
import { NbdUnsupportedError } from "./errors.ts";
import type { ExportInfo } from "./export.ts";
import { shown } from "./_resolve_options.ts";

/** Largest read or write payload per request. */
export function maxIo(info: ExportInfo): number {
  return Math.min(info.blockSize.maximum, DEFAULT_MAX_PAYLOAD);
}

/**
 * Largest effect length the request header can carry, kept to multiples
 * of 512 even when the server allows bytes: the spec's advice for
 * interoperable clients, and what libnbd does (nbdkit 1.32 aborts on a
 * block status of 2^32 - 1 bytes).
 */
export function maxEffect(info: ExportInfo): number {
  const align = Math.max(info.blockSize.minimum, 512);
  const top = info.extendedHeaders ? Number.MAX_SAFE_INTEGER : 0xffffffff;
  return top - (top % align);
}

export function need(
  ok: boolean,
  feature: string,
  method: string,
  why: string,
): void {
  if (!ok) {
    throw new NbdUnsupportedError(feature, `${method}(): ${why}`);
  }
}

/** Checks a range against the export: integer, non-empty, in bounds, aligned. */
export function checkRange(
  method: string,
  offset: number,
  length: number,
  info: ExportInfo,
): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new RangeError(
      `${method}(): offset must be a non-negative integer, not ${offset}`,
    );
  }
  if (!Number.isSafeInteger(length) || length <= 0) {
    throw new RangeError(
      `${method}(): length must be a positive integer, not ${length}`,
    );
  }
  if (BigInt(offset) + BigInt(length) > info.size) {
    throw new RangeError(
      `${method}(): range ${offset}+${length} lies beyond the end of the export (size ${info.size})`,
    );
  }
  const min = info.blockSize.minimum;
  if (offset % min !== 0 || length % min !== 0) {
    throw new RangeError(
      `${method}(): offset ${offset} and length ${length} must be multiples of the export's minimum block size ${min}`,
    );
  }
}

/** The ids of `names`, each a negotiated context, or all when absent. */
export function contextIds(
  names: unknown,
  byName: ReadonlyMap<string, number>,
  negotiated: ReadonlyMap<number, string>,
): number[] | undefined {
  if (names === undefined) return undefined;
  if (!Array.isArray(names) || names.length === 0) {
    throw new TypeError(
      `blockStatus(): contexts must be a non-empty array of context names, not ${
        shown(names)
      }`,
    );
  }
  const ids: number[] = [];
  for (const name of names) {
    const id = typeof name === "string" ? byName.get(name) : undefined;
    if (id === undefined) {
      throw new RangeError(
        `blockStatus(): ${
          shown(name)
        } is not a negotiated context (negotiated: ${
          [...negotiated.values()].join(", ")
        })`,
      );
    }
    if (!ids.includes(id)) ids.push(id);
  }
  return ids;
}
