/**
 * The error of the FUSE mount: a mount point it cannot use (and how to fix
 * that), a kernel it cannot speak to, a request it cannot parse.
 *
 * @module
 */

import { NbdError } from "../../lib/errors.ts";

/**
 * Why a FUSE mount failed:
 * - `"busy"`: the mount point is already a mount point.
 * - `"stale"`: a FUSE mount whose process died is left on it.
 * - `"not-directory"`: the mount point is not a directory.
 * - `"not-found"`: the mount point (or the directory for a file name) does
 *   not exist.
 * - `"permission"`: mounting needs root (CAP_SYS_ADMIN).
 * - `"no-fuse"`: no `/dev/fuse`, or the kernel has no FUSE.
 * - `"protocol"`: the kernel sent what this server cannot parse, or speaks
 *   a version it does not know.
 * - `"other"`: anything else; the message says what.
 */
export type FuseErrorReason =
  | "busy"
  | "stale"
  | "not-directory"
  | "not-found"
  | "permission"
  | "no-fuse"
  | "protocol"
  | "other";

/**
 * Mounting or serving the FUSE file failed. The message is one line that
 * names the fix, such as `fusermount3 -u MOUNTPOINT` for a stale mount.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { mountFuse, NbdFuseError } from "@nbd/client/ffi";
 * const nbd = await connect("nbd://127.0.0.1/");
 * try {
 *   await mountFuse(nbd, "/mnt/nbd");
 * } catch (e) {
 *   if (e instanceof NbdFuseError && e.reason === "stale") {
 *     console.error(e.message); // ... run: fusermount3 -u /mnt/nbd
 *   }
 * }
 * ```
 */
export class NbdFuseError extends NbdError {
  /** What went wrong, for callers to branch on. */
  readonly reason: FuseErrorReason;

  /**
   * Creates the error.
   *
   * @param reason Why it failed.
   * @param message The one-line message, with the fix.
   * @param options The cause, if any.
   */
  constructor(
    reason: FuseErrorReason,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "NbdFuseError";
    this.reason = reason;
  }
}
