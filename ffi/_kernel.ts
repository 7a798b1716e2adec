/**
 * The nbd driver's ioctl interface and the sysfs files around it, through
 * libc only (no Deno file APIs, so no `--allow-read` is needed).
 *
 * @module
 */

import {
  cString,
  E,
  errno,
  F_OK,
  libc,
  O_CLOEXEC,
  O_RDONLY,
  O_RDWR,
  R_OK,
  SC_PAGESIZE,
  W_OK,
} from "./_libc.ts";
import { NbdKernelError } from "./errors.ts";
import type { ExportInfo } from "../lib/export.ts";

// linux/nbd.h and linux/fs.h.
export const NBD_SET_SOCK = 0xab00n;
export const NBD_SET_BLKSIZE = 0xab01n;
export const NBD_SET_SIZE = 0xab02n;
export const NBD_DO_IT = 0xab03n;
export const NBD_CLEAR_SOCK = 0xab04n;
export const NBD_CLEAR_QUE = 0xab05n;
export const NBD_SET_SIZE_BLOCKS = 0xab07n;
export const NBD_DISCONNECT = 0xab08n;
export const NBD_SET_TIMEOUT = 0xab09n;
export const NBD_SET_FLAGS = 0xab0an;
export const BLKROSET = 0x125dn;
export const BLKGETSIZE64 = 0x80081272n;

/** The kernel stores sizes as a signed 64-bit byte count (loff_t). */
export const KERNEL_MAX_BYTES = (1n << 63n) - 1n;

/** `nbd0` from `/dev/nbd0` (or from `nbd0`). */
export function deviceName(device: string): string {
  const m = /^(?:\/dev\/)?(nbd\d+)$/.exec(device);
  if (!m?.[1]) {
    throw new TypeError(
      `Expected an nbd device such as /dev/nbd0, got ${JSON.stringify(device)}`,
    );
  }
  return m[1];
}

/** `/dev/nbd0` for `nbd0` or `/dev/nbd0`. */
export function devicePath(device: string): string {
  return `/dev/${deviceName(device)}`;
}

/** Whether a path exists, by `access(F_OK)`. */
export function pathExists(path: string): boolean {
  return libc().access(cString(path), F_OK) === 0;
}

/** Reads a small file (sysfs) with libc; `null` when it does not exist. */
export function readSmallFile(path: string): string | null {
  const c = libc();
  const fd = c.open(cString(path), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return null;
  try {
    const buf = new Uint8Array(4096);
    const n = Number(c.read(fd, buf, BigInt(buf.length)));
    if (n < 0) return null;
    return new TextDecoder().decode(buf.subarray(0, n));
  } finally {
    c.close(fd);
  }
}

/** The kernel's page size, the largest block size the nbd driver takes. */
export function pageSize(): number {
  const n = Number(libc().sysconf(SC_PAGESIZE));
  return n > 0 ? n : 4096;
}

/** Whether the device has a connection (its sysfs `pid` file exists). */
export function deviceInUse(name: string): boolean {
  return pathExists(`/sys/block/${name}/pid`);
}

/** The thread id in `/sys/block/nbdN/pid`, or `null`. */
export function deviceOwner(name: string): number | null {
  const text = readSmallFile(`/sys/block/${name}/pid`);
  if (text === null) return null;
  const n = Number(text.trim());
  return Number.isInteger(n) ? n : null;
}

/**
 * Checks that the device node exists and that we may open it, so that the
 * opens that run on the thread pool (where errno is lost) only fail for
 * reasons already named.
 *
 * @throws {NbdKernelError} for a missing module, device or permission.
 */
export function checkDevice(path: string, name: string): void {
  const c = libc();
  if (!pathExists(`/sys/block/${name}`) && !pathExists(path)) {
    throw new NbdKernelError(
      path,
      "",
      E.ENOENT,
      `No such device ${path}`,
      "no-module",
    );
  }
  if (c.access(cString(path), R_OK | W_OK) !== 0) {
    const err = errno();
    throw new NbdKernelError(path, "access", err, `Cannot open ${path}`);
  }
}

/**
 * Opens the device for ioctls, synchronously so errno is known. Only for a
 * device that is not up: opening one that is up reads its partition table,
 * which could wait for this very process.
 */
export function openDevice(path: string): number {
  const fd = libc().open(cString(path), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    throw new NbdKernelError(path, "open", errno(), `Cannot open ${path}`);
  }
  return fd;
}

/** Opens a device that may be up, on a pool thread. */
export async function openDeviceAsync(path: string): Promise<number> {
  const fd = await libc().open_nb(cString(path), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    throw new NbdKernelError(path, "open", 0, `Cannot open ${path}`);
  }
  return fd;
}

const IOCTL_NAMES: Record<string, string> = {
  [String(NBD_SET_SOCK)]: "NBD_SET_SOCK",
  [String(NBD_SET_BLKSIZE)]: "NBD_SET_BLKSIZE",
  [String(NBD_SET_SIZE)]: "NBD_SET_SIZE",
  [String(NBD_DO_IT)]: "NBD_DO_IT",
  [String(NBD_CLEAR_SOCK)]: "NBD_CLEAR_SOCK",
  [String(NBD_CLEAR_QUE)]: "NBD_CLEAR_QUE",
  [String(NBD_SET_SIZE_BLOCKS)]: "NBD_SET_SIZE_BLOCKS",
  [String(NBD_DISCONNECT)]: "NBD_DISCONNECT",
  [String(NBD_SET_TIMEOUT)]: "NBD_SET_TIMEOUT",
  [String(NBD_SET_FLAGS)]: "NBD_SET_FLAGS",
  [String(BLKROSET)]: "BLKROSET",
  [String(BLKGETSIZE64)]: "BLKGETSIZE64",
};

/** The name of an ioctl request, e.g. "NBD_SET_SOCK". */
export function ioctlName(request: bigint): string {
  return IOCTL_NAMES[String(request)] ?? `ioctl 0x${request.toString(16)}`;
}

/**
 * One ioctl with an integer argument, synchronously.
 *
 * @throws {NbdKernelError} naming the ioctl and errno.
 */
export function ioctl(
  device: string,
  fd: number,
  request: bigint,
  arg: bigint,
  what: string,
): void {
  if (libc().ioctl(fd, request, arg) < 0) {
    throw new NbdKernelError(device, ioctlName(request), errno(), what);
  }
}

/** `BLKROSET`: its argument is a pointer to an int. */
export function setReadOnly(device: string, fd: number, ro: boolean): void {
  const value = new Int32Array([ro ? 1 : 0]);
  if (libc().ioctl_ptr(fd, BLKROSET, new Uint8Array(value.buffer)) < 0) {
    throw new NbdKernelError(
      device,
      "BLKROSET",
      errno(),
      `Cannot set ${device} ${ro ? "read-only" : "writable"}`,
    );
  }
}

/** `BLKGETSIZE64`: the device's size in bytes as the kernel sees it. */
export function deviceSize(device: string, fd: number): bigint {
  const out = new BigUint64Array(1);
  if (libc().ioctl_ptr(fd, BLKGETSIZE64, new Uint8Array(out.buffer)) < 0) {
    throw new NbdKernelError(
      device,
      "BLKGETSIZE64",
      errno(),
      `Cannot read the size of ${device}`,
    );
  }
  return out[0]!;
}

/**
 * The block size for the kernel: the server's preferred size (or the
 * caller's), within [512, page size] and at least the server's minimum;
 * lowered while that keeps more of the export reachable.
 */
export function chooseBlockSize(
  info: Pick<ExportInfo, "size" | "blockSize">,
  page: number,
  requested?: number,
): number {
  const minimum = Math.max(512, info.blockSize.minimum);
  if (minimum > page) {
    throw new RangeError(
      `The export's minimum block size ${info.blockSize.minimum} is larger than the kernel's limit of ${page} bytes`,
    );
  }
  if (requested !== undefined) {
    if (requested < minimum) {
      throw new RangeError(
        `Block size ${requested} is below the export's minimum of ${info.blockSize.minimum}`,
      );
    }
    return requested;
  }
  let size = Math.min(page, Math.max(minimum, info.blockSize.preferred));
  // Powers of two only: round down.
  size = 2 ** Math.floor(Math.log2(size));
  if (size < minimum) size = minimum;
  while (size > minimum && info.size % BigInt(size) !== 0n) size /= 2;
  return size;
}
