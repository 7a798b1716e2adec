/**
 * The encrypted stream {@linkcode upgradeToTls} returns, whatever engine
 * made it.
 *
 * @module
 */

import type { ByteStream } from "../transport.ts";

/**
 * The encrypted stream {@linkcode upgradeToTls} returns: a
 * {@linkcode ByteStream} (reads and writes may run concurrently) that also
 * tells what was negotiated.
 */
export interface TlsStream extends ByteStream {
  /**
   * The TLS version, e.g. `"TLSv1.3"`, kept after close; `undefined` where
   * the TLS layer does not tell (`Deno.startTls` tells neither the version
   * nor the cipher suite).
   */
  readonly protocol: string | undefined;
  /** The cipher suite's standard name, where the TLS layer tells it. */
  readonly cipher: string | undefined;
  /** Whether the server's certificate chain was verified. */
  readonly verified: boolean;
}
