/**
 * What `copy` copies between: the {@linkcode Source} and
 * {@linkcode Destination} interfaces every endpoint kind implements, the
 * units of work that flow between them, and the settings that shape how
 * endpoints are opened.
 *
 * @module
 */

/** Largest single WRITE_ZEROES, and the block status window. */
export const MAX_ZERO = 1024 * 1024 * 1024;

/** A stretch of the source: zero (skip reading) or data. */
export interface Extent {
  length: number;
  zero: boolean;
}

/** One unit of work for the pipeline. */
export interface Item {
  offset: number;
  length: number;
  zero: boolean;
  /** Already read, for a stream source. */
  data?: Uint8Array;
}

/** What the copy reads from. */
export interface Source {
  readonly name: string;
  /** `undefined` for a stream (stdin, a pipe) whose length is unknown. */
  readonly size: number | undefined;
  readonly alignment: number;
  /** How many connections this side could use (Infinity for files). */
  readonly maxLanes: number;
  /** Whether {@linkcode Source.extents} can say where the zeroes are. */
  readonly hasExtents: boolean;
  extents(
    offset: number,
    length: number,
    signal: AbortSignal,
  ): Promise<Extent[]>;
  /**
   * Reads `length` bytes at `offset`, into `into` (at least `length` bytes
   * long) when given, so that buffers can be reused.
   */
  read(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
    into?: Uint8Array,
  ): Promise<Uint8Array>;
  /** For streams: up to `length` bytes, shorter only at the end; null at EOF. */
  next(length: number): Promise<Uint8Array | null>;
  /** Opens more connections (or descriptors) until there are `n`. */
  addLanes(n: number, signal: AbortSignal): Promise<void>;
  /** How a worker thread opens a lane of its own, where one can. */
  lane?(): LaneSpec;
  /**
   * Lets go of everything. `signal` bounds the wait for requests still in
   * flight; past it the connections are torn down.
   */
  close(signal: AbortSignal): Promise<void>;
}

/**
 * How the destination comes to read zeroes: it already does ("skip": a new
 * file, `null:`, `--destination-is-zero`), a command ("command":
 * WRITE_ZEROES), or only by writing zero bytes ("write": stdout, a device).
 */
export type ZeroMode = "skip" | "command" | "write";

/** What the copy writes to. */
export interface Destination {
  readonly name: string;
  /** `undefined` when it grows to fit (files, stdout, `null:`). */
  readonly size: number | undefined;
  /** Writes must arrive in offset order (stdout, a pipe). */
  readonly sequential: boolean;
  readonly alignment: number;
  readonly preferred: number;
  readonly maxLanes: number;
  readonly zeroMode: ZeroMode;
  /** Checks the destination can take `size` bytes and gets it ready. */
  prepare(size: number | undefined): Promise<void>;
  write(
    offset: number,
    data: Uint8Array,
    lane: number,
    signal: AbortSignal,
  ): Promise<void>;
  /** Only called in "command" mode. */
  zero(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
  ): Promise<void>;
  /** Called after the last write with the number of bytes copied. */
  finish(total: number, flush: boolean, signal: AbortSignal): Promise<void>;
  /** Opens more connections (or descriptors) until there are `n`. */
  addLanes(n: number, signal: AbortSignal): Promise<void>;
  /** As {@linkcode Source.lane}. */
  lane?(): LaneSpec;
  /** As {@linkcode Source.close}. */
  close(signal: AbortSignal): Promise<void>;
}

/**
 * How another thread opens its own lane of an endpoint: an NBD export (one
 * more connection), a file or block device (one more descriptor, never
 * created or truncated), or `null:`.
 */
export type LaneSpec =
  | { kind: "nbd"; uri: string; role: "source" | "destination" }
  | {
    kind: "file";
    path: string;
    role: "source" | "destination";
    zeroMode: ZeroMode;
    size: number | undefined;
  }
  | { kind: "null" };

/** Settings that shape how endpoints are opened. */
export interface Settings {
  connections: number;
  /** `--threads`: the most threads, and so connections, to copy with. */
  threads: number;
  requests: number;
  queueSize: number;
  requestSize: number;
  sparse: number | undefined;
  allocated: boolean;
  destinationIsZero: boolean;
  extents: boolean;
  flush: boolean;
  verbose: boolean;
  /**
   * The metadata context an incremental copy (`--dirty`) follows; the
   * source negotiates it instead of `base:allocation`.
   */
  dirty: string | undefined;
  /**
   * `--reconnect[=SECONDS]`: NBD ends survive a lost connection for this
   * many seconds (`true`: the library's default), replaying what was in
   * flight; `undefined`: off.
   */
  reconnect: number | true | undefined;
}
