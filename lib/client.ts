/**
 * A connection to one export in transmission: {@linkcode NbdClient} checks
 * every argument against what the export allows before anything is sent.
 * `connect()` (in `connect.ts`) makes one.
 *
 * @module
 */

import {
  CMD_CACHE,
  CMD_FLAG_DF,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
} from "./constants.ts";
import { type Capabilities, capabilities } from "./capabilities.ts";
import type { Tracer } from "./_debug.ts";
import type { BlockSize, ExportInfo, Protocol } from "./export.ts";
import {
  readableFrom,
  type ReadableFromOptions,
  writableTo,
  type WritableToOptions,
} from "./streams.ts";
import { Requests, shutDown } from "./_requests.ts";
import {
  checkTransition,
  CLIENT_TRANSITIONS,
  type ClientOwnState,
  type ClientState,
  clientState,
  refusal,
} from "./_states.ts";
import {
  blockStatusRequest,
  byContextName,
  checkRange,
  checkReadRange,
  fuaFlag,
  maxEffect,
  maxIo,
  offsetPlus,
  requireFeature,
  requireWritable,
  zeroFlags,
  zeroStep,
} from "./_request_checks.ts";
import {
  type BlockStatusOf,
  type BlockStatusOptions,
  checkOptions,
  type ReadOptions,
  type RequestOptions,
  sizeNumber,
  type WriteOptions,
  type WriteZeroesOptions,
} from "./request_options.ts";
import { Connections, type NbdStats, type Pool } from "./connections.ts";
import type { Transport } from "./transport.ts";

export type {
  BlockStatus,
  BlockStatusBigInt,
  BlockStatusOf,
  BlockStatusOptions,
  ReadOptions,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "./request_options.ts";
export { sizeNumber } from "./request_options.ts";
export type { ClientState } from "./_states.ts";

/** Requests in flight at once per connection unless told otherwise. */
export const DEFAULT_MAX_IN_FLIGHT = 64;

/**
 * The key of the internal constructor: only this module holds it, so only
 * {@linkcode clientOver} reaches that form.
 */
const OVER: unique symbol = Symbol("NbdClient over a pool");

/** The internal form of {@linkcode NbdClient}'s constructor. */
type InternalConstructor = new (
  key: typeof OVER,
  pool: Pool,
  cleanup: (() => Promise<void>) | undefined,
) => NbdClient;

/**
 * A client over connections `connect()` already made (several, or with
 * reconnecting); the public constructor takes one negotiated transport.
 *
 * @param pool The connections and how to replace them.
 * @param cleanup Runs after the last connection closed (a server
 *   subprocess to stop).
 */
export function clientOver(
  pool: Pool,
  cleanup?: () => Promise<void>,
): NbdClient {
  return new (NbdClient as unknown as InternalConstructor)(OVER, pool, cleanup);
}

/**
 * A connection to one export. Get one from {@linkcode connect}.
 *
 * Every method checks its arguments against the export (bounds, alignment,
 * advertised features) and fails before sending anything when they do not
 * fit. Requests larger than the server's maximum are split; many requests
 * may be in flight at once.
 */
export class NbdClient {
  #info: ExportInfo;
  #tx: Connections;
  /** What the client decided itself; {@linkcode NbdClient.state} adds the rest. */
  #own: ClientOwnState = "open";
  #contexts: Map<number, string>;
  #can: Capabilities;
  #closing: Promise<void> | undefined;
  /** How requests go out, through one queue for every connection. */
  #requests: Requests;
  #cleanup: (() => Promise<void>) | undefined;

  /**
   * Wraps a negotiated transport; {@linkcode connect} is the usual way in.
   *
   * @param transport A transport whose handshake has completed.
   * @param info What the handshake negotiated.
   * @param maxInFlight Requests in flight at once (default 64).
   * @param trace Optional tracer.
   */
  constructor(
    transport: Transport,
    info: ExportInfo,
    maxInFlight?: number,
    trace?: Tracer,
  );
  constructor(
    transport: Transport | typeof OVER,
    info: ExportInfo | Pool,
    third?: number | (() => Promise<void>),
    trace?: Tracer,
  ) {
    let pool: Pool;
    if (transport === OVER) {
      pool = info as Pool;
      this.#cleanup = third as (() => Promise<void>) | undefined;
      info = pool.links[0]!.info;
    } else {
      info = info as ExportInfo;
      const maxInFlight = (third as number | undefined) ??
        DEFAULT_MAX_IN_FLIGHT;
      pool = { links: [{ transport, info }], maxInFlight, trace };
    }
    this.#info = info;
    this.#contexts = info.metaContexts;
    this.#can = capabilities({
      flags: info.flags,
      structuredReplies: info.structuredReplies,
      metaContexts: info.metaContexts.size,
      extendedHeaders: info.extendedHeaders,
    });
    this.#tx = new Connections(pool);
    this.#requests = new Requests(
      pool.maxInFlight * pool.links.length,
      this.#tx,
      () => this.#own === "open",
    );
  }

  /** Size in bytes. @throws {RangeError} beyond `Number.MAX_SAFE_INTEGER`. */
  get size(): number {
    return sizeNumber(this.#info.size);
  }
  /** Size in bytes, exactly. */
  get sizeBigInt(): bigint {
    return this.#info.size;
  }
  /** The export's name. */
  get exportName(): string {
    return this.#info.exportName;
  }
  /** The server's description of the export, or `""`. */
  get description(): string {
    return this.#info.description;
  }
  /** Block size constraints in force. */
  get blockSize(): BlockSize {
    return { ...this.#info.blockSize };
  }
  /**
   * Whether the server advertised its block sizes; if not, `blockSize`
   * holds the spec's defaults (reads and writes are still split at 32 MiB).
   */
  get blockSizeAdvertised(): boolean {
    return this.#info.blockSizeAdvertised;
  }
  /** Transmission flags as sent by the server. */
  get flags(): number {
    return this.#info.flags;
  }
  /** Whether the export refuses writes. */
  get readOnly(): boolean {
    return this.#can.readOnly;
  }
  /** Whether {@linkcode NbdClient.flush} is available. */
  get canFlush(): boolean {
    return this.#can.canFlush;
  }
  /** Whether the `fua` option is available. */
  get canFua(): boolean {
    return this.#can.canFua;
  }
  /** Whether {@linkcode NbdClient.trim} is available. */
  get canTrim(): boolean {
    return this.#can.canTrim;
  }
  /** Whether {@linkcode NbdClient.writeZeroes} is available. */
  get canWriteZeroes(): boolean {
    return this.#can.canWriteZeroes;
  }
  /** Whether the `fastZero` option is available. */
  get canFastZero(): boolean {
    return this.#can.canFastZero;
  }
  /** Whether {@linkcode NbdClient.cache} is available. */
  get canCache(): boolean {
    return this.#can.canCache;
  }
  /** Whether several connections to this export see each other's writes. */
  get canMultiConn(): boolean {
    return this.#can.canMultiConn;
  }
  /** Whether the `df` read option is available. */
  get canDf(): boolean {
    return this.#can.canDf;
  }
  /** Whether {@linkcode NbdClient.blockStatus} is available. */
  get canBlockStatus(): boolean {
    return this.#can.canBlockStatus;
  }
  /**
   * Whether `blockStatus()` can ask the server for chosen contexts only
   * (extended headers and `NBD_FLAG_BLOCK_STAT_PAYLOAD`).
   */
  get canBlockStatusPayload(): boolean {
    return this.#can.canBlockStatusPayload;
  }
  /** Whether the server says the export behaves like a spinning disk. */
  get rotational(): boolean {
    return this.#can.rotational;
  }
  /** Whether structured replies are in use. */
  get structuredReplies(): boolean {
    return this.#info.structuredReplies;
  }
  /** Whether extended headers are in use. */
  get extendedHeaders(): boolean {
    return this.#info.extendedHeaders;
  }
  /** Whether the connection runs over TLS. */
  get tls(): boolean {
    return this.#info.tls;
  }
  /** The handshake style the server spoke. */
  get protocol(): Protocol {
    return this.#info.protocol;
  }
  /** The metadata contexts negotiated, by name. */
  get metaContexts(): string[] {
    return [...this.#contexts.values()];
  }
  /**
   * With `listMetaContexts`: every metadata context the server offered for
   * the export, whether selected or not; `undefined` when they were not
   * listed (not asked for, or no structured replies).
   */
  get availableMetaContexts(): string[] | undefined {
    const listed = this.#info.availableMetaContexts;
    return listed ? [...listed] : undefined;
  }
  /** `"open"`, `"reconnecting"`, `"closing"`, `"closed"` or `"failed"`. */
  get state(): ClientState {
    return clientState(this.#own, this.#tx);
  }

  /** The one place the client's own state changes, checked against the table. */
  #enter(next: ClientOwnState): void {
    checkTransition("a client", CLIENT_TRANSITIONS, this.#own, next);
    this.#own = next;
  }
  /** How many connections carry the requests (`connections` option). */
  get connections(): number {
    return this.#tx.count;
  }
  /** How many times a lost connection was replaced (`reconnect` option). */
  get reconnects(): number {
    return this.#tx.reconnects;
  }
  /**
   * What crossed the wire over every connection so far: bytes and chunks
   * both ways, requests by command (libnbd's `nbd_stats_*`).
   */
  get stats(): NbdStats {
    return this.#tx.stats;
  }
  /** The error that broke the connection, if one did. */
  get failure(): Error | undefined {
    return this.#tx.failure;
  }

  /** Refuses a call the client cannot take in its state. */
  #guard(method: string): void {
    const refused = refusal(
      method,
      this.state,
      this.#tx.failure,
      this.#own === "open" && this.#tx.shuttingDown,
    );
    if (refused) throw refused;
  }

  /**
   * Reads `length` bytes at `offset`.
   *
   * @param offset Byte offset, a multiple of the minimum block size; a
   *   bigint reaches past 2^53.
   * @param length Byte count, a multiple of the minimum block size.
   * @param options `signal`, `df`.
   * @returns The bytes read.
   * @throws {NbdCommandError} when the server fails the read.
   * @throws {RangeError} for a range outside the export or misaligned.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * const sector = await nbd.read(0, 512);
   * ```
   */
  async read(
    offset: number | bigint,
    length: number,
    options: ReadOptions = {},
  ): Promise<Uint8Array> {
    checkOptions("read", options, ["df"]);
    this.#guard("read");
    checkReadRange("read", offset, length, this.#info);
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  /**
   * Reads into `buffer` (its whole length) from `offset`; the data lands
   * there directly. If the read is aborted, the buffer may still be written
   * until the server's reply arrives.
   *
   * @param buffer Destination; its length is the read's length.
   * @param offset Byte offset; a bigint reaches past 2^53.
   * @param options `signal`, `df`.
   * @throws {NbdCommandError} when the server fails the read.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * const buf = new Uint8Array(4096);
   * await nbd.readInto(buf, 8192);
   * ```
   */
  async readInto(
    buffer: Uint8Array,
    offset: number | bigint,
    options: ReadOptions = {},
  ): Promise<void> {
    checkOptions("readInto", options, ["df"]);
    if (!(buffer instanceof Uint8Array)) {
      throw new TypeError("readInto(): buffer must be a Uint8Array");
    }
    this.#guard("readInto");
    checkReadRange("readInto", offset, buffer.length, this.#info);
    const flags = options.df ? CMD_FLAG_DF : 0;
    if (options.df) requireFeature(this.#can, "canDf", "readInto");
    await this.#requests.split(
      0,
      buffer.length,
      maxIo(this.#info),
      options.signal,
      (rel, l) => ({
        type: CMD_READ,
        flags,
        offset: offsetPlus(offset, rel),
        length: l,
        buffer: buffer.subarray(rel, rel + l),
      }),
    );
  }

  /**
   * Writes `data` at `offset`.
   *
   * @param offset Byte offset.
   * @param data The bytes; their length must be a multiple of the minimum block size.
   * @param options `fua`, `signal`.
   * @throws {NbdUnsupportedError} on a read-only export, or `fua` unsupported.
   * @throws {NbdCommandError} when the server fails the write.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.write(0, new Uint8Array(512).fill(1), { fua: true });
   * ```
   */
  async write(
    offset: number,
    data: Uint8Array,
    options: WriteOptions = {},
  ): Promise<void> {
    checkOptions("write", options, ["fua"]);
    if (!(data instanceof Uint8Array)) {
      throw new TypeError("write(): data must be a Uint8Array");
    }
    this.#guard("write");
    checkRange("write", offset, data.length, this.#info);
    requireWritable(this.#can, "write");
    const flags = fuaFlag(this.#can, "write", options.fua);
    await this.#requests.split(
      offset,
      data.length,
      maxIo(this.#info),
      options.signal,
      (o, l, rel) => ({
        type: CMD_WRITE,
        flags,
        offset: o,
        length: l,
        payload: data.subarray(rel, rel + l),
      }),
    );
  }

  /**
   * Makes every completed write durable (`NBD_CMD_FLUSH`).
   *
   * @param options `signal`.
   * @throws {NbdUnsupportedError} when the export cannot flush.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.flush();
   * ```
   */
  async flush(options: RequestOptions = {}): Promise<void> {
    checkOptions("flush", options, []);
    this.#guard("flush");
    requireFeature(this.#can, "canFlush", "flush");
    await this.#requests.send({
      type: CMD_FLUSH,
      flags: 0,
      offset: 0,
      length: 0,
    }, options.signal);
  }

  /**
   * Tells the server the range is no longer needed (`NBD_CMD_TRIM`).
   *
   * @param offset Byte offset.
   * @param length Byte count.
   * @param options `fua`, `signal`.
   * @throws {NbdUnsupportedError} when the export cannot trim.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.trim(0, 1 << 20);
   * ```
   */
  async trim(
    offset: number,
    length: number,
    options: WriteOptions = {},
  ): Promise<void> {
    checkOptions("trim", options, ["fua"]);
    this.#guard("trim");
    checkRange("trim", offset, length, this.#info);
    requireWritable(this.#can, "trim");
    requireFeature(this.#can, "canTrim", "trim");
    const flags = fuaFlag(this.#can, "trim", options.fua);
    await this.#requests.splitRange(
      { type: CMD_TRIM, flags: flags, offset, length },
      maxEffect(this.#info),
      options.signal,
    );
  }

  /**
   * Writes zeroes without sending them (`NBD_CMD_WRITE_ZEROES`).
   *
   * @param offset Byte offset.
   * @param length Byte count.
   * @param options `noHole`, `fastZero`, `fua`, `signal`.
   * @throws {NbdUnsupportedError} when the export cannot write zeroes.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.writeZeroes(0, 1 << 20, { noHole: true });
   * ```
   */
  async writeZeroes(
    offset: number,
    length: number,
    options: WriteZeroesOptions = {},
  ): Promise<void> {
    checkOptions("writeZeroes", options, ["fua", "noHole", "fastZero"]);
    this.#guard("writeZeroes");
    checkRange("writeZeroes", offset, length, this.#info);
    requireWritable(this.#can, "writeZeroes");
    requireFeature(this.#can, "canWriteZeroes", "writeZeroes");
    const flags = zeroFlags(this.#can, options);
    const step = zeroStep(this.#info, options.fastZero === true);
    await this.#requests.splitRange(
      { type: CMD_WRITE_ZEROES, flags: flags, offset, length },
      step,
      options.signal,
    );
  }

  /**
   * Asks the server to prefetch a range (`NBD_CMD_CACHE`).
   *
   * @param offset Byte offset.
   * @param length Byte count.
   * @param options `signal`.
   * @throws {NbdUnsupportedError} when the export does not advertise cache.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.cache(0, 1 << 20);
   * ```
   */
  async cache(
    offset: number,
    length: number,
    options: RequestOptions = {},
  ): Promise<void> {
    checkOptions("cache", options, []);
    this.#guard("cache");
    checkRange("cache", offset, length, this.#info);
    requireFeature(this.#can, "canCache", "cache");
    const step = zeroStep(this.#info, false);
    await this.#requests.splitRange(
      { type: CMD_CACHE, flags: 0, offset, length },
      step,
      options.signal,
    );
  }

  /**
   * Asks for block status from `offset`, for every negotiated context. The
   * server may describe less than `length` (ask again from where it ended)
   * or, in the last extent, more. Bigint `offset` and `length` make the
   * request exact to 2^63 - 1 (exports of 2^53 bytes and more), with
   * bigint extents.
   *
   * @param offset Byte offset: a number, or a bigint.
   * @param length Byte count of interest, of the same type as `offset`.
   * @param options `reqOne`, `contexts`, `signal`.
   * @returns Extents by context name, e.g. `{ "base:allocation": [...] }`.
   * @throws {NbdUnsupportedError} when no metadata context was negotiated.
   * @throws {TypeError} for a bigint mixed with a number.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk", {
   *   metaContexts: ["base:allocation"],
   * });
   * const map = await nbd.blockStatus(0, nbd.size);
   * console.log(map["base:allocation"]);
   * const end = await nbd.blockStatus(2n ** 53n, nbd.sizeBigInt - 2n ** 53n);
   * ```
   */
  async blockStatus<T extends number | bigint>(
    offset: T,
    length: T,
    options: BlockStatusOptions = {},
  ): Promise<BlockStatusOf<T>> {
    checkOptions("blockStatus", options, ["reqOne"]);
    this.#guard("blockStatus");
    const [cmd, ids] = blockStatusRequest(
      this.#info,
      this.#can,
      [offset, length],
      options,
    );
    const byId = await this.#requests.send(cmd, options.signal);
    return byContextName(byId, ids, this.#contexts) as BlockStatusOf<T>;
  }

  /**
   * A byte stream over the export, reading ahead.
   *
   * @param options `offset`, `length`, `chunkSize`, `readAhead`, `signal`.
   * @returns A `ReadableStream` of the export's bytes (BYOB capable).
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * const file = await Deno.create("/tmp/disk.img");
   * await nbd.readable().pipeTo(file.writable);
   * ```
   */
  readable(options: ReadableFromOptions = {}): ReadableStream<Uint8Array> {
    this.#guard("readable");
    return readableFrom(this, options);
  }

  /**
   * A writable stream into the export that pipelines writes and flushes on
   * close.
   *
   * @param options `offset`, `chunkSize`, `maxInFlight`, `fua`, `flush`, `signal`.
   * @returns A `WritableStream` of bytes.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * await using nbd = await connect("nbd://127.0.0.1/disk");
   * const file = await Deno.open("/tmp/disk.img");
   * await file.readable.pipeTo(nbd.writable());
   * ```
   */
  writable(options: WritableToOptions = {}): WritableStream<Uint8Array> {
    this.#guard("writable");
    requireWritable(this.#can, "writable");
    return writableTo(this, options);
  }

  /**
   * Waits for requests in flight, drains, sends `NBD_CMD_DISC` and closes
   * the connection. First it waits for the requests whose callers still
   * wait; then for the replies still owed to callers who gave up (their
   * signal aborted), for at most 2 s, as the spec asks a client to wait
   * until no requests are in flight before it disconnects; then for
   * `NBD_CMD_DISC` to be written, for at most 2 s, after which the socket
   * is torn down. `options.signal` bounds the whole close: when it aborts,
   * the socket is torn down at once and requests still waiting fail with
   * {@linkcode NbdConnectionClosedError}. Calling it again waits for the
   * same close.
   *
   * @param options `signal` bounds the whole close.
   * @throws {TypeError} for options that are not an object, or a signal
   *   that is not an `AbortSignal`.
   *
   * @example
   * ```ts
   * import { connect } from "@nbd/client";
   * const nbd = await connect("nbd://127.0.0.1/disk");
   * await nbd.close({ signal: AbortSignal.timeout(5000) });
   * ```
   */
  close(options: RequestOptions = {}): Promise<void> {
    try {
      checkOptions("close", options, []);
    } catch (e) {
      return Promise.reject(e);
    }
    if (!this.#closing) {
      this.#enter("closing");
      this.#closing = shutDown(
        this.#tx,
        this.#requests.queue,
        options.signal,
        this.#cleanup,
      ).finally(() => {
        this.#enter("closed");
      });
    }
    return this.#closing;
  }

  /** Closes the client at the end of an `await using` block. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
