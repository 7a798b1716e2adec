/**
 * Hands a negotiated connection to the Linux nbd driver, as `qemu-nbd -c`
 * and `nbd-client` do.
 *
 * Plain TCP, Unix and vsock exports take the direct path: the socket is
 * created through libc, the handshake runs over its descriptor, and the
 * kernel gets that descriptor. TLS exports take the relay path: the kernel
 * gets one end of a socketpair and this process copies bytes between the
 * other end and the library's TLS connection.
 *
 * The kernel speaks only simple replies, so the handshake asks for no
 * structured replies, no extended headers and no metadata contexts, and it
 * asks for block sizes.
 *
 * @module
 */

import { resolveOptions } from "../lib/client.ts";
import { refuseUnsupportedTls, upgradeToTls } from "../lib/tls.ts";
import type {
  ConnectOptions,
  DebugHook,
  TlsOptions,
} from "../lib/connect_options.ts";
import { CMD_DISC, FLAG_HAS_FLAGS, FLAG_READ_ONLY } from "../lib/constants.ts";
import { makeTracer, type Tracer } from "../lib/debug.ts";
import {
  abortReason,
  errorText,
  NbdError,
  NbdProtocolError,
} from "../lib/errors.ts";
import type { ExportInfo } from "../lib/export.ts";
import { type HandshakeOptions, negotiate } from "../lib/handshake.ts";
import { type ByteStream, Transport } from "../lib/transport.ts";
import { encodeRequest, SIZES } from "../lib/wire.ts";
import { startDoItWorker } from "./_do_it_worker.ts";
import { FdStream } from "./_fd_stream.ts";
import {
  checkDevice,
  chooseBlockSize,
  deviceInUse,
  deviceName,
  devicePath,
  ioctl,
  KERNEL_MAX_BYTES,
  NBD_CLEAR_QUE,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
  NBD_SET_BLKSIZE,
  NBD_SET_FLAGS,
  NBD_SET_SIZE_BLOCKS,
  NBD_SET_SOCK,
  NBD_SET_TIMEOUT,
  openDevice,
  pageSize,
  setReadOnly,
} from "./_kernel.ts";
import {
  cString,
  describeErrno,
  E,
  libc,
  MSG_NOSIGNAL,
  O_CLOEXEC,
  O_RDONLY,
} from "./_libc.ts";
import { type Relay, socketPair, startRelay } from "./_relay.ts";
import { connectSocket } from "./_socket.ts";
import { NbdKernelError } from "./errors.ts";

/**
 * How to attach. The server and export come from the target; TLS settings
 * and `debug` given here override the target's.
 */
export interface AttachOptions extends TlsOptions {
  /** Trace the handshake and the kernel calls; `true` prints to stderr. */
  debug?: boolean | DebugHook;
  /** Make the device read-only even if the export is writable. */
  readOnly?: boolean;
  /**
   * Seconds the kernel waits for a reply before failing requests and
   * dropping the connection (`NBD_SET_TIMEOUT`); the kernel's default
   * when not given.
   */
  timeout?: number;
  /**
   * Logical block size: a power of two from 512 to the page size. By
   * default the server's preferred block size, clamped to that range.
   */
  blockSize?: number;
  /**
   * Disconnect cleanly on SIGINT and SIGTERM (default true). The listeners
   * are removed once the device is released.
   */
  handleSignals?: boolean;
  /** Aborts the attach while it runs; afterwards, disconnects. */
  signal?: AbortSignal;
  /**
   * Take the relay path even for a plain connection: this process copies
   * the bytes, as it must for TLS. Slower; meant for tests and for servers
   * only Deno can reach.
   */
  relay?: boolean;
  /**
   * Milliseconds to connect to the server and negotiate (default 30000).
   * A server that accepts but never answers cannot hang the attach.
   */
  connectTimeout?: number;
  /** Milliseconds for the device to come up once handed over (default 30000). */
  startTimeout?: number;
}

/** Why a device was released. */
export type ReleaseReason =
  /** {@linkcode AttachedDevice.disconnect} was called (or a signal came). */
  | "disconnect"
  /**
   * The kernel let go without our asking: the server closed the connection
   * (or died), or another process detached the device.
   */
  | "lost"
  /** The kernel reported an error, such as a request timeout. */
  | "error";

/** What {@linkcode AttachedDevice.closed} resolves to. */
export interface ReleaseInfo {
  /** Whether this process asked for the disconnect. */
  requested: boolean;
  /** Why the device was released. */
  reason: ReleaseReason;
  /** One sentence for users. */
  message: string;
  /** The underlying error, for `"error"` (and a failed relay). */
  error: Error | undefined;
}

/** A device with an export attached. */
export interface AttachedDevice extends AsyncDisposable {
  /** The device path, e.g. `"/dev/nbd0"`. */
  readonly device: string;
  /** Size in bytes as the kernel sees it (whole blocks of the export). */
  readonly size: number;
  /** The logical block size given to the kernel. */
  readonly blockSize: number;
  /** Whether the device is read-only. */
  readonly readOnly: boolean;
  /** What the handshake settled. */
  readonly info: ExportInfo;
  /** `"direct"` (the kernel owns the socket) or `"relay"` (TLS). */
  readonly path: "direct" | "relay";
  /** Settles once the device is released; never rejects. */
  readonly closed: Promise<ReleaseInfo>;
  /** Asks the kernel to disconnect, then waits for the release. */
  disconnect(): Promise<ReleaseInfo>;
}

/** Milliseconds after NBD_DISCONNECT before the socket is cut by force. */
const DISCONNECT_GRACE_MS = 5000;

const TLS_KEYS = [
  "tls",
  "tlsCertificates",
  "caCerts",
  "tlsClientCert",
  "tlsClientKey",
  "tlsHostname",
  "tlsVerifyPeer",
  "tlsUsername",
  "tlsPskFile",
  "debug",
] as const;

/** The target as options, with the TLS settings of `options` on top. */
function resolveTarget(
  target: string | ConnectOptions,
  options: AttachOptions,
): ConnectOptions {
  const overrides: Record<string, unknown> = {};
  for (const key of TLS_KEYS) {
    if (options[key] !== undefined) overrides[key] = options[key];
  }
  return resolveOptions(target, overrides as ConnectOptions);
}

/**
 * What the kernel can take: simple replies only, so no structured replies,
 * extended headers or metadata contexts; block sizes asked for. TLS, when
 * wanted, upgrades the libc socket itself (no `Deno.connect`, so no file
 * permissions even for a Unix socket).
 */
function handshakeOptions(
  target: ConnectOptions,
  trace: Tracer,
  signal: AbortSignal,
): HandshakeOptions {
  const tls = target.tls ?? "disable";
  const options: HandshakeOptions = {
    exportName: target.exportName ?? "",
    tls,
    structuredReplies: false,
    extendedHeaders: false,
    metaContexts: [],
    blockSizes: true,
  };
  if (tls !== "disable") {
    options.upgradeTls = (stream) =>
      upgradeToTls(stream, { ...target, signal });
  }
  if (trace) options.trace = trace;
  return options;
}

function validate(options: AttachOptions, page: number): void {
  const { timeout, blockSize } = options;
  if (
    timeout !== undefined &&
    (!Number.isInteger(timeout) || timeout < 0 || timeout > 0xffffffff)
  ) {
    throw new RangeError(
      `timeout must be a whole number of seconds, got ${timeout}`,
    );
  }
  if (
    blockSize !== undefined &&
    (!Number.isInteger(blockSize) || blockSize < 512 || blockSize > page ||
      (blockSize & (blockSize - 1)) !== 0)
  ) {
    throw new RangeError(
      `blockSize must be a power of two from 512 to ${page}, got ${blockSize}`,
    );
  }
}

/**
 * Connects to the server and negotiates for the kernel.
 *
 * @returns the descriptor for the kernel, what was negotiated, and for
 *   TLS the relay's two streams.
 */
async function connectForKernel(
  target: ConnectOptions,
  options: AttachOptions,
  trace: Tracer,
): Promise<{
  sockFd: number;
  info: ExportInfo;
  relay?: { local: FdStream; remote: ByteStream };
}> {
  const ms = options.connectTimeout ?? 30_000;
  const outer = options.signal ?? target.signal;
  const controller = new AbortController();
  const timer = setTimeout(
    () =>
      controller.abort(
        new NbdError(
          `Cannot connect and negotiate within ${ms} ms: the server did not answer in time`,
        ),
      ),
    ms,
  );
  const forward = () => controller.abort(outer && abortReason(outer));
  outer?.addEventListener("abort", forward, { once: true });
  if (outer?.aborted) forward();
  try {
    return await connectAndNegotiate(target, options, trace, controller.signal);
  } catch (e) {
    // An abort says why in its reason; the error thrown may only say
    // "the connection is closed".
    if (controller.signal.aborted) throw abortReason(controller.signal);
    throw e;
  } finally {
    clearTimeout(timer);
    outer?.removeEventListener("abort", forward);
  }
}

async function connectAndNegotiate(
  target: ConnectOptions,
  options: AttachOptions,
  trace: Tracer,
  signal: AbortSignal,
): Promise<{
  sockFd: number;
  info: ExportInfo;
  relay?: { local: FdStream; remote: ByteStream };
}> {
  if ((target.tls ?? "disable") !== "disable") refuseUnsupportedTls(target);
  const fd = await connectSocket(target, { signal });
  const stream = new FdStream(fd);
  const transport = new Transport(stream);
  const onAbort = () => transport.close(abortReason(signal));
  signal.addEventListener("abort", onAbort, { once: true });
  try {
    const info = await negotiate(
      transport,
      handshakeOptions(target, trace, signal),
    );
    checkNothingBuffered(transport);
    if (!info.tls && !options.relay) {
      // The direct path: the kernel gets the very socket we negotiated on.
      return { sockFd: stream.release(), info };
    }
    // The relay path: the kernel gets one end of a socketpair, and this
    // process copies between the other end and the TLS stream.
    const [kernelEnd, ourEnd] = socketPair();
    return {
      sockFd: kernelEnd,
      info,
      relay: { local: new FdStream(ourEnd), remote: transport.stream },
    };
  } catch (e) {
    transport.close();
    throw e;
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

function checkNothingBuffered(transport: Transport): void {
  if (transport.buffered !== 0) {
    throw new NbdProtocolError(
      "transmission",
      `Server sent ${transport.buffered} bytes before any request`,
    );
  }
}

/** Sends `NBD_CMD_DISC`, best effort and bounded: the attach failed anyway. */
async function sayGoodbye(
  write: (p: Uint8Array<ArrayBuffer>) => Promise<number>,
): Promise<void> {
  // The kernel negotiated without extended headers: a compact request.
  const req = new Uint8Array(SIZES.request);
  encodeRequest(
    { flags: 0, type: CMD_DISC, cookie: 0, offset: 0, length: 0 },
    false,
    req,
  );
  try {
    await within(write(req), 1000);
  } catch {
    // The connection may already be gone; nothing more to do.
  }
}

type WorkerMessage =
  | { type: "started"; tid: number }
  | { type: "returned"; result: number; errno: number }
  | { type: "failed"; message: string };

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * `promise`, or `undefined` after `ms`; the timer is cleared either way, so
 * nothing is left to keep the process alive.
 */
async function within<T>(
  promise: Promise<T>,
  ms: number,
): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Attaches an export to an nbd device and returns once the device is up.
 * The device stays attached until {@linkcode AttachedDevice.disconnect},
 * SIGINT/SIGTERM (unless `handleSignals` is false), or the server going
 * away; {@linkcode AttachedDevice.closed} tells which.
 *
 * Needs `--allow-ffi`, `--allow-read` for a TLS certificate directory,
 * and root (CAP_SYS_ADMIN). Sockets, devices and sysfs are reached through
 * libc, which Deno's other permissions do not cover.
 *
 * @param target An `nbd://`, `nbds://`, `nbd+unix://` ... URI, or options
 *   naming the server and export.
 * @param device The device, e.g. `"/dev/nbd0"`; see {@linkcode findFreeDevice}.
 * @param options How to attach.
 * @returns The attached device.
 * @throws {NbdKernelError} when the device is busy, missing or forbidden,
 *   or the export does not fit the kernel.
 * @throws {NbdError} when connecting or negotiating fails.
 * @throws {RangeError} for bad options.
 *
 * @example
 * ```ts ignore
 * import { attach } from "@nbd/client/ffi";
 * const dev = await attach("nbd+unix:///?socket=/run/nbd.sock", "/dev/nbd0");
 * console.log(`${dev.device}: ${dev.size} bytes`);
 * const { message } = await dev.closed;
 * console.log(message);
 * ```
 */
export async function attach(
  target: string | ConnectOptions,
  device: string,
  options: AttachOptions = {},
): Promise<AttachedDevice> {
  const path = devicePath(device);
  const name = deviceName(device);
  libc();
  const page = pageSize();
  validate(options, page);
  const connectOptions = resolveTarget(target, options);
  const trace = makeTracer(connectOptions.debug);
  const signal = options.signal ?? connectOptions.signal;
  if (signal?.aborted) throw abortReason(signal);

  checkDevice(path, name);
  if (deviceInUse(name)) {
    throw new NbdKernelError(
      path,
      "",
      E.EBUSY,
      `Cannot attach to ${path}: it is already connected`,
      "busy",
    );
  }
  const devFd = openDevice(path);
  let sockFd = -1;
  let relay: { local: FdStream; remote: ByteStream } | undefined;
  // What the failure path must undo: our own configuration of the device
  // (not another process's), and the descriptors until the attachment
  // owns them.
  let configured = false;
  let handedOver = false;
  try {
    const conn = await connectForKernel(connectOptions, options, trace);
    sockFd = conn.sockFd;
    relay = conn.relay;
    const info = conn.info;
    if (signal?.aborted) throw abortReason(signal);

    const readOnly = options.readOnly === true ||
      (info.flags & FLAG_READ_ONLY) !== 0;
    let blockSize: number;
    try {
      blockSize = chooseBlockSize(info, page, options.blockSize);
    } catch (e) {
      throw new NbdKernelError(
        path,
        "",
        0,
        `Cannot attach to ${path}: ${errorText(e)}`,
        "size",
      );
    }
    if (info.size > KERNEL_MAX_BYTES) {
      throw new NbdKernelError(
        path,
        "",
        E.EOVERFLOW,
        `Cannot attach to ${path}: the export's ${info.size} bytes exceed the kernel's limit of ${KERNEL_MAX_BYTES}`,
        "size",
      );
    }
    const blocks = info.size / BigInt(blockSize);
    if (blocks === 0n) {
      throw new NbdKernelError(
        path,
        "",
        0,
        `Cannot attach to ${path}: the export (${info.size} bytes) is smaller than one block of ${blockSize} bytes`,
        "size",
      );
    }
    const bytes = blocks * BigInt(blockSize);
    if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new NbdKernelError(
        path,
        "",
        E.EOVERFLOW,
        `Cannot attach to ${path}: ${bytes} bytes is more than this API can report exactly`,
        "size",
      );
    }

    const setup = `Cannot set up ${path}`;
    const step = (req: bigint, arg: bigint, what: string) => {
      trace?.("kernel.ioctl", { device: path, request: what, arg });
      ioctl(path, devFd, req, arg, setup);
    };
    step(NBD_SET_BLKSIZE, BigInt(blockSize), "NBD_SET_BLKSIZE");
    step(NBD_SET_SIZE_BLOCKS, blocks, "NBD_SET_SIZE_BLOCKS");
    step(NBD_CLEAR_SOCK, 0n, "NBD_CLEAR_SOCK");
    configured = true;
    const kernelFlags = FLAG_HAS_FLAGS | info.flags |
      (readOnly ? FLAG_READ_ONLY : 0);
    try {
      step(NBD_SET_FLAGS, BigInt(kernelFlags & 0xffff), "NBD_SET_FLAGS");
    } catch (e) {
      // Kernels before 3.x lack NBD_SET_FLAGS; BLKROSET below still
      // makes a read-only export read-only.
      if (!(e instanceof NbdKernelError) || e.errno !== E.ENOTTY) throw e;
    }
    // BLKROSET sticks to the device across connections: always set it.
    setReadOnly(path, devFd, readOnly);
    if (options.timeout !== undefined) {
      step(NBD_SET_TIMEOUT, BigInt(options.timeout), "NBD_SET_TIMEOUT");
    }
    step(NBD_SET_SOCK, BigInt(sockFd), "NBD_SET_SOCK");

    const attachment = new Attachment({
      path,
      name,
      devFd,
      sockFd,
      info,
      blockSize,
      size: Number(bytes),
      readOnly,
      relay,
      trace,
    });
    // From here on the attachment owns the descriptors.
    handedOver = true;
    sockFd = -1;
    relay = undefined;
    await attachment.start(options.startTimeout ?? 30_000);
    if (signal?.aborted) {
      // Aborted while the device came up: take it down again.
      await attachment.disconnect();
      throw abortReason(signal);
    }
    attachment.watch(options.handleSignals ?? true, signal);
    return attachment;
  } catch (e) {
    // The server is in transmission by now: say goodbye, as a client that
    // changes its mind should, before hanging up.
    if (relay) {
      await sayGoodbye((p) => relay!.remote.write(p));
      relay.local.close();
      try {
        relay.remote.close();
      } catch {
        // Already closed.
      }
    }
    if (sockFd >= 0) {
      const fd = sockFd;
      // Not when sockFd is the kernel's end of a socketpair (relay above).
      if (!relay) {
        await sayGoodbye(async (p) =>
          Number(
            await libc().send(fd, p, BigInt(p.length), MSG_NOSIGNAL),
          )
        );
      }
      libc().close(fd);
    }
    if (!handedOver) {
      // Undo a half-done setup, so the device is not left holding a socket.
      if (configured) libc().ioctl(devFd, NBD_CLEAR_SOCK, 0n);
      libc().close(devFd);
    }
    throw e;
  }
}

interface AttachmentParts {
  path: string;
  name: string;
  devFd: number;
  sockFd: number;
  info: ExportInfo;
  blockSize: number;
  size: number;
  readOnly: boolean;
  relay: { local: FdStream; remote: ByteStream } | undefined;
  trace: Tracer;
}

class Attachment implements AttachedDevice {
  readonly device: string;
  readonly size: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly info: ExportInfo;
  readonly path: "direct" | "relay";
  readonly closed: Promise<ReleaseInfo>;
  #name: string;
  #devFd: number;
  #sockFd: number;
  #relayParts: { local: FdStream; remote: ByteStream } | undefined;
  #relay: Relay | undefined;
  #trace: Tracer;
  #worker: Worker | undefined;
  #requested = false;
  #finished = false;
  #resolveClosed!: (r: ReleaseInfo) => void;
  #pendingIoctls: Promise<unknown>[] = [];
  #graceTimer: ReturnType<typeof setTimeout> | undefined;
  #unwatch: (() => void) | undefined;
  #onStarted: ((m: WorkerMessage) => void) | undefined;

  constructor(parts: AttachmentParts) {
    this.device = parts.path;
    this.size = parts.size;
    this.blockSize = parts.blockSize;
    this.readOnly = parts.readOnly;
    this.info = parts.info;
    this.path = parts.relay ? "relay" : "direct";
    this.#name = parts.name;
    this.#devFd = parts.devFd;
    this.#sockFd = parts.sockFd;
    this.#relayParts = parts.relay;
    this.#trace = parts.trace;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
  }

  /** Starts the relay and NBD_DO_IT; resolves once the device is up. */
  async start(timeoutMs: number): Promise<void> {
    if (this.#relayParts) {
      this.#relay = startRelay(this.#relayParts.local, this.#relayParts.remote);
    }
    const worker = startDoItWorker();
    this.#worker = worker;
    let early: WorkerMessage | undefined;
    const started = new Promise<WorkerMessage>((resolve) => {
      this.#onStarted = resolve;
    });
    worker.onmessage = (e: MessageEvent<WorkerMessage>) => {
      const m = e.data;
      if (m.type === "returned" || m.type === "failed") {
        early ??= m;
        this.#onStarted?.(m);
        void this.#finish(m);
      } else {
        this.#trace?.("kernel.do_it", { device: this.device, tid: m.tid });
        this.#onStarted?.(m);
      }
    };
    worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      const m: WorkerMessage = { type: "failed", message: e.message };
      early ??= m;
      this.#onStarted?.(m);
      void this.#finish(m);
    };
    worker.postMessage({ fd: this.#devFd });

    const deadline = performance.now() + timeoutMs;
    const first = await within(started, timeoutMs);
    // The sysfs pid file appears once the kernel has the device up.
    while (!early && first?.type === "started") {
      if (deviceInUse(this.#name)) break;
      if (performance.now() > deadline) {
        await this.#abandon();
        throw new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          0,
          `${this.device} did not come up within ${timeoutMs} ms`,
          "timeout",
        );
      }
      await delay(10);
    }
    if (first === undefined) {
      await this.#abandon();
      throw new NbdKernelError(
        this.device,
        "NBD_DO_IT",
        0,
        `The NBD_DO_IT thread for ${this.device} did not start within ${timeoutMs} ms`,
        "timeout",
      );
    }
    if (early) {
      const release = await this.closed;
      const m = early;
      if (m.type === "failed") {
        throw new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          0,
          `Cannot start ${this.device}: ${m.message}`,
        );
      }
      throw new NbdKernelError(
        this.device,
        "NBD_DO_IT",
        m.type === "returned" ? m.errno : 0,
        `Cannot start ${this.device}${
          m.type === "returned" && m.result === 0 ? ": " + release.message : ""
        }`,
      );
    }
    this.#trace?.("kernel.up", { device: this.device, size: this.size });
    // Partitions appear on the next open after the device is up (no udev
    // does it for us). On a pool thread: the open reads the partition
    // table, which on the relay path this very thread must carry.
    const c = libc();
    void c.open_nb(cString(this.device), O_RDONLY | O_CLOEXEC, 0).then((fd) =>
      fd >= 0 ? c.close_nb(fd) : undefined
    );
  }

  /** Disconnects on signals and on `signal`; undone when released. */
  watch(handleSignals: boolean, signal: AbortSignal | undefined): void {
    // A second signal does not wait for the server: the socket is cut.
    const onSignal = () => {
      if (this.#requested) this.#cut();
      else void this.disconnect();
    };
    const signals: Deno.Signal[] = handleSignals ? ["SIGINT", "SIGTERM"] : [];
    for (const s of signals) Deno.addSignalListener(s, onSignal);
    signal?.addEventListener("abort", onSignal, { once: true });
    this.#unwatch = () => {
      for (const s of signals) Deno.removeSignalListener(s, onSignal);
      signal?.removeEventListener("abort", onSignal);
    };
    if (this.#finished) this.#unwatch();
  }

  disconnect(): Promise<ReleaseInfo> {
    if (this.#finished || this.#requested) return this.closed;
    this.#requested = true;
    this.#trace?.("kernel.disconnect", { device: this.device });
    const c = libc();
    // On a pool thread: the kernel sends NBD_CMD_DISC through the socket,
    // which on the relay path this thread has to carry.
    this.#pendingIoctls.push(c.ioctl_nb(this.#devFd, NBD_DISCONNECT, 0n));
    // A server that never closes its end is cut off, as `nbd-client -d`
    // does.
    this.#graceTimer = setTimeout(() => this.#cut(), DISCONNECT_GRACE_MS);
    return this.closed;
  }

  /** Shuts the socket down without waiting for the server. */
  #cut(): void {
    if (this.#finished) return;
    clearTimeout(this.#graceTimer);
    this.#pendingIoctls.push(
      libc().ioctl_nb(this.#devFd, NBD_CLEAR_SOCK, 0n),
    );
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.disconnect();
  }

  /** Gives up on a device that never came up. */
  async #abandon(): Promise<void> {
    this.#requested = true;
    libc().ioctl(this.#devFd, NBD_CLEAR_SOCK, 0n);
    await within(this.closed, 5000);
    // NBD_DO_IT never started or never returned: release what we hold.
    await this.#finish({ type: "failed", message: "abandoned" });
  }

  async #finish(m: WorkerMessage): Promise<void> {
    if (this.#finished || m.type === "started") return;
    this.#finished = true;
    let cleanupError: unknown;
    try {
      await this.#release();
    } catch (e) {
      // `closed` must settle whatever happens; the error goes in it.
      cleanupError = e;
    }
    this.#resolveClosed(this.#describe(m, cleanupError));
  }

  /** Hands everything back once NBD_DO_IT has returned. */
  async #release(): Promise<void> {
    clearTimeout(this.#graceTimer);
    this.#unwatch?.();
    const c = libc();
    // Let ioctls on pool threads finish before their descriptor goes.
    await Promise.allSettled(this.#pendingIoctls);
    c.ioctl(this.#devFd, NBD_CLEAR_QUE, 0n);
    c.ioctl(this.#devFd, NBD_CLEAR_SOCK, 0n);
    if (this.#relay) {
      this.#relay.stop();
      await this.#relay.done;
    } else if (this.#relayParts) {
      this.#relayParts.local.close();
      try {
        this.#relayParts.remote.close();
      } catch {
        // Already closed.
      }
    }
    c.close(this.#sockFd);
    // Closing the last reference releases the device (its pid file goes).
    await c.close_nb(this.#devFd);
    this.#worker?.terminate();
  }

  /** What `closed` says about a release. */
  #describe(
    m: Exclude<WorkerMessage, { type: "started" }>,
    cleanupError: unknown,
  ): ReleaseInfo {
    let release: ReleaseInfo;
    const relayError = this.#relay?.error;
    if (m.type === "failed") {
      release = {
        requested: this.#requested,
        reason: "error",
        message: `${this.device}: the NBD_DO_IT thread failed: ${m.message}`,
        error: new Error(m.message),
      };
    } else if (m.result < 0) {
      const what = m.errno === E.ETIMEDOUT
        ? "the server did not answer in time"
        : `NBD_DO_IT failed with ${describeErrno(m.errno)}`;
      release = {
        requested: this.#requested,
        reason: "error",
        message: `${this.device} was released: ${what}`,
        error: new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          m.errno,
          `${this.device} was released`,
        ),
      };
    } else if (this.#requested) {
      release = {
        requested: true,
        reason: "disconnect",
        message: `${this.device} disconnected`,
        error: undefined,
      };
    } else {
      release = {
        requested: false,
        reason: "lost",
        message: relayError
          ? `${this.device} was released: the connection to the server failed: ${
            errorText(relayError)
          }`
          : `${this.device} was released without a disconnect from this process: the server closed the connection, or another process detached the device`,
        error: relayError instanceof Error ? relayError : undefined,
      };
    }
    if (cleanupError !== undefined && release.error === undefined) {
      release.error = cleanupError instanceof Error
        ? cleanupError
        : new Error(String(cleanupError));
    }
    this.#trace?.("kernel.released", {
      device: this.device,
      reason: release.reason,
    });
    return release;
  }
}
