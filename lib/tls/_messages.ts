/**
 * What every TLS engine says the same way: a certificate check that failed,
 * in words that say how to fix it, and the hint for a server that hangs up
 * right after the handshake.
 *
 * @module
 */

import { errorText, NbdConnectionClosedError } from "../errors.ts";
import { NbdTlsError } from "./error.ts";

/**
 * rustls's words for a failed verification, as the codes `node:tls` gives
 * (and {@linkcode explain} explains), so both paths fail alike.
 */
export function rustlsCode(message: string): string | undefined {
  if (/UnknownIssuer|BadSignature|unknown issuer/i.test(message)) {
    return "UNABLE_TO_VERIFY_LEAF_SIGNATURE";
  }
  if (/NotValidForName|not valid for name/i.test(message)) {
    return "ERR_TLS_CERT_ALTNAME_INVALID";
  }
  if (/Expired/i.test(message)) return "CERT_HAS_EXPIRED";
  if (/NotValidYet/i.test(message)) return "CERT_NOT_YET_VALID";
  return undefined;
}

/** Why a server might hang up on a client that sent no certificate. */
export const REQUIRE_CERT_HINT =
  "it may require a client certificate (give tlsCertificates with client-cert.pem and client-key.pem, or tlsClientCert and tlsClientKey)";

/** A failed `Deno.startTls` handshake, in the words `node:tls`'s would get. */
export function handshakeError(e: unknown, name: string): NbdTlsError {
  const detail = errorText(e);
  const code = rustlsCode(detail);
  const meaning = explain(code, name);
  return new NbdTlsError(
    `TLS handshake with ${name} failed: ${
      meaning ? `${meaning} (${detail})` : detail
    }`,
    { cause: e, ...(code ? { code } : {}) },
  );
}

/** Says in words what a certificate verification code means. */
export function explain(
  code: string | undefined,
  name: string | undefined,
): string {
  switch (code) {
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
    case "SELF_SIGNED_CERT_IN_CHAIN":
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
    case "CERT_UNTRUSTED":
    case "CERT_SIGNATURE_FAILURE":
      return "the server's certificate is not signed by a trusted CA; give the CA with tlsCertificates (ca-cert.pem) or caCerts";
    case "ERR_TLS_CERT_ALTNAME_INVALID":
      return `the server's certificate is not valid for the name "${name}"; set tlsHostname to a name the certificate carries`;
    case "CERT_HAS_EXPIRED":
      return "the server's certificate has expired";
    case "CERT_NOT_YET_VALID":
      return "the server's certificate is not valid yet";
    default:
      return "";
  }
}

export function closedError(): NbdConnectionClosedError {
  return new NbdConnectionClosedError("The TLS connection is closed");
}
