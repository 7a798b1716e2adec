/**
 * A TLS engine other than the built-in ones, handed to `connect()` as
 * `tlsEngine` (GnuTLS through FFI: `import { gnutls } from
 * "@nbd/client/ffi"`). The core library only knows this shape, so a
 * program that never passes an engine never loads FFI.
 *
 * @module
 */

import type { ConnectTarget } from "../connect_options.ts";
import type { ByteStream } from "../transport.ts";
import type { TlsStream } from "./stream.ts";
import type { UpgradeOptions } from "./upgrade.ts";

/**
 * A TLS implementation {@linkcode upgradeToTls} hands the handshake to.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { gnutls } from "@nbd/client/ffi";
 *
 * await using client = await connect(
 *   "nbds://localhost/disk?tls-psk-file=/etc/nbd/keys.psk&tls-username=alice",
 *   { tlsEngine: gnutls },
 * );
 * ```
 */
export interface TlsEngine {
  /** A short name for traces and messages, e.g. `"gnutls"`. */
  readonly name: string;
  /** Whether the engine does TLS-PSK (`tlsPskFile`). */
  readonly psk: boolean;
  /**
   * Opens the connection to the server in the form the engine works on
   * best (GnuTLS: a socket descriptor of its own). `connect()` calls it
   * instead of `Deno.connect` when TLS is asked for.
   *
   * @param target Where the server is.
   * @param signal Abandons connecting.
   * @returns The raw stream, in clear until the upgrade.
   */
  dial?(target: ConnectTarget, signal?: AbortSignal): Promise<ByteStream>;
  /**
   * Runs the TLS handshake over `stream`, after `NBD_OPT_STARTTLS` was
   * acknowledged.
   *
   * @param stream The raw stream; the engine owns it once it returns a
   *   stream or throws.
   * @param options What to trust and present, with the name to check.
   * @returns The encrypted stream, or `undefined` when the engine cannot
   *   work over this kind of stream (the built-in path then runs).
   * @throws {NbdTlsError} when the handshake fails.
   */
  upgrade(
    stream: ByteStream,
    options: UpgradeOptions,
  ): Promise<TlsStream | undefined>;
}
