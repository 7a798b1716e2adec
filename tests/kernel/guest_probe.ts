/**
 * Run in the guest with only `--allow-ffi`: what the library itself says
 * about a device (isAttached, BLKGETSIZE64, findFreeDevice), as one JSON
 * line for guest.sh to compare with blockdev's answers.
 *
 * @module
 */

import { deviceSize, openDeviceAsync } from "../../ffi/_kernel.ts";
import { libc } from "../../ffi/_libc.ts";
import { findFreeDevice, isAttached } from "../../ffi/device.ts";

const device = Deno.args[0] ?? "/dev/nbd0";
const fd = await openDeviceAsync(device);
let size: bigint;
try {
  size = deviceSize(device, fd);
} finally {
  libc().close(fd);
}
console.log(JSON.stringify({
  attached: isAttached(device),
  size: String(size),
  free: findFreeDevice(),
}));
