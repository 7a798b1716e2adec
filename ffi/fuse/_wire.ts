/**
 * The FUSE messages this server speaks, as bytes in and bytes out: requests
 * the kernel writes to `/dev/fuse` are decoded into plain objects, replies
 * are encoded into a caller's buffer (the server reuses one per slot). No
 * I/O here. Layouts and numbers are those of Linux's
 * `include/uapi/linux/fuse.h` (protocol 7.45; everything used exists since
 * 7.28), little-endian as on every host Deno's FFI runs this on.
 *
 * @module
 */

import { NbdFuseError } from "./errors.ts";

/** The protocol's major version; a kernel with another one is refused. */
export const FUSE_KERNEL_VERSION = 7;
/** The newest minor version this codec knows. */
export const FUSE_KERNEL_MINOR_VERSION = 45;
/** Older than this lacks `max_pages` in INIT; refused. */
export const FUSE_MIN_MINOR_VERSION = 28;
/** The root directory's node id. */
export const FUSE_ROOT_ID = 1n;

/** Opcodes (`enum fuse_opcode`). */
export const OP = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SETUPMAPPING: 48,
  REMOVEMAPPING: 49,
  SYNCFS: 50,
  TMPFILE: 51,
  STATX: 52,
  COPY_FILE_RANGE_64: 53,
} as const;

const OP_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(OP).map(([k, v]) => [v, `FUSE_${k}`]),
);

/** "15 (FUSE_READ)", for traces and messages. */
export function opName(opcode: number): string {
  return `${opcode} (${OP_NAMES[opcode] ?? "unknown"})`;
}

/** INIT flags (`flags` of `fuse_init_in` / `fuse_init_out`). */
export const INIT = {
  ASYNC_READ: 1 << 0,
  ATOMIC_O_TRUNC: 1 << 3,
  BIG_WRITES: 1 << 5,
  AUTO_INVAL_DATA: 1 << 12,
  ASYNC_DIO: 1 << 15,
  MAX_PAGES: 1 << 22,
} as const;

/** `open_flags` of `fuse_open_out`. */
export const FOPEN = {
  DIRECT_IO: 1 << 0,
  KEEP_CACHE: 1 << 1,
  PARALLEL_DIRECT_WRITES: 1 << 6,
} as const;

/** `valid` bits of `fuse_setattr_in`. */
export const FATTR = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
} as const;

/** `mode` bits of `fuse_fallocate_in` (`FALLOC_FL_*`). */
export const FALLOC = {
  KEEP_SIZE: 0x01,
  PUNCH_HOLE: 0x02,
  ZERO_RANGE: 0x10,
} as const;

/** Message sizes, as sums of their fields. */
export const SIZES = {
  /** len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding */
  inHeader: 4 + 4 + 8 + 8 + 4 + 4 + 4 + 2 + 2,
  /** len, error, unique */
  outHeader: 4 + 4 + 8,
  /** major, minor, max_readahead, flags: what every kernel sends */
  initInMin: 4 + 4 + 4 + 4,
  /**
   * major, minor, max_readahead, flags, max_background,
   * congestion_threshold, max_write, time_gran, max_pages, map_alignment,
   * flags2, max_stack_depth, request_timeout, unused[11]
   */
  initOut: 4 + 4 + 4 + 4 + 2 + 2 + 4 + 4 + 2 + 2 + 4 + 4 + 2 + 2 * 11,
  /**
   * ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
   * ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
   */
  attr: 8 * 6 + 4 * 10,
  /** nodeid, generation, entry_valid, attr_valid, their nsecs, attr */
  entryOut: 8 + 8 + 8 + 8 + 4 + 4 + (8 * 6 + 4 * 10),
  /** attr_valid, attr_valid_nsec, dummy, attr */
  attrOut: 8 + 4 + 4 + (8 * 6 + 4 * 10),
  /** getattr_flags, dummy, fh */
  getattrIn: 4 + 4 + 8,
  /**
   * valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
   * mtimensec, ctimensec, mode, unused4, uid, gid, unused5
   */
  setattrIn: 4 + 4 + 8 + 8 + 8 + 8 + 8 + 8 + 4 * 8,
  /** flags, open_flags */
  openIn: 4 + 4,
  /** fh, open_flags, backing_id */
  openOut: 8 + 4 + 4,
  /** fh, offset, size, read_flags, lock_owner, flags, padding */
  readIn: 8 + 8 + 4 + 4 + 8 + 4 + 4,
  /** fh, offset, size, write_flags, lock_owner, flags, padding */
  writeIn: 8 + 8 + 4 + 4 + 8 + 4 + 4,
  /** size, padding */
  writeOut: 4 + 4,
  /** fh, flags, release_flags, lock_owner */
  releaseIn: 8 + 4 + 4 + 8,
  /** fh, unused, padding, lock_owner */
  flushIn: 8 + 4 + 4 + 8,
  /** fh, fsync_flags, padding */
  fsyncIn: 8 + 4 + 4,
  /** fh, offset, length, mode, padding */
  fallocateIn: 8 + 8 + 8 + 4 + 4,
  /** blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6] */
  statfsOut: 8 * 5 + 4 * 4 + 4 * 6,
  /** ino, off, namelen, type (then the name, padded to 8) */
  direntHead: 8 + 8 + 4 + 4,
  /** nlookup */
  forgetIn: 8,
  /** unique */
  interruptIn: 8,
} as const;

/** What every request starts with. */
export interface RequestHeader {
  /** The whole request's length, header included. */
  len: number;
  opcode: number;
  /** The id the reply must carry. */
  unique: bigint;
  /** The node the request is about (1 is the root). */
  nodeid: bigint;
  uid: number;
  gid: number;
  pid: number;
}

/** A decoded request: the header and what its opcode carries. */
export type FuseRequest =
  & RequestHeader
  & (
    | {
      kind: "init";
      major: number;
      minor: number;
      maxReadahead: number;
      flags: number;
    }
    | { kind: "lookup"; name: string }
    | { kind: "forget" }
    | { kind: "batch-forget" }
    | { kind: "getattr"; fh: bigint }
    | { kind: "setattr"; valid: number; fh: bigint; size: bigint }
    | { kind: "open" | "opendir"; flags: number }
    | { kind: "read" | "readdir"; fh: bigint; offset: bigint; size: number }
    | {
      kind: "write";
      fh: bigint;
      offset: bigint;
      /** A view of the request's own bytes, not a copy. */
      data: Uint8Array;
      writeFlags: number;
    }
    | { kind: "statfs" }
    | { kind: "release" | "releasedir"; fh: bigint }
    | { kind: "flush"; fh: bigint }
    | { kind: "fsync" | "fsyncdir"; fh: bigint; fsyncFlags: number }
    | {
      kind: "fallocate";
      fh: bigint;
      offset: bigint;
      length: bigint;
      mode: number;
    }
    | { kind: "interrupt"; target: bigint }
    | { kind: "destroy" }
    /** Any opcode this server answers with ENOSYS. */
    | { kind: "other" }
  );

function cut(what: string, have: number, need: number): NbdFuseError {
  return new NbdFuseError(
    "protocol",
    `FUSE request cut short: ${have} of ${need} bytes of ${what}`,
  );
}

const decoder = new TextDecoder("utf-8", { fatal: false });

/**
 * Decodes one request as one read of `/dev/fuse` returned it.
 *
 * @param bytes Exactly the bytes the read returned.
 * @returns The request; `data` of a write is a view of `bytes`.
 * @throws {NbdFuseError} if the bytes are fewer than the header's
 *   length or than the opcode's fixed part, or the length disagrees.
 */
export function decodeRequest(bytes: Uint8Array): FuseRequest {
  if (bytes.length < SIZES.inHeader) {
    throw cut("a request header", bytes.length, SIZES.inHeader);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const len = v.getUint32(0, true);
  if (len < SIZES.inHeader) {
    throw new NbdFuseError(
      "protocol",
      `FUSE request length ${len} is shorter than its header`,
    );
  }
  if (bytes.length < len) throw cut("a request", bytes.length, len);
  const opcode = v.getUint32(4, true);
  const head: RequestHeader = {
    len,
    opcode,
    unique: v.getBigUint64(8, true),
    nodeid: v.getBigUint64(16, true),
    uid: v.getUint32(24, true),
    gid: v.getUint32(28, true),
    pid: v.getUint32(32, true),
  };
  const at = SIZES.inHeader;
  const body = len - at;
  const need = (n: number, what: string): void => {
    if (body < n) throw cut(what, body, n);
  };
  switch (opcode) {
    case OP.INIT: {
      need(SIZES.initInMin, "fuse_init_in");
      return {
        ...head,
        kind: "init",
        major: v.getUint32(at, true),
        minor: v.getUint32(at + 4, true),
        maxReadahead: v.getUint32(at + 8, true),
        flags: v.getUint32(at + 12, true),
      };
    }
    case OP.LOOKUP: {
      const raw = bytes.subarray(at, len);
      const nul = raw.indexOf(0);
      if (nul === -1) {
        throw new NbdFuseError(
          "protocol",
          "FUSE_LOOKUP name has no terminating NUL",
        );
      }
      return {
        ...head,
        kind: "lookup",
        name: decoder.decode(raw.subarray(0, nul)),
      };
    }
    case OP.FORGET:
      need(SIZES.forgetIn, "fuse_forget_in");
      return { ...head, kind: "forget" };
    case OP.BATCH_FORGET:
      return { ...head, kind: "batch-forget" };
    case OP.GETATTR:
      need(SIZES.getattrIn, "fuse_getattr_in");
      return { ...head, kind: "getattr", fh: v.getBigUint64(at + 8, true) };
    case OP.SETATTR:
      need(SIZES.setattrIn, "fuse_setattr_in");
      return {
        ...head,
        kind: "setattr",
        valid: v.getUint32(at, true),
        fh: v.getBigUint64(at + 8, true),
        size: v.getBigUint64(at + 16, true),
      };
    case OP.OPEN:
    case OP.OPENDIR:
      need(SIZES.openIn, "fuse_open_in");
      return {
        ...head,
        kind: opcode === OP.OPEN ? "open" : "opendir",
        flags: v.getUint32(at, true),
      };
    case OP.READ:
    case OP.READDIR:
      need(SIZES.readIn, "fuse_read_in");
      return {
        ...head,
        kind: opcode === OP.READ ? "read" : "readdir",
        fh: v.getBigUint64(at, true),
        offset: v.getBigUint64(at + 8, true),
        size: v.getUint32(at + 16, true),
      };
    case OP.WRITE: {
      need(SIZES.writeIn, "fuse_write_in");
      const size = v.getUint32(at + 16, true);
      const start = at + SIZES.writeIn;
      if (len - start !== size) {
        throw new NbdFuseError(
          "protocol",
          `FUSE_WRITE of ${size} bytes carries ${len - start}`,
        );
      }
      return {
        ...head,
        kind: "write",
        fh: v.getBigUint64(at, true),
        offset: v.getBigUint64(at + 8, true),
        writeFlags: v.getUint32(at + 20, true),
        data: bytes.subarray(start, len),
      };
    }
    case OP.STATFS:
      return { ...head, kind: "statfs" };
    case OP.RELEASE:
    case OP.RELEASEDIR:
      need(SIZES.releaseIn, "fuse_release_in");
      return {
        ...head,
        kind: opcode === OP.RELEASE ? "release" : "releasedir",
        fh: v.getBigUint64(at, true),
      };
    case OP.FLUSH:
      need(SIZES.flushIn, "fuse_flush_in");
      return { ...head, kind: "flush", fh: v.getBigUint64(at, true) };
    case OP.FSYNC:
    case OP.FSYNCDIR:
      need(SIZES.fsyncIn, "fuse_fsync_in");
      return {
        ...head,
        kind: opcode === OP.FSYNC ? "fsync" : "fsyncdir",
        fh: v.getBigUint64(at, true),
        fsyncFlags: v.getUint32(at + 8, true),
      };
    case OP.FALLOCATE:
      need(SIZES.fallocateIn, "fuse_fallocate_in");
      return {
        ...head,
        kind: "fallocate",
        fh: v.getBigUint64(at, true),
        offset: v.getBigUint64(at + 8, true),
        length: v.getBigUint64(at + 16, true),
        mode: v.getUint32(at + 24, true),
      };
    case OP.INTERRUPT:
      need(SIZES.interruptIn, "fuse_interrupt_in");
      return { ...head, kind: "interrupt", target: v.getBigUint64(at, true) };
    case OP.DESTROY:
      return { ...head, kind: "destroy" };
    default:
      return { ...head, kind: "other" };
  }
}

/** Whether the kernel waits for a reply to this request. */
export function expectsReply(req: FuseRequest): boolean {
  return req.kind !== "forget" && req.kind !== "batch-forget" &&
    req.kind !== "interrupt";
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/**
 * Writes a reply's header at the start of `buf`.
 *
 * @param buf The reply buffer; the body, if any, follows at 16.
 * @param unique The request's id.
 * @param bodyLength Bytes of body after the header.
 * @param error 0, or a negated errno (only then is `bodyLength` 0).
 * @returns The reply's whole length.
 */
export function encodeHeader(
  buf: Uint8Array,
  unique: bigint,
  bodyLength: number,
  error = 0,
): number {
  const len = SIZES.outHeader + bodyLength;
  const v = view(buf);
  v.setUint32(0, len, true);
  v.setInt32(4, error, true);
  v.setBigUint64(8, unique, true);
  return len;
}

/**
 * An error reply: the header alone, with `-errno`.
 *
 * @param buf Reply buffer (16 bytes at least).
 * @param unique The request's id.
 * @param errno A positive host errno.
 * @returns The reply's length, 16.
 */
export function encodeError(
  buf: Uint8Array,
  unique: bigint,
  errno: number,
): number {
  return encodeHeader(buf, unique, 0, -errno);
}

/** What INIT answers. */
export interface InitReply {
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  /** Pages per request (FUSE_MAX_PAGES). */
  maxPages: number;
}

/**
 * The INIT reply.
 *
 * @returns The reply's length.
 */
export function encodeInit(
  buf: Uint8Array,
  unique: bigint,
  r: InitReply,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  buf.fill(0, at, at + SIZES.initOut);
  v.setUint32(at, FUSE_KERNEL_VERSION, true);
  v.setUint32(at + 4, r.minor, true);
  v.setUint32(at + 8, r.maxReadahead, true);
  v.setUint32(at + 12, r.flags, true);
  v.setUint16(at + 16, r.maxBackground, true);
  v.setUint16(at + 18, r.congestionThreshold, true);
  v.setUint32(at + 20, r.maxWrite, true);
  v.setUint32(at + 24, 1, true); // time_gran: nanoseconds
  v.setUint16(at + 28, r.maxPages, true);
  return encodeHeader(buf, unique, SIZES.initOut);
}

/** A node's attributes, as `struct fuse_attr` carries them. */
export interface Attr {
  ino: bigint;
  size: bigint;
  /** Mode with its file type bits (`0o100644`, `0o40755`). */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch, for atime, mtime and ctime alike. */
  time: bigint;
  blksize: number;
}

function putAttr(v: DataView, at: number, a: Attr): void {
  v.setBigUint64(at, a.ino, true);
  v.setBigUint64(at + 8, a.size, true);
  v.setBigUint64(at + 16, (a.size + 511n) / 512n, true);
  v.setBigUint64(at + 24, a.time, true);
  v.setBigUint64(at + 32, a.time, true);
  v.setBigUint64(at + 40, a.time, true);
  v.setUint32(at + 48, 0, true);
  v.setUint32(at + 52, 0, true);
  v.setUint32(at + 56, 0, true);
  v.setUint32(at + 60, a.mode, true);
  v.setUint32(at + 64, a.nlink, true);
  v.setUint32(at + 68, a.uid, true);
  v.setUint32(at + 72, a.gid, true);
  v.setUint32(at + 76, 0, true); // rdev
  v.setUint32(at + 80, a.blksize, true);
  v.setUint32(at + 84, 0, true); // flags
}

/**
 * A LOOKUP reply (`fuse_entry_out`).
 *
 * @param validSeconds How long the kernel may keep the name and attributes.
 * @returns The reply's length.
 */
export function encodeEntry(
  buf: Uint8Array,
  unique: bigint,
  a: Attr,
  validSeconds: bigint,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  v.setBigUint64(at, a.ino, true); // nodeid
  v.setBigUint64(at + 8, 0n, true); // generation
  v.setBigUint64(at + 16, validSeconds, true);
  v.setBigUint64(at + 24, validSeconds, true);
  v.setUint32(at + 32, 0, true);
  v.setUint32(at + 36, 0, true);
  putAttr(v, at + 40, a);
  return encodeHeader(buf, unique, SIZES.entryOut);
}

/**
 * A GETATTR or SETATTR reply (`fuse_attr_out`).
 *
 * @returns The reply's length.
 */
export function encodeAttr(
  buf: Uint8Array,
  unique: bigint,
  a: Attr,
  validSeconds: bigint,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  v.setBigUint64(at, validSeconds, true);
  v.setUint32(at + 8, 0, true);
  v.setUint32(at + 12, 0, true);
  putAttr(v, at + 16, a);
  return encodeHeader(buf, unique, SIZES.attrOut);
}

/**
 * An OPEN or OPENDIR reply (`fuse_open_out`).
 *
 * @param openFlags `FOPEN_*` bits.
 * @returns The reply's length.
 */
export function encodeOpen(
  buf: Uint8Array,
  unique: bigint,
  fh: bigint,
  openFlags: number,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  v.setBigUint64(at, fh, true);
  v.setUint32(at + 8, openFlags, true);
  v.setInt32(at + 12, 0, true);
  return encodeHeader(buf, unique, SIZES.openOut);
}

/**
 * A WRITE reply (`fuse_write_out`).
 *
 * @returns The reply's length.
 */
export function encodeWrite(
  buf: Uint8Array,
  unique: bigint,
  size: number,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  v.setUint32(at, size, true);
  v.setUint32(at + 4, 0, true);
  return encodeHeader(buf, unique, SIZES.writeOut);
}

/** What STATFS answers. */
export interface StatFs {
  blocks: bigint;
  bsize: number;
  files: bigint;
  namelen: number;
}

/**
 * A STATFS reply (`fuse_statfs_out`): nothing free, as for a full device.
 *
 * @returns The reply's length.
 */
export function encodeStatfs(
  buf: Uint8Array,
  unique: bigint,
  s: StatFs,
): number {
  const v = view(buf);
  const at = SIZES.outHeader;
  buf.fill(0, at, at + SIZES.statfsOut);
  v.setBigUint64(at, s.blocks, true);
  v.setBigUint64(at + 24, s.files, true);
  v.setUint32(at + 40, s.bsize, true);
  v.setUint32(at + 44, s.namelen, true);
  v.setUint32(at + 48, s.bsize, true); // frsize
  return encodeHeader(buf, unique, SIZES.statfsOut);
}

/** One directory entry for READDIR. */
export interface Dirent {
  ino: bigint;
  name: string;
  /** `DT_DIR` (4) or `DT_REG` (8). */
  type: number;
}

const encoder = new TextEncoder();

/**
 * A READDIR reply: the entries from index `offset` that fit in `size`
 * bytes; each entry's `off` is the index of the next.
 *
 * @returns The reply's length.
 */
export function encodeReaddir(
  buf: Uint8Array,
  unique: bigint,
  entries: readonly Dirent[],
  offset: bigint,
  size: number,
): number {
  const v = view(buf);
  let at = SIZES.outHeader;
  const end = SIZES.outHeader + Math.min(size, buf.length - SIZES.outHeader);
  for (let i = Number(offset); i < entries.length; i++) {
    const e = entries[i]!;
    const name = encoder.encode(e.name);
    const total = SIZES.direntHead + ((name.length + 7) & ~7);
    if (at + total > end) break;
    v.setBigUint64(at, e.ino, true);
    v.setBigUint64(at + 8, BigInt(i + 1), true);
    v.setUint32(at + 16, name.length, true);
    v.setUint32(at + 20, e.type, true);
    buf.set(name, at + SIZES.direntHead);
    buf.fill(0, at + SIZES.direntHead + name.length, at + total);
    at += total;
  }
  return encodeHeader(buf, unique, at - SIZES.outHeader);
}
