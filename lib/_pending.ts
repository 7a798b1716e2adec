/**
 * A request on its way through one connection: the command as the client
 * layer hands it over, and what the reader loop of `transmission.ts` keeps
 * about it until its reply is whole (the bytes covered, the extents, the
 * first error).
 *
 * @module
 */

import { CMD_BLOCK_STATUS, commandName } from "./constants.ts";
import { abortReason, type NbdCommandError } from "./errors.ts";
import type { ReadCoverage } from "./_coverage.ts";
import type { Extent, ExtentBigInt } from "./_replies.ts";
import type { AbortTarget, WaitQueue, Watch } from "./_wait_queue.ts";

/** A request as the client layer hands it over, already checked. */
export interface Command {
  type: number;
  flags: number;
  /**
   * Numbers, or bigints for a request made by a bigint call (block status
   * or a read at or past 2^53); never one of each.
   */
  offset: number | bigint;
  length: number | bigint;
  /**
   * Data to send: the bytes of `NBD_CMD_WRITE`, or the payload form of
   * `NBD_CMD_BLOCK_STATUS` (effect length and context ids, with
   * `NBD_CMD_FLAG_PAYLOAD_LEN` among the flags and `contexts` set).
   */
  payload?: Uint8Array;
  /** Block status in the payload form: the context ids asked about. */
  contexts?: readonly number[];
  /**
   * The caller's signal, for the connections layer only (this class does
   * not look at it): a request held for a reconnect is dropped, not
   * replayed, once it aborts.
   */
  hold?: AbortSignal | undefined;
  /** Where read data lands (`NBD_CMD_READ`); `length` bytes. */
  buffer?: Uint8Array;
  signal?: AbortSignal | undefined;
}

/** Counters of one connection; see {@linkcode Transmission.stats}. */
export interface TransmissionStats {
  bytesSent: number;
  bytesReceived: number;
  /** Requests sent, indexed by command type; index 15 holds the rest. */
  requests: readonly number[];
  /** Simple replies and structured reply chunks received. */
  chunksReceived: number;
}

/**
 * Block status results by metadata context id: bigint extents for a
 * request made with bigint offsets.
 */
export type ExtentsById = Map<number, Extent[] | ExtentBigInt[]>;

/**
 * One request in flight. It is its own abort target, so that a request
 * with a signal costs no closure, and its signal one listener in all.
 */
export class Pending implements ReadCoverage, AbortTarget {
  coveredBytes = 0;
  firstStart = 0;
  firstEnd = 0;
  ranges: Array<[number, number]> | undefined = undefined;
  // Declared, so that every read keeps one object shape.
  bitmap: Uint32Array | undefined = undefined;
  /** Block status received so far (block status commands only). */
  extents: ExtentsById | undefined;
  error: NbdCommandError | undefined = undefined;
  /** The read's buffer was detached; its data went to scratch. */
  detached = false;
  /** The caller stopped waiting (its signal aborted); close() need not wait. */
  abandoned = false;
  /** The watch on the caller's signal, while it waits. */
  watch: Watch | undefined = undefined;

  constructor(
    readonly cookie: number,
    readonly cmd: Command,
    readonly resolve: (extents: ExtentsById) => void,
    readonly reject: (e: Error) => void,
    readonly slots: WaitQueue,
  ) {
    this.extents = cmd.type === CMD_BLOCK_STATUS ? new Map() : undefined;
  }

  /** The caller's signal aborted: reject now, keep the slot until the reply. */
  onAbort(signal: AbortSignal): void {
    this.watch = undefined;
    this.abandoned = true;
    this.slots.abandon();
    this.reject(abortReason(signal));
  }
}

/** A read whose buffer went away fails alone: a caller's mistake. */
export function detachedError(cmd: Command): TypeError {
  return new TypeError(
    `The buffer of ${
      commandName(cmd.type)
    } (offset ${cmd.offset}, length ${cmd.length}) was detached before its data arrived; the data was dropped`,
  );
}
