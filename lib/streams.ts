/**
 * Web streams over an export: {@linkcode readableFrom} turns a range into a
 * byte stream with reads pipelined ahead, {@linkcode writableTo} turns
 * writes of any size into aligned, pipelined `NBD_CMD_WRITE`s.
 *
 * Both take a {@linkcode StreamableClient}, the least of a client they need,
 * so that they can be used over anything that reads and writes at offsets.
 *
 * @example Copy a local file into an export
 * ```ts ignore
 * import { connect, writableTo } from "@nbd/client";
 *
 * await using nbd = await connect("nbd+unix:///disk?socket=/run/nbd.sock");
 * using file = await Deno.open("disk.img");
 * await file.readable.pipeTo(writableTo(nbd));
 * ```
 *
 * @module
 */

import type { BlockSize } from "./export.ts";

/**
 * What the streams need from a client. The library's client has this shape;
 * a test double or another transport can provide it too.
 */
export interface StreamableClient {
  /** Size of the export in bytes. */
  readonly size: number;
  /** The export's block size constraints. */
  readonly blockSize: BlockSize;
  /** Whether the export accepts `NBD_CMD_FLUSH`. */
  readonly canFlush: boolean;
  /** Whether the export accepts the FUA flag on writes. */
  readonly canFua: boolean;
  /** Reads `length` bytes at `offset`. */
  read(
    offset: number,
    length: number,
    options?: { signal?: AbortSignal },
  ): Promise<Uint8Array>;
  /**
   * Reads `buffer.length` bytes at `offset` into `buffer`. Optional: where
   * it is given, the stream reads ahead into buffers of its own that it
   * reuses, instead of allocating one per request.
   */
  readInto?(
    buffer: Uint8Array,
    offset: number,
    options?: { signal?: AbortSignal },
  ): Promise<void>;
  /** Writes `data` at `offset`. */
  write(
    offset: number,
    data: Uint8Array,
    options?: { fua?: boolean; signal?: AbortSignal },
  ): Promise<void>;
  /** Asks the server to make completed writes durable. */
  flush(options?: { signal?: AbortSignal }): Promise<void>;
}

/** Options for {@linkcode readableFrom}. */
export interface ReadableFromOptions {
  /** Where to start reading (default 0). */
  offset?: number;
  /** How many bytes to read (default: to the end of the export). */
  length?: number;
  /**
   * Bytes per read request. By default the export's preferred block size,
   * at least 64 KiB and at most its maximum.
   */
  chunkSize?: number;
  /** Read requests kept in flight ahead of the consumer (default 4). */
  readAhead?: number;
  /** Cancels the stream and every read in flight. */
  signal?: AbortSignal;
}

/** Options for {@linkcode writableTo}. */
export interface WritableToOptions {
  /** Where to start writing (default 0). */
  offset?: number;
  /**
   * Bytes per write request (default 256 KiB, clamped to the export's
   * maximum and rounded down to its minimum block size).
   */
  chunkSize?: number;
  /** Write requests in flight at once (default 4). */
  maxInFlight?: number;
  /** Set FUA on every write, where the export supports it. */
  fua?: boolean;
  /** Send `NBD_CMD_FLUSH` on close when the export can flush (default true). */
  flush?: boolean;
  /** Aborts the stream and every write in flight. */
  signal?: AbortSignal;
}

const DEFAULT_READ_CHUNK = 64 * 1024;
const DEFAULT_WRITE_CHUNK = 256 * 1024;

function checkRange(
  size: number,
  offset: number,
  length: number,
): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new RangeError(`Offset must be a non-negative integer: ${offset}`);
  }
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`Length must be a non-negative integer: ${length}`);
  }
  if (offset + length > size) {
    throw new RangeError(
      `Range of ${length} bytes at offset ${offset} is beyond the end of the export (${size} bytes)`,
    );
  }
}

function checkPositive(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new RangeError(`${name} must be a positive integer: ${value}`);
  }
}

/** Promises whose failure is observed later must not be unhandled now. */
function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/**
 * Makes a byte stream of a range of the export. Up to `readAhead` reads are
 * in flight while the consumer works, and the stream is a `"bytes"` stream,
 * so a BYOB reader may read straight into its own buffers.
 *
 * @param client The connection to read from.
 * @param options The range, request size, read-ahead and abort signal.
 * @returns A stream of the range's bytes, in order.
 * @throws {RangeError} If the range is outside the export, its offset is
 * not a multiple of the minimum block size, or a size is not a positive
 * integer. A length that is not a multiple of the minimum block size is
 * fine, as for {@linkcode writableTo}: the last block is read whole and the
 * stream ends where the range does.
 *
 * @example Hash an export
 * ```ts ignore
 * import { connect, readableFrom } from "@nbd/client";
 *
 * await using nbd = await connect("nbd+unix:///?socket=/tmp/nbd.sock");
 * let bytes = 0;
 * for await (const chunk of readableFrom(nbd)) bytes += chunk.length;
 * console.log(bytes === nbd.size);
 * ```
 */
export function readableFrom(
  client: StreamableClient,
  options: ReadableFromOptions = {},
): ReadableStream<Uint8Array> {
  const start = options.offset ?? 0;
  const length = options.length ?? client.size - start;
  checkRange(client.size, start, length);
  const { minimum, preferred, maximum } = client.blockSize;
  if (minimum > 1 && start % minimum !== 0) {
    throw new RangeError(
      `Offset ${start} is not a multiple of the export's minimum block size ${minimum}`,
    );
  }
  // The same rule as writableTo(): the offset is aligned, the length need
  // not be. A partial last block is read whole and handed out cut.
  const tail = minimum > 1 ? length % minimum : 0;
  if (tail !== 0 && start + length - tail + minimum > client.size) {
    throw new RangeError(
      `Range of ${length} bytes at offset ${start} ends inside the export's last partial block`,
    );
  }
  let chunkSize = options.chunkSize ??
    Math.min(Math.max(preferred, DEFAULT_READ_CHUNK), maximum);
  checkPositive("chunkSize", chunkSize);
  chunkSize = Math.min(chunkSize, maximum);
  // Keep every request but the last on the export's block boundaries.
  if (minimum > 1) {
    chunkSize = Math.max(minimum, chunkSize - chunkSize % minimum);
  }
  const readAhead = options.readAhead ?? 4;
  checkPositive("readAhead", readAhead);

  const end = start + length;
  const stop = new AbortController();
  const signal = options.signal
    ? AbortSignal.any([options.signal, stop.signal])
    : stop.signal;
  // Buffers whose data has been handed over (copied into a reader's
  // buffer), ready for the next read ahead.
  const free: Uint8Array[] = [];
  const pending: Promise<Uint8Array>[] = [];
  let next = start;
  const readInto = client.readInto?.bind(client);

  /** Reads `n` bytes at `at`, asking for whole blocks. */
  const read = (at: number, n: number): Promise<Uint8Array> => {
    const rem = minimum > 1 ? n % minimum : 0;
    // Only the last request can be short of a block; it still fits a
    // chunk, which is a multiple of the block size.
    const whole = rem === 0 ? n : n - rem + minimum;
    if (!readInto) {
      return client.read(at, whole, { signal }).then((data) =>
        whole === n ? data : data.subarray(0, n)
      );
    }
    const own = free.pop() ?? new Uint8Array(chunkSize);
    const buf = whole === own.length ? own : own.subarray(0, whole);
    return readInto(buf, at, { signal }).then(() =>
      whole === n ? buf : buf.subarray(0, n)
    );
  };

  const fill = () => {
    while (pending.length < readAhead && next < end) {
      const n = Math.min(chunkSize, end - next);
      pending.push(quiet(read(next, n)));
      next += n;
    }
  };

  return new ReadableStream({
    type: "bytes",
    start(controller) {
      if (length === 0) controller.close();
    },
    async pull(controller) {
      signal.throwIfAborted();
      fill();
      const head = pending.shift();
      if (!head) {
        controller.close();
        controller.byobRequest?.respond(0);
        return;
      }
      let data: Uint8Array;
      try {
        data = await head;
      } catch (error) {
        stop.abort(error);
        pending.length = 0;
        throw error;
      }
      const request = controller.byobRequest;
      const view = request?.view;
      if (request && view && readInto) {
        const theirs = view.buffer as ArrayBuffer;
        if (
          theirs.byteLength === data.buffer.byteLength &&
          view.byteOffset === data.byteOffset &&
          data.length <= view.byteLength
        ) {
          // The reader's buffer is the size of ours: hand it ours, filled,
          // and keep its own for a read ahead. No byte is copied.
          request.respondWithNewView(data);
          if (theirs.byteLength === chunkSize) {
            free.push(new Uint8Array(theirs));
          }
        } else {
          // Another shape: the reader's buffer gets the one copy, and ours
          // goes back to the pool.
          const into = new Uint8Array(theirs, view.byteOffset, view.byteLength);
          const n = Math.min(into.length, data.length);
          into.set(n === data.length ? data : data.subarray(0, n));
          request.respond(n);
          if (n < data.length) controller.enqueue(data.slice(n));
          if (data.byteOffset === 0 && data.buffer.byteLength === chunkSize) {
            free.push(new Uint8Array(data.buffer));
          }
        }
      } else {
        // A default reader takes the buffer itself (enqueue transfers it).
        controller.enqueue(data);
      }
      fill();
      if (pending.length === 0 && next >= end) controller.close();
    },
    cancel(reason) {
      stop.abort(reason);
      pending.length = 0;
    },
  });
}

/**
 * Makes a writable stream that writes what it is given to the export,
 * starting at `offset`. Chunks of any size are gathered into requests of
 * `chunkSize` bytes; up to `maxInFlight` are in flight at once. A last
 * piece that is not a multiple of the export's minimum block size is merged
 * with the export's own bytes (read, patched, written back). On close the
 * stream waits for every write and sends `NBD_CMD_FLUSH` if the export can
 * flush; the first failed write errors the stream.
 *
 * @param client The connection to write to.
 * @param options Start offset, request size, queue depth, FUA, flush.
 * @returns A stream whose `close()` resolves once everything is written.
 * @throws {RangeError} If the offset is outside the export, not aligned to
 * its minimum block size, or a size is not a positive integer.
 *
 * @example Upload a file
 * ```ts ignore
 * import { connect, writableTo } from "@nbd/client";
 *
 * await using nbd = await connect("nbd+unix:///?socket=/tmp/nbd.sock");
 * using file = await Deno.open("disk.img");
 * await file.readable.pipeTo(writableTo(nbd, { offset: 0 }));
 * ```
 */
export function writableTo(
  client: StreamableClient,
  options: WritableToOptions = {},
): WritableStream<Uint8Array> {
  const start = options.offset ?? 0;
  checkRange(client.size, start, 0);
  const { minimum, maximum } = client.blockSize;
  if (minimum > 1 && start % minimum !== 0) {
    throw new RangeError(
      `Offset ${start} is not a multiple of the export's minimum block size ${minimum}`,
    );
  }
  let chunkSize = Math.min(options.chunkSize ?? DEFAULT_WRITE_CHUNK, maximum);
  checkPositive("chunkSize", chunkSize);
  if (minimum > 1) {
    chunkSize = Math.max(minimum, chunkSize - chunkSize % minimum);
  }
  const maxInFlight = options.maxInFlight ?? 4;
  checkPositive("maxInFlight", maxInFlight);
  const fua = options.fua === true && client.canFua;

  const stop = new AbortController();
  const signal = options.signal
    ? AbortSignal.any([options.signal, stop.signal])
    : stop.signal;
  const inFlight = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let staged = new Uint8Array(chunkSize);
  let stagedLength = 0;
  let offset = start;

  const check = () => {
    if (failure) throw failure.error;
    signal.throwIfAborted();
  };

  const submit = async (data: Uint8Array) => {
    while (inFlight.size >= maxInFlight) await Promise.race(inFlight);
    check();
    if (offset + data.length > client.size) {
      throw new RangeError(
        `Write of ${data.length} bytes at offset ${offset} is beyond the end of the export (${client.size} bytes)`,
      );
    }
    const p: Promise<void> = client.write(offset, data, { fua, signal })
      .catch((error) => {
        failure ??= { error };
      })
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
    offset += data.length;
  };

  const drain = async () => {
    while (inFlight.size > 0) await Promise.race(inFlight);
  };

  return new WritableStream<Uint8Array>({
    async write(chunk) {
      check();
      let pos = 0;
      if (stagedLength > 0) {
        const n = Math.min(chunk.length, chunkSize - stagedLength);
        staged.set(chunk.subarray(0, n), stagedLength);
        stagedLength += n;
        pos = n;
        if (stagedLength < chunkSize) return;
        const full = staged;
        staged = new Uint8Array(chunkSize);
        stagedLength = 0;
        await submit(full);
      }
      // Whole requests straight from the chunk; copied, because the writer
      // may reuse its buffer as soon as this promise resolves.
      while (chunk.length - pos >= chunkSize) {
        await submit(chunk.slice(pos, pos + chunkSize));
        pos += chunkSize;
      }
      if (pos < chunk.length) {
        staged.set(chunk.subarray(pos), 0);
        stagedLength = chunk.length - pos;
      }
    },
    async close() {
      if (stagedLength > 0) {
        let tail = staged.subarray(0, stagedLength);
        const rem = minimum > 1 ? tail.length % minimum : 0;
        if (rem !== 0) {
          // The export only takes whole blocks: keep the bytes after the
          // end of the data as the export has them.
          const blockStart = offset + tail.length - rem;
          if (blockStart + minimum > client.size) {
            throw new RangeError(
              `Write of ${tail.length} bytes at offset ${offset} ends inside the export's last partial block`,
            );
          }
          await drain();
          check();
          const block = await client.read(blockStart, minimum, { signal });
          block.set(tail.subarray(tail.length - rem));
          const padded = new Uint8Array(tail.length - rem + minimum);
          padded.set(tail.subarray(0, tail.length - rem));
          padded.set(block, tail.length - rem);
          tail = padded;
        }
        stagedLength = 0;
        await submit(tail);
      }
      await drain();
      check();
      if (options.flush !== false && client.canFlush) {
        await client.flush({ signal });
      }
    },
    async abort(reason) {
      stop.abort(reason);
      await drain();
    },
  });
}
