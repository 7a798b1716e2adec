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
 * The kernel is told through its generic netlink family `nbd` where it
 * exists (`netlink/`: several connections, persist), else through ioctls
 * (`ioctl/`). {@linkcode attach} runs the steps, each in its own module:
 * connecting for the kernel (`_connect.ts`), the device's geometry
 * (`_geometry.ts`), the ioctl configuration and its rollback
 * (`ioctl/_configure.ts`), and the attachment that lives on
 * (`ioctl/_attachment.ts`, `netlink/_attach.ts`).
 *
 * @module
 */

import type {
  ConnectOptions,
  DebugHook,
  TlsOptions,
} from "../lib/connect_options.ts";
import { makeTracer } from "../lib/_debug.ts";
import { abortReason } from "../lib/errors.ts";
import {
  checkMilliseconds,
  checkSignal,
  resolveOptions,
  shown,
} from "../lib/_resolve_options.ts";
import type { AttachedDevice } from "./_attached.ts";
import { gnutls } from "./gnutls/engine.ts";
import {
  checkDevice,
  deviceInUse,
  deviceName,
  devicePath,
  pageSize,
} from "./_kernel.ts";
import { attachByIoctl } from "./ioctl/_attach.ts";
import { E, libc } from "./_libc.ts";
import { attachByNetlink, PERSIST_DEAD_TIMEOUT } from "./netlink/_attach.ts";
import { findFreeDevice } from "./device.ts";
import { NbdKernelError } from "./errors.ts";
import { netlinkAvailable } from "./netlink/mod.ts";

export type {
  AttachedDevice,
  ReleaseInfo,
  ReleaseReason,
} from "./_attached.ts";

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
   * Disconnect cleanly on SIGINT and SIGTERM (default true); a second
   * signal while that waits for the server cuts the connection instead.
   * The listeners are removed once the device is released.
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
   * Milliseconds to connect to the server and negotiate (default 30000; 0
   * for no limit). A server that accepts but never answers cannot hang the
   * attach.
   */
  connectTimeout?: number;
  /**
   * Milliseconds for the device to come up once handed over (default
   * 30000; ioctl path: over netlink the kernel answers once it is up).
   */
  startTimeout?: number;
  /**
   * Tell the kernel through its netlink interface (`true`) or through
   * ioctls (`false`). By default netlink where the kernel has the `nbd`
   * family, ioctls elsewhere. Over netlink a direct-route device outlives
   * this process (until {@linkcode detach}); over ioctls it goes with it.
   */
  netlink?: boolean;
  /**
   * Negotiated connections the kernel spreads requests over (default 1;
   * up to 64). More than one needs netlink and an export that advertises
   * `NBD_FLAG_CAN_MULTI_CONN`.
   */
  connections?: number;
  /**
   * When a connection dies, dial again with the same negotiation, check
   * it reaches the same export (the size, and no flag, block size or
   * metadata context withdrawn, as the library's `reconnect` checks), and
   * hand the new socket to the kernel (`NBD_CMD_RECONFIGURE`); I/O waits meanwhile, up to
   * `deadConnectionTimeout`. Needs netlink and this process alive.
   * Without it, a dead connection releases the device.
   */
  persist?: boolean;
  /**
   * Seconds I/O waits for a dead connection to be replaced before it
   * fails (netlink only). Default 60 with `persist`, else 0 (fail at
   * once). With `persist`, redialling goes on for this long (at least 60
   * s). Without, a dead connection releases the device at once while this
   * process lives; the timeout matters once it is gone and the device
   * outlived it.
   */
  deadConnectionTimeout?: number;
}

/** The most connections attach() takes. */
const MAX_CONNECTIONS = 64;

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
  // GnuTLS for the relay: libnbd's trust, revocation lists, TLS-PSK.
  return resolveOptions(target, {
    tlsEngine: gnutls,
    ...overrides,
  } as ConnectOptions);
}

function validate(options: AttachOptions, page: number): void {
  if (options === null || typeof options !== "object") {
    throw new TypeError(
      `attach() takes options as an object, not ${shown(options)}`,
    );
  }
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
  const { connections, deadConnectionTimeout: dead } = options;
  if (
    connections !== undefined &&
    (!Number.isInteger(connections) || connections < 1 ||
      connections > MAX_CONNECTIONS)
  ) {
    throw new RangeError(
      `connections must be a whole number from 1 to ${MAX_CONNECTIONS}, got ${connections}`,
    );
  }
  if (
    dead !== undefined &&
    (!Number.isInteger(dead) || dead < 0 || dead > 0xffffffff)
  ) {
    throw new RangeError(
      `deadConnectionTimeout must be a whole number of seconds, got ${dead}`,
    );
  }
  for (
    const key of [
      "readOnly",
      "handleSignals",
      "relay",
      "netlink",
      "persist",
    ] as const
  ) {
    const v: unknown = options[key];
    if (v !== undefined && typeof v !== "boolean") {
      throw new TypeError(`${key} must be true or false, not ${shown(v)}`);
    }
  }
  for (const key of ["connectTimeout", "startTimeout"] as const) {
    if (options[key] !== undefined) checkMilliseconds(key, options[key]);
  }
  checkSignal("attach()", options.signal);
  const needs = netlinkOnly(options);
  if (options.netlink === false && needs) {
    throw new RangeError(
      `${needs} needs the kernel's netlink interface, but netlink is false (the ioctl path takes one connection and cannot persist)`,
    );
  }
}

/** What only netlink does, named for a refusal; `undefined` if nothing. */
function netlinkOnly(options: AttachOptions): string | undefined {
  if ((options.connections ?? 1) > 1) {
    return `${options.connections} connections`;
  }
  if (options.persist === true) return "persist";
  if (options.deadConnectionTimeout !== undefined) {
    return "deadConnectionTimeout";
  }
  return undefined;
}

/**
 * Netlink or ioctls: as asked, else netlink where the kernel has it.
 *
 * @throws {NbdKernelError} when netlink is needed and missing.
 */
async function chooseNetlink(
  options: AttachOptions,
  path: string,
): Promise<boolean> {
  if (options.netlink === false) return false;
  const needs = netlinkOnly(options);
  const available = await netlinkAvailable();
  if (!available && (options.netlink === true || needs)) {
    throw new NbdKernelError(
      path,
      "CTRL_CMD_GETFAMILY",
      E.ENOENT,
      `Cannot attach ${path}${
        needs ? ` with ${needs}` : " over netlink"
      }: the kernel has no generic netlink family "nbd" (only the ioctl path, one connection)`,
      "no-module",
    );
  }
  return available;
}

/**
 * Attaches an export to an nbd device and returns once the device is up.
 * The device stays attached until {@linkcode AttachedDevice.disconnect},
 * SIGINT/SIGTERM (unless `handleSignals` is false), or the server going
 * away (with `persist`: not coming back); {@linkcode AttachedDevice.closed}
 * tells which.
 *
 * Over netlink (the default where the kernel has it) a device on the
 * direct route stays attached and working even after this process exits,
 * until {@linkcode detach}; on the relay route (TLS) and over ioctls it
 * depends on this process.
 *
 * Needs `--allow-ffi`, `--allow-read` for a TLS certificate directory,
 * and root (CAP_SYS_ADMIN). Sockets, devices and sysfs are reached through
 * libc, which Deno's other permissions do not cover.
 *
 * @param target An `nbd://`, `nbds://`, `nbd+unix://` ... URI, or options
 *   naming the server and export.
 * @param device The device, e.g. `"/dev/nbd0"`; `undefined` for any free
 *   one (over netlink the kernel picks it; see {@linkcode findFreeDevice}).
 * @param options How to attach.
 * @returns The attached device.
 * @throws {NbdKernelError} when the device is busy, missing or forbidden,
 *   the export does not fit the kernel or does not allow several
 *   connections, or netlink is needed and missing.
 * @throws {NbdError} when connecting or negotiating fails.
 * @throws {RangeError} for bad options, and for `connections`, `persist`
 *   or `deadConnectionTimeout` with `netlink: false`.
 *
 * @example
 * ```ts ignore
 * import { attach } from "@nbd/client/ffi";
 * const dev = await attach("nbd+unix:///?socket=/run/nbd.sock", "/dev/nbd0");
 * console.log(`${dev.device}: ${dev.size} bytes`);
 * const { message } = await dev.closed;
 * console.log(message);
 * ```
 *
 * @example Two connections that survive a server restart
 * ```ts ignore
 * import { attach } from "@nbd/client/ffi";
 * const dev = await attach("nbd://192.0.2.7/disk", undefined, {
 *   connections: 2,
 *   persist: true,
 *   deadConnectionTimeout: 120,
 * });
 * console.log(`${dev.device}: ${dev.connections} connections`);
 * ```
 */
export async function attach(
  target: string | ConnectOptions,
  device: string | undefined,
  options: AttachOptions = {},
): Promise<AttachedDevice> {
  if (device !== undefined) devicePath(device);
  libc();
  const page = pageSize();
  validate(options, page);
  const connectOptions = resolveTarget(target, options);
  const trace = makeTracer(connectOptions.debug);
  const signal = options.signal ?? connectOptions.signal;
  if (signal?.aborted) throw abortReason(signal);
  const named = device === undefined ? "a free nbd device" : devicePath(device);
  if (device !== undefined) {
    checkDevice(devicePath(device), deviceName(device));
    refuseBusy(device);
  }
  const netlink = await chooseNetlink(options, named);
  if (signal?.aborted) throw abortReason(signal);
  const connect = {
    signal,
    connectTimeout: options.connectTimeout ?? 30_000,
    relay: options.relay === true,
  };
  const dev = netlink
    ? await attachByNetlink({
      path: device === undefined ? undefined : devicePath(device),
      index: device === undefined
        ? undefined
        : Number(deviceName(device).slice(3)),
      target: connectOptions,
      connect,
      connections: options.connections ?? 1,
      persist: options.persist === true,
      deadConnectionTimeout: options.deadConnectionTimeout ??
        (options.persist === true ? PERSIST_DEAD_TIMEOUT : undefined),
      timeout: options.timeout,
      blockSize: options.blockSize,
      readOnly: options.readOnly === true,
      page,
      trace,
    })
    : await attachByIoctl(connectOptions, freeForIoctl(device), {
      connect,
      page,
      trace,
      readOnly: options.readOnly === true,
      timeout: options.timeout,
      blockSize: options.blockSize,
      startTimeout: options.startTimeout ?? 30_000,
    });
  // One watch() for both paths: see AttachedBase.watch.
  dev.watch(options.handleSignals ?? true, signal);
  return dev;
}

/**
 * The device for the ioctl path: the one given (already checked), else a
 * free one, checked here; either way checked once.
 */
function freeForIoctl(device: string | undefined): string {
  if (device !== undefined) return devicePath(device);
  const found = findFreeDevice();
  checkDevice(found, deviceName(found));
  refuseBusy(found);
  return found;
}

function refuseBusy(device: string): void {
  if (deviceInUse(deviceName(device))) {
    const path = devicePath(device);
    throw new NbdKernelError(
      path,
      "",
      E.EBUSY,
      `Cannot attach to ${path}: it is already connected`,
      "busy",
    );
  }
}
