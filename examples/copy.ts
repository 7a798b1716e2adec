/**
 * `copy`: what `nbdcopy` does. Copies between NBD exports, local files or
 * block devices, and stdin/stdout (`-`), in any direction; `null:` is a sink
 * for measuring a source.
 *
 * ```sh
 * deno run -A examples/copy.ts nbd+unix:///disk?socket=/tmp/nbd.sock disk.img
 * deno run -A examples/copy.ts --flush disk.img nbd://127.0.0.1/
 * deno run -A examples/copy.ts nbd://127.0.0.1/ null:
 * ```
 *
 * Sparse-aware on both sides: zero extents of the source (from
 * `base:allocation`) are never read, all-zero blocks it does read are not
 * written as data, and the destination gets `NBD_CMD_WRITE_ZEROES` (or, for
 * a file, a hole) instead. Requests are pipelined, over several connections
 * when the servers advertise multi-conn. Any failure prints one line
 * (`copy: ...`) and exits 1; a copy that did not finish never exits 0.
 *
 * @module
 */

import { connect } from "../mod.ts";
import { STATE_ZERO } from "../lib/constants.ts";
import {
  errorLine,
  humanBytes,
  type OptionSpec,
  parseArgs,
  parseCount,
  parseSize,
  Progress,
  progressMode,
  UsageError,
  warn,
  warnUsage,
  writeAll,
} from "./_cli.ts";

const USAGE = `Usage: copy [OPTIONS] SOURCE DESTINATION

SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI
DESTINATION += null:

Options:
  -C, --connections=N     NBD connections when multi-conn is offered (4)
  -R, --requests=N        requests in flight per connection (64)
      --queue-size=N      bytes in flight per connection (16M)
      --request-size=N    bytes per read or write request (256k)
  -S, --sparse=N          detect all-zero blocks of N bytes (4k; 0 = off)
      --allocated         write every byte: no holes on the destination
      --destination-is-zero, --target-is-zero
                          the destination already reads as zeroes
      --no-extents        ignore the source's block status, read everything
      --flush             flush the destination before exiting
  -p, --progress[=FD]     progress bar (default on a terminal); with FD,
                          "N/100" lines on that descriptor
      --no-progress       no progress bar
  -v, --verbose           print what was read, written and zeroed
  -h, --help              this text
`;

const OPTIONS: OptionSpec[] = [
  { name: "connections", kind: "value", short: "C" },
  { name: "requests", kind: "value", short: "R" },
  { name: "queue-size", kind: "value" },
  { name: "request-size", kind: "value" },
  { name: "sparse", kind: "value", short: "S" },
  { name: "allocated", kind: "flag" },
  { name: "destination-is-zero", kind: "flag" },
  { name: "target-is-zero", kind: "flag" },
  { name: "no-extents", kind: "flag" },
  { name: "flush", kind: "flag" },
  { name: "progress", kind: "optional", short: "p" },
  { name: "no-progress", kind: "flag" },
  { name: "verbose", kind: "flag", short: "v" },
  { name: "help", kind: "flag", short: "h" },
];

/** The NBD protocol's ceiling for one payload. */
const MAX_REQUEST_SIZE = 32 * 1024 * 1024;
/** Largest single WRITE_ZEROES, and the block status window. */
const MAX_ZERO = 1024 * 1024 * 1024;

type Client = Awaited<ReturnType<typeof connect>>;

/** A stretch of the source: zero (skip reading) or data. */
interface Extent {
  length: number;
  zero: boolean;
}

/** One unit of work for the pipeline. */
interface Item {
  offset: number;
  length: number;
  zero: boolean;
  /** Already read, for a stream source. */
  data?: Uint8Array;
}

/** What the copy reads from. */
interface Source {
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
  addLanes(n: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * How the destination comes to read zeroes: it already does ("skip": a new
 * file, `null:`, `--destination-is-zero`), a command ("command":
 * WRITE_ZEROES), or only by writing zero bytes ("write": stdout, a device).
 */
type ZeroMode = "skip" | "command" | "write";

/** What the copy writes to. */
interface Destination {
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
  finish(total: number, flush: boolean): Promise<void>;
  addLanes(n: number): Promise<void>;
  close(): Promise<void>;
}

/** Settings that shape how endpoints are opened. */
interface Settings {
  connections: number;
  requests: number;
  queueSize: number;
  requestSize: number;
  sparse: number | undefined;
  allocated: boolean;
  destinationIsZero: boolean;
  extents: boolean;
  flush: boolean;
  verbose: boolean;
}

function isNbdUri(word: string): boolean {
  return /^nbds?(\+(unix|vsock))?:\/\//.test(word);
}

/** An NBD export as either side, over one or more connections. */
class NbdEndpoint implements Source, Destination {
  readonly name: string;
  readonly sequential = false;
  readonly hasExtents: boolean;
  readonly zeroMode: ZeroMode;
  #uri: string;
  #requests: number;
  #contexts: string[];
  #conns: Client[];
  #allocated: boolean;

  private constructor(
    uri: string,
    first: Client,
    requests: number,
    contexts: string[],
    settings: Settings,
  ) {
    this.name = uri;
    this.#uri = uri;
    this.#conns = [first];
    this.#requests = requests;
    this.#contexts = contexts;
    this.hasExtents = first.metaContexts.includes("base:allocation");
    this.zeroMode = settings.destinationIsZero && !settings.allocated
      ? "skip"
      : first.canWriteZeroes
      ? "command"
      : "write";
    this.#allocated = settings.allocated;
  }

  static async open(
    uri: string,
    role: "source" | "destination",
    settings: Settings,
  ): Promise<NbdEndpoint> {
    const contexts = role === "source" && settings.extents
      ? ["base:allocation"]
      : [];
    const first = await connect(uri, {
      metaContexts: contexts,
      maxInFlight: settings.requests,
    });
    return new NbdEndpoint(uri, first, settings.requests, contexts, settings);
  }

  get size(): number {
    return this.#conns[0]!.size;
  }
  get alignment(): number {
    return this.#conns[0]!.blockSize?.minimum || 1;
  }
  get preferred(): number {
    return this.#conns[0]!.blockSize?.preferred || 4096;
  }
  get maxLanes(): number {
    return this.#conns[0]!.canMultiConn ? Infinity : 1;
  }

  async addLanes(n: number): Promise<void> {
    while (this.#conns.length < n) {
      this.#conns.push(
        await connect(this.#uri, {
          metaContexts: this.#contexts,
          maxInFlight: this.#requests,
        }),
      );
    }
  }

  #lane(lane: number): Client {
    return this.#conns[lane % this.#conns.length]!;
  }

  async extents(
    offset: number,
    length: number,
    signal: AbortSignal,
  ): Promise<Extent[]> {
    const reply = await this.#conns[0]!.blockStatus(offset, length, { signal });
    return (reply["base:allocation"] ?? []).map((e) => ({
      length: e.length,
      zero: (e.flags & STATE_ZERO) !== 0,
    }));
  }

  async read(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    if (!into) return await this.#lane(lane).read(offset, length, { signal });
    const buf = into.subarray(0, length);
    await this.#lane(lane).readInto(buf, offset, { signal });
    return buf;
  }

  next(): Promise<Uint8Array | null> {
    throw new Error("not a stream");
  }

  prepare(size: number | undefined): Promise<void> {
    const c = this.#conns[0]!;
    if (c.readOnly) {
      return Promise.reject(
        new Error(`${this.name}: the export is read-only`),
      );
    }
    if (size !== undefined && size > c.size) {
      return Promise.reject(
        new Error(
          `destination is too small: ${c.size} bytes, the source has ${size}`,
        ),
      );
    }
    return Promise.resolve();
  }

  write(
    offset: number,
    data: Uint8Array,
    lane: number,
    signal: AbortSignal,
  ): Promise<void> {
    return this.#lane(lane).write(offset, data, { signal });
  }

  zero(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
  ): Promise<void> {
    return this.#lane(lane).writeZeroes(offset, length, {
      noHole: this.#allocated,
      signal,
    });
  }

  async finish(_total: number, flush: boolean): Promise<void> {
    // With multi-conn a flush on one connection covers the writes of all.
    if (flush && this.#conns[0]!.canFlush) await this.#conns[0]!.flush();
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.#conns.map((c) => c.close()));
  }
}

/** A regular file or a block device, read or written at offsets. */
class FileEndpoint implements Source, Destination {
  readonly name: string;
  readonly sequential = false;
  readonly hasExtents = false;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  readonly zeroMode: ZeroMode;
  #file: Deno.FsFile;
  #device: boolean;
  #size: number | undefined;
  #knownSize = false;
  #write: boolean;
  // Deno has no pread/pwrite: a seek and a read must not interleave with
  // another's. Each lane has its own descriptor (its own file position),
  // and requests on one descriptor go one at a time.
  #handles: Array<{ file: Deno.FsFile; lock: Promise<void> }>;

  constructor(
    path: string,
    file: Deno.FsFile,
    device: boolean,
    size: number | undefined,
    zeroMode: ZeroMode,
    writable: boolean,
  ) {
    this.name = path;
    this.#file = file;
    this.#handles = [{ file, lock: Promise.resolve() }];
    this.#write = writable;
    this.#device = device;
    this.#size = size;
    this.zeroMode = zeroMode;
  }

  get size(): number | undefined {
    return this.#size;
  }

  #locked<T>(lane: number, fn: (file: Deno.FsFile) => Promise<T>): Promise<T> {
    const h = this.#handles[lane % this.#handles.length]!;
    const run = h.lock.then(() => fn(h.file));
    h.lock = run.then(() => {}, () => {});
    return run;
  }

  extents(): Promise<Extent[]> {
    return Promise.reject(new Error("files have no extent map here"));
  }

  read(
    offset: number,
    length: number,
    lane: number,
    _signal: AbortSignal,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    return this.#locked(lane, async (file) => {
      await file.seek(offset, Deno.SeekMode.Start);
      const buf = into ? into.subarray(0, length) : new Uint8Array(length);
      let got = 0;
      while (got < length) {
        const n = await file.read(buf.subarray(got));
        if (n === null) {
          throw new Error(
            `${this.name}: file ended at ${offset + got}, expected ${
              offset + length
            } bytes`,
          );
        }
        got += n;
      }
      return buf;
    });
  }

  next(): Promise<Uint8Array | null> {
    throw new Error("not a stream");
  }

  async prepare(size: number | undefined): Promise<void> {
    if (this.#device) {
      if (size !== undefined && this.#size !== undefined && size > this.#size) {
        throw new Error(
          `destination is too small: ${this.#size} bytes, the source has ${size}`,
        );
      }
      return;
    }
    // A new (truncated) file: extending it leaves a hole, so every zero
    // region that is never written stays unallocated.
    if (size !== undefined) {
      await this.#file.truncate(size);
      this.#knownSize = true;
    }
  }

  write(offset: number, data: Uint8Array, lane: number): Promise<void> {
    return this.#locked(lane, async (file) => {
      await file.seek(offset, Deno.SeekMode.Start);
      await writeAll(file, data);
    });
  }

  zero(): Promise<void> {
    return Promise.reject(new Error("files are zeroed by leaving holes"));
  }

  async finish(total: number, flush: boolean): Promise<void> {
    // From a stream the size was only known now; skipped zeroes at the end
    // are a hole that the file must still cover.
    if (!this.#device && !this.#knownSize) await this.#file.truncate(total);
    if (flush) await this.#file.sync();
  }

  async addLanes(n: number): Promise<void> {
    // Reopened without create or truncate: the first open did those.
    while (this.#handles.length < n) {
      const file = await Deno.open(
        this.name,
        this.#write ? { write: true } : { read: true },
      );
      this.#handles.push({ file, lock: Promise.resolve() });
    }
  }

  async close(): Promise<void> {
    // Wait for I/O still queued on a descriptor before closing it.
    for (const h of this.#handles) {
      await h.lock;
      h.file.close();
    }
  }

  static async openSource(path: string): Promise<Source> {
    const file = await Deno.open(path, { read: true });
    try {
      const info = await file.stat();
      if (info.isFile) {
        return new FileEndpoint(path, file, false, info.size, "write", false);
      }
      if (info.isBlockDevice) {
        const size = await file.seek(0, Deno.SeekMode.End);
        return new FileEndpoint(path, file, true, size, "write", false);
      }
      return new StreamSource(path, file);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  static async openDestination(
    path: string,
    settings: Settings,
  ): Promise<Destination> {
    let info: Deno.FileInfo | undefined;
    try {
      info = await Deno.stat(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (info?.isBlockDevice) {
      const file = await Deno.open(path, { write: true });
      const size = await file.seek(0, Deno.SeekMode.End);
      return new FileEndpoint(
        path,
        file,
        true,
        size,
        settings.destinationIsZero && !settings.allocated ? "skip" : "write",
        true,
      );
    }
    if (info && !info.isFile) {
      // A pipe, a character device, a socket: bytes in order.
      const file = await Deno.open(path, { write: true });
      return new StreamDestination(path, file);
    }
    // Like cp: a regular file is replaced, which makes it new and sparse.
    const file = await Deno.open(path, {
      write: true,
      create: true,
      truncate: true,
    });
    return new FileEndpoint(
      path,
      file,
      false,
      undefined,
      settings.allocated ? "write" : "skip",
      true,
    );
  }
}

/** stdin, a pipe or a character device: bytes in order, length unknown. */
class StreamSource implements Source {
  readonly name: string;
  readonly size = undefined;
  readonly alignment = 1;
  readonly maxLanes = Infinity;
  readonly hasExtents = false;
  #reader: { read(p: Uint8Array): Promise<number | null>; close?(): void };

  constructor(
    name: string,
    reader: { read(p: Uint8Array): Promise<number | null>; close?(): void },
  ) {
    this.name = name;
    this.#reader = reader;
  }

  extents(): Promise<Extent[]> {
    return Promise.reject(new Error("streams have no extent map"));
  }

  read(): Promise<Uint8Array> {
    return Promise.reject(new Error("streams cannot be read at offsets"));
  }

  async next(length: number): Promise<Uint8Array | null> {
    const buf = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const n = await this.#reader.read(buf.subarray(got));
      if (n === null) break;
      got += n;
    }
    return got === 0 ? null : buf.subarray(0, got);
  }

  addLanes(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    if (this.#reader !== Deno.stdin) this.#reader.close?.();
    return Promise.resolve();
  }
}

/** stdout or a pipe: every byte written, in order. */
class StreamDestination implements Destination {
  readonly name: string;
  readonly size = undefined;
  readonly sequential = true;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  readonly zeroMode: ZeroMode = "write";
  #writer: { write(p: Uint8Array): Promise<number>; close?(): void };
  #position = 0;

  constructor(
    name: string,
    writer: { write(p: Uint8Array): Promise<number>; close?(): void },
  ) {
    this.name = name;
    this.#writer = writer;
  }

  prepare(): Promise<void> {
    return Promise.resolve();
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (offset !== this.#position) {
      throw new Error(
        `internal error: stream write at ${offset}, expected ${this.#position}`,
      );
    }
    await writeAll(this.#writer, data);
    this.#position += data.length;
  }

  zero(): Promise<void> {
    return Promise.reject(new Error("streams take zero bytes"));
  }

  finish(): Promise<void> {
    return Promise.resolve();
  }

  addLanes(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    if (this.#writer !== Deno.stdout) this.#writer.close?.();
    return Promise.resolve();
  }
}

/** `null:`: takes everything, keeps nothing. */
class NullDestination implements Destination {
  readonly name = "null:";
  readonly size = undefined;
  readonly sequential = false;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  // "write", not "skip": scanning data for zeroes that are thrown away
  // anyway would only slow down the measurement null: is for.
  readonly zeroMode: ZeroMode = "write";
  prepare(): Promise<void> {
    return Promise.resolve();
  }
  write(): Promise<void> {
    return Promise.resolve();
  }
  zero(): Promise<void> {
    return Promise.resolve();
  }
  finish(): Promise<void> {
    return Promise.resolve();
  }
  addLanes(): Promise<void> {
    return Promise.resolve();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

async function openSource(word: string, s: Settings): Promise<Source> {
  if (word === "-") return new StreamSource("stdin", Deno.stdin);
  if (word === "null:") throw new UsageError("null: can only be a destination");
  if (isNbdUri(word)) return await NbdEndpoint.open(word, "source", s);
  return await FileEndpoint.openSource(word);
}

async function openDestination(
  word: string,
  s: Settings,
): Promise<Destination> {
  if (word === "-") return new StreamDestination("stdout", Deno.stdout);
  if (word === "null:") return new NullDestination();
  if (isNbdUri(word)) return await NbdEndpoint.open(word, "destination", s);
  return await FileEndpoint.openDestination(word, s);
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

function alignDown(n: number, a: number): number {
  return Math.floor(n / a) * a;
}

/**
 * The work for a source of known size, in offset order: data in pieces of
 * at most `requestSize`, and zero extents (from block status) as zero items
 * trimmed inward to `align` so every request stays on block boundaries.
 */
async function* planRange(
  src: Source,
  size: number,
  requestSize: number,
  align: number,
  useExtents: boolean,
  signal: AbortSignal,
): AsyncGenerator<Item> {
  let dataStart = 0;
  function* dataUpTo(end: number, wholeOnly: boolean): Generator<Item> {
    while (dataStart < end) {
      const n = Math.min(requestSize, end - dataStart);
      if (wholeOnly && n < requestSize) return;
      yield { offset: dataStart, length: n, zero: false };
      dataStart += n;
    }
  }
  if (!useExtents) {
    yield* dataUpTo(size, false);
    return;
  }
  let pos = 0;
  while (pos < size) {
    const extents = await src.extents(
      pos,
      Math.min(size - pos, MAX_ZERO),
      signal,
    );
    const before = pos;
    for (const e of extents) {
      if (pos >= size) break;
      const a = pos;
      const b = Math.min(pos + e.length, size);
      pos = b;
      if (!e.zero) {
        yield* dataUpTo(b, true);
        continue;
      }
      const za = alignUp(a, align);
      const zb = b === size ? size : alignDown(b, align);
      if (za >= zb) continue; // too small to zero alone; read with its data
      yield* dataUpTo(za, false);
      for (let o = za; o < zb; o += MAX_ZERO) {
        yield { offset: o, length: Math.min(MAX_ZERO, zb - o), zero: true };
      }
      dataStart = zb;
    }
    if (pos === before) {
      throw new Error(`${src.name}: no extents returned at offset ${pos}`);
    }
  }
  yield* dataUpTo(size, false);
}

/** The work for a stream: read ahead one request at a time. */
async function* planStream(
  src: Source,
  requestSize: number,
  limit: number | undefined,
): AsyncGenerator<Item> {
  let offset = 0;
  for (;;) {
    const data = await src.next(requestSize);
    if (data === null) return;
    if (limit !== undefined && offset + data.length > limit) {
      throw new Error(
        `destination is too small: ${limit} bytes, the source has more`,
      );
    }
    yield { offset, length: data.length, zero: false, data };
    offset += data.length;
    if (data.length < requestSize) return;
  }
}

/** Whether every byte is zero; word-at-a-time where alignment allows. */
export function isZero(bytes: Uint8Array): boolean {
  let i = 0;
  const head = (4 - (bytes.byteOffset % 4)) % 4;
  for (; i < head && i < bytes.length; i++) if (bytes[i] !== 0) return false;
  const words = Math.floor((bytes.length - i) / 4);
  if (words > 0) {
    const u32 = new Uint32Array(bytes.buffer, bytes.byteOffset + i, words);
    for (let w = 0; w < u32.length; w++) if (u32[w] !== 0) return false;
    i += words * 4;
  }
  for (; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/**
 * A test for "bytes [from, to) of `data` are all zero" that views the
 * buffer as words once, instead of once per block.
 */
function blockTester(data: Uint8Array): (from: number, to: number) => boolean {
  if (data.byteOffset % 4 !== 0) {
    return (from, to) => isZero(data.subarray(from, to));
  }
  const words = new Uint32Array(
    data.buffer,
    data.byteOffset,
    Math.floor(data.length / 4),
  );
  return (from, to) => {
    if (from % 4 !== 0 || (to % 4 !== 0 && to !== data.length)) {
      return isZero(data.subarray(from, to));
    }
    const whole = Math.floor(to / 4);
    for (let w = from / 4; w < whole; w++) if (words[w] !== 0) return false;
    for (let b = whole * 4; b < to; b++) if (data[b] !== 0) return false;
    return true;
  };
}

/** Totals for `--verbose`. */
interface Stats {
  read: number;
  written: number;
  zeroed: number;
}

/**
 * Copies everything `plan` yields from `src` to `dst`, with up to `limit`
 * items in flight spread over `lanes` connections. Stops at the first
 * failure and waits for everything in flight before throwing it.
 */
async function pump(
  src: Source,
  dst: Destination,
  plan: AsyncGenerator<Item>,
  opts: {
    lanes: number;
    limit: number;
    requestSize: number;
    sparse: number;
    progress: Progress;
    stats: Stats;
    signal: AbortSignal;
    abort: (reason: unknown) => void;
  },
): Promise<number> {
  const { lanes, limit, requestSize, sparse, progress, stats, signal } = opts;
  const zeroes = dst.zeroMode === "write"
    ? new Uint8Array(requestSize)
    : new Uint8Array(0);
  // Read buffers are reused once their data has been written; a buffer whose
  // item failed is dropped, since an abandoned write may still hold it.
  const pool: Uint8Array[] = [];

  const putZero = async (offset: number, length: number, lane: number) => {
    stats.zeroed += length;
    if (dst.zeroMode === "skip") return;
    if (dst.zeroMode === "command") {
      for (let o = offset; o < offset + length; o += MAX_ZERO) {
        await dst.zero(
          o,
          Math.min(MAX_ZERO, offset + length - o),
          lane,
          signal,
        );
      }
      return;
    }
    for (let o = offset; o < offset + length; o += requestSize) {
      const n = Math.min(requestSize, offset + length - o);
      await dst.write(o, zeroes.subarray(0, n), lane, signal);
    }
  };

  const putData = async (offset: number, data: Uint8Array, lane: number) => {
    if (sparse === 0 || dst.zeroMode === "write") {
      stats.written += data.length;
      await dst.write(offset, data, lane, signal);
      return;
    }
    // Runs of all-zero blocks become zero requests (or holes).
    const zeroBlock = blockTester(data);
    let i = 0;
    while (i < data.length) {
      const zero = zeroBlock(i, Math.min(i + sparse, data.length));
      let j = Math.min(i + sparse, data.length);
      while (
        j < data.length &&
        zeroBlock(j, Math.min(j + sparse, data.length)) === zero
      ) {
        j = Math.min(j + sparse, data.length);
      }
      if (zero) {
        await putZero(offset + i, j - i, lane);
      } else {
        stats.written += j - i;
        await dst.write(offset + i, data.subarray(i, j), lane, signal);
      }
      i = j;
    }
  };

  const active = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let turn: Promise<void> = Promise.resolve();
  let index = 0;
  let end = 0;

  const run = async (item: Item, lane: number, after: Promise<void> | null) => {
    let data = item.data;
    let pooled: Uint8Array | undefined;
    if (!item.zero && data === undefined) {
      if (item.length <= requestSize) {
        pooled = pool.pop() ?? new Uint8Array(requestSize);
      }
      try {
        data = await src.read(item.offset, item.length, lane, signal, pooled);
      } catch (e) {
        throw wrap(`reading ${src.name}`, e);
      }
      stats.read += data.length;
    } else if (data !== undefined) {
      stats.read += data.length;
    }
    if (after) await after;
    signal.throwIfAborted();
    try {
      if (item.zero) await putZero(item.offset, item.length, lane);
      else await putData(item.offset, data!, lane);
    } catch (e) {
      throw wrap(`writing ${dst.name}`, e);
    }
    if (pooled) pool.push(pooled);
    progress.add(item.length);
  };

  try {
    for await (const item of plan) {
      while (active.size >= limit && !failure) await Promise.race(active);
      if (failure) break;
      const lane = index++ % lanes;
      end = Math.max(end, item.offset + item.length);
      let release: () => void = () => {};
      const after = dst.sequential ? turn : null;
      if (dst.sequential) turn = new Promise<void>((r) => release = r);
      const p: Promise<void> = run(item, lane, after)
        .catch((error) => {
          failure ??= { error };
          opts.abort(error);
        })
        .finally(() => {
          release();
          active.delete(p);
        });
      active.add(p);
    }
  } catch (error) {
    failure ??= { error: wrap(`reading ${src.name}`, error) };
    opts.abort(error);
  }
  await Promise.all(active);
  if (failure) throw failure.error;
  return end;
}

function wrap(what: string, e: unknown): Error {
  if (e instanceof DOMException && e.name === "AbortError") return e;
  const message = e instanceof Error ? e.message : String(e);
  return new Error(`${what}: ${message}`, { cause: e });
}

function readSettings(o: Map<string, string | true>): Settings {
  const str = (name: string) => {
    const v = o.get(name);
    return typeof v === "string" ? v : undefined;
  };
  const connections = str("connections");
  const requests = str("requests");
  const queueSize = str("queue-size");
  const requestSize = str("request-size");
  const sparse = str("sparse");
  const settings: Settings = {
    connections: connections === undefined
      ? 4
      : parseCount(connections, "--connections", 1, 64),
    requests: requests === undefined
      ? 64
      : parseCount(requests, "--requests", 1, 1024),
    queueSize: queueSize === undefined
      ? 16 * 1024 * 1024
      : parseSize(queueSize, "--queue-size"),
    requestSize: requestSize === undefined
      ? 256 * 1024
      : parseSize(requestSize, "--request-size"),
    sparse: sparse === undefined ? undefined : parseSize(sparse, "--sparse"),
    allocated: o.has("allocated"),
    destinationIsZero: o.has("destination-is-zero") || o.has("target-is-zero"),
    extents: !o.has("no-extents"),
    flush: o.has("flush"),
    verbose: o.has("verbose"),
  };
  if (
    settings.requestSize < 512 || settings.requestSize > MAX_REQUEST_SIZE ||
    settings.requestSize % 512 !== 0
  ) {
    throw new UsageError(
      `--request-size: must be a multiple of 512 from 512 to ${MAX_REQUEST_SIZE}`,
    );
  }
  return settings;
}

/** What the command line asks for. */
interface Request {
  source: string;
  destination: string;
  settings: Settings;
  progress: string | true | undefined;
  noProgress: boolean;
}

/**
 * Reads the command line.
 *
 * @returns The request, or `"help"`.
 * @throws {UsageError} On a malformed option or a missing endpoint.
 */
function parseRequest(args: string[]): Request | "help" {
  const { options, positionals } = parseArgs(args, OPTIONS);
  if (options.has("help")) return "help";
  if (positionals.length !== 2) {
    throw new UsageError("expected a SOURCE and a DESTINATION");
  }
  const progress = options.get("progress");
  if (typeof progress === "string") {
    parseCount(progress, "--progress", 1, 1 << 20);
  }
  return {
    source: positionals[0]!,
    destination: positionals[1]!,
    settings: readSettings(options),
    progress,
    noProgress: options.has("no-progress"),
  };
}

/**
 * Copies `src` to `dst` as the settings say.
 *
 * @returns The one-line summary for `--verbose`.
 * @throws The first failure, after everything in flight has settled.
 */
async function transfer(
  src: Source,
  dst: Destination,
  request: Request,
  controller: AbortController,
  onProgress: (p: Progress) => void,
): Promise<string> {
  const settings = request.settings;
  // Multi-conn only where every NBD side offers it (files count as
  // unlimited); a stream on either side keeps to one of everything.
  const lanes = Math.max(
    1,
    Math.min(settings.connections, src.maxLanes, dst.maxLanes),
  );
  await src.addLanes(lanes);
  await dst.addLanes(lanes);

  const size = src.size;
  if (size !== undefined && size % dst.alignment !== 0) {
    throw new Error(
      `the source's size ${size} is not a multiple of the destination's block size ${dst.alignment}`,
    );
  }
  await dst.prepare(size);
  const align = Math.max(src.alignment, dst.alignment);
  const requestSize = alignUp(settings.requestSize, align);
  const sparse = settings.sparse === undefined
    ? Math.max(4096, dst.preferred)
    : settings.sparse === 0
    ? 0
    : alignUp(settings.sparse, align);
  // As nbdcopy: at most --requests, and at most --queue-size bytes, in
  // flight per connection (but always at least one request).
  const perLane = Math.max(
    1,
    Math.min(settings.requests, Math.floor(settings.queueSize / requestSize)),
  );

  const progress = new Progress(
    progressMode(request.progress, request.noProgress),
    size,
  );
  onProgress(progress);
  const stats: Stats = { read: 0, written: 0, zeroed: 0 };
  const started = performance.now();
  const plan = size === undefined
    ? planStream(src, requestSize, dst.size)
    : planRange(
      src,
      size,
      requestSize,
      align,
      settings.extents && src.hasExtents,
      controller.signal,
    );
  const total = await pump(src, dst, plan, {
    lanes,
    limit: lanes * perLane,
    requestSize,
    sparse,
    progress,
    stats,
    signal: controller.signal,
    abort: (reason) => controller.abort(reason),
  });
  try {
    await dst.finish(size ?? total, settings.flush);
  } catch (e) {
    throw wrap(`finishing ${dst.name}`, e);
  }
  progress.finish(true);
  const seconds = (performance.now() - started) / 1000;
  return `copy: ${size ?? total} bytes in ${
    seconds.toFixed(3)
  } s over ${lanes} connection(s): read ${stats.read}, wrote ${stats.written}, zeroed ${stats.zeroed} (${
    humanBytes((size ?? total) / (seconds || 1))
  }/s)`;
}

/**
 * Runs the tool.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The exit status: 0 when every byte was copied, 1 otherwise, 130
 * when interrupted.
 */
export async function main(args: string[]): Promise<number> {
  let request: Request | "help";
  try {
    request = parseRequest(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    warnUsage("copy", e);
    return 1;
  }
  if (request === "help") {
    await writeAll(Deno.stdout, USAGE);
    return 0;
  }

  const controller = new AbortController();
  const interrupted = new Error("interrupted");
  // The first ^C stops the copy and closes the connections cleanly; a
  // second one, for a source that will not stop (stdin), exits at once.
  const onSignal = () => {
    if (controller.signal.aborted) Deno.exit(130);
    controller.abort(interrupted);
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const s of signals) Deno.addSignalListener(s, onSignal);
  let src: Source | undefined;
  let dst: Destination | undefined;
  let progress: Progress | undefined;
  try {
    src = await openSource(request.source, request.settings);
    dst = await openDestination(request.destination, request.settings);
    const summary = await transfer(
      src,
      dst,
      request,
      controller,
      (p) => progress = p,
    );
    if (request.settings.verbose) warn(summary);
    return 0;
  } catch (e) {
    const wasInterrupted = controller.signal.reason === interrupted;
    controller.abort(e);
    progress?.finish(false);
    if (wasInterrupted) {
      warn("copy: interrupted");
      return 130;
    }
    warn(errorLine("copy", e));
    return 1;
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, onSignal);
    await src?.close().catch(() => {});
    await dst?.close().catch(() => {});
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
