/**
 * The kernel's generic netlink interface to the nbd driver, as
 * `nbd-client` 3.x uses it: a device configured in one request, with one or
 * several sockets (the kernel's multi-queue path), a dead-connection
 * timeout during which I/O waits for a replacement socket, and
 * `NBD_CMD_RECONFIGURE` to hand one over.
 *
 * Unlike the ioctl path, no thread of this process waits in the kernel:
 * once {@linkcode connectDevice} returns, the kernel owns the connection,
 * and the device stays attached, even after this process exits, until
 * {@linkcode disconnectDevice}. A dead server does not release the device
 * either: the kernel multicasts `NBD_CMD_LINK_DEAD`
 * ({@linkcode watchLinkDead}) and fails I/O once the dead-connection
 * timeout passes; someone must reconfigure or disconnect.
 *
 * Needs `--allow-ffi` and, for everything but status, root
 * (CAP_SYS_ADMIN).
 *
 * @module
 */

import { FLAG_CAN_MULTI_CONN } from "../../lib/constants.ts";
import { E, libc } from "../_libc.ts";
import { GenlSocket, linkDeadEvents, resolveFamily } from "./_socket.ts";
import type { Family } from "./_genl.ts";
import {
  decodeIndex,
  decodeStatus,
  type DeviceSettings,
  type DeviceState,
  encodeNbd,
  NBD_CMD_CONNECT,
  NBD_CMD_DISCONNECT,
  NBD_CMD_RECONFIGURE,
  NBD_CMD_STATUS,
  NBD_GENL_MCAST_GROUP_NAME,
} from "./_family.ts";
import { NbdKernelError } from "../errors.ts";

export type { DeviceState };
export {
  NBD_CFLAG_DESTROY_ON_DISCONNECT,
  NBD_CFLAG_DISCONNECT_ON_CLOSE,
} from "./_family.ts";

/** Settings of {@linkcode connectDevice}. */
export interface ConnectDeviceOptions {
  /** The device index (`N` of `/dev/nbdN`); any free device when absent. */
  index?: number;
  /**
   * Connected, negotiated sockets, one per connection. The kernel takes
   * its own reference: the caller closes its descriptors afterwards, on
   * success and on failure.
   */
  sockets: readonly number[];
  /** Size of the device in bytes (whole blocks). */
  size: bigint | number;
  /** Logical block size: a power of two from 512 to the page size. */
  blockSize: number;
  /**
   * Transmission flags for the kernel: the export's, with
   * `NBD_FLAG_HAS_FLAGS` and, for a read-only device, `NBD_FLAG_READ_ONLY`.
   * Several sockets need `NBD_FLAG_CAN_MULTI_CONN`.
   */
  serverFlags: number;
  /** `NBD_CFLAG_*` (default none). */
  clientFlags?: number;
  /** Seconds before a request times out (the kernel's default when absent). */
  timeout?: number;
  /**
   * Seconds I/O waits for a dead connection to be replaced
   * ({@linkcode reconfigureDevice}) before failing; 0 or absent: fail at
   * once.
   */
  deadConnectionTimeout?: number;
}

/** Settings of {@linkcode reconfigureDevice}; absent ones stay as they are. */
export interface ReconfigureDeviceOptions {
  /** New sockets, each replacing one dead connection. */
  sockets?: readonly number[];
  /** Seconds before a request times out. */
  timeout?: number;
  /** Seconds I/O waits for a dead connection to be replaced. */
  deadConnectionTimeout?: number;
  /** `NBD_CFLAG_*`: replaces the current set. */
  clientFlags?: number;
}

function seconds(name: string, value: number | undefined): void {
  if (
    value !== undefined &&
    (!Number.isInteger(value) || value < 0 || value > 0xffffffff)
  ) {
    throw new RangeError(
      `${name} must be a whole number of seconds, got ${value}`,
    );
  }
}

function checkIndex(index: number): void {
  if (!Number.isInteger(index) || index < 0 || index > 0xffffffff) {
    throw new RangeError(`A device index is a whole number, got ${index}`);
  }
}

function checkSockets(sockets: readonly number[], required: boolean): void {
  if (required && sockets.length === 0) {
    throw new RangeError("At least one socket is needed");
  }
  for (const fd of sockets) {
    if (!Number.isInteger(fd) || fd < 0) {
      throw new RangeError(`A socket descriptor is a whole number, got ${fd}`);
    }
  }
}

function devicePathOf(index: number | undefined): string {
  return index === undefined ? "a free nbd device" : `/dev/nbd${index}`;
}

/** Opens a socket, resolves the family, runs `fn`, closes the socket. */
async function withFamily<T>(
  device: string,
  fn: (socket: GenlSocket, family: Family) => Promise<T>,
): Promise<T> {
  libc();
  const socket = GenlSocket.open();
  try {
    const family = await resolveFamily(socket);
    if (!family) {
      throw new NbdKernelError(
        device,
        "CTRL_CMD_GETFAMILY",
        E.ENOENT,
        `The kernel has no generic netlink family "nbd"`,
        "no-module",
      );
    }
    return await fn(socket, family);
  } finally {
    socket.close();
  }
}

/**
 * Whether the kernel offers the nbd driver's netlink interface (the `nbd`
 * generic netlink family, present once the nbd module is loaded).
 *
 * @returns `true` when the family resolves; `false` on kernels without it.
 * @throws {NbdError} without `--allow-ffi` or off glibc Linux.
 *
 * @example
 * ```ts ignore
 * import { netlinkAvailable } from "@nbd/client/ffi";
 * console.log(await netlinkAvailable() ? "netlink" : "ioctl");
 * ```
 */
export async function netlinkAvailable(): Promise<boolean> {
  libc();
  let socket: GenlSocket;
  try {
    socket = GenlSocket.open();
  } catch {
    // No AF_NETLINK at all (a sandbox): the ioctl path may still work.
    return false;
  }
  try {
    return (await resolveFamily(socket)) !== null;
  } finally {
    socket.close();
  }
}

/**
 * Configures a device with connected, negotiated sockets
 * (`NBD_CMD_CONNECT`) and returns once the device is up.
 *
 * @param options What the kernel needs: sockets, size, flags, timeouts.
 * @returns The device index (`N` of `/dev/nbdN`).
 * @throws {NbdKernelError} when the kernel refuses: `"busy"` for a device
 *   in use, `"permission"` without CAP_SYS_ADMIN, `"no-module"` without the
 *   family; EINVAL for several sockets on an export without multi-conn.
 * @throws {RangeError} for bad settings.
 *
 * @example
 * ```ts ignore
 * import { connectDevice } from "@nbd/client/ffi";
 * declare const fd: number; // a socket after the handshake
 * const index = await connectDevice({
 *   sockets: [fd],
 *   size: 1n << 30n,
 *   blockSize: 4096,
 *   serverFlags: 1,
 * });
 * console.log(`/dev/nbd${index}`);
 * ```
 */
export async function connectDevice(
  options: ConnectDeviceOptions,
): Promise<number> {
  if (options.index !== undefined) checkIndex(options.index);
  checkSockets(options.sockets, true);
  seconds("timeout", options.timeout);
  seconds("deadConnectionTimeout", options.deadConnectionTimeout);
  const size = BigInt(options.size);
  if (size <= 0n) throw new RangeError(`size must be positive, got ${size}`);
  const bs = options.blockSize;
  if (!Number.isInteger(bs) || bs < 512 || (bs & (bs - 1)) !== 0) {
    throw new RangeError(
      `blockSize must be a power of two of at least 512, got ${bs}`,
    );
  }
  const device = devicePathOf(options.index);
  if (
    options.sockets.length > 1 &&
    (options.serverFlags & FLAG_CAN_MULTI_CONN) === 0
  ) {
    throw new NbdKernelError(
      device,
      "NBD_CMD_CONNECT",
      E.EINVAL,
      `Cannot connect ${device} with ${options.sockets.length} sockets: the export does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN)`,
      "other",
    );
  }
  const settings: DeviceSettings = {
    sockets: options.sockets,
    size,
    blockSize: bs,
    serverFlags: options.serverFlags,
  };
  if (options.index !== undefined) settings.index = options.index;
  if (options.clientFlags !== undefined) {
    settings.clientFlags = options.clientFlags;
  }
  if (options.timeout !== undefined) settings.timeout = options.timeout;
  if (options.deadConnectionTimeout !== undefined) {
    settings.deadConnectionTimeout = options.deadConnectionTimeout;
  }
  return await withFamily(device, async (socket, family) => {
    const seq = socket.nextSeq();
    const replies = await socket.request(
      encodeNbd(family.id, seq, NBD_CMD_CONNECT, settings),
      seq,
      "NBD_CMD_CONNECT",
      device,
      `Cannot connect ${device}`,
    );
    const reply = replies.find((m) => m.type === family.id);
    if (reply) return decodeIndex(reply, NBD_CMD_CONNECT);
    // The kernel drops its reply when short of memory; the device is up
    // anyway, and a given index is known.
    if (options.index !== undefined) return options.index;
    throw new NbdKernelError(
      device,
      "NBD_CMD_CONNECT",
      0,
      "The kernel connected a device without saying which",
    );
  });
}

/**
 * Disconnects a device (`NBD_CMD_DISCONNECT`): the kernel sends
 * `NBD_CMD_DISC` to the server, shuts the sockets down and fails what is
 * queued. A device that is not connected is left as it is.
 *
 * @param index The device index.
 * @throws {NbdKernelError} when the kernel refuses (no such device,
 *   no permission).
 *
 * @example
 * ```ts ignore
 * import { disconnectDevice } from "@nbd/client/ffi";
 * await disconnectDevice(0);
 * ```
 */
export async function disconnectDevice(index: number): Promise<void> {
  checkIndex(index);
  const device = devicePathOf(index);
  await withFamily(device, async (socket, family) => {
    const seq = socket.nextSeq();
    await socket.request(
      encodeNbd(family.id, seq, NBD_CMD_DISCONNECT, { index }),
      seq,
      "NBD_CMD_DISCONNECT",
      device,
      `Cannot disconnect ${device}`,
      "pool",
    );
  });
}

/**
 * Changes a connected device (`NBD_CMD_RECONFIGURE`): each socket given
 * replaces one dead connection (a socket beyond the dead ones is ignored by
 * the kernel), and the timeouts and client flags given replace the current
 * ones.
 *
 * @param index The device index.
 * @param options What to change.
 * @throws {NbdKernelError} when the kernel refuses (EINVAL for a device
 *   that is not connected).
 *
 * @example
 * ```ts ignore
 * import { reconfigureDevice } from "@nbd/client/ffi";
 * declare const fd: number; // a fresh socket after the handshake
 * await reconfigureDevice(0, { sockets: [fd] });
 * ```
 */
export async function reconfigureDevice(
  index: number,
  options: ReconfigureDeviceOptions,
): Promise<void> {
  checkIndex(index);
  checkSockets(options.sockets ?? [], false);
  seconds("timeout", options.timeout);
  seconds("deadConnectionTimeout", options.deadConnectionTimeout);
  const device = devicePathOf(index);
  const settings: DeviceSettings = { index };
  if (options.sockets !== undefined) settings.sockets = options.sockets;
  if (options.timeout !== undefined) settings.timeout = options.timeout;
  if (options.deadConnectionTimeout !== undefined) {
    settings.deadConnectionTimeout = options.deadConnectionTimeout;
  }
  if (options.clientFlags !== undefined) {
    settings.clientFlags = options.clientFlags;
  }
  await withFamily(device, async (socket, family) => {
    const seq = socket.nextSeq();
    await socket.request(
      encodeNbd(family.id, seq, NBD_CMD_RECONFIGURE, settings),
      seq,
      "NBD_CMD_RECONFIGURE",
      device,
      `Cannot reconfigure ${device}`,
    );
  });
}

/**
 * The kernel's list of nbd devices and whether each is connected
 * (`NBD_CMD_STATUS`). A device whose server died stays connected until it
 * is reconfigured or disconnected.
 *
 * @param index One device; all when absent.
 * @returns The devices by index; empty for an index that does not exist.
 * @throws {NbdKernelError} when the family is missing.
 *
 * @example
 * ```ts ignore
 * import { deviceStatus } from "@nbd/client/ffi";
 * for (const d of await deviceStatus()) {
 *   console.log(`/dev/nbd${d.index}: ${d.connected ? "connected" : "free"}`);
 * }
 * ```
 */
export async function deviceStatus(index?: number): Promise<DeviceState[]> {
  if (index !== undefined) checkIndex(index);
  const device = index === undefined ? "" : devicePathOf(index);
  return await withFamily(device, async (socket, family) => {
    const seq = socket.nextSeq();
    const replies = await socket.request(
      encodeNbd(
        family.id,
        seq,
        NBD_CMD_STATUS,
        index === undefined ? {} : { index },
      ),
      seq,
      "NBD_CMD_STATUS",
      device,
      "Cannot read the status of nbd devices",
    );
    const reply = replies.find((m) => m.type === family.id);
    if (!reply) {
      throw new NbdKernelError(
        device,
        "NBD_CMD_STATUS",
        0,
        "The kernel acknowledged NBD_CMD_STATUS without a device list",
      );
    }
    return decodeStatus(reply);
  });
}

/**
 * A subscription to `NBD_CMD_LINK_DEAD`: an async iterator of the indices
 * of devices whose connection to the server died. It ends when its signal
 * aborts or `return()` is called; dispose it to close the socket.
 */
export interface LinkDeadWatch
  extends AsyncIterableIterator<number>, AsyncDisposable {
  /**
   * How many times notifications were lost (the socket's queue
   * overflowed); after one, check {@linkcode deviceStatus} and the devices
   * themselves.
   */
  readonly overruns: number;
  /** Ends the iteration and closes the socket (a pending `next()` ends too). */
  return(): Promise<IteratorResult<number, undefined>>;
}

/**
 * Subscribes to the kernel's dead-link notifications. The subscription is
 * in place when this returns, so a link that dies right after a
 * {@linkcode connectDevice} is not missed.
 *
 * @param signal Ends the iteration when it aborts.
 * @returns The subscription.
 * @throws {NbdKernelError} when the family or its group is missing.
 *
 * @example
 * ```ts ignore
 * import { watchLinkDead } from "@nbd/client/ffi";
 * const stop = new AbortController();
 * for await (const index of await watchLinkDead(stop.signal)) {
 *   console.log(`/dev/nbd${index}: the server is gone`);
 * }
 * ```
 */
export async function watchLinkDead(
  signal?: AbortSignal,
): Promise<LinkDeadWatch> {
  libc();
  const socket = GenlSocket.open();
  try {
    const family = await resolveFamily(socket);
    const group = family?.groups.get(NBD_GENL_MCAST_GROUP_NAME);
    if (!family || group === undefined) {
      throw new NbdKernelError(
        "",
        "CTRL_CMD_GETFAMILY",
        E.ENOENT,
        family
          ? `The nbd netlink family has no multicast group "${NBD_GENL_MCAST_GROUP_NAME}"`
          : `The kernel has no generic netlink family "nbd"`,
        "no-module",
      );
    }
    socket.join(group, NBD_GENL_MCAST_GROUP_NAME);
    return new Watch(socket, family, signal);
  } catch (e) {
    socket.close();
    throw e;
  }
}

type Event = { index: number } | { overrun: true };

class Watch implements LinkDeadWatch {
  #socket: GenlSocket;
  #events: AsyncGenerator<Event>;
  #stop = new AbortController();
  #signal: AbortSignal;
  #pending = 0;
  #done = false;
  overruns = 0;

  constructor(
    socket: GenlSocket,
    family: Family,
    signal: AbortSignal | undefined,
  ) {
    this.#socket = socket;
    this.#signal = signal
      ? AbortSignal.any([signal, this.#stop.signal])
      : this.#stop.signal;
    this.#events = linkDeadEvents(socket, family, this.#signal);
  }

  async next(): Promise<IteratorResult<number, undefined>> {
    while (!this.#done && !this.#signal.aborted) {
      let r: IteratorResult<Event>;
      this.#pending++;
      try {
        r = await this.#events.next();
      } catch (e) {
        // An abort ends the iteration; anything else is an error.
        if (this.#signal.aborted) break;
        this.#finish();
        throw e;
      } finally {
        this.#pending--;
      }
      if (r.done) break;
      if ("index" in r.value) return { done: false, value: r.value.index };
      this.overruns++;
    }
    this.#finish();
    return { done: true, value: undefined };
  }

  /** Ends the iteration; a pending next() settles within a poll slice. */
  return(): Promise<IteratorResult<number, undefined>> {
    this.#stop.abort();
    // The socket may be in a poll on a pool thread: the pending next()
    // closes it once that returns, so its number is not reused under it.
    if (this.#pending === 0) this.#finish();
    return Promise.resolve({ done: true, value: undefined });
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.return();
  }

  #finish(): void {
    if (this.#done) return;
    this.#done = true;
    this.#socket.close();
  }
}
