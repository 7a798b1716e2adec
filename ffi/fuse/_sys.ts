/**
 * The libc calls the FUSE server makes, in a small library handle of its
 * own (the kernel handoff's `_libc.ts` serves the nbd driver).
 *
 * `/dev/fuse` is opened non-blocking: the server waits for requests with a
 * `poll` on Deno's thread pool, then reads them on the main thread, where
 * errno can be read (ENODEV is how the kernel says the mount is gone; a
 * read on a pool thread would lose it).
 *
 * @module
 */

import { NbdSystemCallError } from "../errors.ts";
import { cString } from "../_libc.ts";
import { NbdFuseError } from "./errors.ts";

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  poll: {
    parameters: ["buffer", "u64", "i32"],
    result: "i32",
    nonblocking: true,
  },
  mount: {
    parameters: ["buffer", "buffer", "buffer", "u64", "buffer"],
    result: "i32",
  },
  umount2: { parameters: ["buffer", "i32"], result: "i32" },
  getuid: { parameters: [], result: "u32" },
  getgid: { parameters: [], result: "u32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Sys = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/**
 * Opens libc on first use.
 *
 * @throws {NbdFuseError} off Linux, or without `--allow-ffi`.
 */
export function sys(): Sys {
  if (lib) return lib.symbols;
  if (Deno.build.os !== "linux") {
    throw new NbdFuseError(
      "no-fuse",
      `The FUSE mount needs Linux; this is ${Deno.build.os}`,
    );
  }
  try {
    lib = Deno.dlopen("libc.so.6", SYMBOLS);
  } catch (e) {
    throw new NbdFuseError(
      "other",
      e instanceof Deno.errors.NotCapable
        ? "The FUSE mount calls libc through FFI: run Deno with --allow-ffi"
        : `Cannot open glibc's libc.so.6: ${
          e instanceof Error ? e.message : String(e)
        }`,
      { cause: e },
    );
  }
  return lib.symbols;
}

/** errno of the calling thread, right after a synchronous call. */
export function errno(): number {
  const p = sys().__errno_location();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32(0);
}

export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const POLLIN = 0x1;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const MS_RDONLY = 1;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
export const ENOENT = 2;
export const EINTR = 4;
export const EIO = 5;
export const EAGAIN = 11;
export const EACCES = 13;
export const EBUSY = 16;
export const ENODEV = 19;
export const ENOTDIR = 20;
export const EINVAL = 22;
export const EFBIG = 27;
export const EROFS = 30;
export const ENOSYS = 38;
export const EOPNOTSUPP = 95;
export const EPERM = 1;

/**
 * Opens `/dev/fuse` read-write, non-blocking and close-on-exec (a server
 * the client starts must not inherit it, or the mount would outlive us).
 *
 * @throws {NbdFuseError} when there is no `/dev/fuse` or no permission.
 */
export function openFuseDevice(): number {
  const fd = sys().open(
    cString("/dev/fuse"),
    O_RDWR | O_NONBLOCK | O_CLOEXEC,
    0,
  );
  if (fd >= 0) return fd;
  const e = errno();
  const cause = new NbdSystemCallError("open", e, "Cannot open /dev/fuse");
  if (e === ENOENT || e === ENODEV) {
    throw new NbdFuseError(
      "no-fuse",
      "Cannot open /dev/fuse: this kernel has no FUSE (modprobe fuse), or /dev is not mounted",
      { cause },
    );
  }
  throw new NbdFuseError(
    e === EACCES || e === EPERM ? "permission" : "other",
    cause.message,
    { cause },
  );
}

/** `close(2)`, ignoring its result. */
export function closeFd(fd: number): void {
  sys().close(fd);
}
