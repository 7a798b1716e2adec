/**
 * Device bookkeeping that needs no connection: which devices are free,
 * whether one is attached, and detaching one (`-d`).
 *
 * @module
 */

import {
  checkDevice,
  deviceInUse,
  deviceName,
  devicePath,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
  openDeviceAsync,
  pathExists,
} from "./_kernel.ts";
import { E, errno, libc } from "./_libc.ts";
import { NbdKernelError } from "./errors.ts";

/**
 * Whether a connection holds the device (its `/sys/block/nbdN/pid` file
 * exists).
 *
 * @param device The device, e.g. `"/dev/nbd0"`.
 * @returns `true` while the device is attached.
 * @throws {TypeError} if `device` is not an nbd device path.
 * @throws {NbdKernelError} if the device does not exist (no nbd module).
 *
 * @example
 * ```ts ignore
 * import { isAttached } from "@nbd/client/ffi";
 * console.log(isAttached("/dev/nbd0"));
 * ```
 */
export function isAttached(device: string): boolean {
  const name = deviceName(device);
  if (!pathExists(`/sys/block/${name}`)) {
    throw new NbdKernelError(
      devicePath(device),
      "",
      E.ENOENT,
      `No such device ${devicePath(device)}`,
      "no-module",
    );
  }
  return deviceInUse(name);
}

/**
 * The first nbd device that no connection holds.
 *
 * @returns A path such as `"/dev/nbd1"`.
 * @throws {NbdKernelError} with reason `"no-module"` when there are no nbd
 *   devices, `"busy"` when all are in use.
 *
 * @example
 * ```ts ignore
 * import { attach, findFreeDevice } from "@nbd/client/ffi";
 * const dev = await attach("nbd://127.0.0.1/", findFreeDevice());
 * ```
 */
export function findFreeDevice(): string {
  let count = 0;
  for (; pathExists(`/sys/block/nbd${count}`); count++) {
    if (!deviceInUse(`nbd${count}`)) return `/dev/nbd${count}`;
  }
  if (count === 0) {
    throw new NbdKernelError(
      "/dev/nbd0",
      "",
      E.ENOENT,
      "No nbd devices",
      "no-module",
    );
  }
  throw new NbdKernelError(
    `/dev/nbd${count - 1}`,
    "",
    E.EBUSY,
    `All ${count} nbd devices are in use`,
    "busy",
  );
}

/** Options for {@linkcode detach}. */
export interface DetachOptions {
  /**
   * Milliseconds to wait for the device to be released (its pid file to
   * go); 0 to return right after the ioctls. Default 10000.
   */
  wait?: number;
}

/**
 * Detaches whatever connection holds a device, as `nbd-client -d` does:
 * `NBD_DISCONNECT`, then `NBD_CLEAR_SOCK`. The process that attached it
 * sees its `NBD_DO_IT` return.
 *
 * @param device The device, e.g. `"/dev/nbd0"`.
 * @param options How long to wait for the release.
 * @returns Whether the device was attached before the call.
 * @throws {NbdKernelError} for a missing device, missing permissions, or a
 *   device still held after the wait.
 *
 * @example
 * ```ts ignore
 * import { detach } from "@nbd/client/ffi";
 * await detach("/dev/nbd0");
 * ```
 */
export async function detach(
  device: string,
  options: DetachOptions = {},
): Promise<boolean> {
  const path = devicePath(device);
  const name = deviceName(device);
  checkDevice(path, name);
  const wasAttached = deviceInUse(name);
  const c = libc();
  // On a pool thread: opening a device that is up reads its partition
  // table, which may be served by this very process (relay path).
  const fd = await openDeviceAsync(path);
  try {
    // Synchronous so errno is known; the kernel only queues NBD_CMD_DISC.
    if (c.ioctl(fd, NBD_DISCONNECT, 0n) < 0) {
      const err = errno();
      // A device with no connection has nothing to disconnect.
      if (wasAttached || err !== E.EINVAL) {
        throw new NbdKernelError(
          path,
          "NBD_DISCONNECT",
          err,
          `Cannot detach ${path}`,
        );
      }
    }
    if (c.ioctl(fd, NBD_CLEAR_SOCK, 0n) < 0) {
      throw new NbdKernelError(
        path,
        "NBD_CLEAR_SOCK",
        errno(),
        `Cannot detach ${path}`,
      );
    }
  } finally {
    await c.close_nb(fd);
  }
  const wait = options.wait ?? 10_000;
  const deadline = performance.now() + wait;
  while (wait > 0 && deviceInUse(name)) {
    if (performance.now() > deadline) {
      throw new NbdKernelError(
        path,
        "",
        E.EBUSY,
        `${path} is still attached ${wait} ms after NBD_DISCONNECT (is it mounted?)`,
        "busy",
      );
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return wasAttached;
}
