/**
 * The transmission phase: requests read and checked, carried out on the
 * export's disk, and answered as a correct server would (simple replies,
 * structured or extended chunks), unless a hook answers instead.
 *
 * @module
 */

import {
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
  EINVAL,
  ENOSPC,
  EOVERFLOW,
  EPERM,
  EXTENDED_REQUEST_MAGIC,
  FLAG_READ_ONLY,
  FLAG_SEND_CACHE,
  FLAG_SEND_FLUSH,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
} from "../../../lib/constants.ts";
import type { Connection } from "./connection.ts";
import { decodeRequestHeader } from "./decode.ts";
import {
  blockStatusExtPayload,
  blockStatusPayload,
  errorPayload,
  extendedChunk,
  type Extent,
  offsetDataPayload,
  offsetHolePayload,
  simpleReply,
  structuredChunk,
} from "./encode.ts";
import type { CommandContext, ReceivedRequest } from "./hooks.ts";
import {
  BASE_ALLOCATION,
  type ExportState,
  type TestDisk,
  transmissionFlags,
} from "./store.ts";

/** Write payloads beyond this are not read; the server hangs up. */
const MAX_WRITE_PAYLOAD = 64 * 1024 * 1024;
/** Longest compact descriptor: a u32, kept 512-aligned. */
const DEFAULT_BLOCK_STATUS_MAX = 0xfffffe00;

/**
 * Serves requests until the client disconnects or hangs up (or a bound is
 * reached); each is handled on its own, so replies may overtake each other.
 */
export async function transmission(conn: Connection): Promise<void> {
  const max = conn.config.maxRequests ?? 1_000_000;
  for (let index = 0; index < max; index++) {
    const req = await readRequest(conn, index);
    if (req === null) return;
    if (req.type === CMD_DISC) {
      await conn.drainHandlers();
      if (conn.config.onCommand) await handle(conn, req);
      await conn.flushBatch();
      await conn.flushed();
      conn.close("client disconnected");
      return;
    }
    conn.track(handle(conn, req));
  }
  conn.close(`more than ${max} requests; hung up`);
}

async function readRequest(
  conn: Connection,
  index: number,
): Promise<ReceivedRequest | null> {
  const size = conn.extended ? 32 : 28;
  const h = await conn.readExact(size);
  if (h === null) {
    // Replies still being prepared have no one to go to; stalls end too.
    conn.close("client closed the connection");
    return null;
  }
  const req = decodeRequestHeader(h, conn.extended, index);
  const { magic, type, flags, length } = req;
  const expected = conn.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
  conn.log.requests.push({ ...req });
  if (magic !== expected) {
    conn.close(
      `bad request magic 0x${magic.toString(16)}, expected 0x${
        expected.toString(16)
      }; hung up`,
    );
    return null;
  }
  const hasPayload = type === CMD_WRITE ||
    (conn.extended && (flags & CMD_FLAG_PAYLOAD_LEN) !== 0);
  if (hasPayload) {
    if (length > BigInt(MAX_WRITE_PAYLOAD)) {
      conn.close(`write payload of ${length} bytes; hung up`);
      return null;
    }
    req.data = await conn.mustRead(Number(length));
  }
  return req;
}

async function handle(conn: Connection, req: ReceivedRequest): Promise<void> {
  const cfg = conn.config;
  const delay = typeof cfg.delay === "function"
    ? cfg.delay(req)
    : cfg.delay ?? 0;
  if (delay > 0) await conn.sleep(delay);
  if (conn.isClosed) return;
  const ctx: CommandContext = {
    ...conn.hookContext(),
    defaultReply: () => Promise.resolve(command(conn, req)),
  };
  const hooked = cfg.onCommand ? await cfg.onCommand(req, ctx) : undefined;
  if (hooked !== undefined) {
    const actions = Array.isArray(hooked) ? hooked : [hooked];
    if (cfg.reorder && actions.every((a) => a instanceof Uint8Array)) {
      await conn.reply(actions as Uint8Array[]);
    } else await conn.act(actions);
    return;
  }
  if (req.type === CMD_DISC) return;
  await conn.reply(command(conn, req));
}

/** The correct reply to one request, carried out on the disk. */
function command(conn: Connection, req: ReceivedRequest): Uint8Array[] {
  const ex = conn.current;
  if (!ex) return [];
  const flags = transmissionFlags(ex.config, conn.structured);
  const fail = (errno: number, message: string) =>
    errorReply(conn, req, errno, message);
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
      return carryOut(conn, req, ex, Number(req.offset), Number(req.length));
    }
    case CMD_FLUSH: {
      const refusal = needs(FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH");
      if (refusal) return fail(EINVAL, refusal);
      return okReply(conn, req);
    }
    default:
      return fail(EINVAL, `unknown command ${req.name}`);
  }
}

function carryOut(
  conn: Connection,
  req: ReceivedRequest,
  ex: ExportState,
  offset: number,
  length: number,
): Uint8Array[] {
  const disk = ex.disk;
  switch (req.type) {
    case CMD_READ:
      return readReply(conn, req, disk, offset, length);
    case CMD_WRITE:
      disk.write(offset, req.data ?? new Uint8Array(length));
      return okReply(conn, req);
    case CMD_TRIM:
      disk.zero(offset, length, true);
      return okReply(conn, req);
    case CMD_WRITE_ZEROES:
      disk.zero(offset, length, (req.flags & CMD_FLAG_NO_HOLE) === 0);
      void CMD_FLAG_FAST_ZERO;
      return okReply(conn, req);
    case CMD_CACHE:
      return okReply(conn, req);
    default:
      return blockStatus(conn, req, ex, offset, length);
  }
}

function readReply(
  conn: Connection,
  req: ReceivedRequest,
  disk: TestDisk,
  offset: number,
  length: number,
): Uint8Array[] {
  if (!conn.structured) {
    return [simpleReply(req.cookie, 0, disk.read(offset, length))];
  }
  const cfg = conn.config;
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
      ? chunk(
        conn,
        req,
        last,
        REPLY_TYPE_OFFSET_HOLE,
        offsetHolePayload(p.offset, p.length),
      )
      : chunk(
        conn,
        req,
        last,
        REPLY_TYPE_OFFSET_DATA,
        offsetDataPayload(p.offset, disk.read(p.offset, p.length)),
      );
  });
}

function blockStatus(
  conn: Connection,
  req: ReceivedRequest,
  ex: ExportState,
  offset: number,
  length: number,
): Uint8Array[] {
  if (!conn.structured || conn.contexts.length === 0) {
    return errorReply(conn, req, EINVAL, "no metadata context selected");
  }
  const one = (req.flags & CMD_FLAG_REQ_ONE) !== 0;
  const limit = conn.extended
    ? Number.MAX_SAFE_INTEGER
    : DEFAULT_BLOCK_STATUS_MAX;
  const replies: Uint8Array[] = [];
  conn.contexts.forEach((ctx, i) => {
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
    const last = i === conn.contexts.length - 1 ? REPLY_FLAG_DONE : 0;
    replies.push(
      conn.extended
        ? chunk(
          conn,
          req,
          last,
          REPLY_TYPE_BLOCK_STATUS_EXT,
          blockStatusExtPayload(ctx.id, extents),
        )
        : chunk(
          conn,
          req,
          last,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(ctx.id, extents),
        ),
    );
  });
  return replies;
}

function chunk(
  conn: Connection,
  req: ReceivedRequest,
  flags: number,
  type: number,
  payload: Uint8Array,
): Uint8Array {
  return conn.extended
    ? extendedChunk(req.cookie, flags, type, req.offset, payload)
    : structuredChunk(req.cookie, flags, type, payload);
}

function okReply(conn: Connection, req: ReceivedRequest): Uint8Array[] {
  if (conn.extended || (conn.structured && conn.config.noneChunks)) {
    return [
      chunk(conn, req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, new Uint8Array(0)),
    ];
  }
  return [simpleReply(req.cookie, 0)];
}

function errorReply(
  conn: Connection,
  req: ReceivedRequest,
  errno: number,
  message: string,
): Uint8Array[] {
  if (conn.structured) {
    return [
      chunk(
        conn,
        req,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        errorPayload(errno, message),
      ),
    ];
  }
  return [simpleReply(req.cookie, errno)];
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
