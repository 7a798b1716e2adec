/**
 * A scripted NBD server for the client's tests: correct by default, and able
 * to misbehave in every way a broken or hostile server might, one hook at a
 * time. Real servers are tested in `tests/interop/`; this one exists for what
 * real servers never do.
 *
 * ```ts
 * await using server = await startTestServer({
 *   exports: [{ name: "disk", size: 1 << 20 }],
 *   onCommand: (req) =>
 *     req.type === CMD_READ ? simpleReply(req.cookie, EIO) : undefined,
 * });
 * const client = await connect(server.uri);
 * ```
 *
 * Everything here is bounded: loops stop at a count, waits stop at a timer or
 * when the server closes, and `close()` leaves no resource open.
 *
 * @module
 */

import {
  CLISERV_MAGIC,
  CMD_BLOCK_STATUS,
  CMD_CACHE,
  CMD_DISC,
  CMD_FLAG_DF,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_PAYLOAD_LEN,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  COMMAND_NAMES,
  EINVAL,
  ENOSPC,
  EOVERFLOW,
  EPERM,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_CAN_MULTI_CONN,
  FLAG_FIXED_NEWSTYLE,
  FLAG_HAS_FLAGS,
  FLAG_NO_ZEROES,
  FLAG_READ_ONLY,
  FLAG_SEND_CACHE,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  INFO_NAME,
  NBDMAGIC,
  numberAndName,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_NAMES,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_BLOCK_SIZE_REQD,
  REP_ERR_INVALID,
  REP_ERR_POLICY,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
} from "../../lib/constants.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------
// Encoders: one line per hostile reply in a test.
// ---------------------------------------------------------------------------

/** Builds a big-endian message field by field. */
export class Builder {
  #buf = new Uint8Array(64);
  #view = new DataView(this.#buf.buffer);
  #len = 0;

  #room(n: number): number {
    const at = this.#len;
    if (at + n > this.#buf.length) {
      const next = new Uint8Array(Math.max(this.#buf.length * 2, at + n));
      next.set(this.#buf.subarray(0, at));
      this.#buf = next;
      this.#view = new DataView(next.buffer);
    }
    this.#len += n;
    return at;
  }

  /** Appends one byte. */
  u8(v: number): this {
    const at = this.#room(1);
    this.#view.setUint8(at, v);
    return this;
  }

  /** Appends a big-endian 16-bit field. */
  u16(v: number): this {
    const at = this.#room(2);
    this.#view.setUint16(at, v);
    return this;
  }

  /** Appends a big-endian 32-bit field. */
  u32(v: number): this {
    const at = this.#room(4);
    this.#view.setUint32(at, v >>> 0);
    return this;
  }

  /** Appends a big-endian 64-bit field. */
  u64(v: bigint | number): this {
    const at = this.#room(8);
    this.#view.setBigUint64(at, BigInt.asUintN(64, BigInt(v)));
    return this;
  }

  /** Appends raw bytes. */
  bytes(b: Uint8Array): this {
    const at = this.#room(b.length);
    this.#buf.set(b, at);
    return this;
  }

  /** Appends a string's UTF-8 bytes, without a length. */
  string(s: string): this {
    return this.bytes(encoder.encode(s));
  }

  /** Appends `n` zero bytes. */
  zeroes(n: number): this {
    this.#room(n);
    return this;
  }

  /** The message built so far. */
  done(): Uint8Array {
    return this.#buf.slice(0, this.#len);
  }
}

/** Joins byte arrays. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function toBytes(data: Uint8Array | string | undefined): Uint8Array {
  if (data === undefined) return new Uint8Array(0);
  return typeof data === "string" ? encoder.encode(data) : data;
}

/** The newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export function newstyleGreeting(
  handshakeFlags: number = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
): Uint8Array {
  return new Builder().u64(NBDMAGIC).u64(IHAVEOPT).u16(handshakeFlags).done();
}

/** The whole oldstyle greeting: magics, size, 32-bit flags, 124 zeroes. */
export function oldstyleGreeting(
  size: bigint | number,
  flags: number,
): Uint8Array {
  return new Builder().u64(NBDMAGIC).u64(CLISERV_MAGIC).u64(size).u32(flags)
    .zeroes(124).done();
}

/**
 * An option reply: magic, option, reply type, length, data.
 *
 * @param option The option this answers (a hostile test may name another).
 * @param type `NBD_REP_*`; error types may carry a message as `data`.
 * @param data The payload, or a string sent as UTF-8.
 */
export function optionReply(
  option: number,
  type: number,
  data?: Uint8Array | string,
): Uint8Array {
  const payload = toBytes(data);
  return new Builder().u64(OPTION_REPLY_MAGIC).u32(option).u32(type)
    .u32(payload.length).bytes(payload).done();
}

/** The payload of `NBD_REP_SERVER`: name length, name, description. */
export function repServerPayload(
  name: string,
  description = "",
): Uint8Array {
  const n = encoder.encode(name);
  return new Builder().u32(n.length).bytes(n).string(description).done();
}

/** The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size, flags. */
export function infoExportPayload(
  size: bigint | number,
  flags: number,
): Uint8Array {
  return new Builder().u16(INFO_EXPORT).u64(size).u16(flags).done();
}

/** The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`. */
export function infoBlockSizePayload(
  minimum: number,
  preferred: number,
  maximum: number,
): Uint8Array {
  return new Builder().u16(INFO_BLOCK_SIZE).u32(minimum).u32(preferred)
    .u32(maximum).done();
}

/** The payload of an `NBD_REP_INFO` holding a string (name, description). */
export function infoStringPayload(type: number, text: string): Uint8Array {
  return new Builder().u16(type).string(text).done();
}

/** The payload of `NBD_REP_META_CONTEXT`: context id, name. */
export function metaContextPayload(id: number, name: string): Uint8Array {
  return new Builder().u32(id).string(name).done();
}

/**
 * The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and unless
 * `noZeroes`, 124 zero bytes.
 */
export function exportNameReply(
  size: bigint | number,
  flags: number,
  noZeroes = false,
): Uint8Array {
  const b = new Builder().u64(size).u16(flags);
  if (!noZeroes) b.zeroes(124);
  return b.done();
}

/** A simple reply: magic, errno, cookie, then `data` (for a read). */
export function simpleReply(
  cookie: bigint,
  errno = 0,
  data?: Uint8Array,
): Uint8Array {
  const b = new Builder().u32(SIMPLE_REPLY_MAGIC).u32(errno).u64(cookie);
  if (data) b.bytes(data);
  return b.done();
}

/**
 * A structured reply chunk. `length` overrides the header's length field
 * (to lie about it); the payload is sent as given either way.
 */
export function structuredChunk(
  cookie: bigint,
  flags: number,
  type: number,
  payload: Uint8Array = new Uint8Array(0),
  length: number = payload.length,
): Uint8Array {
  return new Builder().u32(STRUCTURED_REPLY_MAGIC).u16(flags).u16(type)
    .u64(cookie).u32(length).bytes(payload).done();
}

/**
 * An extended reply chunk (extended headers). `offset` MUST be the request's
 * offset; `length` overrides the 64-bit length field.
 */
export function extendedChunk(
  cookie: bigint,
  flags: number,
  type: number,
  offset: bigint | number,
  payload: Uint8Array = new Uint8Array(0),
  length: bigint | number = payload.length,
): Uint8Array {
  return new Builder().u32(EXTENDED_REPLY_MAGIC).u16(flags).u16(type)
    .u64(cookie).u64(offset).u64(length).bytes(payload).done();
}

/** `NBD_REPLY_TYPE_OFFSET_DATA` payload: offset, data. */
export function offsetDataPayload(
  offset: bigint | number,
  data: Uint8Array,
): Uint8Array {
  return new Builder().u64(offset).bytes(data).done();
}

/** `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset, 32-bit hole size. */
export function offsetHolePayload(
  offset: bigint | number,
  size: number,
): Uint8Array {
  return new Builder().u64(offset).u32(size).done();
}

/** `NBD_REPLY_TYPE_ERROR` payload: errno, message length, message. */
export function errorPayload(errno: number, message = ""): Uint8Array {
  const m = encoder.encode(message);
  return new Builder().u32(errno).u16(m.length).bytes(m).done();
}

/** `NBD_REPLY_TYPE_ERROR_OFFSET` payload: errno, message, offset. */
export function errorOffsetPayload(
  errno: number,
  message: string,
  offset: bigint | number,
): Uint8Array {
  const m = encoder.encode(message);
  return new Builder().u32(errno).u16(m.length).bytes(m).u64(offset).done();
}

/** One extent of a metadata context. */
export interface Extent {
  /** Bytes covered. */
  length: number;
  /** Context-defined flags (`STATE_HOLE | STATE_ZERO` for base:allocation). */
  flags: number;
}

/** `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id, {u32 length, u32 flags}*. */
export function blockStatusPayload(id: number, extents: Extent[]): Uint8Array {
  const b = new Builder().u32(id);
  for (const e of extents) b.u32(e.length).u32(e.flags);
  return b.done();
}

/**
 * `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload: context id, descriptor count,
 * {u64 length, u64 flags}*.
 */
export function blockStatusExtPayload(
  id: number,
  extents: Extent[],
  count: number = extents.length,
): Uint8Array {
  const b = new Builder().u32(id).u32(count);
  for (const e of extents) b.u64(e.length).u64(e.flags);
  return b.done();
}

// ---------------------------------------------------------------------------
// Exports and their backing memory.
// ---------------------------------------------------------------------------

/** Pages are allocated on first write, so a large export costs nothing. */
const PAGE_SIZE = 64 * 1024;
/** base:allocation extents are cut at this length to fit a u32. */
const MAX_EXTENT = 0x80000000;

/** The memory behind one export: sparse, zero until written. */
export class TestDisk {
  /** Export size in bytes. */
  readonly size: number;
  #pages = new Map<number, Uint8Array>();

  /** @param size Export size; must be a safe integer. */
  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`Bad export size ${size}`);
    }
    this.size = size;
  }

  /** Copies `length` bytes at `offset` out of the disk. */
  read(offset: number, length: number): Uint8Array {
    this.#check(offset, length);
    const out = new Uint8Array(length);
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, length - at);
      const page = this.#pages.get(index);
      if (page) out.set(page.subarray(within, within + n), at);
      at += n;
    }
    return out;
  }

  /** Writes `data` at `offset`, allocating pages. */
  write(offset: number, data: Uint8Array): void {
    this.#check(offset, data.length);
    let at = 0;
    while (at < data.length) {
      const pos = offset + at;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, data.length - at);
      let page = this.#pages.get(index);
      if (!page) {
        page = new Uint8Array(PAGE_SIZE);
        this.#pages.set(index, page);
      }
      page.set(data.subarray(at, at + n), within);
      at += n;
    }
  }

  /**
   * Zeroes a range. With `punch`, pages wholly inside it are released (they
   * read as zero and report as holes); without, they stay allocated.
   */
  zero(offset: number, length: number, punch: boolean): void {
    this.#check(offset, length);
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, length - at);
      const page = this.#pages.get(index);
      if (punch && n === PAGE_SIZE) this.#pages.delete(index);
      else if (page) page.fill(0, within, within + n);
      else if (!punch) this.#pages.set(index, new Uint8Array(PAGE_SIZE));
      at += n;
    }
  }

  /** Whether any byte of the page holding `offset` was ever written. */
  allocated(offset: number): boolean {
    return this.#pages.has(Math.floor(offset / PAGE_SIZE));
  }

  /**
   * Splits a range into runs of allocated and unallocated pages, in order.
   * Bounded by the number of pages in the range.
   */
  runs(offset: number, length: number): { length: number; hole: boolean }[] {
    this.#check(offset, length);
    const out: { length: number; hole: boolean }[] = [];
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const index = Math.floor(pos / PAGE_SIZE);
      const n = Math.min((index + 1) * PAGE_SIZE - pos, length - at);
      const hole = !this.#pages.has(index);
      const last = out[out.length - 1];
      if (last && last.hole === hole && last.length + n <= MAX_EXTENT) {
        last.length += n;
      } else out.push({ length: n, hole });
      at += n;
    }
    return out;
  }

  #check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(
        `Range ${offset}+${length} is outside the disk of ${this.size} bytes`,
      );
    }
  }
}

/** Block size constraints, as in `NBD_INFO_BLOCK_SIZE`. */
export interface BlockSize {
  /** Minimum block size; offsets and lengths are multiples of it. */
  minimum: number;
  /** Preferred block size. */
  preferred: number;
  /** Maximum payload size. */
  maximum: number;
}

/** One export of the test server. */
export interface ExportConfig {
  /** Export name; `""` also answers the default-export request. */
  name: string;
  /** Size in bytes (backing memory is allocated lazily). */
  size: number;
  /** Initial contents from offset 0; all-zero 64 KiB pages stay holes. */
  data?: Uint8Array;
  /** Text for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`. */
  description?: string;
  /** Sets `NBD_FLAG_READ_ONLY`; writes fail with EPERM. */
  readOnly?: boolean;
  /**
   * Exact transmission flags (`NBD_FLAG_HAS_FLAGS` is always added). By
   * default: flush, FUA, trim, write zeroes, fast zero, cache, multi-conn,
   * and DF when structured replies are on.
   */
  flags?: number;
  /** Sent in `NBD_INFO_BLOCK_SIZE` when asked, and enforced on requests. */
  blockSize?: BlockSize;
  /**
   * A fixed `base:allocation` map from offset 0. By default the map follows
   * the backing memory: unwritten pages are `STATE_HOLE | STATE_ZERO`.
   */
  allocation?: Extent[];
  /** Further metadata contexts by name, each a map from offset 0. */
  contexts?: Record<string, Extent[]>;
}

const BASE_ALLOCATION = "base:allocation";

const DEFAULT_FLAGS = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM |
  FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO | FLAG_SEND_CACHE |
  FLAG_CAN_MULTI_CONN;

// ---------------------------------------------------------------------------
// Hooks and records.
// ---------------------------------------------------------------------------

/**
 * What a hook asks the server to do, in order: send bytes, close the
 * connection (`"drop"`), wait until the server closes (`"stall"`), or pause.
 */
export type Action = Uint8Array | "drop" | "stall" | { delay: number };

/**
 * What an option hook may also ask: `"transmission"` moves the connection to
 * the transmission phase with the export named in the option (or the default
 * one), after the bytes before it were sent.
 */
export type OptionAction = Action | "transmission";

/** An option as received. */
export interface ReceivedOption {
  /** The option number. */
  option: number;
  /** "7 (NBD_OPT_GO)". */
  name: string;
  /** The option data. */
  payload: Uint8Array;
}

/** A request header as received (plus the write payload). */
export interface ReceivedRequest {
  /** The request magic (compact or extended). */
  magic: number;
  /** Whether the request used the 32-byte extended header. */
  extended: boolean;
  /** Command flags. */
  flags: number;
  /** Command type. */
  type: number;
  /** "1 (NBD_CMD_WRITE)". */
  name: string;
  /** The cookie to echo. */
  cookie: bigint;
  /** Offset. */
  offset: bigint;
  /** Length (u32 in compact requests, u64 in extended ones). */
  length: bigint;
  /** Index of this request on its connection, from 0. */
  index: number;
  /** The write payload, if any (not kept in the log). */
  data?: Uint8Array;
}

/** Everything one connection received, for assertions. */
export interface ConnectionLog {
  /** Connection number, from 0 in accept order. */
  readonly id: number;
  /** The 32-bit client flags, once received. */
  clientFlags: number | undefined;
  /** Every option, in order, with its data. */
  readonly options: ReceivedOption[];
  /** Every request header, in order (payloads are not kept). */
  readonly requests: Omit<ReceivedRequest, "data">[];
  /** The export in use once in transmission. */
  exportName: string | undefined;
  /** Whether structured replies were negotiated. */
  structuredReplies: boolean;
  /** Whether extended headers were negotiated. */
  extendedHeaders: boolean;
  /** Selected metadata contexts by id. */
  metaContexts: { id: number; name: string }[];
  /** Why the server closed the connection, when it did it on purpose. */
  readonly notes: string[];
  /** Set once the connection is over. */
  closed: boolean;
}

/** The negotiated state a hook can read. */
export interface ConnectionState {
  /** The log of this connection (also in `server.log`). */
  readonly log: ConnectionLog;
  /** `"handshake"` or `"transmission"`. */
  readonly phase: "handshake" | "transmission";
  /** Whether the client asked for NO_ZEROES. */
  readonly noZeroes: boolean;
  /** Whether structured replies are on. */
  readonly structuredReplies: boolean;
  /** Whether extended headers are on. */
  readonly extendedHeaders: boolean;
  /** The export in use, once in transmission. */
  readonly disk: TestDisk | undefined;
  /** The configuration of that export. */
  readonly export: ExportConfig | undefined;
}

/** What hooks get besides the message: state and a way to act at once. */
export interface HookContext {
  /** Negotiated state and the connection's log. */
  readonly state: ConnectionState;
  /** Sends bytes now, in order with everything else this connection sends. */
  send(...messages: Uint8Array[]): Promise<void>;
  /** Closes the connection at once. */
  drop(): void;
  /** Resolves when the connection or the server closes. */
  readonly closed: Promise<void>;
}

/** Extra for command hooks. */
export interface CommandContext extends HookContext {
  /**
   * Carries out the command as a correct server would (writes included) and
   * returns the reply messages without sending them.
   */
  defaultReply(): Promise<Uint8Array[]>;
}

/** Extra for option hooks. */
export interface OptionContext extends HookContext {
  /**
   * Carries out the option as a correct server would and returns the reply
   * bytes without sending them. For GO and EXPORT_NAME, pair it with
   * `"transmission"`.
   */
  defaultReply(): Uint8Array[];
}

/** A hook's answer: nothing for the default behaviour, or actions. */
export type HookResult<A> = undefined | A | A[];

/** How `NBD_OPT_STARTTLS` (or any option) is refused. */
export interface ReplyOverride {
  /** The reply type to send. */
  reply: number;
  /** Optional text (for error replies). */
  message?: string;
}

/** Configuration of {@linkcode startTestServer}. */
export interface TestServerConfig {
  /** Negotiation style; fixed newstyle by default. */
  style?: "oldstyle" | "newstyle" | "fixed";
  /** Where to listen; a Unix socket by default. */
  listen?: "unix" | "tcp" | "both";
  /** The exports; one 1 MiB export named "" by default. */
  exports?: ExportConfig[];
  /**
   * Handshake flags to advertise. Default: FIXED_NEWSTYLE | NO_ZEROES for
   * fixed newstyle, 0 for newstyle.
   */
  handshakeFlags?: number;
  /**
   * Raw bytes sent instead of the greeting (the rest goes on as usual), or
   * actions, e.g. `[bytes.subarray(0, 11), "drop"]`.
   */
  greeting?: Uint8Array | Action[];
  /** Accept connections but send nothing until closed. */
  stallHandshake?: boolean;
  /** Accept `NBD_OPT_STRUCTURED_REPLY` (default true). */
  structuredReplies?: boolean;
  /** Accept `NBD_OPT_EXTENDED_HEADERS` (default true). */
  extendedHeaders?: boolean;
  /** How to answer STARTTLS; `NBD_REP_ERR_POLICY` by default. */
  starttls?: ReplyOverride;
  /** Fixed replies per option number, replacing the default handling. */
  optionReplies?: Record<number, number | ReplyOverride>;
  /** Extra `NBD_REP_INFO` replies sent before NBD_INFO_EXPORT in INFO/GO. */
  unknownInfos?: { type: number; data?: Uint8Array }[];
  /** Send NBD_INFO_BLOCK_SIZE even if the client did not ask. */
  alwaysSendBlockSize?: boolean;
  /** Refuse GO with ERR_BLOCK_SIZE_REQD unless the client asks for sizes. */
  blockSizeRequired?: boolean;
  /** Answer requests in reverse order of arrival within a short window. */
  reorder?: boolean;
  /** The reorder window in milliseconds (default 5). */
  reorderWindowMs?: number;
  /** Delay before handling each request, in milliseconds. */
  delay?: number | ((req: ReceivedRequest) => number);
  /** Split structured read replies into chunks of this many bytes. */
  readChunkSize?: number;
  /** Send the chunks of one read in reverse order. */
  shuffleChunks?: boolean;
  /** Send unwritten pages as NBD_REPLY_TYPE_OFFSET_HOLE in structured reads. */
  readHoles?: boolean;
  /** End successful non-read replies with a NONE chunk instead of a simple reply. */
  noneChunks?: boolean;
  /** Called on every option before the default handling. */
  onOption?: (
    opt: ReceivedOption,
    ctx: OptionContext,
  ) => HookResult<OptionAction> | Promise<HookResult<OptionAction>>;
  /** Called on every request (after its payload was read). */
  onCommand?: (
    req: ReceivedRequest,
    ctx: CommandContext,
  ) => HookResult<Action> | Promise<HookResult<Action>>;
  /** Bound on options per connection (default 64). */
  maxOptions?: number;
  /** Bound on requests per connection (default 1,000,000). */
  maxRequests?: number;
  /** Bound on accepted connections (default 1000). */
  maxConnections?: number;
}

/** The running server. */
export interface TestServer extends AsyncDisposable {
  /** The Unix socket path, when listening on one. */
  readonly path: string | undefined;
  /** The TCP port on 127.0.0.1, when listening on TCP. */
  readonly port: number | undefined;
  /** A URI for the first export (Unix socket preferred). */
  readonly uri: string;
  /** A URI for a given export. */
  uriFor(exportName: string, transport?: "unix" | "tcp"): string;
  /** One record per accepted connection. */
  readonly log: readonly ConnectionLog[];
  /** The backing memory of an export (the first one by default). */
  disk(name?: string): TestDisk;
  /**
   * Waits until every accepted connection is over.
   *
   * @throws {Error} after `timeoutMs` (default 5000).
   */
  settled(timeoutMs?: number): Promise<void>;
  /** Closes the listeners and every connection, and waits for them. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------
// Parsing what the client sends.
// ---------------------------------------------------------------------------

class Cursor {
  #view: DataView;
  #u8: Uint8Array;
  #at = 0;

  constructor(u8: Uint8Array) {
    this.#u8 = u8;
    this.#view = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  }

  get left(): number {
    return this.#u8.length - this.#at;
  }

  #take(n: number): number {
    if (n > this.left) throw new RangeError("short option data");
    const at = this.#at;
    this.#at += n;
    return at;
  }

  u16(): number {
    return this.#view.getUint16(this.#take(2));
  }

  u32(): number {
    return this.#view.getUint32(this.#take(4));
  }

  u64(): bigint {
    return this.#view.getBigUint64(this.#take(8));
  }

  string(n: number): string {
    const at = this.#take(n);
    return decoder.decode(this.#u8.subarray(at, at + n));
  }
}

/** Option data beyond this is a hostile client; the server hangs up. */
const MAX_OPTION_DATA = 1 << 20;
/** Write payloads beyond this are not read; the server hangs up. */
const MAX_WRITE_PAYLOAD = 64 * 1024 * 1024;
/** Longest compact descriptor: a u32, kept 512-aligned. */
const DEFAULT_BLOCK_STATUS_MAX = 0xfffffe00;
/** Messages are joined into writes of up to this many bytes. */
const COALESCE_LIMIT = 256 * 1024;
/** A stalled connection drops at most this much client data, then hangs up. */
const STALL_DRAIN_LIMIT = 16 * 1024 * 1024;

class Hangup extends Error {}

// ---------------------------------------------------------------------------
// One connection.
// ---------------------------------------------------------------------------

interface ExportState {
  config: ExportConfig;
  disk: TestDisk;
}

/** A read-only window on a connection's negotiated state. */
class StateView implements ConnectionState {
  #c: Connection;

  constructor(c: Connection) {
    this.#c = c;
  }

  get log(): ConnectionLog {
    return this.#c.log;
  }

  get phase(): "handshake" | "transmission" {
    return this.#c.phase;
  }

  get noZeroes(): boolean {
    return this.#c.noZeroes;
  }

  get structuredReplies(): boolean {
    return this.#c.structured;
  }

  get extendedHeaders(): boolean {
    return this.#c.extended;
  }

  get disk(): TestDisk | undefined {
    return this.#c.current?.disk;
  }

  get export(): ExportConfig | undefined {
    return this.#c.current?.config;
  }
}

class Connection {
  readonly log: ConnectionLog;
  #conn: Deno.Conn;
  #server: ServerImpl;
  #config: TestServerConfig;
  #closed = Promise.withResolvers<void>();
  #isClosed = false;
  #writeTail: Promise<void> = Promise.resolve();
  #timers = new Set<ReturnType<typeof setTimeout>>();
  #handlers = new Set<Promise<void>>();
  #batch: Uint8Array[][] = [];
  #batchTimer: ReturnType<typeof setTimeout> | undefined;
  phase: "handshake" | "transmission" = "handshake";
  noZeroes = false;
  fixed = false;
  structured = false;
  extended = false;
  current: ExportState | undefined;
  /** Contexts chosen by SET_META_CONTEXT, with the export they were set for. */
  contexts: { id: number; name: string }[] = [];
  contextsExport: string | undefined;

  constructor(
    id: number,
    conn: Deno.Conn,
    server: ServerImpl,
    config: TestServerConfig,
  ) {
    this.log = {
      id,
      clientFlags: undefined,
      options: [],
      requests: [],
      exportName: undefined,
      structuredReplies: false,
      extendedHeaders: false,
      metaContexts: [],
      notes: [],
      closed: false,
    };
    this.#conn = conn;
    this.#server = server;
    this.#config = config;
  }

  get closed(): Promise<void> {
    return this.#closed.promise;
  }

  get state(): ConnectionState {
    return new StateView(this);
  }

  close(note?: string): void {
    if (note) this.log.notes.push(note);
    if (this.#isClosed) return;
    this.#isClosed = true;
    this.log.closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    if (this.#batchTimer !== undefined) clearTimeout(this.#batchTimer);
    this.#batchTimer = undefined;
    this.#batch = [];
    try {
      this.#conn.close();
    } catch {
      // The client closed first.
    }
    this.#closed.resolve();
  }

  /** Waits `ms`, or less if the connection closes first. */
  sleep(ms: number): Promise<void> {
    if (this.#isClosed || ms <= 0) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.#timers.delete(t);
        resolve();
      }, ms);
      this.#timers.add(t);
      this.#closed.promise.then(() => {
        clearTimeout(t);
        this.#timers.delete(t);
        resolve();
      });
    });
  }

  /**
   * Waits until the server closes or the client hangs up, dropping whatever
   * the client sends meanwhile (up to a bound), then closes.
   */
  async stallReading(): Promise<void> {
    const scratch = new Uint8Array(4096);
    const draining = (async () => {
      for (let total = 0; total < STALL_DRAIN_LIMIT;) {
        let n: number | null;
        try {
          n = await this.#conn.read(scratch);
        } catch {
          return;
        }
        if (n === null) {
          this.log.notes.push("client closed during a stall");
          return;
        }
        total += n;
      }
    })();
    await Promise.race([this.#closed.promise, draining]);
    this.close();
    await draining;
  }

  /** Reads exactly `n` bytes; `null` on a clean end before the first byte. */
  async readExact(n: number): Promise<Uint8Array | null> {
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      if (this.#isClosed) throw new Hangup();
      let r: number | null;
      try {
        r = await this.#conn.read(out.subarray(got));
      } catch {
        throw new Hangup();
      }
      if (r === null) {
        if (got === 0) return null;
        this.log.notes.push(`client closed after ${got} of ${n} bytes`);
        throw new Hangup();
      }
      got += r;
    }
    return out;
  }

  async mustRead(n: number): Promise<Uint8Array> {
    const b = await this.readExact(n);
    if (b === null) throw new Hangup();
    return b;
  }

  /** Queues one message; messages never interleave. */
  send(...messages: Uint8Array[]): Promise<void> {
    const run = this.#writeTail.then(async () => {
      for (const m of coalesce(messages)) {
        let at = 0;
        while (at < m.length) {
          if (this.#isClosed) throw new Hangup();
          try {
            at += await this.#conn.write(m.subarray(at));
          } catch {
            throw new Hangup();
          }
        }
      }
    });
    this.#writeTail = run.catch(() => {});
    return run;
  }

  /** Carries out hook actions in order. */
  async act(actions: readonly (Action | OptionAction)[]): Promise<void> {
    for (const a of actions) {
      if (this.#isClosed) return;
      if (a instanceof Uint8Array) await this.send(a);
      else if (a === "drop") {
        await this.#writeTail;
        this.close("dropped by hook");
      } else if (a === "stall") {
        // In transmission the request loop notices a hang-up; before it,
        // nothing is reading, so the stall reads (and drops) by itself.
        if (this.phase === "handshake") await this.stallReading();
        else await this.#closed.promise;
      } else if (a === "transmission") continue;
      else await this.sleep(a.delay);
    }
  }

  track(p: Promise<void>): void {
    const tracked = p.catch((e) => {
      if (!(e instanceof Hangup)) {
        this.log.notes.push(`server error: ${String(e)}`);
      }
    }).finally(() => {
      this.#handlers.delete(tracked);
    });
    this.#handlers.add(tracked);
  }

  async drainHandlers(): Promise<void> {
    // Each round waits for what was in flight; handlers never spawn others.
    await Promise.all([...this.#handlers]);
  }

  /** Sends a reply now, or holds it for the reorder window. */
  reply(messages: Uint8Array[]): Promise<void> {
    if (!this.#config.reorder) return this.send(...messages);
    this.#batch.push(messages);
    if (this.#batchTimer === undefined) {
      this.#batchTimer = setTimeout(() => {
        this.#batchTimer = undefined;
        this.flushBatch().catch(() => {});
      }, this.#config.reorderWindowMs ?? 5);
    }
    return Promise.resolve();
  }

  /** Sends held replies: last request first, chunks interleaved. */
  async flushBatch(): Promise<void> {
    if (this.#batchTimer !== undefined) clearTimeout(this.#batchTimer);
    this.#batchTimer = undefined;
    const batch = this.#batch.reverse();
    this.#batch = [];
    const order: Uint8Array[] = [];
    let longest = 0;
    for (const r of batch) longest = Math.max(longest, r.length);
    for (let i = 0; i < longest; i++) {
      for (const r of batch) {
        const m = r[i];
        if (m) order.push(m);
      }
    }
    await this.send(...order);
  }

  async run(): Promise<void> {
    try {
      await this.#handshake();
      if (this.phase === "transmission") await this.#transmission();
    } catch (e) {
      if (!(e instanceof Hangup)) {
        this.log.notes.push(`server error: ${String(e)}`);
      }
    } finally {
      await this.drainHandlers();
      await this.#writeTail;
      this.close();
    }
  }

  // --- Handshake -----------------------------------------------------------

  /** Sends the greeting, or what the configuration has instead. */
  async #greet(standard: Uint8Array): Promise<void> {
    const g = this.#config.greeting ?? standard;
    await this.act(g instanceof Uint8Array ? [g] : g);
  }

  async #handshake(): Promise<void> {
    const cfg = this.#config;
    if (cfg.stallHandshake) {
      await this.stallReading();
      return;
    }
    const style = cfg.style ?? "fixed";
    if (style === "oldstyle") {
      const ex = this.#server.defaultExport();
      this.current = ex;
      await this.#greet(
        oldstyleGreeting(ex.config.size, this.#transmissionFlags(ex)),
      );
      if (this.#isClosed) return;
      this.log.exportName = ex.config.name;
      this.phase = "transmission";
      return;
    }
    const advertised = cfg.handshakeFlags ??
      (style === "fixed" ? FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES : 0);
    await this.#greet(newstyleGreeting(advertised));
    if (this.#isClosed) return;
    const flagBytes = await this.mustRead(4);
    const clientFlags = new DataView(flagBytes.buffer).getUint32(0);
    this.log.clientFlags = clientFlags;
    const allowed =
      (advertised & FLAG_FIXED_NEWSTYLE ? FLAG_C_FIXED_NEWSTYLE : 0) |
      (advertised & FLAG_NO_ZEROES ? FLAG_C_NO_ZEROES : 0);
    if (clientFlags & ~allowed) {
      this.close(
        `client flags 0x${clientFlags.toString(16)} not advertised; hung up`,
      );
      return;
    }
    this.fixed = (clientFlags & FLAG_C_FIXED_NEWSTYLE) !== 0 &&
      style === "fixed";
    this.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    const max = cfg.maxOptions ?? 64;
    for (let i = 0; i < max; i++) {
      const header = await this.readExact(16);
      if (header === null) {
        this.log.notes.push("client closed during the handshake");
        return;
      }
      const view = new DataView(header.buffer);
      if (view.getBigUint64(0) !== IHAVEOPT) {
        this.close("bad option magic; hung up");
        return;
      }
      const option = view.getUint32(8);
      const length = view.getUint32(12);
      if (length > MAX_OPTION_DATA) {
        this.close(`option data of ${length} bytes; hung up`);
        return;
      }
      const payload = await this.mustRead(length);
      const received: ReceivedOption = {
        option,
        name: numberAndName(OPTION_NAMES, option),
        payload,
      };
      this.log.options.push(received);
      const done = await this.#option(received);
      if (done || this.#isClosed) return;
    }
    this.close(`more than ${max} options; hung up`);
  }

  /** Handles one option; `true` once the handshake is over. */
  async #option(opt: ReceivedOption): Promise<boolean> {
    const cfg = this.#config;
    const ctx: OptionContext = {
      state: this.state,
      send: (...m) => this.send(...m),
      drop: () => this.close("dropped by hook"),
      closed: this.#closed.promise,
      defaultReply: () => this.#defaultOption(opt).replies,
    };
    const hooked = cfg.onOption ? await cfg.onOption(opt, ctx) : undefined;
    if (hooked !== undefined) {
      const actions = Array.isArray(hooked) ? hooked : [hooked];
      await this.act(actions);
      if (actions.includes("transmission")) {
        const name = optionExportName(opt) ?? "";
        const ex = this.#server.findExport(name) ??
          this.#server.defaultExport();
        this.#enterTransmission(ex);
        return true;
      }
      return actions.includes("drop") || actions.includes("stall");
    }
    const override = cfg.optionReplies?.[opt.option];
    if (
      override !== undefined && (this.fixed || opt.option !== OPT_EXPORT_NAME)
    ) {
      const o = typeof override === "number" ? { reply: override } : override;
      await this.send(optionReply(opt.option, o.reply, o.message));
      if (opt.option === OPT_ABORT) {
        this.close("client aborted");
        return true;
      }
      return false;
    }
    const result = this.#defaultOption(opt);
    await this.send(...result.replies);
    if (result.hangup) {
      this.close(result.hangup);
      return true;
    }
    if (result.enter) {
      this.#enterTransmission(result.enter);
      return true;
    }
    return false;
  }

  #enterTransmission(ex: ExportState): void {
    this.current = ex;
    this.log.exportName = ex.config.name;
    if (this.contextsExport !== ex.config.name) this.contexts = [];
    this.log.metaContexts = [...this.contexts];
    this.log.structuredReplies = this.structured;
    this.log.extendedHeaders = this.extended;
    this.phase = "transmission";
  }

  /**
   * The correct answer to an option, as bytes, plus what follows it. Side
   * effects on negotiated state happen here (structured replies, contexts).
   */
  #defaultOption(
    opt: ReceivedOption,
  ): { replies: Uint8Array[]; enter?: ExportState; hangup?: string } {
    const cfg = this.#config;
    const o = opt.option;
    const err = (type: number, message: string) => ({
      replies: [optionReply(o, type, message)],
    });
    if (!this.fixed && o !== OPT_EXPORT_NAME) {
      // Non-fixed newstyle servers knew no other option and hung up.
      return {
        replies: [],
        hangup: `option ${opt.name} in non-fixed newstyle; hung up`,
      };
    }
    switch (o) {
      case OPT_EXPORT_NAME: {
        const name = decoder.decode(opt.payload);
        const ex = this.#server.findExport(name);
        if (!ex) {
          return { replies: [], hangup: `no export "${name}"; hung up` };
        }
        return {
          replies: [
            exportNameReply(
              ex.config.size,
              this.#transmissionFlags(ex),
              this.noZeroes,
            ),
          ],
          enter: ex,
        };
      }
      case OPT_ABORT:
        return { replies: [optionReply(o, REP_ACK)], hangup: "client aborted" };
      case OPT_LIST: {
        if (opt.payload.length !== 0) {
          return err(REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        }
        const replies = this.#server.exports.map((ex) =>
          optionReply(
            o,
            REP_SERVER,
            repServerPayload(ex.config.name, ex.config.description ?? ""),
          )
        );
        replies.push(optionReply(o, REP_ACK));
        return { replies };
      }
      case OPT_STARTTLS: {
        const r = cfg.starttls ?? { reply: REP_ERR_POLICY };
        return {
          replies: [
            optionReply(o, r.reply, r.message ?? "TLS is not available"),
          ],
        };
      }
      case OPT_INFO:
      case OPT_GO:
        return this.#infoOrGo(opt);
      case OPT_STRUCTURED_REPLY:
        if (cfg.structuredReplies === false) {
          return err(REP_ERR_UNSUP, "structured replies are off");
        }
        if (opt.payload.length !== 0) {
          return err(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        }
        this.structured = true;
        return { replies: [optionReply(o, REP_ACK)] };
      case OPT_EXTENDED_HEADERS:
        if (cfg.extendedHeaders === false) {
          return err(REP_ERR_UNSUP, "extended headers are off");
        }
        if (opt.payload.length !== 0) {
          return err(REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
        }
        this.extended = true;
        this.structured = true;
        return { replies: [optionReply(o, REP_ACK)] };
      case OPT_LIST_META_CONTEXT:
      case OPT_SET_META_CONTEXT:
        return this.#metaContext(opt);
      default:
        return err(REP_ERR_UNSUP, `option ${opt.name} is not supported`);
    }
  }

  #infoOrGo(
    opt: ReceivedOption,
  ): { replies: Uint8Array[]; enter?: ExportState } {
    const o = opt.option;
    let name: string;
    const requested: number[] = [];
    try {
      const c = new Cursor(opt.payload);
      name = c.string(c.u32());
      const n = c.u16();
      for (let i = 0; i < n; i++) requested.push(c.u16());
      if (c.left !== 0) throw new RangeError("trailing data");
    } catch {
      return {
        replies: [optionReply(o, REP_ERR_INVALID, "malformed option data")],
      };
    }
    const ex = this.#server.findExport(name);
    if (!ex) {
      return {
        replies: [
          optionReply(o, REP_ERR_UNKNOWN, `no export named "${name}"`),
        ],
      };
    }
    const cfg = this.#config;
    const c = ex.config;
    const wantsSizes = requested.includes(INFO_BLOCK_SIZE);
    if (cfg.blockSizeRequired && !wantsSizes) {
      return {
        replies: [
          optionReply(o, REP_ERR_BLOCK_SIZE_REQD, "block sizes required"),
        ],
      };
    }
    const replies: Uint8Array[] = [];
    replies.push(...this.#server.unknownInfoReplies(o));
    if (requested.includes(INFO_NAME)) {
      replies.push(
        optionReply(o, REP_INFO, infoStringPayload(INFO_NAME, c.name)),
      );
    }
    if (requested.includes(INFO_DESCRIPTION) && c.description !== undefined) {
      replies.push(
        optionReply(
          o,
          REP_INFO,
          infoStringPayload(INFO_DESCRIPTION, c.description),
        ),
      );
    }
    if ((wantsSizes || cfg.alwaysSendBlockSize) && c.blockSize) {
      const b = c.blockSize;
      replies.push(
        optionReply(
          o,
          REP_INFO,
          infoBlockSizePayload(b.minimum, b.preferred, b.maximum),
        ),
      );
    }
    replies.push(
      optionReply(
        o,
        REP_INFO,
        infoExportPayload(c.size, this.#transmissionFlags(ex)),
      ),
    );
    replies.push(optionReply(o, REP_ACK));
    return o === OPT_GO ? { replies, enter: ex } : { replies };
  }

  #metaContext(opt: ReceivedOption): { replies: Uint8Array[] } {
    const o = opt.option;
    if (!this.structured) {
      return {
        replies: [
          optionReply(o, REP_ERR_INVALID, "negotiate structured replies first"),
        ],
      };
    }
    let name: string;
    const queries: string[] = [];
    try {
      const c = new Cursor(opt.payload);
      name = c.string(c.u32());
      const n = c.u32();
      if (n > 1024) throw new RangeError("too many queries");
      for (let i = 0; i < n; i++) queries.push(c.string(c.u32()));
      if (c.left !== 0) throw new RangeError("trailing data");
    } catch {
      return {
        replies: [optionReply(o, REP_ERR_INVALID, "malformed option data")],
      };
    }
    const ex = this.#server.findExport(name);
    if (!ex) {
      return {
        replies: [
          optionReply(o, REP_ERR_UNKNOWN, `no export named "${name}"`),
        ],
      };
    }
    const available = [
      BASE_ALLOCATION,
      ...Object.keys(ex.config.contexts ?? {}),
    ];
    const matches = (q: string) =>
      available.filter((a) => q.endsWith(":") ? a.startsWith(q) : a === q);
    const replies: Uint8Array[] = [];
    if (o === OPT_LIST_META_CONTEXT) {
      const listed = queries.length === 0
        ? available
        : [...new Set(queries.flatMap(matches))];
      for (const n of listed) {
        replies.push(
          optionReply(o, REP_META_CONTEXT, metaContextPayload(0, n)),
        );
      }
    } else {
      const chosen = [
        ...new Set(queries.flatMap((q) => q.endsWith(":") ? [] : matches(q))),
      ];
      this.contexts = chosen.map((n, i) => ({ id: i + 1, name: n }));
      this.contextsExport = ex.config.name;
      for (const ctx of this.contexts) {
        replies.push(
          optionReply(
            o,
            REP_META_CONTEXT,
            metaContextPayload(ctx.id, ctx.name),
          ),
        );
      }
    }
    replies.push(optionReply(o, REP_ACK));
    return { replies };
  }

  #transmissionFlags(ex: ExportState): number {
    const c = ex.config;
    let flags = c.flags ??
      (DEFAULT_FLAGS | (this.structured ? FLAG_SEND_DF : 0));
    if (c.readOnly) flags |= FLAG_READ_ONLY;
    return (flags | FLAG_HAS_FLAGS) & 0xffff;
  }

  // --- Transmission --------------------------------------------------------

  async #transmission(): Promise<void> {
    const max = this.#config.maxRequests ?? 1_000_000;
    for (let index = 0; index < max; index++) {
      const req = await this.#readRequest(index);
      if (req === null) return;
      if (req.type === CMD_DISC) {
        await this.drainHandlers();
        if (this.#config.onCommand) await this.#handle(req);
        await this.flushBatch();
        await this.#writeTail;
        this.close("client disconnected");
        return;
      }
      this.track(this.#handle(req));
    }
    this.close(`more than ${max} requests; hung up`);
  }

  async #readRequest(index: number): Promise<ReceivedRequest | null> {
    const size = this.extended ? 32 : 28;
    const h = await this.readExact(size);
    if (h === null) {
      // Replies still being prepared have no one to go to; stalls end too.
      this.close("client closed the connection");
      return null;
    }
    const v = new DataView(h.buffer);
    const magic = v.getUint32(0);
    const expected = this.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
    const flags = v.getUint16(4);
    const type = v.getUint16(6);
    const cookie = v.getBigUint64(8);
    const offset = v.getBigUint64(16);
    const length = this.extended ? v.getBigUint64(24) : BigInt(v.getUint32(24));
    const req: ReceivedRequest = {
      magic,
      extended: this.extended,
      flags,
      type,
      name: numberAndName(COMMAND_NAMES, type),
      cookie,
      offset,
      length,
      index,
    };
    this.log.requests.push({ ...req });
    if (magic !== expected) {
      this.close(
        `bad request magic 0x${magic.toString(16)}, expected 0x${
          expected.toString(16)
        }; hung up`,
      );
      return null;
    }
    const hasPayload = type === CMD_WRITE ||
      (this.extended && (flags & CMD_FLAG_PAYLOAD_LEN) !== 0);
    if (hasPayload) {
      if (length > BigInt(MAX_WRITE_PAYLOAD)) {
        this.close(`write payload of ${length} bytes; hung up`);
        return null;
      }
      req.data = await this.mustRead(Number(length));
    }
    return req;
  }

  async #handle(req: ReceivedRequest): Promise<void> {
    const cfg = this.#config;
    const delay = typeof cfg.delay === "function"
      ? cfg.delay(req)
      : cfg.delay ?? 0;
    if (delay > 0) await this.sleep(delay);
    if (this.#isClosed) return;
    const ctx: CommandContext = {
      state: this.state,
      send: (...m) => this.send(...m),
      drop: () => this.close("dropped by hook"),
      closed: this.#closed.promise,
      defaultReply: () => Promise.resolve(this.#command(req)),
    };
    const hooked = cfg.onCommand ? await cfg.onCommand(req, ctx) : undefined;
    if (hooked !== undefined) {
      const actions = Array.isArray(hooked) ? hooked : [hooked];
      if (cfg.reorder && actions.every((a) => a instanceof Uint8Array)) {
        await this.reply(actions as Uint8Array[]);
      } else await this.act(actions);
      return;
    }
    if (req.type === CMD_DISC) return;
    await this.reply(this.#command(req));
  }

  /** The correct reply to one request, carried out on the disk. */
  #command(req: ReceivedRequest): Uint8Array[] {
    const ex = this.current;
    if (!ex) return [];
    const flags = this.#transmissionFlags(ex);
    const fail = (errno: number, message: string) =>
      this.#errorReply(req, errno, message);
    const size = BigInt(ex.disk.size);
    const end = req.offset + req.length;
    const bs = ex.config.blockSize;
    const needs = (flag: number, what: string) =>
      (flags & flag) === 0 ? `${what} was not advertised` : undefined;
    switch (req.type) {
      case CMD_READ:
      case CMD_WRITE:
      case CMD_TRIM:
      case CMD_WRITE_ZEROES:
      case CMD_CACHE:
      case CMD_BLOCK_STATUS: {
        const refusal = req.type === CMD_TRIM
          ? needs(FLAG_SEND_TRIM, "NBD_FLAG_SEND_TRIM")
          : req.type === CMD_WRITE_ZEROES
          ? needs(FLAG_SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")
          : req.type === CMD_CACHE
          ? needs(FLAG_SEND_CACHE, "NBD_FLAG_SEND_CACHE")
          : undefined;
        if (refusal) return fail(EINVAL, refusal);
        if (req.length === 0n) return fail(EINVAL, "zero length");
        const writes = req.type === CMD_WRITE || req.type === CMD_TRIM ||
          req.type === CMD_WRITE_ZEROES;
        if (writes && (flags & FLAG_READ_ONLY)) {
          return fail(EPERM, "the export is read-only");
        }
        if (end > size) {
          return fail(
            writes ? ENOSPC : EINVAL,
            `request ${req.offset}+${req.length} beyond the export size ${size}`,
          );
        }
        if (bs && req.type !== CMD_BLOCK_STATUS) {
          const min = BigInt(bs.minimum);
          if (req.offset % min !== 0n || req.length % min !== 0n) {
            return fail(EINVAL, `not aligned to ${bs.minimum}`);
          }
          if (
            (req.type === CMD_READ || req.type === CMD_WRITE) &&
            req.length > BigInt(bs.maximum)
          ) {
            return fail(EINVAL, `longer than the maximum ${bs.maximum}`);
          }
        }
        if (
          (req.type === CMD_READ || req.type === CMD_WRITE) &&
          req.length > BigInt(MAX_WRITE_PAYLOAD)
        ) {
          return fail(EOVERFLOW, "request too large");
        }
        return this.#carryOut(req, ex, Number(req.offset), Number(req.length));
      }
      case CMD_FLUSH: {
        const refusal = needs(FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH");
        if (refusal) return fail(EINVAL, refusal);
        return this.#okReply(req);
      }
      default:
        return fail(EINVAL, `unknown command ${req.name}`);
    }
  }

  #carryOut(
    req: ReceivedRequest,
    ex: ExportState,
    offset: number,
    length: number,
  ): Uint8Array[] {
    const disk = ex.disk;
    switch (req.type) {
      case CMD_READ:
        return this.#readReply(req, disk, offset, length);
      case CMD_WRITE:
        disk.write(offset, req.data ?? new Uint8Array(length));
        return this.#okReply(req);
      case CMD_TRIM:
        disk.zero(offset, length, true);
        return this.#okReply(req);
      case CMD_WRITE_ZEROES:
        disk.zero(offset, length, (req.flags & CMD_FLAG_NO_HOLE) === 0);
        void CMD_FLAG_FAST_ZERO;
        return this.#okReply(req);
      case CMD_CACHE:
        return this.#okReply(req);
      default:
        return this.#blockStatus(req, ex, offset, length);
    }
  }

  #readReply(
    req: ReceivedRequest,
    disk: TestDisk,
    offset: number,
    length: number,
  ): Uint8Array[] {
    if (!this.structured) {
      return [simpleReply(req.cookie, 0, disk.read(offset, length))];
    }
    const cfg = this.#config;
    const df = (req.flags & CMD_FLAG_DF) !== 0;
    const step = df ? length : Math.max(1, cfg.readChunkSize ?? length);
    const pieces: { offset: number; length: number; hole: boolean }[] = [];
    const runs = cfg.readHoles && !df
      ? disk.runs(offset, length)
      : [{ length, hole: false }];
    let at = offset;
    for (const run of runs) {
      for (let done = 0; done < run.length; done += step) {
        const n = Math.min(step, run.length - done);
        pieces.push({ offset: at + done, length: n, hole: run.hole });
      }
      at += run.length;
    }
    if (cfg.shuffleChunks) pieces.reverse();
    return pieces.map((p, i) => {
      const last = i === pieces.length - 1 ? REPLY_FLAG_DONE : 0;
      return p.hole
        ? this.#chunk(
          req,
          last,
          REPLY_TYPE_OFFSET_HOLE,
          offsetHolePayload(p.offset, p.length),
        )
        : this.#chunk(
          req,
          last,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(p.offset, disk.read(p.offset, p.length)),
        );
    });
  }

  #blockStatus(
    req: ReceivedRequest,
    ex: ExportState,
    offset: number,
    length: number,
  ): Uint8Array[] {
    if (!this.structured || this.contexts.length === 0) {
      return this.#errorReply(req, EINVAL, "no metadata context selected");
    }
    const one = (req.flags & CMD_FLAG_REQ_ONE) !== 0;
    const limit = this.extended
      ? Number.MAX_SAFE_INTEGER
      : DEFAULT_BLOCK_STATUS_MAX;
    const replies: Uint8Array[] = [];
    this.contexts.forEach((ctx, i) => {
      let extents: Extent[];
      if (ctx.name === BASE_ALLOCATION && !ex.config.allocation) {
        extents = ex.disk.runs(offset, length).map((r) => ({
          length: r.length,
          flags: r.hole ? STATE_HOLE | STATE_ZERO : 0,
        }));
      } else {
        const map = ctx.name === BASE_ALLOCATION
          ? ex.config.allocation ?? []
          : ex.config.contexts?.[ctx.name] ?? [];
        extents = clipExtents(map, offset, length);
      }
      if (one) extents = extents.slice(0, 1);
      extents = splitExtents(extents, limit, one);
      const last = i === this.contexts.length - 1 ? REPLY_FLAG_DONE : 0;
      replies.push(
        this.extended
          ? this.#chunk(
            req,
            last,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            blockStatusExtPayload(ctx.id, extents),
          )
          : this.#chunk(
            req,
            last,
            REPLY_TYPE_BLOCK_STATUS,
            blockStatusPayload(ctx.id, extents),
          ),
      );
    });
    return replies;
  }

  #chunk(
    req: ReceivedRequest,
    flags: number,
    type: number,
    payload: Uint8Array,
  ): Uint8Array {
    return this.extended
      ? extendedChunk(req.cookie, flags, type, req.offset, payload)
      : structuredChunk(req.cookie, flags, type, payload);
  }

  #okReply(req: ReceivedRequest): Uint8Array[] {
    if (this.extended || (this.structured && this.#config.noneChunks)) {
      return [
        this.#chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, new Uint8Array(0)),
      ];
    }
    return [simpleReply(req.cookie, 0)];
  }

  #errorReply(
    req: ReceivedRequest,
    errno: number,
    message: string,
  ): Uint8Array[] {
    if (this.structured) {
      return [
        this.#chunk(
          req,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR,
          errorPayload(errno, message),
        ),
      ];
    }
    return [simpleReply(req.cookie, errno)];
  }
}

/**
 * Drops empty extents and cuts long ones to fit the descriptor's length
 * field; with REQ_ONE only the first piece is kept.
 */
function splitExtents(
  extents: Extent[],
  limit: number,
  one: boolean,
): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    // Bounded by the request length over `limit` (at most a few pieces).
    for (let left = e.length; left > 0;) {
      const n = Math.min(left, limit);
      out.push({ length: n, flags: e.flags });
      if (one) return out;
      left -= n;
    }
  }
  return out;
}

/** Cuts a map that starts at offset 0 down to [offset, offset + length). */
function clipExtents(map: Extent[], offset: number, length: number): Extent[] {
  const out: Extent[] = [];
  const end = offset + length;
  let at = 0;
  for (const e of map) {
    const from = Math.max(at, offset);
    const to = Math.min(at + e.length, end);
    if (to > from) out.push({ length: to - from, flags: e.flags });
    at += e.length;
    if (at >= end) break;
  }
  if (at < end) out.push({ length: end - Math.max(at, offset), flags: 0 });
  return out;
}

/** Joins runs of small messages so that thousands cost few writes. */
function coalesce(messages: Uint8Array[]): Uint8Array[] {
  if (messages.length < 2) return messages;
  const out: Uint8Array[] = [];
  let run: Uint8Array[] = [];
  let size = 0;
  const flush = () => {
    if (run.length === 1) out.push(run[0]!);
    else if (run.length > 1) out.push(concat(...run));
    run = [];
    size = 0;
  };
  for (const m of messages) {
    if (size + m.length > COALESCE_LIMIT) flush();
    run.push(m);
    size += m.length;
  }
  flush();
  return out;
}

/** Writes initial contents, leaving all-zero pages unallocated (holes). */
function writeSparse(disk: TestDisk, data: Uint8Array): void {
  for (let at = 0; at < data.length; at += PAGE_SIZE) {
    const page = data.subarray(at, Math.min(at + PAGE_SIZE, data.length));
    if (page.some((b) => b !== 0)) disk.write(at, page);
  }
}

/** The export name inside an EXPORT_NAME, INFO or GO option, if any. */
function optionExportName(opt: ReceivedOption): string | undefined {
  if (opt.option === OPT_EXPORT_NAME) return decoder.decode(opt.payload);
  if (opt.option === OPT_GO || opt.option === OPT_INFO) {
    try {
      const c = new Cursor(opt.payload);
      return c.string(c.u32());
    } catch {
      return undefined;
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------

class ServerImpl implements TestServer {
  readonly exports: ExportState[];
  readonly log: ConnectionLog[] = [];
  #config: TestServerConfig;
  #listeners: Deno.Listener[] = [];
  #dir: string | undefined;
  #path: string | undefined;
  #port: number | undefined;
  #connections = new Set<Connection>();
  #running = new Set<Promise<void>>();
  #acceptLoops: Promise<void>[] = [];
  #closing: Promise<void> | undefined;
  #infoCache = new Map<number, Uint8Array[]>();

  constructor(config: TestServerConfig) {
    this.#config = config;
    const list = config.exports ?? [{ name: "", size: 1 << 20 }];
    if (list.length === 0) throw new TypeError("At least one export needed");
    this.exports = list.map((c) => {
      const disk = new TestDisk(c.size);
      if (c.data) writeSparse(disk, c.data);
      return { config: c, disk };
    });
  }

  async start(): Promise<void> {
    const where = this.#config.listen ?? "unix";
    if (where === "unix" || where === "both") {
      this.#dir = await Deno.makeTempDir({ prefix: "nbd-test-server-" });
      this.#path = `${this.#dir}/nbd.sock`;
      this.#listeners.push(
        Deno.listen({ transport: "unix", path: this.#path }),
      );
    }
    if (where === "tcp" || where === "both") {
      const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      this.#port = l.addr.port;
      this.#listeners.push(l);
    }
    for (const l of this.#listeners) this.#acceptLoops.push(this.#accept(l));
  }

  async #accept(listener: Deno.Listener): Promise<void> {
    const max = this.#config.maxConnections ?? 1000;
    while (this.log.length < max) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      if (this.#closing) {
        conn.close();
        return;
      }
      const c = new Connection(this.log.length, conn, this, this.#config);
      this.log.push(c.log);
      this.#connections.add(c);
      const running: Promise<void> = c.run().finally(() => {
        this.#connections.delete(c);
        this.#running.delete(running);
      });
      this.#running.add(running);
    }
  }

  get path(): string | undefined {
    return this.#path;
  }

  get port(): number | undefined {
    return this.#port;
  }

  get uri(): string {
    // Oldstyle has no export names; qemu refuses a URI that gives one.
    if (this.#config.style === "oldstyle") return this.uriFor("");
    return this.uriFor(this.exports[0]?.config.name ?? "");
  }

  uriFor(exportName: string, transport?: "unix" | "tcp"): string {
    const name = encodeURIComponent(exportName);
    if (this.#path !== undefined && transport !== "tcp") {
      return `nbd+unix:///${name}?socket=${encodeURIComponent(this.#path)}`;
    }
    if (this.#port === undefined) throw new TypeError("Not listening on TCP");
    return `nbd://127.0.0.1:${this.#port}/${name}`;
  }

  /** The configured unknown NBD_REP_INFO replies, built once per option. */
  unknownInfoReplies(option: number): Uint8Array[] {
    let replies = this.#infoCache.get(option);
    if (!replies) {
      replies = (this.#config.unknownInfos ?? []).map((info) =>
        optionReply(
          option,
          REP_INFO,
          concat(
            new Builder().u16(info.type).done(),
            info.data ?? new Uint8Array(0),
          ),
        )
      );
      this.#infoCache.set(option, replies);
    }
    return replies;
  }

  findExport(name: string): ExportState | undefined {
    return this.exports.find((e) => e.config.name === name) ??
      (name === "" ? this.exports[0] : undefined);
  }

  defaultExport(): ExportState {
    const ex = this.findExport("");
    if (!ex) throw new TypeError("No exports");
    return ex;
  }

  disk(name?: string): TestDisk {
    const ex = name === undefined ? this.exports[0] : this.findExport(name);
    if (!ex) throw new TypeError(`No export named "${name}"`);
    return ex.disk;
  }

  async settled(timeoutMs = 5000): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`Connections still open after ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      // Connections accepted while waiting are waited for too, a bounded
      // number of times.
      for (let i = 0; i < 100 && this.#running.size > 0; i++) {
        await Promise.race([Promise.all([...this.#running]), timeout]);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    for (const l of this.#listeners) {
      try {
        l.close();
      } catch {
        // Already closed.
      }
    }
    await Promise.all(this.#acceptLoops);
    for (const c of this.#connections) c.close("server closed");
    await Promise.all([...this.#running]);
    if (this.#dir) await Deno.remove(this.#dir, { recursive: true });
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Starts a test server on a private Unix socket (or 127.0.0.1:0).
 *
 * @param config Exports, style and hooks; all optional.
 * @returns The running server; close it with `await using` or `close()`.
 * @example
 * ```ts
 * await using server = await startTestServer({ style: "oldstyle" });
 * console.log(server.uri);
 * ```
 */
export async function startTestServer(
  config: TestServerConfig = {},
): Promise<TestServer> {
  const server = new ServerImpl(config);
  await server.start();
  return server;
}
