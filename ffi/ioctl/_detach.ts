/**
 * Detaching through ioctls, as `nbd-client -d` does without netlink:
 * `NBD_DISCONNECT`, then `NBD_CLEAR_SOCK`. Frees a device attached either
 * way.
 *
 * @module
 */

import { NBD_CLEAR_SOCK, NBD_DISCONNECT, openDeviceAsync } from "../_kernel.ts";
import { E, errno, libc } from "../_libc.ts";
import { NbdKernelError } from "../errors.ts";

/**
 * Asks the kernel to let go of a device through ioctls.
 *
 * @param path The device path, already checked.
 * @param wasAttached Whether a connection held it (then EINVAL is an error).
 * @throws {NbdKernelError} when the kernel refuses.
 */
export async function detachByIoctl(
  path: string,
  wasAttached: boolean,
): Promise<void> {
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
}
