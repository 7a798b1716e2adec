/**
 * The file system a FUSE mount shows: one directory holding one file, the
 * export. Answers each of the kernel's requests (INIT aside, which is the
 * server's) into the request's own buffer, reading and writing through
 * the client; the server loop in `serve.ts` reads the requests, writes the
 * replies, and turns what the client throws into an errno.
 *
 * @module
 */

import {
  EFBIG,
  EINVAL,
  ENOENT,
  ENOSYS,
  EOPNOTSUPP,
  EROFS,
  sys,
} from "./_sys.ts";
import {
  type Attr,
  type Dirent,
  encodeAttr,
  encodeEntry,
  encodeError,
  encodeHeader,
  encodeOpen,
  encodeReaddir,
  encodeStatfs,
  encodeWrite,
  FALLOC,
  FATTR,
  FOPEN,
  FUSE_ROOT_ID,
  type FuseRequest,
  SIZES,
} from "./_wire.ts";

/**
 * What the server needs of a client: `NbdClient` from `connect()` is one.
 * Requests are issued concurrently; the client pipelines them.
 */
export interface FuseClient {
  /** The export's size in bytes. */
  readonly size: number;
  /** The same, exactly. */
  readonly sizeBigInt: bigint;
  /** Whether the export refuses writes. */
  readonly readOnly: boolean;
  /** Whether `flush()` is allowed. */
  readonly canFlush: boolean;
  /** Whether `writeZeroes()` is allowed. */
  readonly canWriteZeroes: boolean;
  /** Requests must be multiples of `minimum` bytes, at such offsets. */
  readonly blockSize: { readonly minimum: number };
  /** `"failed"` or `"closed"` once no request can succeed. */
  readonly state: string;
  /** Reads `buffer.length` bytes at `offset` into `buffer`. */
  readInto(buffer: Uint8Array, offset: number): Promise<void>;
  /** Reads `length` bytes at `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Writes `data` at `offset`. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes completed writes durable. */
  flush(): Promise<void>;
  /** Discards a range. */
  trim(offset: number, length: number): Promise<void>;
  /** Zeroes a range; `noHole` keeps it allocated. */
  writeZeroes(
    offset: number,
    length: number,
    options?: { noHole?: boolean },
  ): Promise<void>;
}

/**
 * What the kernel's page cache does with the file:
 * - `"coherent"` (default): the cache is dropped whenever the file is
 *   opened, so every open sees the export as it is now (what nbdfuse and
 *   libfuse do by default); reads within one open are cached and read
 *   ahead.
 * - `"kernel"`: the cache is kept across opens (`FOPEN_KEEP_CACHE`); only
 *   right when nothing else writes to the export.
 * - `"direct"`: no page cache at all (`FOPEN_DIRECT_IO`); every read and
 *   write goes to the server as the program issued it.
 */
export type FuseCacheMode = "coherent" | "kernel" | "direct";

const FILE_ID = 2n;
const S_IFDIR = 0o40000;
const S_IFREG = 0o100000;
const DT_DIR = 4;
const DT_REG = 8;
const O_ACCMODE = 3;
const ENOSPC = 28;
/** How long the kernel may trust a name or attributes: the size never changes. */
const VALID_SECONDS = 3600n;

/** What the file looks like. */
export interface FileConfig {
  /** The file's name in the mount's one directory. */
  fileName: string;
  /** Refuse writes with `EROFS`; the file's mode says so too. */
  readOnly: boolean;
  /** Which page cache the kernel keeps for it. */
  cache: FuseCacheMode;
}

/** The export as one file in one directory. */
export class ExportFile {
  /** Whether writes are refused. */
  readonly readOnly: boolean;
  #client: FuseClient;
  #fileName: string;
  #dirAttr: Attr;
  #fileAttr: Attr;
  #entries: Dirent[];
  #openFlags: number;
  #minBlock: number;
  /** Unaligned writes read, merge and write whole blocks: one at a time. */
  #rmw: Promise<void> = Promise.resolve();

  /**
   * @param client The export's client.
   * @param config The file's name, mode and cache.
   */
  constructor(client: FuseClient, config: FileConfig) {
    this.#client = client;
    this.#fileName = config.fileName;
    this.readOnly = config.readOnly;
    const now = BigInt(Math.floor(Date.now() / 1000));
    const uid = sys().getuid();
    const gid = sys().getgid();
    this.#dirAttr = {
      ino: FUSE_ROOT_ID,
      size: 4096n,
      mode: S_IFDIR | 0o755,
      nlink: 2,
      uid,
      gid,
      time: now,
      blksize: 4096,
    };
    this.#fileAttr = {
      ino: FILE_ID,
      size: client.sizeBigInt,
      mode: S_IFREG | (config.readOnly ? 0o444 : 0o644),
      nlink: 1,
      uid,
      gid,
      time: now,
      blksize: 4096,
    };
    this.#entries = [
      { ino: FUSE_ROOT_ID, name: ".", type: DT_DIR },
      { ino: FUSE_ROOT_ID, name: "..", type: DT_DIR },
      { ino: FILE_ID, name: config.fileName, type: DT_REG },
    ];
    this.#openFlags = config.cache === "direct"
      ? FOPEN.DIRECT_IO | FOPEN.PARALLEL_DIRECT_WRITES
      : config.cache === "kernel"
      ? FOPEN.KEEP_CACHE
      : 0;
    this.#minBlock = client.blockSize.minimum;
  }

  /**
   * Answers one request of the kernel's (INIT aside) in `slot`, whose
   * request it overwrites.
   *
   * @returns The reply's length in `slot`, or `undefined` when the request
   *   takes no reply.
   * @throws What the client throws: the server turns it into an errno.
   */
  async answer(
    slot: Uint8Array<ArrayBuffer>,
    req: Exclude<FuseRequest, { kind: "init" }>,
  ): Promise<number | undefined> {
    const u = req.unique;
    switch (req.kind) {
      case "lookup":
        if (req.nodeid === FUSE_ROOT_ID && req.name === this.#fileName) {
          return encodeEntry(slot, u, this.#fileAttr, VALID_SECONDS);
        }
        return encodeError(slot, u, ENOENT);
      case "getattr": {
        const a = this.#attrOf(req.nodeid);
        if (!a) return encodeError(slot, u, ENOENT);
        return encodeAttr(slot, u, a, VALID_SECONDS);
      }
      case "setattr": {
        const a = this.#attrOf(req.nodeid);
        if (!a) return encodeError(slot, u, ENOENT);
        // The export's size is fixed: only "truncate" to that size passes.
        if ((req.valid & FATTR.SIZE) && req.size !== a.size) {
          return encodeError(slot, u, EINVAL);
        }
        return encodeAttr(slot, u, a, VALID_SECONDS);
      }
      case "open":
        if (req.nodeid !== FILE_ID) return encodeError(slot, u, ENOENT);
        if (this.readOnly && (req.flags & O_ACCMODE) !== 0) {
          return encodeError(slot, u, EROFS);
        }
        return encodeOpen(slot, u, 0n, this.#openFlags);
      case "opendir":
        if (req.nodeid !== FUSE_ROOT_ID) return encodeError(slot, u, ENOENT);
        return encodeOpen(slot, u, 0n, 0);
      case "readdir":
        return encodeReaddir(slot, u, this.#entries, req.offset, req.size);
      case "read":
        return await this.#read(slot, req.unique, req.offset, req.size);
      case "write":
        return await this.#write(slot, req.unique, req.offset, req.data);
      case "statfs":
        return encodeStatfs(slot, u, {
          blocks: (this.#fileAttr.size + 4095n) / 4096n,
          bsize: 4096,
          files: 1n,
          namelen: 255,
        });
      case "release":
      case "releasedir":
      case "flush":
      case "fsyncdir":
      case "destroy":
        return encodeHeader(slot, u, 0);
      case "fsync":
        if (this.#client.canFlush && !this.readOnly) {
          await this.#client.flush();
        }
        return encodeHeader(slot, u, 0);
      case "fallocate":
        return await this.#fallocate(slot, req);
      case "forget":
      case "batch-forget":
      case "interrupt":
        return undefined;
      case "other":
        return encodeError(slot, u, ENOSYS);
    }
  }

  #attrOf(nodeid: bigint): Attr | undefined {
    if (nodeid === FUSE_ROOT_ID) return this.#dirAttr;
    if (nodeid === FILE_ID) return this.#fileAttr;
    return undefined;
  }

  async #read(
    slot: Uint8Array<ArrayBuffer>,
    unique: bigint,
    offset64: bigint,
    size: number,
  ): Promise<number> {
    const total = this.#fileAttr.size;
    if (offset64 >= total || size === 0) {
      return encodeHeader(slot, unique, 0);
    }
    const offset = Number(offset64);
    const length = Math.min(size, Number(total - offset64));
    if (SIZES.outHeader + length > slot.length) {
      return encodeError(slot, unique, EINVAL);
    }
    const into = slot.subarray(SIZES.outHeader, SIZES.outHeader + length);
    const min = this.#minBlock;
    if (offset % min === 0 && length % min === 0) {
      await this.#client.readInto(into, offset);
    } else {
      // The export reads whole blocks only: read around, keep the middle.
      const start = offset - offset % min;
      const end = Math.ceil((offset + length) / min) * min;
      const whole = await this.#client.read(start, end - start);
      into.set(whole.subarray(offset - start, offset - start + length));
    }
    return encodeHeader(slot, unique, length);
  }

  async #write(
    slot: Uint8Array,
    unique: bigint,
    offset64: bigint,
    data: Uint8Array,
  ): Promise<number> {
    if (this.readOnly) return encodeError(slot, unique, EROFS);
    const total = this.#fileAttr.size;
    if (offset64 + BigInt(data.length) > total) {
      return encodeError(slot, unique, offset64 >= total ? ENOSPC : EFBIG);
    }
    const offset = Number(offset64);
    const min = this.#minBlock;
    if (data.length === 0) {
      // Nothing to send.
    } else if (offset % min === 0 && data.length % min === 0) {
      await this.#client.write(offset, data);
    } else {
      await this.#mergeWrite(offset, data);
    }
    return encodeWrite(slot, unique, data.length);
  }

  /** Read, merge, write the whole blocks around an unaligned write. */
  #mergeWrite(offset: number, data: Uint8Array): Promise<void> {
    const min = this.#minBlock;
    const run = async (): Promise<void> => {
      const start = offset - offset % min;
      const end = Math.ceil((offset + data.length) / min) * min;
      const whole = await this.#client.read(start, end - start);
      whole.set(data, offset - start);
      await this.#client.write(start, whole);
    };
    const next = this.#rmw.then(run, run);
    this.#rmw = next.catch(() => {});
    return next;
  }

  async #fallocate(
    slot: Uint8Array,
    req: FuseRequest & { kind: "fallocate" },
  ): Promise<number> {
    const u = req.unique;
    if (req.nodeid !== FILE_ID) return encodeError(slot, u, ENOENT);
    const total = this.#fileAttr.size;
    const end = req.offset + req.length;
    const mode = req.mode;
    if (mode === 0 || mode === FALLOC.KEEP_SIZE) {
      // Allocation: every byte of the export exists already.
      if (end > total && mode === 0) return encodeError(slot, u, EFBIG);
      return encodeHeader(slot, u, 0);
    }
    if (this.readOnly) return encodeError(slot, u, EROFS);
    const punch = mode === (FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE);
    const zero = mode === FALLOC.ZERO_RANGE ||
      mode === (FALLOC.ZERO_RANGE | FALLOC.KEEP_SIZE);
    if (!punch && !zero) return encodeError(slot, u, EOPNOTSUPP);
    if (req.offset >= total || req.length === 0n) {
      return encodeHeader(slot, u, 0);
    }
    const offset = Number(req.offset);
    const length = Number((end > total ? total : end) - req.offset);
    const c = this.#client;
    // A punched range must read back as zeroes (fallocate(2); the loop
    // driver turns a block device's write zeroes into a punch), and
    // NBD_CMD_TRIM does not promise that: a punch is a write of zeroes the
    // server may deallocate, a zero range one it must keep allocated.
    if (!c.canWriteZeroes) return encodeError(slot, u, EOPNOTSUPP);
    await c.writeZeroes(offset, length, zero ? { noHole: true } : {});
    return encodeHeader(slot, u, 0);
  }
}
