/**
 * The few libc functions the kernel handoff needs, opened once with
 * `Deno.dlopen`. Only glibc's `libc.so.6` on Linux is supported.
 *
 * Calls whose errno matters run synchronously on the calling thread and read
 * errno right after through `__errno_location()`. Calls that may block run
 * `nonblocking` on Deno's thread pool; errno is lost there (it lives on the
 * pool thread), so they are used only where the result alone is enough or
 * where a follow-up call (`getsockopt(SO_ERROR)`) can say what went wrong.
 *
 * @module
 */

import { NbdError } from "../lib/errors.ts";
import { openLibrary } from "./_dlopen.ts";

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  socketpair: {
    parameters: ["i32", "i32", "i32", "buffer"],
    result: "i32",
  },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  setsockopt: {
    parameters: ["i32", "i32", "i32", "buffer", "u32"],
    result: "i32",
  },
  getsockopt: {
    parameters: ["i32", "i32", "i32", "buffer", "buffer"],
    result: "i32",
  },
  poll: {
    parameters: ["buffer", "u64", "i32"],
    result: "i32",
    nonblocking: true,
  },
  recv: {
    parameters: ["i32", "buffer", "usize", "i32"],
    result: "isize",
    nonblocking: true,
  },
  send: {
    parameters: ["i32", "buffer", "usize", "i32"],
    result: "isize",
    nonblocking: true,
  },
  /** For netlink: the kernel answers within the call, and errno matters. */
  recv_now: {
    name: "recv",
    parameters: ["i32", "buffer", "usize", "i32"],
    result: "isize",
  },
  send_now: {
    name: "send",
    parameters: ["i32", "buffer", "usize", "i32"],
    result: "isize",
  },
  getaddrinfo: {
    parameters: ["buffer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  freeaddrinfo: { parameters: ["pointer"], result: "void" },
  gai_strerror: { parameters: ["i32"], result: "pointer" },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  /** For opening a device that is up: the open may read the partition table. */
  open_nb: {
    name: "open",
    parameters: ["buffer", "i32", "u32"],
    result: "i32",
    nonblocking: true,
  },
  close_nb: {
    name: "close",
    parameters: ["i32"],
    result: "i32",
    nonblocking: true,
  },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  access: { parameters: ["buffer", "i32"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "u64"], result: "i32" },
  ioctl_ptr: {
    name: "ioctl",
    parameters: ["i32", "u64", "buffer"],
    result: "i32",
  },
  /** For ioctls that talk to the server (`NBD_DISCONNECT`). */
  ioctl_nb: {
    name: "ioctl",
    parameters: ["i32", "u64", "u64"],
    result: "i32",
    nonblocking: true,
  },
  sysconf: { parameters: ["i32"], result: "i64" },
  strerror: { parameters: ["i32"], result: "pointer" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The opened library's symbols. */
export type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/**
 * Opens libc on first use.
 *
 * @throws {NbdError} on anything but Linux with glibc, or without
 *   `--allow-ffi`.
 */
export function libc(): Libc {
  if (lib) return lib.symbols;
  if (Deno.build.os !== "linux") {
    throw new NbdError(
      `The kernel handoff needs Linux's nbd driver; this is ${Deno.build.os}`,
    );
  }
  lib = openLibrary(
    "libc.so.6",
    SYMBOLS,
    "The kernel handoff",
    "libc",
    "Cannot open glibc's libc.so.6 (the kernel handoff supports glibc-based Linux only)",
  );
  return lib.symbols;
}

/** errno of the calling thread, right after a synchronous call. */
export function errno(): number {
  const p = libc().__errno_location();
  if (p === null) return 0;
  return new Deno.UnsafePointerView(p).getInt32(0);
}

/** Host errno values (x86-64 and arm64 Linux) that messages name. */
export const E = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  ENODEV: 19,
  EINVAL: 22,
  ENOTTY: 25,
  EROFS: 30,
  EPIPE: 32,
  EBADR: 53,
  EOVERFLOW: 75,
  ENOTSOCK: 88,
  EAFNOSUPPORT: 97,
  EADDRNOTAVAIL: 99,
  ENETUNREACH: 101,
  ECONNRESET: 104,
  ESHUTDOWN: 108,
  ENOBUFS: 105,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTUNREACH: 113,
  EINPROGRESS: 115,
} as const;

const NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(E).map(([k, v]) => [v, k]),
);

/** "111 (ECONNREFUSED, Connection refused)" */
export function describeErrno(n: number): string {
  const name = NAMES[n] ?? "unknown";
  let text = "";
  try {
    const p = libc().strerror(n);
    if (p !== null) text = new Deno.UnsafePointerView(p).getCString();
  } catch {
    // Only for the message; the number and name are enough.
  }
  return text ? `${n} (${name}, ${text})` : `${n} (${name})`;
}

/** The name of an errno value, "unknown" if not in the table. */
export function errnoName(n: number): string {
  return NAMES[n] ?? "unknown";
}

const encoder = new TextEncoder();

/** A NUL-terminated copy of `s` for a `char *` parameter. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

// Constants of x86-64/arm64 Linux.
export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_INET6 = 10;
export const AF_VSOCK = 40;
export const SOCK_STREAM = 1;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_ERROR = 4;
export const IPPROTO_TCP = 6;
export const TCP_NODELAY = 1;
export const SHUT_RDWR = 2;
export const MSG_NOSIGNAL = 0x4000;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const F_OK = 0;
export const R_OK = 4;
export const W_OK = 2;
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const SC_PAGESIZE = 30;
export const AF_NETLINK = 16;
export const SOCK_RAW = 3;
export const NETLINK_GENERIC = 16;
export const SOL_NETLINK = 270;
export const NETLINK_ADD_MEMBERSHIP = 1;
export const NETLINK_CAP_ACK = 10;
export const NETLINK_EXT_ACK = 11;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
