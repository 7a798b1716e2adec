/**
 * A generic netlink socket through libc, for the kernel's `nbd` family:
 * requests answered with an ack (or an `NLMSG_ERROR` with the errno and the
 * kernel's extended-ack text), and a multicast subscription for
 * `NBD_CMD_LINK_DEAD`. The bytes are made and read in `_genl.ts` and `_family.ts`.
 *
 * The kernel runs a generic netlink request inside the `send()` that
 * carries it, so the reply is queued once `send()` returns: requests send
 * and receive synchronously (errno stays readable), and only wait on a
 * pool-thread `poll()` if nothing is there yet. `NBD_CMD_DISCONNECT` is the
 * exception: the kernel writes `NBD_CMD_DISC` to the server inside that
 * `send()`, and on the relay path this very process must carry it, so it is
 * sent from a pool thread.
 *
 * @module
 */

import { abortReason } from "../../lib/errors.ts";
import {
  AF_NETLINK,
  E,
  errno,
  libc,
  MSG_DONTWAIT,
  MSG_TRUNC,
  NETLINK_ADD_MEMBERSHIP,
  NETLINK_CAP_ACK,
  NETLINK_EXT_ACK,
  NETLINK_GENERIC,
  POLLIN,
  SOCK_CLOEXEC,
  SOCK_RAW,
  SOL_NETLINK,
} from "../_libc.ts";
import {
  decodeAck,
  decodeFamily,
  encodeGetFamily,
  type Family,
  type NetlinkMessage,
  NLMSG_ERROR,
  parseMessages,
  refusal,
} from "./_genl.ts";
import {
  decodeLinkDead,
  type LinkDeadEvent,
  NBD_GENL_FAMILY_NAME,
} from "./_family.ts";
import { NbdKernelError, NbdSystemCallError } from "../errors.ts";

/** Largest datagram read; a longer one is reported, never cut silently. */
const RECEIVE_BUFFER = 64 * 1024;
/** Milliseconds a request waits for its ack after sending. */
const REPLY_TIMEOUT_MS = 30_000;
/** Poll slices, so that an abort or a deadline is seen soon. */
const POLL_SLICE_MS = 250;

/** How a request is sent; see the module doc. */
export type SendMode = "now" | "pool";

let sequence = (Date.now() & 0x7fffffff) >>> 0;

/** An open `AF_NETLINK`/`NETLINK_GENERIC` socket. */
export class GenlSocket {
  #fd: number;
  #buffer = new Uint8Array(RECEIVE_BUFFER);
  #pfd = new Uint8Array(4 + 2 + 2); // fd, events, revents

  private constructor(fd: number) {
    this.#fd = fd;
    const view = new DataView(this.#pfd.buffer);
    view.setInt32(0, fd, true);
    view.setInt16(4, POLLIN, true);
  }

  /**
   * Opens and binds a socket; asks for extended acks (the kernel's text on
   * a refusal) and capped ones (the request is not echoed back).
   *
   * @throws {NbdSystemCallError} when the socket cannot be made.
   */
  static open(): GenlSocket {
    const c = libc();
    const fd = c.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd < 0) {
      throw new NbdSystemCallError(
        "socket",
        errno(),
        "Cannot open a generic netlink socket",
      );
    }
    // struct sockaddr_nl: family, pad, pid (0: the kernel picks), groups.
    const address = new Uint8Array(2 + 2 + 4 + 4);
    new DataView(address.buffer).setUint16(0, AF_NETLINK, true);
    if (c.bind(fd, address, address.length) !== 0) {
      const err = errno();
      c.close(fd);
      throw new NbdSystemCallError(
        "bind",
        err,
        "Cannot bind a generic netlink socket",
      );
    }
    const one = new Uint8Array(new Int32Array([1]).buffer);
    // Both are best effort: kernels before 4.12 lack extended acks.
    c.setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, one, 4);
    c.setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, one, 4);
    return new GenlSocket(fd);
  }

  /** A fresh sequence number for a request. */
  nextSeq(): number {
    sequence = (sequence + 1) >>> 0;
    return sequence;
  }

  /**
   * Joins a multicast group.
   *
   * @throws {NbdSystemCallError} on failure.
   */
  join(group: number, name: string): void {
    const value = new Uint8Array(new Uint32Array([group]).buffer);
    if (
      libc().setsockopt(
        this.#fd,
        SOL_NETLINK,
        NETLINK_ADD_MEMBERSHIP,
        value,
        4,
      ) !== 0
    ) {
      throw new NbdSystemCallError(
        "setsockopt",
        errno(),
        `Cannot join the netlink multicast group ${name} (${group})`,
      );
    }
  }

  /**
   * Sends a request built with sequence `seq` and collects the messages
   * that answer it, up to and including its ack.
   *
   * @param what The command, e.g. `"NBD_CMD_CONNECT"`, for messages.
   * @param device The device concerned, or `""`.
   * @param doing What is being done, for messages.
   * @returns The reply messages before the ack (none for most commands).
   * @throws {NbdKernelError} when the kernel refuses the request.
   * @throws {NbdSystemCallError} when sending or receiving fails, the
   *   reply is malformed, or no ack comes within 30 s.
   */
  async request(
    bytes: Uint8Array<ArrayBuffer>,
    seq: number,
    what: string,
    device: string,
    doing: string,
    mode: SendMode = "now",
  ): Promise<NetlinkMessage[]> {
    const c = libc();
    const length = BigInt(bytes.length);
    if (mode === "now") {
      const n = Number(c.send_now(this.#fd, bytes, length, 0));
      if (n !== bytes.length) {
        throw new NbdSystemCallError(
          "send",
          n < 0 ? errno() : 0,
          `${doing}: sending ${what} over netlink`,
        );
      }
    } else {
      const n = Number(await c.send(this.#fd, bytes, length, 0));
      if (n !== bytes.length) {
        // errno stayed on the pool thread.
        throw new NbdSystemCallError(
          "send",
          0,
          `${doing}: sending ${what} over netlink`,
        );
      }
    }
    const replies: NetlinkMessage[] = [];
    const deadline = performance.now() + REPLY_TIMEOUT_MS;
    for (;;) {
      const datagram = await this.receive(deadline, undefined, doing);
      if (datagram === null) {
        throw new NbdSystemCallError(
          "recv",
          E.ETIMEDOUT,
          `${doing}: no answer to ${what} within ${REPLY_TIMEOUT_MS} ms`,
        );
      }
      for (const m of parseMessages(datagram)) {
        // Stale answers to an earlier, abandoned request are skipped.
        if (m.seq !== seq) continue;
        if (m.type === NLMSG_ERROR) {
          const ack = decodeAck(m);
          if (ack.errno !== 0) throw refusal(ack, what, device, doing);
          return replies;
        }
        replies.push(m);
      }
    }
  }

  /**
   * One datagram, waiting until `deadline` (a `performance.now()` time);
   * `null` when none came by then.
   *
   * @throws {NbdSystemCallError} when `recv` fails or a datagram is longer
   *   than the buffer; the abort reason when `signal` aborts.
   */
  async receive(
    deadline: number,
    signal: AbortSignal | undefined,
    doing: string,
  ): Promise<Uint8Array | null> {
    const c = libc();
    for (;;) {
      if (signal?.aborted) throw abortReason(signal);
      const n = Number(
        c.recv_now(
          this.#fd,
          this.#buffer,
          BigInt(this.#buffer.length),
          MSG_DONTWAIT | MSG_TRUNC,
        ),
      );
      if (n > this.#buffer.length) {
        throw new NbdSystemCallError(
          "recv",
          0,
          `${doing}: a netlink message of ${n} bytes exceeds the ${this.#buffer.length}-byte buffer`,
        );
      }
      if (n >= 0) return this.#buffer.slice(0, n);
      const err = errno();
      if (err !== E.EAGAIN && err !== E.EINTR) {
        throw new NbdSystemCallError(
          "recv",
          err,
          `${doing}: reading from the netlink socket`,
        );
      }
      const left = deadline - performance.now();
      if (left <= 0) return null;
      await c.poll(this.#pfd, 1n, Math.ceil(Math.min(POLL_SLICE_MS, left)));
    }
  }

  /** Closes the socket. */
  close(): void {
    if (this.#fd < 0) return;
    libc().close(this.#fd);
    this.#fd = -1;
  }
}

/**
 * Resolves the `nbd` family on `socket`; `null` when the kernel has no
 * such family (no nbd module, or a kernel without its netlink interface).
 *
 * @throws {NbdKernelError} when the controller refuses otherwise.
 */
export async function resolveFamily(
  socket: GenlSocket,
): Promise<Family | null> {
  const seq = socket.nextSeq();
  try {
    const replies = await socket.request(
      encodeGetFamily(seq, NBD_GENL_FAMILY_NAME),
      seq,
      "CTRL_CMD_GETFAMILY",
      "",
      `Cannot resolve the generic netlink family "${NBD_GENL_FAMILY_NAME}"`,
    );
    const reply = replies[0];
    if (!reply) {
      throw new NbdSystemCallError(
        "",
        0,
        "The netlink controller acknowledged CTRL_CMD_GETFAMILY without describing the family",
      );
    }
    return decodeFamily(reply);
  } catch (e) {
    if (e instanceof NbdKernelError && e.errno === E.ENOENT) return null;
    throw e;
  }
}

/**
 * Reads `NBD_CMD_LINK_DEAD` notifications from a socket that joined the
 * nbd multicast group, until `signal` aborts.
 *
 * @throws the abort reason when `signal` aborts.
 */
export async function* linkDeadEvents(
  socket: GenlSocket,
  family: Family,
  signal: AbortSignal | undefined,
): AsyncGenerator<LinkDeadEvent, void, undefined> {
  const doing = "Watching for dead nbd links";
  for (;;) {
    let datagram: Uint8Array | null;
    try {
      datagram = await socket.receive(Infinity, signal, doing);
    } catch (e) {
      // The socket's queue overflowed: notifications were lost.
      if (e instanceof NbdSystemCallError && e.errno === E.ENOBUFS) {
        yield { overrun: true };
        continue;
      }
      throw e;
    }
    if (datagram === null) continue;
    yield* decodeLinkDead(datagram, family.id);
  }
}
