/**
 * Run in the guest with only `--allow-ffi`: what the library itself says
 * about a device (isAttached, BLKGETSIZE64, findFreeDevice), and the error
 * attach() gives for a device that does not exist, as one JSON line for
 * guest.sh to compare with blockdev's answers.
 *
 * Usage: deno run --allow-ffi tests/kernel/guest_probe.ts DEVICE [MISSING]
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

const device = Deno.args[0] ?? "/dev/nbd0";
const missing = Deno.args[1];
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
    await attach({ path: "/nonexistent.sock" }, missing);
    out.missing = "attached?!";
  } catch (e) {
    out.missing = e instanceof NbdKernelError
      ? `${e.reason}: ${e.message}`
      : `unexpected: ${e}`;
  }
}
console.log(JSON.stringify(out));
