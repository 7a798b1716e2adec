/**
 * An NBD export as one file in a FUSE mount, as libnbd's `nbdfuse` does it,
 * with no libfuse and no nbd module: `/dev/fuse` and `mount(2)` through
 * libc, the FUSE messages from `_wire.ts`, and each request mapped onto
 * the client's pipelined NBD requests.
 *
 * Several requests are in flight at once. Each slot owns one buffer for
 * its request and its reply: a WRITE's data goes to the client as a view
 * of the request, a READ's data lands straight in the reply after its
 * header. The server waits for requests with one `poll` on Deno's thread
 * pool and reads them on the main thread until none is left or every slot
 * is busy.
 *
 * @module
 */

import { NbdCommandError } from "../../lib/errors.ts";
import { libc, SC_PAGESIZE } from "../_libc.ts";
import { NbdSystemCallError } from "../errors.ts";
import { NbdFuseError } from "./errors.ts";
import { ExportFile, type FuseCacheMode, type FuseClient } from "./_file.ts";
import {
  checkMountpoint,
  mountedAt,
  mountFuseFs,
  resolveTarget,
  setReadahead,
  unmountFs,
} from "./_mount.ts";
import {
  closeFd,
  EAGAIN,
  EINTR,
  EINVAL,
  EIO,
  ENODEV,
  ENOENT,
  errno,
  openFuseDevice,
  POLLIN,
  sys,
} from "./_sys.ts";
import {
  decodeRequest,
  encodeError,
  encodeInit,
  expectsReply,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_MIN_MINOR_VERSION,
  type FuseRequest,
  INIT,
  opName,
  SIZES,
} from "./_wire.ts";

export type { FuseCacheMode, FuseClient } from "./_file.ts";

/** Options of {@linkcode mountFuse}. */
export interface FuseOptions {
  /** Serve the file read-only and mount read-only (also when the export is). */
  readOnly?: boolean;
  /** Page cache behaviour; see {@linkcode FuseCacheMode}. Default `"coherent"`. */
  cache?: FuseCacheMode;
  /** Requests in flight at once, 1 to 256. Default 16. */
  inFlight?: number;
  /** Largest request in pages (`FUSE_MAX_PAGES`), 1 to 256. Default 256. */
  maxPages?: number;
  /**
   * Read-ahead of buffered reads in KiB, 0 to 65536; 0 leaves the kernel's
   * (128 KiB). Default: the largest request (1024 with 4 KiB pages), which
   * halves the round trips of a sequential read.
   */
  readahead?: number;
  /** Called with each request and failure, for `-v`. */
  debug?: (event: string, fields: Record<string, unknown>) => void;
}

/** How a mount ended. */
export interface FuseEnd {
  /**
   * `"unmounted"`: unmounted by {@linkcode FuseMount.unmount}, `umount` or
   * `fusermount3 -u`. `"server-failed"`: the NBD connection failed; the
   * file answered EIO and was unmounted. `"error"`: this server failed.
   */
  reason: "unmounted" | "server-failed" | "error";
  /** What failed, for `"server-failed"` and `"error"`. */
  error?: Error;
}

/** A mounted export; see {@linkcode mountFuse}. */
export interface FuseMount {
  /** The directory the file system is mounted on. */
  readonly mountpoint: string;
  /** The file's full path, `MOUNTPOINT/nbd` by default. */
  readonly path: string;
  /** The file's size: the export's. */
  readonly size: number;
  /** Whether writes are refused. */
  readonly readOnly: boolean;
  /** Bytes per request the kernel may send (`max_write`). */
  readonly maxWrite: number;
  /**
   * Settles when the mount is gone and every request is answered; never
   * rejects.
   */
  readonly closed: Promise<FuseEnd>;
  /**
   * Unmounts: at once when the file is not in use, else lazily (gone from
   * the tree now, served until the last user, such as a loop device,
   * closes it).
   *
   * @returns `closed`.
   */
  unmount(): Promise<FuseEnd>;
}

/** Errnos of NBD (`doc/proto.md`) that mean the same on Linux. */
const PASSED_ERRNOS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);

/**
 * Mounts an open client's export as one file in a FUSE file system and
 * serves it until it is unmounted. Resolves once the kernel has spoken
 * INIT, that is once the file answers; the client stays the caller's to
 * close after `closed` settles.
 *
 * `path` is `MOUNTPOINT` (an existing directory; the file is `nbd`) or
 * `MOUNTPOINT/FILENAME` (a name that does not exist in an existing
 * directory). Needs root (CAP_SYS_ADMIN) and `--allow-ffi`, plus
 * `--allow-read` for the mount point checks and `--allow-write` to raise
 * the mount's read-ahead in sysfs (skipped without it).
 *
 * @param client An open client; its export is the file.
 * @param path Where the file appears.
 * @param options Read-only, page cache mode, requests in flight.
 * @returns The mount, serving.
 * @throws {NbdFuseError} for a busy, stale, missing or non-directory mount
 *   point (the message names the fix), without permission, or when the
 *   kernel's FUSE speaks another major version.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { mountFuse } from "@nbd/client/ffi";
 *
 * await using nbd = await connect("nbd+unix:///?socket=/tmp/nbd.sock");
 * const mount = await mountFuse(nbd, "/mnt/nbd");
 * console.log(`${mount.path}: ${mount.size} bytes`); // losetup -f ... it
 * Deno.addSignalListener("SIGINT", () => mount.unmount());
 * const end = await mount.closed;
 * console.log(end.reason);
 * ```
 */
export async function mountFuse(
  client: FuseClient,
  path: string,
  options: FuseOptions = {},
): Promise<FuseMount> {
  const inFlight = bounded(options.inFlight ?? 16, "inFlight", 1, 256);
  const maxPages = bounded(options.maxPages ?? 256, "maxPages", 1, 256);
  const readaheadKib = options.readahead === undefined
    ? undefined
    : bounded(options.readahead, "readahead", 0, 65536);
  const cache = options.cache ?? "coherent";
  if (!["coherent", "kernel", "direct"].includes(cache)) {
    throw new TypeError(
      `mountFuse(): cache must be "coherent", "kernel" or "direct", not ${
        String(cache)
      }`,
    );
  }
  const target = resolveTarget(path);
  checkMountpoint(target.mountpoint);
  const readOnly = options.readOnly === true || client.readOnly;
  const fd = openFuseDevice();
  try {
    mountFuseFs(fd, target.mountpoint, readOnly, "nbd");
  } catch (e) {
    closeFd(fd);
    throw e;
  }
  // Which mount is ours, so that unmounting never takes down another.
  const device = mountedAt(target.mountpoint)?.device;
  const server = new FuseServer(client, fd, {
    device,
    mountpoint: target.mountpoint,
    fileName: target.fileName,
    readOnly,
    cache,
    inFlight,
    maxPages,
    debug: options.debug,
  });
  try {
    await server.start();
  } catch (e) {
    server.abandon();
    throw e;
  }
  const readahead = readaheadKib ?? server.maxWrite / 1024;
  if (readahead > 0 && !setReadahead(target.mountpoint, readahead)) {
    options.debug?.("readahead-unchanged", { kib: readahead });
  }
  return server;
}

function bounded(n: number, what: string, min: number, max: number): number {
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new RangeError(
      `mountFuse(): ${what} must be an integer from ${min} to ${max}, not ${n}`,
    );
  }
  return n;
}

interface ServerConfig {
  /** `major:minor` of our mount, as mounted; `undefined` if not seen. */
  device: string | undefined;
  mountpoint: string;
  fileName: string;
  readOnly: boolean;
  cache: FuseCacheMode;
  inFlight: number;
  maxPages: number;
  debug: FuseOptions["debug"];
}

/**
 * The server's life: `starting` until INIT is answered, `serving`, then
 * `ending` once it knows the mount is going (unmount asked, server
 * failed), `ended` when the kernel said the mount is gone and every
 * request is answered.
 */
type ServerState =
  | { kind: "starting" }
  | { kind: "serving" }
  | { kind: "ending"; end: FuseEnd }
  | { kind: "ended"; end: FuseEnd };

class FuseServer implements FuseMount {
  readonly mountpoint: string;
  readonly path: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly maxWrite: number;
  readonly closed: Promise<FuseEnd>;

  #client: FuseClient;
  #fd: number;
  #config: ServerConfig;
  #state: ServerState = { kind: "starting" };
  #free: Uint8Array<ArrayBuffer>[] = [];
  #busy = 0;
  #slotWaiter: (() => void) | undefined;
  #settled: (() => void) | undefined;
  #resolveClosed!: (end: FuseEnd) => void;
  #pollfd = new Uint8Array(8);
  #file: ExportFile;

  constructor(client: FuseClient, fd: number, config: ServerConfig) {
    this.#client = client;
    this.#fd = fd;
    this.#config = config;
    this.mountpoint = config.mountpoint;
    this.path = `${
      config.mountpoint === "/" ? "" : config.mountpoint
    }/${config.fileName}`;
    this.size = client.size;
    this.readOnly = config.readOnly;
    const page = Number(libc().sysconf(SC_PAGESIZE)) || 4096;
    this.maxWrite = config.maxPages * page;
    // A read of /dev/fuse must have room for the largest write request.
    const slotSize = this.maxWrite + page;
    for (let i = 0; i < config.inFlight; i++) {
      this.#free.push(new Uint8Array(slotSize));
    }
    const pv = new DataView(this.#pollfd.buffer);
    pv.setInt32(0, fd, true);
    pv.setInt16(4, POLLIN, true);
    this.#file = new ExportFile(client, {
      fileName: config.fileName,
      readOnly: config.readOnly,
      cache: config.cache,
    });
    this.closed = new Promise((resolve) => this.#resolveClosed = resolve);
  }

  #trace(event: string, fields: Record<string, unknown>): void {
    this.#config.debug?.(event, fields);
  }

  /** Answers INIT, then serves in the background. */
  async start(): Promise<void> {
    const slot = this.#free.pop()!;
    try {
      // Bounded: the kernel queues INIT inside mount(2).
      const deadline = Date.now() + 10_000;
      for (;;) {
        const n = this.#readRequest(slot);
        if (n === "again") {
          if (Date.now() > deadline) {
            throw new NbdFuseError(
              "protocol",
              "The kernel sent no FUSE_INIT within 10 s of the mount",
            );
          }
          await this.#poll();
          continue;
        }
        if (n === "gone") {
          throw new NbdFuseError(
            "other",
            `${this.mountpoint} was unmounted before FUSE_INIT`,
          );
        }
        const req = decodeRequest(slot.subarray(0, n));
        if (req.kind !== "init") {
          throw new NbdFuseError(
            "protocol",
            `The kernel's first FUSE request is ${
              opName(req.opcode)
            }, not FUSE_INIT`,
          );
        }
        this.#init(slot, req);
        break;
      }
    } finally {
      this.#free.push(slot);
    }
    this.#state = { kind: "serving" };
    this.#loop().then(
      () => this.#finish(),
      (e) => {
        this.#ending({ reason: "error", error: asError(e) });
        this.#finish();
      },
    );
  }

  /** After a failed start: unmount and close, nothing left behind. */
  abandon(): void {
    try {
      unmountFs(this.mountpoint, this.#config.device);
    } catch {
      // The descriptor's close below aborts the connection anyway.
    }
    closeFd(this.#fd);
  }

  unmount(): Promise<FuseEnd> {
    this.#ending({ reason: "unmounted" });
    return this.closed;
  }

  /**
   * Moves to `ending` once, and detaches the mount, unless the kernel said
   * it is gone already (`gone`): what is mounted there now is not ours.
   */
  #ending(end: FuseEnd, gone = false): void {
    const s = this.#state;
    if (s.kind === "ending" || s.kind === "ended") return;
    this.#state = { kind: "ending", end };
    this.#trace("unmount", { reason: end.reason });
    if (gone) return;
    try {
      unmountFs(this.mountpoint, this.#config.device);
    } catch (e) {
      this.#trace("unmount-failed", { error: asError(e).message });
    }
  }

  async #finish(): Promise<void> {
    // Every request answered (or failing to be: the device is gone).
    if (this.#busy > 0) {
      await new Promise<void>((resolve) => this.#settled = resolve);
    }
    closeFd(this.#fd);
    const s = this.#state;
    const end = s.kind === "ending" || s.kind === "ended"
      ? s.end
      : { reason: "unmounted" as const };
    this.#state = { kind: "ended", end };
    this.#trace("ended", { reason: end.reason });
    this.#resolveClosed(end);
  }

  /** Bytes read, `"again"` when none is queued, `"gone"` once unmounted. */
  #readRequest(slot: Uint8Array<ArrayBuffer>): number | "again" | "gone" {
    for (let tries = 0; tries < 1000; tries++) {
      const n = Number(sys().read(this.#fd, slot, BigInt(slot.length)));
      if (n >= 0) return n;
      const e = errno();
      if (e === EAGAIN) return "again";
      if (e === ENODEV) return "gone";
      // EINTR: a signal; ENOENT: the request was interrupted meanwhile.
      if (e === EINTR || e === ENOENT) continue;
      throw new NbdSystemCallError("read", e, "Cannot read /dev/fuse");
    }
    return "again";
  }

  async #poll(): Promise<void> {
    await sys().poll(this.#pollfd, 1n, -1);
  }

  async #loop(): Promise<void> {
    for (;;) {
      const slot = this.#free.pop();
      if (!slot) {
        await new Promise<void>((resolve) => this.#slotWaiter = resolve);
        continue;
      }
      const n = this.#readRequest(slot);
      if (typeof n === "number") {
        this.#busy++;
        this.#serve(slot, n).finally(() => this.#release(slot));
        continue;
      }
      this.#free.push(slot);
      if (n === "gone") {
        this.#ending({ reason: "unmounted" }, true);
        return;
      }
      await this.#poll();
    }
  }

  /** A request is answered: its slot is free again. */
  #release(slot: Uint8Array<ArrayBuffer>): void {
    this.#free.push(slot);
    this.#busy--;
    const w = this.#slotWaiter;
    this.#slotWaiter = undefined;
    w?.();
    if (this.#busy === 0) {
      const s = this.#settled;
      this.#settled = undefined;
      s?.();
    }
  }

  #reply(slot: Uint8Array, len: number): void {
    const n = Number(sys().write(this.#fd, slot, BigInt(len)));
    if (n >= 0) return;
    const e = errno();
    // ENOENT: the kernel gave up on the request (interrupted);
    // ENODEV: the mount is gone. Neither is this server's failure.
    if (e !== ENOENT && e !== ENODEV) {
      this.#trace("reply-failed", { errno: e });
    }
  }

  #error(slot: Uint8Array, unique: bigint, e: number): void {
    this.#reply(slot, encodeError(slot, unique, e));
  }

  async #serve(slot: Uint8Array<ArrayBuffer>, n: number): Promise<void> {
    let req: FuseRequest;
    try {
      req = decodeRequest(slot.subarray(0, n));
    } catch (e) {
      this.#trace("bad-request", { error: asError(e).message });
      // The header alone is enough to refuse it, when there is one.
      if (n >= SIZES.inHeader) {
        const unique = new DataView(slot.buffer).getBigUint64(8, true);
        this.#error(slot, unique, EIO);
      }
      return;
    }
    if (this.#config.debug) {
      this.#trace("request", { op: opName(req.opcode), unique: req.unique });
    }
    if (!expectsReply(req)) return;
    try {
      await this.#answer(slot, req);
    } catch (e) {
      const errnoValue = this.#errnoOf(e);
      this.#trace("failed", {
        op: opName(req.opcode),
        errno: errnoValue,
        error: asError(e).message,
      });
      this.#error(slot, req.unique, errnoValue);
    }
  }

  /** The errno a failed NBD request gives the kernel; notices a dead server. */
  #errnoOf(e: unknown): number {
    // Whatever the error's kind (a server shutting down answers ESHUTDOWN
    // first), a client that can no longer carry requests ends the mount.
    if (this.#client.state === "failed" || this.#client.state === "closed") {
      this.#ending({ reason: "server-failed", error: asError(e) });
    }
    if (e instanceof NbdCommandError) {
      return PASSED_ERRNOS.has(e.errno) ? e.errno : EIO;
    }
    if (e instanceof RangeError) return EINVAL;
    return EIO;
  }

  async #answer(
    slot: Uint8Array<ArrayBuffer>,
    req: FuseRequest,
  ): Promise<void> {
    if (req.kind === "init") return this.#init(slot, req);
    const len = await this.#file.answer(slot, req);
    if (len !== undefined) this.#reply(slot, len);
  }

  #init(slot: Uint8Array, req: FuseRequest & { kind: "init" }): void {
    if (
      req.major !== FUSE_KERNEL_VERSION || req.minor < FUSE_MIN_MINOR_VERSION
    ) {
      this.#error(slot, req.unique, EINVAL);
      throw new NbdFuseError(
        "protocol",
        `The kernel speaks FUSE ${req.major}.${req.minor}; this server needs ${FUSE_KERNEL_VERSION}.${FUSE_MIN_MINOR_VERSION} or newer`,
      );
    }
    const wanted = INIT.ASYNC_READ | INIT.BIG_WRITES | INIT.MAX_PAGES |
      INIT.ASYNC_DIO;
    const flags = req.flags & wanted;
    const c = this.#config;
    this.#trace("init", {
      kernel: `${req.major}.${req.minor}`,
      maxWrite: this.maxWrite,
      maxReadahead: req.maxReadahead,
    });
    this.#reply(
      slot,
      encodeInit(slot, req.unique, {
        minor: Math.min(req.minor, FUSE_KERNEL_MINOR_VERSION),
        maxReadahead: req.maxReadahead,
        flags,
        maxBackground: c.inFlight,
        congestionThreshold: Math.max(1, Math.floor(c.inFlight * 3 / 4)),
        maxWrite: this.maxWrite,
        maxPages: c.maxPages,
      }),
    );
  }
}

function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

/**
 * Whether `dir` has a FUSE mount made by {@linkcode mountFuse} on it now
 * (its type in /proc/self/mountinfo is `fuse.nbd`).
 *
 * @param dir An absolute directory path.
 * @returns Whether such a mount is there.
 *
 * @example
 * ```ts ignore
 * import { isFuseMounted } from "@nbd/client/ffi";
 * if (isFuseMounted("/mnt/nbd")) console.log("still mounted");
 * ```
 */
export function isFuseMounted(dir: string): boolean {
  const m = mountedAt(dir);
  return m !== undefined && m.fstype === "fuse.nbd";
}
