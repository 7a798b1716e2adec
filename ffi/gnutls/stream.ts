/**
 * A GnuTLS session over a socket descriptor, as the library's
 * {@linkcode TlsStream}: the handshake, then records read straight into the
 * caller's buffer.
 *
 * The socket is non-blocking and every GnuTLS call synchronous: a call
 * that would wait returns `GNUTLS_E_AGAIN`, and the wait is a `poll()` on
 * Deno's thread pool, so the event loop stays free. A read takes every
 * record already there in one go (GnuTLS returns one record per call), so
 * a 256 KiB reply is one wait and sixteen cheap calls, not sixteen waits.
 *
 * @module
 */

import { abortReason, NbdConnectionClosedError } from "../../lib/errors.ts";
import { NbdTlsError } from "../../lib/tls/error.ts";
import type { TlsStream } from "../../lib/tls/stream.ts";
import { explain, REQUIRE_CERT_HINT } from "../../lib/tls/_messages.ts";
import {
  F_GETFL,
  F_SETFL,
  libc,
  O_NONBLOCK,
  POLLIN,
  POLLOUT,
  SHUT_RDWR,
} from "../_libc.ts";
import {
  cText,
  errorName,
  GNUTLS_CERT_EXPIRED,
  GNUTLS_CERT_NOT_ACTIVATED,
  GNUTLS_CERT_REVOKED,
  GNUTLS_CERT_SIGNER_NOT_CA,
  GNUTLS_CERT_SIGNER_NOT_FOUND,
  GNUTLS_CERT_UNEXPECTED_OWNER,
  GNUTLS_CRT_X509,
  GNUTLS_E_AGAIN,
  GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR,
  GNUTLS_E_FATAL_ALERT_RECEIVED,
  GNUTLS_E_INTERRUPTED,
  GNUTLS_E_PREMATURE_TERMINATION,
  GNUTLS_SHUT_WR,
  gnutlsFree,
  gnutlsLib,
  strerror,
} from "./_lib.ts";

/** What the session was set up with, to free on close and to explain failures. */
export interface SessionParts {
  /** The `gnutls_session_t`. */
  session: Deno.PointerValue;
  /** Frees the credentials the session uses (after `gnutls_deinit`). */
  freeCredentials: () => void;
  /** The name the certificate was checked against, for messages. */
  name: string | undefined;
  /** Whether a client certificate was configured. */
  sentCertificate: boolean;
  /** Whether the server's certificate is verified (false for PSK too). */
  verify: boolean;
  /** Whether the session authenticates with a pre-shared key. */
  psk: boolean;
  /**
   * Memory GnuTLS keeps a pointer to for the session's life (the name
   * `gnutls_session_set_verify_cert` checks, which it does not copy): held
   * here so the collector cannot free it under the handshake.
   */
  pinned: Uint8Array[];
}

/**
 * The encrypted stream of the GnuTLS engine. Reads and writes may run at
 * once; `close()` wakes both.
 */
export class GnutlsStream implements TlsStream {
  #fd: number;
  #parts: SessionParts;
  #session: Deno.PointerValue;
  #closed = false;
  #pending = 0;
  #secure = false;
  #received = false;
  #protocol: string | undefined;
  #cipher: string | undefined;
  #pollIn = pollFd();
  #pollOut = pollFd();

  /**
   * Takes over `fd` (a connected socket) and the session set up for it.
   *
   * @param fd The socket; the stream closes it.
   * @param parts The session and its credentials; the stream frees them.
   */
  constructor(fd: number, parts: SessionParts) {
    this.#fd = fd;
    this.#parts = parts;
    this.#session = parts.session;
    const c = libc();
    c.fcntl(fd, F_SETFL, c.fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
    gnutlsLib().gnutls_transport_set_int2(parts.session, fd, fd);
    new DataView(this.#pollIn.buffer).setInt32(0, fd, true);
    new DataView(this.#pollIn.buffer).setInt16(4, POLLIN, true);
    new DataView(this.#pollOut.buffer).setInt32(0, fd, true);
    new DataView(this.#pollOut.buffer).setInt16(4, POLLOUT, true);
  }

  /** The TLS version, e.g. `"TLSv1.3"`; kept after close. */
  get protocol(): string | undefined {
    return this.#protocol;
  }

  /** The cipher's GnuTLS name, e.g. `"AES-256-GCM"`; kept after close. */
  get cipher(): string | undefined {
    return this.#cipher;
  }

  /** Whether the server's certificate chain (and name) was verified. */
  get verified(): boolean {
    return this.#secure && this.#parts.verify;
  }

  /**
   * Runs the handshake; on failure the stream is closed.
   *
   * @param signal Abandons the handshake.
   * @throws {NbdTlsError} with GnuTLS's words when the handshake fails.
   * @throws {Error} the signal's reason when `signal` aborts.
   */
  async handshake(signal: AbortSignal | undefined): Promise<void> {
    const g = gnutlsLib();
    const onAbort = () => this.close();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        if (signal?.aborted) throw abortReason(signal);
        if (this.#closed) throw closedError();
        const rc = g.gnutls_handshake(this.#session);
        if (rc === 0) break;
        if (rc === GNUTLS_E_AGAIN || rc === GNUTLS_E_INTERRUPTED) {
          const writing = g.gnutls_record_get_direction(this.#session) === 1;
          await this.#wait(writing);
          continue;
        }
        if (g.gnutls_error_is_fatal(rc) === 0) continue;
        throw this.#handshakeError(rc);
      }
      this.#secure = true;
      const version = cText(
        g.gnutls_protocol_get_name(
          g.gnutls_protocol_get_version(this.#session),
        ),
      );
      this.#protocol = version.replace(/^TLS(?=\d)/, "TLSv") || undefined;
      this.#cipher =
        cText(g.gnutls_cipher_get_name(g.gnutls_cipher_get(this.#session))) ||
        undefined;
    } catch (e) {
      this.close();
      if (signal?.aborted) throw abortReason(signal);
      throw e;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Reads decrypted bytes into `p`: every record already received, up to
   * `p.length`.
   *
   * @param p Where the bytes go.
   * @returns How many bytes were read, or `null` at the end of the stream.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async read(p: Uint8Array): Promise<number | null> {
    if (p.length === 0) return 0;
    const g = gnutlsLib();
    const buf = p as Uint8Array<ArrayBuffer>;
    for (;;) {
      if (this.#closed) throw closedError();
      let got = 0;
      let rc = 0;
      while (got < p.length) {
        rc = Number(
          g.gnutls_record_recv(
            this.#session,
            got === 0 ? buf : buf.subarray(got),
            BigInt(p.length - got),
          ),
        );
        if (rc <= 0) break;
        got += rc;
      }
      if (got > 0) {
        this.#received = true;
        // An error after some data surfaces at the next read.
        return got;
      }
      if (rc === 0) {
        if (!this.#received) throw this.#earlyEnd();
        return null;
      }
      if (rc === GNUTLS_E_AGAIN || rc === GNUTLS_E_INTERRUPTED) {
        await this.#wait(false);
        continue;
      }
      if (g.gnutls_error_is_fatal(rc) === 0) continue;
      if (rc === GNUTLS_E_PREMATURE_TERMINATION && this.#received) return null;
      throw this.#recordError(rc);
    }
  }

  /**
   * Encrypts and sends all of `p`.
   *
   * @param p The bytes to send; may be reused once this resolves.
   * @returns `p.length`.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async write(p: Uint8Array): Promise<number> {
    const g = gnutlsLib();
    const buf = p as Uint8Array<ArrayBuffer>;
    let sent = 0;
    while (sent < p.length) {
      if (this.#closed) throw closedError();
      // After GNUTLS_E_AGAIN the same data must be offered again.
      const rest = sent === 0 ? buf : buf.subarray(sent);
      const rc = Number(
        g.gnutls_record_send(this.#session, rest, BigInt(rest.length)),
      );
      if (rc > 0) {
        sent += rc;
        continue;
      }
      if (rc === GNUTLS_E_AGAIN || rc === GNUTLS_E_INTERRUPTED) {
        await this.#wait(true);
        continue;
      }
      throw this.#recordError(rc);
    }
    return p.length;
  }

  /**
   * Sends the TLS goodbye if it can go at once, then shuts the socket down
   * (waking a read or write that waits) and frees everything once nothing
   * waits any more.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#secure) gnutlsLib().gnutls_bye(this.#session, GNUTLS_SHUT_WR);
    libc().shutdown(this.#fd, SHUT_RDWR);
    // Every GnuTLS call is synchronous, so none is running now.
    gnutlsLib().gnutls_deinit(this.#session);
    this.#parts.freeCredentials();
    if (this.#pending === 0) this.#closeFd();
  }

  async #wait(writing: boolean): Promise<void> {
    this.#pending++;
    try {
      await libc().poll(writing ? this.#pollOut : this.#pollIn, 1n, -1);
    } finally {
      this.#pending--;
      if (this.#closed && this.#pending === 0) this.#closeFd();
    }
    if (this.#closed) throw closedError();
  }

  #closeFd(): void {
    if (this.#fd < 0) return;
    libc().close(this.#fd);
    this.#fd = -1;
  }

  #who(): string {
    return this.#parts.name ?? "the server";
  }

  /** GnuTLS's words for `rc`, with the alert the server sent if it sent one. */
  #detail(rc: number): string {
    let detail = `${strerror(rc)} (${errorName(rc)})`;
    if (rc === GNUTLS_E_FATAL_ALERT_RECEIVED) {
      const g = gnutlsLib();
      const alert = cText(
        g.gnutls_alert_get_name(g.gnutls_alert_get(this.#session)),
      );
      if (alert) detail += `: the server said "${alert}"`;
    }
    return `GnuTLS: ${detail}`;
  }

  #handshakeError(rc: number): NbdTlsError {
    let code: string | undefined;
    let detail = this.#detail(rc);
    if (rc === GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      const status = gnutlsLib().gnutls_session_get_verify_cert_status(
        this.#session,
      );
      code = verifyCode(status);
      const text = statusText(status);
      if (text) detail += `; ${text}`;
    }
    const meaning = explain(code, this.#parts.name);
    const hint = this.#parts.psk
      ? "; the server may not know this user or key (tlsUsername, tlsPskFile)"
      : "";
    return new NbdTlsError(
      `TLS handshake with ${this.#who()} failed: ${
        meaning ? `${meaning} (${detail})` : detail
      }${hint}`,
      { code: code ?? errorName(rc) },
    );
  }

  #recordError(rc: number): NbdTlsError {
    const hint = this.#received ? "" : `; ${this.#rejectionHint()}`;
    return new NbdTlsError(
      `TLS connection to ${this.#who()} failed${
        this.#received ? "" : " right after the handshake"
      }: ${this.#detail(rc)}${hint}`,
      { code: errorName(rc) },
    );
  }

  #earlyEnd(): NbdTlsError {
    return new NbdTlsError(
      `The server closed the TLS connection right after the handshake, before sending anything; ${this.#rejectionHint()}`,
    );
  }

  #rejectionHint(): string {
    if (this.#parts.psk) {
      return "it may not accept this user's pre-shared key";
    }
    return this.#parts.sentCertificate
      ? "it may not trust the client certificate that was sent"
      : REQUIRE_CERT_HINT;
  }
}

/** A `struct pollfd` (fd, events, revents). */
function pollFd(): Uint8Array<ArrayBuffer> {
  return new Uint8Array(4 + 2 + 2);
}

/**
 * The verification status bits as the codes the `node:tls` path gives, so
 * that callers branch alike whichever engine ran.
 */
export function verifyCode(status: number): string | undefined {
  if (status & (GNUTLS_CERT_SIGNER_NOT_FOUND | GNUTLS_CERT_SIGNER_NOT_CA)) {
    return "UNABLE_TO_VERIFY_LEAF_SIGNATURE";
  }
  if (status & GNUTLS_CERT_REVOKED) return "CERT_REVOKED";
  if (status & GNUTLS_CERT_EXPIRED) return "CERT_HAS_EXPIRED";
  if (status & GNUTLS_CERT_NOT_ACTIVATED) return "CERT_NOT_YET_VALID";
  if (status & GNUTLS_CERT_UNEXPECTED_OWNER) {
    return "ERR_TLS_CERT_ALTNAME_INVALID";
  }
  return undefined;
}

/** GnuTLS's sentence for a verification status, e.g. "The certificate is NOT trusted. ..." */
function statusText(status: number): string {
  const out = new BigUint64Array(2);
  const rc = gnutlsLib().gnutls_certificate_verification_status_print(
    status,
    GNUTLS_CRT_X509,
    out,
    0,
  );
  if (rc < 0) return "";
  const p = Deno.UnsafePointer.create(out[0]!);
  const text = cText(p).trim();
  gnutlsFree(p);
  return text;
}

function closedError(): NbdConnectionClosedError {
  return new NbdConnectionClosedError("The TLS connection is closed");
}
