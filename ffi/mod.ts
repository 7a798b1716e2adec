/**
 * Kernel handoff: attach an NBD export to a Linux `/dev/nbdX` device, as
 * `qemu-nbd -c` and `nbd-client` do, through Deno's FFI and glibc.
 *
 * This is a separate entry point so that a program that only speaks NBD
 * over a socket never needs `--allow-ffi`. Attaching needs `--allow-ffi`
 * and root (CAP_SYS_ADMIN), plus `--allow-read` for a TLS certificate
 * directory. Sockets, devices and sysfs are reached through libc, which
 * Deno's other permissions do not cover (FFI can do anything the process
 * can); `examples/connect.ts` is documented with `--allow-net --allow-ffi`.
 *
 * Plain TCP, Unix and vsock exports are handed to the kernel directly (the
 * kernel owns the socket); TLS exports are relayed through a socketpair by
 * this process, which must then stay alive.
 *
 * The kernel is told through its generic netlink family `nbd` where it has
 * one (several connections, `persist` across server restarts, and a
 * direct-route device that outlives this process), else through ioctls
 * (one connection; the device goes with the process). `netlink: false`
 * picks the ioctl path.
 *
 * @example
 * ```ts ignore
 * import { attach, findFreeDevice } from "@nbd/client/ffi";
 *
 * const dev = await attach(
 *   "nbd+unix:///?socket=/run/nbdkit.sock",
 *   findFreeDevice(),
 *   { timeout: 30 },
 * );
 * console.log(`${dev.device}: ${dev.size} bytes, block size ${dev.blockSize}`);
 * // Stays attached until SIGINT/SIGTERM, dev.disconnect(), or the server
 * // going away.
 * const release = await dev.closed;
 * console.log(release.message);
 * Deno.exit(release.requested ? 0 : 1);
 * ```
 *
 * @module
 */

export { attach } from "./attach.ts";
export type {
  AttachedDevice,
  AttachOptions,
  ReleaseInfo,
  ReleaseReason,
} from "./attach.ts";
export { detach, findFreeDevice, isAttached, status } from "./device.ts";
export type { DetachOptions, DeviceStatus } from "./device.ts";
export { netlinkAvailable } from "./netlink/mod.ts";
export { NbdKernelError, NbdSystemCallError } from "./errors.ts";
export type { KernelErrorReason } from "./errors.ts";
// What the signatures above mention, so this entry point documents alone.
export { NbdError } from "../lib/errors.ts";
export type {
  ConnectOptions,
  ConnectTarget,
  DebugHook,
  NegotiationOptions,
  ReconnectOptions,
  TlsMode,
  TlsOptions,
} from "../lib/connect_options.ts";
export type { BlockSize, ExportInfo, Protocol } from "../lib/export.ts";
// TLS through GnuTLS: libnbd's trust, revocation lists and TLS-PSK.
export { gnutls, gnutlsIfAllowed } from "./gnutls/engine.ts";
export { findPskKey } from "./gnutls/psk.ts";
export type { PskKey } from "./gnutls/psk.ts";
export type { TlsEngine } from "../lib/connect_options.ts";
export type { TlsStream } from "../lib/tls/stream.ts";
export type { ByteStream } from "../lib/transport.ts";
export type { UpgradeOptions } from "../lib/tls/upgrade.ts";
export { NbdTlsError } from "../lib/tls/error.ts";
// The export as one file in a FUSE mount (nbdfuse's way, no nbd module).
export { isFuseMounted, mountFuse } from "./fuse/serve.ts";
export type {
  FuseCacheMode,
  FuseClient,
  FuseEnd,
  FuseMount,
  FuseOptions,
} from "./fuse/serve.ts";
export { NbdFuseError } from "./fuse/errors.ts";
export type { FuseErrorReason } from "./fuse/errors.ts";
