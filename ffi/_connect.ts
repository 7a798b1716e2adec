/**
 * Connecting for the kernel: a libc socket, the library's handshake over
 * its descriptor (asking only for what the kernel speaks), and for TLS or
 * `relay` a socketpair whose far end the kernel gets. On failure after the
 * handshake, {@linkcode hangUp} says goodbye and closes.
 *
 * @module
 */

import type { ConnectOptions } from "../lib/connect_options.ts";
import { CMD_DISC } from "../lib/constants.ts";
import { deadline, within } from "../lib/_deadline.ts";
import type { Tracer } from "../lib/_debug.ts";
import { abortReason, NbdError, NbdProtocolError } from "../lib/errors.ts";
import type { ExportInfo } from "../lib/export.ts";
import { type HandshakeOptions, negotiate } from "../lib/_handshake.ts";
import { refuseUnsupportedTls, upgradeToTls } from "../lib/tls/upgrade.ts";
import { type ByteStream, Transport } from "../lib/transport.ts";
import { encodeRequest, SIZES } from "../lib/_wire.ts";
import { FdStream } from "./_fd_stream.ts";
import { gnutls } from "./gnutls/engine.ts";
import { libc, MSG_NOSIGNAL } from "./_libc.ts";
import { socketPair } from "./_relay.ts";
import { connectSocket } from "./_socket.ts";

/** The relay's two streams: ours of the socketpair, and the server's. */
export interface RelayEnds {
  local: FdStream;
  remote: ByteStream;
}

/** A negotiated connection, ready for the kernel. */
export interface KernelConnection {
  /** The descriptor the kernel gets (`NBD_SET_SOCK`). */
  sockFd: number;
  /** What the handshake settled. */
  info: ExportInfo;
  /** For the relay path, the streams this process copies between. */
  relay?: RelayEnds;
}

/** How to connect. */
export interface KernelConnectOptions {
  /** Aborts connecting and negotiating. */
  signal: AbortSignal | undefined;
  /** Milliseconds allowed for both (0 for no limit). */
  connectTimeout: number;
  /** Take the relay path even without TLS. */
  relay: boolean;
}

/**
 * What the kernel can take: simple replies only, so no structured replies,
 * extended headers or metadata contexts; block sizes asked for. TLS, when
 * wanted, upgrades the libc socket itself (no `Deno.connect`, so no file
 * permissions even for a Unix socket).
 */
function handshakeOptions(
  target: ConnectOptions,
  trace: Tracer,
  signal: AbortSignal,
): HandshakeOptions {
  const tls = target.tls ?? "disable";
  const options: HandshakeOptions = {
    exportName: target.exportName ?? "",
    tls,
    structuredReplies: false,
    extendedHeaders: false,
    metaContexts: [],
    blockSizes: true,
  };
  if (tls !== "disable") {
    options.upgradeTls = (stream) =>
      upgradeToTls(stream, { tlsEngine: gnutls, ...target, signal });
  }
  if (trace) options.trace = trace;
  return options;
}

/**
 * Connects to the server and negotiates for the kernel, within the
 * caller's signal and the connect timeout.
 *
 * @returns the descriptor for the kernel, what was negotiated, and for
 *   the relay path its two streams.
 */
export async function connectForKernel(
  target: ConnectOptions,
  options: KernelConnectOptions,
  trace: Tracer,
): Promise<KernelConnection> {
  const ms = options.connectTimeout;
  using time = deadline(
    options.signal,
    ms,
    () =>
      new NbdError(
        `Cannot connect and negotiate within ${ms} ms: the server did not answer in time`,
      ),
  );
  try {
    return await connectAndNegotiate(target, options.relay, trace, time.signal);
  } catch (e) {
    // An abort says why in its reason; the error thrown may only say
    // "the connection is closed".
    if (time.signal.aborted) throw abortReason(time.signal);
    throw e;
  }
}

async function connectAndNegotiate(
  target: ConnectOptions,
  relay: boolean,
  trace: Tracer,
  signal: AbortSignal,
): Promise<KernelConnection> {
  if ((target.tls ?? "disable") !== "disable") {
    refuseUnsupportedTls({ tlsEngine: gnutls, ...target });
  }
  const fd = await connectSocket(target, { signal });
  const stream = new FdStream(fd);
  const transport = new Transport(stream);
  const onAbort = () => transport.close(abortReason(signal));
  signal.addEventListener("abort", onAbort, { once: true });
  try {
    const info = await negotiate(
      transport,
      handshakeOptions(target, trace, signal),
    );
    checkNothingBuffered(transport);
    if (!info.tls && !relay) {
      // The direct path: the kernel gets the very socket we negotiated on.
      return { sockFd: stream.release(), info };
    }
    // The relay path: the kernel gets one end of a socketpair, and this
    // process copies between the other end and the TLS stream.
    const [kernelEnd, ourEnd] = socketPair();
    return {
      sockFd: kernelEnd,
      info,
      relay: { local: new FdStream(ourEnd), remote: transport.stream },
    };
  } catch (e) {
    transport.close();
    throw e;
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

function checkNothingBuffered(transport: Transport): void {
  if (transport.buffered !== 0) {
    throw new NbdProtocolError(
      "transmission",
      `Server sent ${transport.buffered} bytes before any request`,
    );
  }
}

/**
 * Gives up on a negotiated connection the kernel never took: the server is
 * in transmission by now, so say goodbye, as a client that changes its
 * mind should, then close everything.
 */
export async function hangUp(conn: KernelConnection): Promise<void> {
  const { relay, sockFd } = conn;
  if (relay) {
    await sayGoodbye((p) => relay.remote.write(p));
    relay.local.close();
    try {
      relay.remote.close();
    } catch {
      // Already closed.
    }
  } else {
    await sayGoodbye(async (p) =>
      Number(await libc().send(sockFd, p, BigInt(p.length), MSG_NOSIGNAL))
    );
  }
  // On the relay path, the kernel's end of the socketpair.
  libc().close(sockFd);
}

/** Sends `NBD_CMD_DISC`, best effort and bounded: the attach failed anyway. */
async function sayGoodbye(
  write: (p: Uint8Array<ArrayBuffer>) => Promise<number>,
): Promise<void> {
  // The kernel negotiated without extended headers: a compact request.
  const req = new Uint8Array(SIZES.request);
  encodeRequest(
    { flags: 0, type: CMD_DISC, cookie: 0, offset: 0, length: 0 },
    false,
    req,
  );
  try {
    await within(write(req), 1000);
  } catch {
    // The connection may already be gone; nothing more to do.
  }
}
