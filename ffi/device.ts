/**
 * Device bookkeeping that needs no connection: which devices are free,
 * whether one is attached, their status (`-l`), and detaching one (`-d`).
 *
 * @module
 */

import {
  checkDevice,
  deviceInUse,
  deviceName,
  deviceOwner,
  devicePath,
  pathExists,
  readSmallFile,
} from "./_kernel.ts";
import { E, libc } from "./_libc.ts";
import { NbdKernelError } from "./errors.ts";
import { detachByIoctl } from "./ioctl/_detach.ts";
import {
  deviceStatus,
  disconnectDevice,
  netlinkAvailable,
} from "./netlink/mod.ts";

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
   * go); 0 to return right after asking. Default 10000.
   */
  wait?: number;
  /**
   * Ask through netlink (`NBD_CMD_DISCONNECT`, `true`) or through ioctls
   * (`false`). By default netlink where the kernel has it. Either frees a
   * device attached either way.
   */
  netlink?: boolean;
}

/**
 * Detaches whatever connection holds a device, as `nbd-client -d` does:
 * `NBD_CMD_DISCONNECT` over netlink, or the ioctls `NBD_DISCONNECT` then
 * `NBD_CLEAR_SOCK`. A process that attached it sees its device released.
 *
 * @param device The device, e.g. `"/dev/nbd0"`.
 * @param options How long to wait for the release, and how to ask.
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
  if (options.netlink ?? await netlinkAvailable()) {
    // Not connected: the kernel has nothing to do, and says EINVAL.
    if (wasAttached) await disconnectDevice(Number(name.slice(3)));
  } else {
    await detachByIoctl(path, wasAttached);
  }
  const wait = options.wait ?? 10_000;
  const deadline = performance.now() + wait;
  while (wait > 0 && deviceInUse(name)) {
    if (performance.now() > deadline) {
      throw new NbdKernelError(
        path,
        "",
        E.EBUSY,
        `${path} is still attached ${wait} ms after the disconnect (is it mounted?)`,
        "busy",
      );
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return wasAttached;
}

/** One nbd device, as {@linkcode status} reports it. */
export interface DeviceStatus {
  /** The device path, e.g. `"/dev/nbd0"`. */
  device: string;
  /** Its index, the `N` of `/dev/nbdN`. */
  index: number;
  /**
   * Whether a connection holds it. Over netlink a device whose server
   * died stays connected until it is reconfigured or disconnected.
   */
  connected: boolean;
  /**
   * The id in `/sys/block/nbdN/pid`: the thread that configured it
   * (`null` when free). Over netlink it may be gone by now.
   */
  pid: number | null;
  /** Its size in bytes as the kernel shows it (0 when free). */
  size: number;
  /** Where `connected` came from: `NBD_CMD_STATUS` or the sysfs pid file. */
  source: "netlink" | "sysfs";
}

function sysfsSize(name: string): number {
  // In 512-byte sectors, whatever the logical block size.
  const sectors = Number(readSmallFile(`/sys/block/${name}/size`)?.trim());
  return Number.isSafeInteger(sectors * 512) ? sectors * 512 : 0;
}

/**
 * The nbd devices and their state: the kernel's own list
 * (`NBD_CMD_STATUS`) where it has the netlink family, else a scan of
 * `/sys/block`; the pid and size from sysfs. Needs no root.
 *
 * @param device One device; all when absent.
 * @returns The devices by index; empty for a device that does not exist.
 * @throws {TypeError} if `device` is not an nbd device path.
 * @throws {NbdKernelError} when the kernel refuses the status request.
 *
 * @example
 * ```ts ignore
 * import { status } from "@nbd/client/ffi";
 * for (const d of await status()) {
 *   console.log(`${d.device}: ${d.connected ? `${d.size} bytes` : "free"}`);
 * }
 * ```
 */
export async function status(device?: string): Promise<DeviceStatus[]> {
  const one = device === undefined ? undefined : deviceName(device);
  const index = one === undefined ? undefined : Number(one.slice(3));
  libc();
  let states: { index: number; connected: boolean }[];
  let source: DeviceStatus["source"];
  if (await netlinkAvailable()) {
    states = await deviceStatus(index);
    source = "netlink";
  } else {
    states = [];
    source = "sysfs";
    const names = one !== undefined ? [one] : [];
    if (one === undefined) {
      for (let i = 0; pathExists(`/sys/block/nbd${i}`); i++) {
        names.push(`nbd${i}`);
      }
    }
    for (const name of names) {
      if (!pathExists(`/sys/block/${name}`)) continue;
      states.push({
        index: Number(name.slice(3)),
        connected: deviceInUse(name),
      });
    }
  }
  return states.map(({ index, connected }) => {
    const name = `nbd${index}`;
    return {
      device: `/dev/${name}`,
      index,
      connected,
      pid: deviceOwner(name),
      size: connected ? sysfsSize(name) : 0,
      source,
    };
  });
}
