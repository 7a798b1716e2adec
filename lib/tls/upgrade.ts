/**
 * TLS after `NBD_OPT_STARTTLS` (`doc/proto.md`, "TLS support"; libnbd's
 * `states-newstyle-opt-starttls.c` and `crypto.c`).
 *
 * Once the server has acknowledged `NBD_OPT_STARTTLS`, the handshake hands
 * the raw stream to {@linkcode upgradeToTls}, which runs the TLS handshake
 * over it and returns an encrypted {@linkcode ByteStream} to carry on with.
 *
 * Three paths, one per need. A caller that passes a
 * `TlsEngine` (`tlsEngine`, GnuTLS through FFI from
 * `@nbd/client/ffi`) gets that engine: trust limited to the given CA, a
 * revocation list, client certificates and TLS-PSK, at C speed. Without
 * one, a TCP connection that sends no client certificate and verifies the
 * server against the system's roots goes through `Deno.startTls`: rustls
 * in Deno's own I/O, measured at two to three times the throughput of the
 * `node:tls` path for a third of the CPU (`bench/PROFILE.md`). Everything
 * else goes through `node:tls`: `Deno.startTls` takes only a
 * `Deno.TcpConn` (no Unix socket, no descriptor stream from `ffi/`), sends
 * no client certificate (it ignores `cert` and `key`), cannot turn off
 * chain verification for `tlsVerifyPeer: false`, and adds `caCerts` to the
 * built-in roots instead of trusting only them (so a CA of one's own,
 * `tlsCertificates` or `caCerts`, would also let any publicly trusted
 * certificate for the name through). Deno's `node:tls` does all three over
 * any duplex stream (`_node_stream.ts`). That module is loaded on first
 * use, so clients that never need it never load Node compatibility.
 *
 * @module
 */

import type {
  ConnectTarget,
  DebugHook,
  TlsOptions,
  UpgradeOptions,
} from "../connect_options.ts";
import { abortReason } from "../errors.ts";
import type { ByteStream } from "../transport.ts";
import { loadTlsCredentials } from "./credentials.ts";
import { NbdTlsError } from "./error.ts";
import type { TlsStream } from "./stream.ts";
import { DenoTlsStream } from "./_deno_stream.ts";
import {
  byteStreamDuplex,
  type NodeStream,
  NodeTlsStream,
} from "./_node_stream.ts";

type NodeTls = typeof import("node:tls");

export type { UpgradeOptions } from "../connect_options.ts";

/**
 * Refuses, before any traffic, the kinds of TLS that Deno cannot do.
 * TLS-PSK (`tlsPskFile`, `tls-psk-file=`) needs pre-shared-key cipher suites,
 * which rustls, the TLS library under Deno, does not implement; a
 * `TlsEngine` that has them (`tlsEngine: gnutls`) lifts this.
 *
 * @param options The TLS settings about to be used.
 * @throws {NbdTlsError} when `tlsPskFile` is set and no engine with PSK is.
 *
 * @example
 * ```ts
 * import { refuseUnsupportedTls } from "@nbd/client";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => refuseUnsupportedTls({ tlsPskFile: "keys.psk" }), /TLS-PSK/);
 * ```
 */
export function refuseUnsupportedTls(options: TlsOptions): void {
  if (options.tlsPskFile !== undefined && options.tlsEngine?.psk !== true) {
    throw new NbdTlsError(
      `TLS-PSK (tlsPskFile "${options.tlsPskFile}") is not supported: Deno's TLS (rustls) has no pre-shared-key cipher suites; ${PSK_FIX}`,
    );
  }
}

/** How to get TLS-PSK: the engine that has it. */
const PSK_FIX =
  "run with --allow-ffi and pass tlsEngine: gnutls from @nbd/client/ffi (the tools do so by themselves under --allow-ffi), or use X.509 certificates (tlsCertificates) instead";

/**
 * How `connect()` opens a connection when the caller passed a
 * `tlsEngine` that dials for itself: TLS is asked for (`tls` is
 * `"require"` or `"prefer"`, or left unset with a PSK file or certificate
 * directory given). Otherwise `undefined`, and `Deno.connect` is used.
 *
 * @param o The connect options.
 * @returns A function that opens the raw stream, or `undefined`.
 */
export function engineDial(
  o: TlsOptions & ConnectTarget,
): (() => Promise<ByteStream>) | undefined {
  const engine = o.tlsEngine;
  if (engine?.dial === undefined || o.tls === "disable") return undefined;
  const wanted = o.tls !== undefined || o.tlsPskFile !== undefined ||
    o.tlsCertificates !== undefined;
  return wanted ? () => engine.dial!(o) : undefined;
}

/**
 * Runs the TLS handshake over a stream on which the server has just
 * acknowledged `NBD_OPT_STARTTLS`, and returns the encrypted stream.
 *
 * The server's certificate chain is verified against the CA from
 * `tlsCertificates`/`caCerts` (or the default roots), and its name against
 * `tlsHostname ?? hostname`. Over a Unix socket with no `tlsHostname` there
 * is no name to compare: the chain is still verified, the name is not
 * (libnbd verifies nothing at all there; give `tlsHostname` to check the
 * name too). `tlsVerifyPeer: false` turns both checks off. A client
 * certificate is sent when one is configured (see
 * {@linkcode loadTlsCredentials}).
 *
 * With `tlsEngine` (GnuTLS from `@nbd/client/ffi`) the engine runs the
 * handshake when it can work over `stream` (a socket it dialled), with the
 * same checks; otherwise the built-in path below runs, and TLS-PSK is
 * refused.
 *
 * With TLS 1.3 a server that rejects the client's certificate says so only
 * after the client has finished its side of the handshake, so that failure
 * surfaces at the first read of the returned stream, as an
 * {@linkcode NbdTlsError} that says so.
 *
 * @param stream The raw stream: a `Deno.TcpConn`, a `Deno.UnixConn`, or any
 *   {@linkcode ByteStream}. It belongs to the result from now on, and is
 *   closed if the handshake fails.
 * @param options TLS settings, plus the host name or socket path the stream
 *   was opened to, an abort signal and a debug hook.
 * @returns The encrypted stream; closing it closes `stream`.
 * @throws {NbdTlsError} when PSK is asked for, the certificates cannot be
 *   read, or the handshake fails (unknown CA, name mismatch, expired
 *   certificate, protocol failure); the message includes the TLS error.
 * @throws {Error} the signal's reason when `signal` aborts.
 *
 * @example
 * ```ts ignore
 * import { upgradeToTls } from "@nbd/client";
 *
 * // After sending NBD_OPT_STARTTLS over `conn` and reading NBD_REP_ACK:
 * const conn = await Deno.connect({ hostname: "nbd.example.com", port: 10809 });
 * const secure = await upgradeToTls(conn, {
 *   hostname: "nbd.example.com",
 *   tlsCertificates: "/etc/pki/nbd",
 * });
 * ```
 */
export async function upgradeToTls(
  stream: ByteStream,
  options: UpgradeOptions,
): Promise<TlsStream> {
  let owned = true;
  try {
    refuseUnsupportedTls(options);
    const signal = options.signal;
    if (signal?.aborted) throw abortReason(signal);
    const engine = options.tlsEngine;
    if (engine !== undefined) {
      const secure = await engine.upgrade(stream, options);
      if (secure !== undefined) {
        owned = false;
        trace(options.debug, "tls.handshake", {
          engine: engine.name,
          hostname: options.tlsHostname ?? options.hostname,
          protocol: secure.protocol,
          cipher: secure.cipher,
          verified: secure.verified,
        });
        return secure;
      }
      if (options.tlsPskFile !== undefined) {
        throw new NbdTlsError(
          `TLS-PSK (tlsPskFile "${options.tlsPskFile}") needs a socket the ${engine.name} engine opened itself; this connection was not (a server command or a stream given by the caller)`,
        );
      }
    }
    const credentials = await loadTlsCredentials(options);
    const name = options.tlsHostname ?? options.hostname;
    const verify = options.tlsVerifyPeer !== false;
    // Deno.startTls only where it trusts exactly what node:tls would: it
    // adds caCerts to the built-in roots instead of trusting only them, so
    // a CA of the user's own keeps the node:tls path.
    if (
      verify && credentials.cert === undefined &&
      credentials.ca === undefined && name !== undefined && isTcpConn(stream)
    ) {
      owned = false;
      const secure = await DenoTlsStream.start(
        stream,
        name,
        credentials,
        signal,
      );
      trace(options.debug, "tls.handshake", {
        hostname: name,
        protocol: secure.protocol,
        cipher: secure.cipher,
        verified: secure.verified,
        clientCertificate: false,
      });
      return secure;
    }
    const [tls, nodeStream]: [NodeTls, NodeStream] = await Promise.all([
      import("node:tls"),
      import("node:stream"),
    ]);
    if (signal?.aborted) throw abortReason(signal);

    const socket = tls.connect({
      socket: byteStreamDuplex(stream, nodeStream),
      ...credentials,
      rejectUnauthorized: verify,
      // SNI carries host names only, never addresses (RFC 6066).
      ...(name !== undefined && !isIpAddress(name) ? { servername: name } : {}),
      checkServerIdentity: (_host, cert) =>
        verify && name !== undefined
          ? tls.checkServerIdentity(name, cert)
          : undefined,
    });
    owned = false;
    const secure = new NodeTlsStream(
      socket,
      name,
      credentials.cert !== undefined,
    );
    await secure.handshake(signal);
    trace(options.debug, "tls.handshake", {
      hostname: name,
      protocol: secure.protocol,
      cipher: secure.cipher,
      verified: secure.verified,
      clientCertificate: credentials.cert !== undefined,
    });
    return secure;
  } finally {
    if (owned) {
      // Failed before the TLS layer took the stream over: close it here.
      try {
        stream.close();
      } catch {
        // Already closed.
      }
    }
  }
}

function trace(
  debug: boolean | DebugHook | undefined,
  event: string,
  fields: Record<string, unknown>,
): void {
  if (typeof debug === "function") debug(event, fields);
}

function isIpAddress(name: string): boolean {
  return /^[0-9.]+$/.test(name) || name.includes(":");
}

/** Whether `stream` is a plain `Deno.TcpConn`, which `Deno.startTls` takes. */
function isTcpConn(stream: ByteStream): stream is Deno.TcpConn {
  return typeof (stream as Partial<Deno.TcpConn>).setNoDelay === "function" &&
    (stream as Partial<Deno.TcpConn>).remoteAddr?.transport === "tcp";
}
