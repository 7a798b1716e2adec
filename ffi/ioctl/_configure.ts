/**
 * The ioctl sequence that sets a device up for one connection, as
 * `nbd-client` runs it, and its rollback: a device whose setup failed half
 * way is not left holding a socket.
 *
 * @module
 */

import { FLAG_HAS_FLAGS, FLAG_READ_ONLY } from "../../lib/constants.ts";
import type { Tracer } from "../../lib/_debug.ts";
import type { Geometry } from "../_geometry.ts";
import {
  ioctl,
  NBD_CLEAR_SOCK,
  NBD_SET_BLKSIZE,
  NBD_SET_FLAGS,
  NBD_SET_SIZE_BLOCKS,
  NBD_SET_SOCK,
  NBD_SET_TIMEOUT,
  setReadOnly,
} from "../_kernel.ts";
import { E, libc } from "../_libc.ts";
import { NbdKernelError } from "../errors.ts";

/** What the device is told. */
export interface DeviceSettings {
  geometry: Geometry;
  /** The export's transmission flags. */
  flags: number;
  /** Whether the device is to be read-only. */
  readOnly: boolean;
  /** The kernel's request timeout in seconds, when asked for. */
  timeout: number | undefined;
  /** The negotiated socket (or the kernel's end of the relay). */
  sockFd: number;
}

/**
 * Configures the device on `devFd` and hands it the socket
 * (`NBD_SET_SOCK`). If a step fails after the device was cleared for us,
 * `NBD_CLEAR_SOCK` undoes our configuration (never another process's)
 * before the error is thrown.
 *
 * @throws {NbdKernelError} when the kernel refuses a step.
 */
export function configureDevice(
  path: string,
  devFd: number,
  settings: DeviceSettings,
  trace: Tracer,
): void {
  const setup = `Cannot set up ${path}`;
  const step = (req: bigint, arg: bigint, what: string) => {
    trace?.("kernel.ioctl", { device: path, request: what, arg });
    ioctl(path, devFd, req, arg, setup);
  };
  const { geometry, readOnly } = settings;
  step(NBD_SET_BLKSIZE, BigInt(geometry.blockSize), "NBD_SET_BLKSIZE");
  step(NBD_SET_SIZE_BLOCKS, geometry.blocks, "NBD_SET_SIZE_BLOCKS");
  step(NBD_CLEAR_SOCK, 0n, "NBD_CLEAR_SOCK");
  // From here on the configuration is ours to undo.
  try {
    const kernelFlags = FLAG_HAS_FLAGS | settings.flags |
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
    if (settings.timeout !== undefined) {
      step(NBD_SET_TIMEOUT, BigInt(settings.timeout), "NBD_SET_TIMEOUT");
    }
    step(NBD_SET_SOCK, BigInt(settings.sockFd), "NBD_SET_SOCK");
  } catch (e) {
    libc().ioctl(devFd, NBD_CLEAR_SOCK, 0n);
    throw e;
  }
}
