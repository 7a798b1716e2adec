/**
 * The options every request method of `NbdClient` takes, and
 * the checks run on them before anything is sent.
 *
 * @module
 */

import type { Extent, ExtentBigInt } from "./transmission.ts";
import { checkSignal, shown } from "./_resolve_options.ts";

/** Options every request takes. */
export interface RequestOptions {
  /** Stop waiting when this aborts (the request may still reach the server). */
  signal?: AbortSignal;
}

/** Options of {@linkcode NbdClient.read} and {@linkcode NbdClient.readInto}. */
export interface ReadOptions extends RequestOptions {
  /** Ask the server not to fragment the reply (`NBD_CMD_FLAG_DF`). */
  df?: boolean;
}

/** Options of writes. */
export interface WriteOptions extends RequestOptions {
  /** Force unit access: reply only once the data is durable. */
  fua?: boolean;
}

/** Options of {@linkcode NbdClient.writeZeroes}. */
export interface WriteZeroesOptions extends WriteOptions {
  /** Allocate the zeroes instead of punching a hole (`NBD_CMD_FLAG_NO_HOLE`). */
  noHole?: boolean;
  /** Fail with `ENOTSUP` unless zeroing is faster than writing. */
  fastZero?: boolean;
}

/** Options of {@linkcode NbdClient.blockStatus}. */
export interface BlockStatusOptions extends RequestOptions {
  /** Ask for exactly one extent per context (`NBD_CMD_FLAG_REQ_ONE`). */
  reqOne?: boolean;
  /**
   * Only these negotiated contexts. With `canBlockStatusPayload` the server
   * is asked for them alone (`NBD_CMD_FLAG_PAYLOAD_LEN`); otherwise it is
   * asked for all and the answer is filtered here.
   */
  contexts?: string[];
}

/** Block status by metadata context name. */
export type BlockStatus = Record<string, Extent[]>;

/**
 * Block status by metadata context name, for a request made with bigint
 * offsets: every offset and length exact to 2^63 - 1.
 */
export type BlockStatusBigInt = Record<string, ExtentBigInt[]>;

/**
 * What `blockStatus()` resolves with for offsets of type `T`: bigint
 * extents for bigint offsets, number extents for numbers.
 */
export type BlockStatusOf<T extends number | bigint> = T extends bigint
  ? BlockStatusBigInt
  : BlockStatus;

/**
 * Checks a request's options before anything is sent: an object, an
 * `AbortSignal` if any, and booleans where flags are asked for.
 *
 * @throws {TypeError} naming the method and the option.
 */
export function checkOptions(
  method: string,
  options: unknown,
  flags: readonly string[],
): void {
  if (options === null || typeof options !== "object") {
    throw new TypeError(
      `${method}(): options must be an object, not ${shown(options)}`,
    );
  }
  const fields = options as Record<string, unknown>;
  checkSignal(`${method}()`, fields.signal);
  for (const flag of flags) {
    const v = fields[flag];
    if (v !== undefined && typeof v !== "boolean") {
      throw new TypeError(
        `${method}(): ${flag} must be true or false, not ${shown(v)}`,
      );
    }
  }
}
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * An export's size as a number, the API's rule for every size: exact, or a
 * RangeError that points at the `sizeBigInt` twin.
 */
export function sizeNumber(size: bigint): number {
  if (size > MAX_SAFE) {
    throw new RangeError(
      `The export's size ${size} exceeds Number.MAX_SAFE_INTEGER; use sizeBigInt`,
    );
  }
  return Number(size);
}
