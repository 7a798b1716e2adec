/**
 * What an export allows, worked out once from its transmission flags and
 * what the session negotiated (as libnbd's `flags.c`): `NbdClient`'s
 * `can…` getters and the `info` tool both read it from here.
 *
 * @module
 */

import {
  FLAG_BLOCK_STAT_PAYLOAD,
  FLAG_CAN_MULTI_CONN,
  FLAG_READ_ONLY,
  FLAG_ROTATIONAL,
  FLAG_SEND_CACHE,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
  TRANSMISSION_FLAG_NAMES,
} from "./constants.ts";

/** What {@linkcode capabilities} needs to know about a session. */
export interface CapabilityFacts {
  /** The transmission flags as the server sent them. */
  flags: number;
  /** Whether structured replies are in use. */
  structuredReplies: boolean;
  /** How many metadata contexts were negotiated (0 if none). */
  metaContexts: number;
  /** Whether extended headers are in use (false if not given). */
  extendedHeaders?: boolean;
}

/** What an export allows; each field is one `NbdClient` getter. */
export interface Capabilities {
  /** The export refuses writes (`NBD_FLAG_READ_ONLY`). */
  readOnly: boolean;
  /** The server says the export behaves like a spinning disk. */
  rotational: boolean;
  /** `flush()` is available (`NBD_FLAG_SEND_FLUSH`). */
  canFlush: boolean;
  /** The `fua` option is available (`NBD_FLAG_SEND_FUA`). */
  canFua: boolean;
  /** `trim()` is available: a writable export with `NBD_FLAG_SEND_TRIM`. */
  canTrim: boolean;
  /** `writeZeroes()` is available: writable, `NBD_FLAG_SEND_WRITE_ZEROES`. */
  canWriteZeroes: boolean;
  /** The `fastZero` option is available: write zeroes and `NBD_FLAG_SEND_FAST_ZERO`. */
  canFastZero: boolean;
  /** `cache()` is available (`NBD_FLAG_SEND_CACHE`). */
  canCache: boolean;
  /** Several connections to the export see each other's writes. */
  canMultiConn: boolean;
  /** The `df` read option is available: structured replies and `NBD_FLAG_SEND_DF`. */
  canDf: boolean;
  /** `blockStatus()` is available: structured replies and a metadata context. */
  canBlockStatus: boolean;
  /**
   * `blockStatus()` can ask for chosen contexts only: extended headers and
   * `NBD_FLAG_BLOCK_STAT_PAYLOAD`.
   */
  canBlockStatusPayload: boolean;
}

/**
 * Works out what an export allows. A flag that needs something the session
 * lacks counts as absent, as libnbd treats it: `NBD_FLAG_SEND_DF` without
 * structured replies, fast zero without write zeroes; a read-only export
 * can neither trim nor write zeroes whatever its flags say.
 *
 * @param facts The flags and what was negotiated.
 * @returns One boolean per capability.
 *
 * @example
 * ```ts
 * import { capabilities } from "@nbd/client";
 * const can = capabilities({ flags: 0x0003, structuredReplies: true, metaContexts: 0 });
 * console.log(can.readOnly, can.canTrim); // true false
 * ```
 */
export function capabilities(facts: CapabilityFacts): Capabilities {
  const has = (bit: number) => (facts.flags & bit) !== 0;
  const readOnly = has(FLAG_READ_ONLY);
  const canWriteZeroes = !readOnly && has(FLAG_SEND_WRITE_ZEROES);
  return {
    readOnly,
    rotational: has(FLAG_ROTATIONAL),
    canFlush: has(FLAG_SEND_FLUSH),
    canFua: has(FLAG_SEND_FUA),
    canTrim: !readOnly && has(FLAG_SEND_TRIM),
    canWriteZeroes,
    canFastZero: canWriteZeroes && has(FLAG_SEND_FAST_ZERO),
    canCache: has(FLAG_SEND_CACHE),
    canMultiConn: has(FLAG_CAN_MULTI_CONN),
    canDf: facts.structuredReplies && has(FLAG_SEND_DF),
    canBlockStatus: facts.structuredReplies && facts.metaContexts > 0,
    canBlockStatusPayload: facts.extendedHeaders === true &&
      has(FLAG_BLOCK_STAT_PAYLOAD),
  };
}

/**
 * The names of the transmission flags set in `flags`, lowest bit first;
 * a bit without a name is written in hex (`"0x8000"`).
 *
 * @param flags Transmission flags.
 * @returns For example `["NBD_FLAG_HAS_FLAGS", "NBD_FLAG_SEND_FLUSH"]`.
 *
 * @example
 * ```ts
 * import { transmissionFlagNames } from "@nbd/client";
 * console.log(transmissionFlagNames(0x0005)); // HAS_FLAGS, SEND_FLUSH
 * ```
 */
export function transmissionFlagNames(flags: number): string[] {
  const names: string[] = [];
  for (let bit = 1; bit !== 0 && bit <= flags; bit <<= 1) {
    if (flags & bit) {
      names.push(TRANSMISSION_FLAG_NAMES[bit] ?? `0x${bit.toString(16)}`);
    }
  }
  return names;
}
