/**
 * The `Deno.startTls` path: TCP, the server verified against the system's
 * roots, no client certificate. rustls in Deno's own I/O.
 *
 * @module
 */

import { abortReason, errorText } from "../errors.ts";
import type { TlsCredentials } from "./credentials.ts";
import { NbdTlsError } from "./error.ts";
import type { TlsStream } from "./stream.ts";
import { closedError, handshakeError, REQUIRE_CERT_HINT } from "./_messages.ts";

/**
 * A `Deno.startTls` session: TCP, the server verified, no client
 * certificate. Reads and writes go straight to Deno's TLS connection.
 */
export class DenoTlsStream implements TlsStream {
  readonly protocol: string | undefined = undefined;
  readonly cipher: string | undefined = undefined;
  readonly verified = true;
  #conn: Deno.TlsConn;
  #name: string;
  #received = false;
  #closed = false;

  private constructor(conn: Deno.TlsConn, name: string) {
    this.#conn = conn;
    this.#name = name;
  }

  /**
   * Runs the handshake over `tcp`, which it takes over (and closes on
   * failure).
   *
   * @throws {NbdTlsError} when the handshake fails.
   * @throws {Error} the signal's reason when `signal` aborts.
   */
  static async start(
    tcp: Deno.TcpConn,
    name: string,
    credentials: TlsCredentials,
    signal: AbortSignal | undefined,
  ): Promise<DenoTlsStream> {
    let conn: Deno.TlsConn;
    try {
      conn = await Deno.startTls(tcp, {
        hostname: name,
        ...(credentials.ca ? { caCerts: credentials.ca } : {}),
      });
    } catch (e) {
      try {
        tcp.close();
      } catch {
        // Already closed.
      }
      throw handshakeError(e, name);
    }
    const onAbort = () => {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await conn.handshake();
    } catch (e) {
      onAbort();
      if (signal?.aborted) throw abortReason(signal);
      throw handshakeError(e, name);
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    if (signal?.aborted) {
      onAbort();
      throw abortReason(signal);
    }
    return new DenoTlsStream(conn, name);
  }

  /**
   * Reads decrypted bytes into `p`.
   *
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) throw closedError();
    let n: number | null;
    try {
      n = await this.#conn.read(p);
    } catch (e) {
      throw this.#error(e);
    }
    // Closed while the read waited: that read fails, as on the other path.
    if (this.#closed) throw closedError();
    if (n === null && !this.#received) {
      throw new NbdTlsError(
        `The server closed the TLS connection right after the handshake, before sending anything; ${REQUIRE_CERT_HINT}`,
      );
    }
    if (n !== null) this.#received = true;
    return n;
  }

  /**
   * Encrypts and sends a prefix of `p`.
   *
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async write(p: Uint8Array): Promise<number> {
    if (this.#closed) throw closedError();
    let n: number;
    try {
      n = await this.#conn.write(p);
    } catch (e) {
      throw this.#error(e);
    }
    if (this.#closed) throw closedError();
    return n;
  }

  /** Closes the TLS session and the TCP connection under it. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }

  #error(e: unknown): Error {
    if (this.#closed) return closedError();
    const detail = errorText(e);
    const hint = this.#received ? "" : `; ${REQUIRE_CERT_HINT}`;
    return new NbdTlsError(
      `TLS connection to ${this.#name} failed${
        this.#received ? "" : " right after the handshake"
      }: ${detail}${hint}`,
      { cause: e },
    );
  }
}
