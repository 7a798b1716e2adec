/**
 * Run in the guest with only `--allow-ffi`: what the library itself says
 * about a device (isAttached, BLKGETSIZE64, findFreeDevice), and the error
 * attach() gives for a device that does not exist, as one JSON line for
 * guest.sh to compare with blockdev's answers.
 *
 * With SILENT, a Unix socket whose server accepts and never answers, it
 * also checks that attach() gives up on it in time.
 *
 * With TINY, a socket serving an export smaller than a block, it checks
 * that attach() refuses it (and leaves the device free).
 *
 * MODE `ioctl` attaches with `netlink: false`; anything else takes the
 * default (netlink where the kernel has it).
 *
 * Usage: deno run --allow-ffi tests/kernel/guest_probe.ts DEVICE MISSING SILENT FREE TINY [MODE]
 *
 * @module
 */

import { deviceSize, openDeviceAsync } from "../../ffi/_kernel.ts";
import { libc } from "../../ffi/_libc.ts";
import {
  attach,
  findFreeDevice,
  isAttached,
  NbdKernelError,
} from "../../ffi/mod.ts";
import { errorText } from "../../lib/errors.ts";

const device = Deno.args[0] ?? "/dev/nbd0";
const [, missing, silent, free, tiny, mode] = Deno.args;
const how = mode === "ioctl" ? { netlink: false } : {};
const fd = await openDeviceAsync(device);
let size: bigint;
try {
  size = deviceSize(device, fd);
} finally {
  libc().close(fd);
}
const out: Record<string, unknown> = {
  attached: isAttached(device),
  size: String(size),
  free: findFreeDevice(),
};
if (missing) {
  try {
    await attach({ path: "/nonexistent.sock" }, missing, how);
    out.missing = "attached?!";
  } catch (e) {
    out.missing = e instanceof NbdKernelError
      ? `${e.reason}: ${e.message}`
      : `unexpected: ${e}`;
  }
}
if (silent && free) {
  const started = performance.now();
  try {
    await attach({ path: silent }, free, { ...how, connectTimeout: 2000 });
    out.silent = "attached?!";
  } catch (e) {
    out.silent = `${Math.round((performance.now() - started) / 1000)}s: ${
      errorText(e)
    }`;
  }
}
if (tiny && free) {
  try {
    await attach({ path: tiny }, free, how);
    out.tiny = "attached?!";
  } catch (e) {
    out.tiny = e instanceof NbdKernelError
      ? `${e.reason}: ${e.message}`
      : `unexpected: ${e}`;
  }
  out.tinyLeftFree = !isAttached(free);
}
console.log(JSON.stringify(out));
