/**
 * What a request sends, as pure functions of what the export negotiated:
 * the checks its arguments pass before anything is sent (a range in
 * bounds and aligned, a feature advertised, the contexts named), the
 * flags its options ask for, the largest pieces it is split into, and the
 * block status request and its answer by context name.
 *
 * @module
 */

import type { Capabilities } from "./capabilities.ts";
import {
  CMD_BLOCK_STATUS,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_PAYLOAD_LEN,
  CMD_FLAG_REQ_ONE,
  DEFAULT_MAX_PAYLOAD,
} from "./constants.ts";
import type { Command, ExtentsById } from "./_pending.ts";
import type { Extent, ExtentBigInt } from "./_replies.ts";
import type {
  BlockStatus,
  BlockStatusBigInt,
  BlockStatusOptions,
} from "./request_options.ts";
import { encodeStatusPayload } from "./_wire.ts";
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

/**
 * {@linkcode maxEffect} for a request made with bigints: with extended
 * headers the most a 64-bit length holds (2^63 - 1, as nbdinfo asks for
 * the rest of an export in one request), aligned the same way.
 */
export function maxEffectBigInt(info: ExportInfo): bigint {
  const align = BigInt(Math.max(info.blockSize.minimum, 512));
  const top = info.extendedHeaders ? 2n ** 63n - 1n : 0xffff_ffffn;
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
    const past = Number.isInteger(offset) && offset > 0
      ? BIGINT_METHODS.includes(method)
        ? `; past 2^53 pass it as a bigint, ${method}(${BigInt(offset)}n, ...)`
        : `; ${method}() reaches offsets up to Number.MAX_SAFE_INTEGER only`
      : "";
    throw new RangeError(
      `${method}(): offset must be a non-negative integer, not ${offset}${past}`,
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

/** The methods that take bigint offsets, exact past 2^53. */
const BIGINT_METHODS = ["blockStatus", "read", "readInto"];

const NBD_MAX_U63 = 2n ** 63n - 1n;

/**
 * {@linkcode checkRange} for bigint offsets: the same rules, exact to
 * 2^63 - 1 (the spec's largest export).
 *
 * @throws {TypeError} unless both are bigints.
 * @throws {RangeError} for a range that is empty, outside the export or
 *   unaligned.
 */
export function checkRangeBigInt(
  method: string,
  offset: bigint,
  length: unknown,
  info: ExportInfo,
): asserts length is bigint {
  if (typeof length !== "bigint") {
    throw new TypeError(
      `${method}(): offset and length must both be numbers or both bigints, not ${typeof offset} and ${typeof length}`,
    );
  }
  if (offset < 0n || offset > NBD_MAX_U63) {
    throw new RangeError(
      `${method}(): offset must be a non-negative integer below 2^63, not ${offset}`,
    );
  }
  if (length <= 0n || length > NBD_MAX_U63) {
    throw new RangeError(
      `${method}(): length must be a positive integer below 2^63, not ${length}`,
    );
  }
  if (offset + length > info.size) {
    throw new RangeError(
      `${method}(): range ${offset}+${length} lies beyond the end of the export (size ${info.size})`,
    );
  }
  const min = BigInt(info.blockSize.minimum);
  if (offset % min !== 0n || length % min !== 0n) {
    throw new RangeError(
      `${method}(): offset ${offset} and length ${length} must be multiples of the export's minimum block size ${min}`,
    );
  }
}

/**
 * The range of a read: {@linkcode checkRange} for a number offset,
 * {@linkcode checkRangeBigInt} for a bigint one (the length, a buffer's,
 * is a number either way).
 */
export function checkReadRange(
  method: string,
  offset: number | bigint,
  length: number,
  info: ExportInfo,
): void {
  if (typeof offset !== "bigint") {
    checkRange(method, offset, length, info);
  } else if (!Number.isSafeInteger(length)) {
    throw new RangeError(
      `${method}(): length must be a positive integer, not ${length}`,
    );
  } else checkRangeBigInt(method, offset, BigInt(length), info);
}

/** `base + rel`, in the type of `base`. */
export function offsetPlus(
  base: number | bigint,
  rel: number,
): number | bigint {
  return typeof base === "bigint" ? base + BigInt(rel) : base + rel;
}

/** The ids of `names`, each a negotiated context, or all when absent. */
export function contextIds(
  names: unknown,
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
  const byName = new Map([...negotiated].map(([id, name]) => [name, id]));
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

/** Each feature a request may need: its name, and why it is refused. */
const FEATURES = {
  canFua: ["fua", "the export does not support FUA"],
  canDf: ["df", "the export does not support DF"],
  canFlush: ["flush", "the export does not support flush"],
  canTrim: ["trim", "the export does not support trim"],
  canWriteZeroes: ["writeZeroes", "the export does not support write zeroes"],
  canFastZero: ["fastZero", "the export does not support fast zero"],
  canCache: ["cache", "the export does not support cache"],
  canBlockStatus: [
    "blockStatus",
    "no metadata context was negotiated (pass metaContexts to connect())",
  ],
} as const satisfies Partial<
  Record<keyof Capabilities, readonly [string, string]>
>;

/**
 * Refuses a request the export does not advertise a feature for.
 *
 * @throws {NbdUnsupportedError} naming the feature and the method.
 */
export function requireFeature(
  can: Capabilities,
  feature: keyof typeof FEATURES,
  method: string,
): void {
  const [name, why] = FEATURES[feature];
  need(can[feature], name, method, why);
}

/** Refuses a write to a read-only export. */
export function requireWritable(can: Capabilities, method: string): void {
  need(!can.readOnly, "write", method, "the export is read-only");
}

/** `NBD_CMD_FLAG_FUA` when asked for, if the export offers it. */
export function fuaFlag(
  can: Capabilities,
  method: string,
  fua: boolean | undefined,
): number {
  if (!fua) return 0;
  requireFeature(can, "canFua", method);
  return CMD_FLAG_FUA;
}

/**
 * The block status request for `length` bytes at `offset`: its effect
 * length kept to what the header carries, and, when only some contexts
 * are asked about and the export allows it, in the payload form that
 * names them. Bigint offsets make a bigint request (its reply has bigint
 * extents).
 */
export function blockStatusCommand(
  info: ExportInfo,
  payloadForm: boolean,
  offset: number | bigint,
  length: number | bigint,
  reqOne: boolean,
  ids: number[] | undefined,
): Command {
  let effect: number | bigint;
  if (typeof length === "bigint") {
    const top = maxEffectBigInt(info);
    effect = length < top ? length : top;
  } else {
    effect = Math.min(length, maxEffect(info));
  }
  const flags = reqOne ? CMD_FLAG_REQ_ONE : 0;
  return ids && payloadForm
    ? {
      type: CMD_BLOCK_STATUS,
      flags: flags | CMD_FLAG_PAYLOAD_LEN,
      offset,
      length: effect,
      payload: encodeStatusPayload(effect, ids),
      contexts: ids,
    }
    : { type: CMD_BLOCK_STATUS, flags, offset, length: effect };
}

/**
 * Checks a block status call, before anything is sent, and makes its
 * request: the range (numbers, or bigints exact to 2^63 - 1), the feature,
 * the contexts named.
 *
 * @returns The command, and the ids of the contexts asked about.
 * @throws {RangeError} for a bad range or an unknown context.
 * @throws {TypeError} for a bigint and a number mixed, or bad contexts.
 * @throws {NbdUnsupportedError} when no context was negotiated.
 */
export function blockStatusRequest(
  info: ExportInfo,
  can: Capabilities,
  [offset, length]: [number | bigint, number | bigint],
  options: BlockStatusOptions,
): [Command, number[] | undefined] {
  if (typeof offset === "bigint") {
    checkRangeBigInt("blockStatus", offset, length, info);
  } else checkRange("blockStatus", offset, length as number, info);
  requireFeature(can, "canBlockStatus", "blockStatus");
  const ids = contextIds(options.contexts, info.metaContexts);
  const cmd = blockStatusCommand(
    info,
    can.canBlockStatusPayload,
    offset,
    length,
    options.reqOne === true,
    ids,
  );
  return [cmd, ids];
}

/** Block status by context name, only the contexts asked about (all without `ids`). */
export function byContextName(
  byId: ExtentsById,
  ids: number[] | undefined,
  contexts: ReadonlyMap<number, string>,
): BlockStatus | BlockStatusBigInt {
  const out: Record<string, Extent[] | ExtentBigInt[]> = {};
  for (const [id, extents] of byId) {
    if (!ids || ids.includes(id)) out[contexts.get(id)!] = extents;
  }
  return out as BlockStatus | BlockStatusBigInt;
}

/** The flags of `NBD_CMD_WRITE_ZEROES` its options ask for, each offered. */
export function zeroFlags(
  can: Capabilities,
  options: { fua?: boolean; noHole?: boolean; fastZero?: boolean },
): number {
  let flags = fuaFlag(can, "writeZeroes", options.fua);
  if (options.noHole) flags |= CMD_FLAG_NO_HOLE;
  if (options.fastZero) {
    requireFeature(can, "canFastZero", "writeZeroes");
    flags |= CMD_FLAG_FAST_ZERO;
  }
  return flags;
}

/**
 * The largest piece of a write zeroes or a cache: the effect length the
 * header carries, and the server's maximum payload too, which a server may
 * apply to them (a fast zero is not split by it: it must not be slow).
 */
export function zeroStep(info: ExportInfo, fastZero: boolean): number {
  return fastZero
    ? maxEffect(info)
    : Math.min(maxEffect(info), info.blockSize.maximum);
}
