/**
 * The error every TLS failure becomes, whichever TLS library was under it.
 *
 * @module
 */

import { NbdError } from "../errors.ts";

/**
 * TLS failed: certificate files could not be read, the server's certificate
 * was not trusted or does not match the expected name, the server rejected
 * ours, or the TLS layer broke later. The message includes the TLS library's
 * own words; `code` carries its error code when it gave one.
 *
 * @example
 * ```ts
 * import { connect, NbdTlsError } from "@nbd/client";
 * try {
 *   await connect("nbds://nbd.example.com/disk?tls-certificates=/etc/pki/nbd");
 * } catch (e) {
 *   if (e instanceof NbdTlsError) console.error(e.code, e.message);
 * }
 * ```
 */
export class NbdTlsError extends NbdError {
  /**
   * The TLS library's error code, e.g. `"ERR_TLS_CERT_ALTNAME_INVALID"` or
   * `"UNABLE_TO_VERIFY_LEAF_SIGNATURE"`, if it gave one.
   */
  readonly code: string | undefined;

  /**
   * Creates the error.
   *
   * @param message What failed, with the underlying error's text.
   * @param options The underlying error (`cause`) and the TLS error code.
   */
  constructor(message: string, options?: ErrorOptions & { code?: string }) {
    super(message, options);
    this.name = "NbdTlsError";
    this.code = options?.code;
  }
}
