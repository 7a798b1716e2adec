/**
 * Opening sockets through libc, so that their descriptors can be handed to
 * the kernel: TCP (names resolved with `getaddrinfo`, as the C library
 * would), Unix (paths and the abstract namespace) and vsock.
 *
 * Connects are non-blocking plus `poll`, so a slow TCP connect neither
 * blocks the event loop nor loses errno (`SO_ERROR` says what failed).
 *
 * @module
 */

import { abortReason } from "../lib/errors.ts";
import type { ConnectTarget } from "../lib/connect_options.ts";
import { DEFAULT_PORT } from "../lib/constants.ts";
import {
  AF_INET,
  AF_INET6,
  AF_UNIX,
  AF_VSOCK,
  cString,
  E,
  errno,
  F_GETFL,
  F_SETFL,
  IPPROTO_TCP,
  libc,
  O_NONBLOCK,
  POLLOUT,
  SO_ERROR,
  SOCK_CLOEXEC,
  SOCK_STREAM,
  SOL_SOCKET,
  TCP_NODELAY,
} from "./_libc.ts";
import { NbdSystemCallError } from "./errors.ts";

/** A socket address ready for `connect()`. */
interface Address {
  family: number;
  bytes: Uint8Array<ArrayBuffer>;
  text: string;
}

const encoder = new TextEncoder();
const SUN_PATH_MAX = 108;

/** `struct sockaddr_un` for a path, or `"\0name"` in the abstract space. */
export function unixAddress(path: string): Address {
  const name = encoder.encode(path);
  const abstract = name[0] === 0;
  // A filesystem path carries its NUL; an abstract name is counted exactly.
  const length = abstract ? name.length : name.length + 1;
  if (name.length === 0 || length > SUN_PATH_MAX) {
    throw new RangeError(
      `Unix socket path must be 1 to ${
        SUN_PATH_MAX - 1
      } bytes, got ${name.length}`,
    );
  }
  const bytes = new Uint8Array(2 + length); // sun_family, sun_path
  new DataView(bytes.buffer).setUint16(0, AF_UNIX, true);
  bytes.set(name, 2);
  return {
    family: AF_UNIX,
    bytes,
    text: abstract ? `@${path.slice(1)}` : path,
  };
}

/** `struct sockaddr_vm`. */
export function vsockAddress(cid: number, port: number): Address {
  const bytes = new Uint8Array(2 + 2 + 4 + 4 + 1 + 3); // family, reserved, port, cid, flags, zero
  const view = new DataView(bytes.buffer);
  view.setUint16(0, AF_VSOCK, true);
  view.setUint32(4, port, true);
  view.setUint32(8, cid, true);
  return { family: AF_VSOCK, bytes, text: `vsock ${cid}:${port}` };
}

/** Resolves a host name with glibc's `getaddrinfo`, on a pool thread. */
export async function resolve(
  hostname: string,
  port: number,
): Promise<Address[]> {
  const c = libc();
  // struct addrinfo hints: flags, family, socktype, protocol, then lengths
  // and pointers, 48 bytes in all on 64-bit Linux.
  const hints = new Uint8Array(4 + 4 + 4 + 4 + 8 + 8 + 8 + 8);
  const hv = new DataView(hints.buffer);
  hv.setInt32(0, 0x400, true); // AI_NUMERICSERV
  hv.setInt32(8, SOCK_STREAM, true);
  const out = new BigUint64Array(1);
  const rc = await c.getaddrinfo(
    cString(hostname),
    cString(String(port)),
    hints,
    out,
  );
  if (rc !== 0) {
    const p = c.gai_strerror(rc);
    const text = p ? new Deno.UnsafePointerView(p).getCString() : `error ${rc}`;
    throw new NbdSystemCallError(
      "getaddrinfo",
      0,
      `Cannot resolve ${hostname}: ${text}`,
    );
  }
  const head = Deno.UnsafePointer.create(out[0]!);
  const addresses: Address[] = [];
  try {
    for (let p = head; p !== null;) {
      const v = new Deno.UnsafePointerView(p);
      const family = v.getInt32(4);
      const length = v.getUint32(16);
      const addr = v.getPointer(24);
      if ((family === AF_INET || family === AF_INET6) && addr !== null) {
        const bytes = new Uint8Array(
          Deno.UnsafePointerView.getArrayBuffer(addr, length),
        ).slice();
        addresses.push({ family, bytes, text: formatInet(bytes, family) });
      }
      p = v.getPointer(40);
    }
  } finally {
    c.freeaddrinfo(head);
  }
  return addresses;
}

function formatInet(sa: Uint8Array, family: number): string {
  const view = new DataView(sa.buffer, sa.byteOffset, sa.byteLength);
  const port = view.getUint16(2);
  if (family === AF_INET) return `${sa.subarray(4, 8).join(".")}:${port}`;
  const groups: string[] = [];
  for (let i = 0; i < 8; i++) {
    groups.push(view.getUint16(8 + 2 * i).toString(16));
  }
  return `[${groups.join(":")}]:${port}`;
}

/** Options for {@linkcode connectSocket}. */
export interface SocketOptions {
  /** Give up when this aborts. */
  signal?: AbortSignal | undefined;
  /** Milliseconds for each address to connect; 30 s by default. */
  timeoutMs?: number;
}

/**
 * Connects a stream socket to the target and returns its descriptor, in
 * blocking mode, as the kernel expects it.
 *
 * @throws {NbdSystemCallError} when no address accepts the connection.
 * @throws {TypeError} when the target names no server.
 */
export async function connectSocket(
  target: ConnectTarget,
  options: SocketOptions = {},
): Promise<number> {
  let addresses: Address[];
  if (target.path !== undefined) {
    addresses = [unixAddress(target.path)];
  } else if (target.cid !== undefined) {
    addresses = [vsockAddress(target.cid, target.port ?? DEFAULT_PORT)];
  } else if (target.hostname !== undefined) {
    addresses = await resolve(target.hostname, target.port ?? DEFAULT_PORT);
    if (addresses.length === 0) {
      throw new NbdSystemCallError(
        "getaddrinfo",
        0,
        `Cannot resolve ${target.hostname}: no IPv4 or IPv6 address`,
      );
    }
  } else {
    throw new TypeError(
      "The target names no server: give hostname, path or cid",
    );
  }
  let last: Error | undefined;
  for (const address of addresses) {
    try {
      return await connectOne(address, options);
    } catch (e) {
      if (options.signal?.aborted) throw abortReason(options.signal);
      if (!(e instanceof NbdSystemCallError)) throw e;
      last = e;
    }
  }
  throw last!;
}

async function connectOne(
  address: Address,
  options: SocketOptions,
): Promise<number> {
  const c = libc();
  const what = `Cannot connect to ${address.text}`;
  const fd = c.socket(address.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new NbdSystemCallError("socket", errno(), what);
  try {
    // A Unix connect never waits for the network: done in one call.
    const wait = address.family !== AF_UNIX;
    const flags = c.fcntl(fd, F_GETFL, 0);
    if (wait) c.fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    if (c.connect(fd, address.bytes, address.bytes.length) !== 0) {
      const err = errno();
      if (!wait || err !== E.EINPROGRESS) {
        throw new NbdSystemCallError("connect", err, what);
      }
      await waitWritable(fd, address.text, options);
      const soError = new Int32Array(1);
      const len = new Uint32Array([4]);
      c.getsockopt(fd, SOL_SOCKET, SO_ERROR, soError, len);
      if (soError[0] !== 0) {
        throw new NbdSystemCallError("connect", soError[0]!, what);
      }
    }
    if (wait) c.fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    if (address.family === AF_INET || address.family === AF_INET6) {
      // Requests are small and latency-bound, as nbd-client also decides.
      c.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, new Int32Array([1]), 4);
    }
    return fd;
  } catch (e) {
    c.close(fd);
    throw e;
  }
}

async function waitWritable(
  fd: number,
  text: string,
  options: SocketOptions,
): Promise<void> {
  const deadline = performance.now() + (options.timeoutMs ?? 30_000);
  const pfd = new Uint8Array(4 + 2 + 2); // fd, events, revents
  const view = new DataView(pfd.buffer);
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLOUT, true);
  for (;;) {
    if (options.signal?.aborted) throw abortReason(options.signal);
    const left = deadline - performance.now();
    if (left <= 0) {
      throw new NbdSystemCallError(
        "connect",
        E.ETIMEDOUT,
        `Cannot connect to ${text} within ${options.timeoutMs ?? 30_000} ms`,
      );
    }
    // Short slices, so that an abort is seen soon.
    const n = await libc().poll(pfd, 1n, Math.min(200, Math.ceil(left)));
    if (n > 0) return;
  }
}
