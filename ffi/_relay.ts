/**
 * The relay path: the kernel gets one end of a socketpair and this copies
 * bytes between the other end and the library's own connection (TLS), as
 * nbd-client does for TLS.
 *
 * @module
 */

import type { ByteStream } from "../lib/transport.ts";
import type { FdStream } from "./_fd_stream.ts";
import { AF_UNIX, errno, libc, SOCK_CLOEXEC, SOCK_STREAM } from "./_libc.ts";
import { NbdSystemCallError } from "./errors.ts";

const CHUNK = 256 * 1024;

/** A running relay. */
export interface Relay {
  /** Settles when both directions have stopped; never rejects. */
  done: Promise<void>;
  /** Why the relay stopped, if it failed rather than ended. */
  readonly error: unknown;
  /** Stops both directions and closes both streams. */
  stop(): void;
}

/** `socketpair(AF_UNIX, SOCK_STREAM)`: `[forTheKernel, forUs]`. */
export function socketPair(): [number, number] {
  const fds = new Int32Array(2);
  if (
    libc().socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) !== 0
  ) {
    throw new NbdSystemCallError(
      "socketpair",
      errno(),
      "Cannot create the socket pair for the kernel",
    );
  }
  return [fds[0]!, fds[1]!];
}

async function pump(from: ByteStream, to: ByteStream): Promise<void> {
  const buf = new Uint8Array(CHUNK);
  for (;;) {
    const n = await from.read(buf);
    if (n === null) return;
    let at = 0;
    while (at < n) at += await to.write(buf.subarray(at, n));
  }
}

/**
 * Copies both ways between the kernel's socketpair end and the server's
 * stream until either side ends; then closes both, which the kernel sees
 * as the server going away (or the server sees as our disconnect).
 */
export function startRelay(local: FdStream, remote: ByteStream): Relay {
  let error: unknown;
  let stopped = false;
  const stop = () => {
    if (stopped) return;
    stopped = true;
    local.close();
    try {
      remote.close();
    } catch {
      // Already closed by the peer.
    }
  };
  const run = (from: ByteStream, to: ByteStream) =>
    pump(from, to).catch((e) => {
      if (!stopped) error = e;
    }).finally(stop);
  const done = Promise.all([run(local, remote), run(remote, local)]).then(
    () => {},
  );
  return {
    done,
    get error() {
      return error;
    },
    stop,
  };
}
