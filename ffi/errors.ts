/**
 * Errors of the kernel handoff: a failing system call, and the kernel's
 * refusals that users act on (busy device, no module, no permission).
 *
 * @module
 */

import { NbdError } from "../lib/errors.ts";
import { describeErrno, errnoName } from "./_libc.ts";

/**
 * A libc call failed. Carries the call and the host's errno.
 *
 * @example
 * ```ts ignore
 * import { attach, NbdSystemCallError } from "@nbd/client/ffi";
 * try {
 *   await attach("nbd://127.0.0.1/", "/dev/nbd0");
 * } catch (e) {
 *   if (e instanceof NbdSystemCallError) console.error(e.errnoName);
 * }
 * ```
 */
export class NbdSystemCallError extends NbdError {
  /** The call or ioctl that failed, e.g. `"connect"` or `"NBD_SET_SOCK"`. */
  readonly call: string;
  /** The host's errno value (0 when the kernel did not say). */
  readonly errno: number;
  /** Its name, e.g. `"ECONNREFUSED"`, or `"unknown"`. */
  readonly errnoName: string;

  /**
   * Builds the message from what was being done, the call and its errno.
   *
   * @param call The call that failed; `""` to name only the errno.
   * @param errno The errno it left.
   * @param message What was being done; the errno is appended.
   * @param advice What to do about it, appended last.
   */
  constructor(call: string, errno: number, message: string, advice?: string) {
    // Without a call, the errno alone says what the kernel answered; with
    // neither, the message says it all.
    const failed = call
      ? (errno
        ? `${call} failed with ${describeErrno(errno)}`
        : `${call} failed`)
      : (errno ? describeErrno(errno) : "");
    super(
      `${message}${failed ? `: ${failed}` : ""}${advice ? `. ${advice}` : ""}`,
    );
    this.name = "NbdSystemCallError";
    this.call = call;
    this.errno = errno;
    this.errnoName = errno ? errnoName(errno) : "unknown";
  }
}

/**
 * Why the kernel refused a device:
 * - `"busy"`: another connection holds it (EBUSY).
 * - `"no-module"`: no such device node, the nbd module is not loaded.
 * - `"permission"`: EACCES/EPERM; needs root (CAP_SYS_ADMIN).
 * - `"size"`: the export's size or block sizes do not fit the kernel.
 * - `"timeout"`: the device did not come up in time.
 * - `"other"`: anything else; see `errno`.
 */
export type KernelErrorReason =
  | "busy"
  | "no-module"
  | "permission"
  | "size"
  | "timeout"
  | "other";

/**
 * The kernel's nbd driver refused or failed an operation on a device.
 *
 * @example
 * ```ts ignore
 * import { attach, NbdKernelError } from "@nbd/client/ffi";
 * try {
 *   await attach("nbd://127.0.0.1/", "/dev/nbd0");
 * } catch (e) {
 *   if (e instanceof NbdKernelError && e.reason === "busy") {
 *     console.error("pick another device");
 *   }
 * }
 * ```
 */
export class NbdKernelError extends NbdSystemCallError {
  /** The device path, e.g. `"/dev/nbd0"`. */
  readonly device: string;
  /** What the user can act on. */
  readonly reason: KernelErrorReason;

  /**
   * Builds the message and classifies the reason from errno if not given.
   *
   * @param device The device path.
   * @param call The call or ioctl that failed.
   * @param errno The errno it left, 0 if none.
   * @param message What was being done.
   * @param reason Classified from errno when not given.
   * @param advice What to do; chosen from the reason when not given.
   */
  constructor(
    device: string,
    call: string,
    errno: number,
    message: string,
    reason?: KernelErrorReason,
    advice?: string,
  ) {
    const r = reason ?? classify(errno);
    super(call, errno, message, advice ?? ADVICE[r]);
    this.name = "NbdKernelError";
    this.device = device;
    this.reason = r;
  }
}

const ADVICE: Record<KernelErrorReason, string | undefined> = {
  busy: "The device is in use; detach it or pick another (findFreeDevice())",
  "no-module": "Is the nbd module loaded? Try: modprobe nbd",
  permission: "Attaching a device needs root (CAP_SYS_ADMIN)",
  size: undefined,
  timeout: undefined,
  other: undefined,
};

function classify(errno: number): KernelErrorReason {
  switch (errno) {
    case 16:
      return "busy";
    case 1:
    case 13:
      return "permission";
    case 2:
    case 6:
    case 19:
      return "no-module";
    default:
      return "other";
  }
}
