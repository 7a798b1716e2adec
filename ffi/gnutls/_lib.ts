/**
 * The few GnuTLS functions the TLS engine needs, from `libgnutls.so.30`
 * (the library apt, libnbd, qemu and nbdkit link), opened once with
 * `Deno.dlopen`, plus the constants of `gnutls/gnutls.h` they take.
 *
 * Every call is synchronous: the socket is non-blocking, so a call
 * returns `GNUTLS_E_AGAIN` instead of waiting, and the wait happens in a
 * `poll()` on Deno's thread pool. The records are decrypted on the calling
 * thread, as Deno's own TLS does.
 *
 * @module
 */

import { NbdError } from "../../lib/errors.ts";
import { openLibrary } from "../_dlopen.ts";

const SYMBOLS = {
  gnutls_global_init: { parameters: [], result: "i32" },
  gnutls_certificate_allocate_credentials: {
    parameters: ["buffer"],
    result: "i32",
  },
  gnutls_certificate_free_credentials: {
    parameters: ["pointer"],
    result: "void",
  },
  gnutls_certificate_set_x509_system_trust: {
    parameters: ["pointer"],
    result: "i32",
  },
  gnutls_certificate_set_x509_trust_mem: {
    parameters: ["pointer", "buffer", "i32"],
    result: "i32",
  },
  gnutls_certificate_set_x509_key_mem: {
    parameters: ["pointer", "buffer", "buffer", "i32"],
    result: "i32",
  },
  gnutls_certificate_set_x509_crl_mem: {
    parameters: ["pointer", "buffer", "i32"],
    result: "i32",
  },
  gnutls_psk_allocate_client_credentials: {
    parameters: ["buffer"],
    result: "i32",
  },
  gnutls_psk_free_client_credentials: {
    parameters: ["pointer"],
    result: "void",
  },
  gnutls_psk_set_client_credentials: {
    parameters: ["pointer", "buffer", "buffer", "i32"],
    result: "i32",
  },
  gnutls_init: { parameters: ["buffer", "u32"], result: "i32" },
  gnutls_deinit: { parameters: ["pointer"], result: "void" },
  gnutls_set_default_priority: { parameters: ["pointer"], result: "i32" },
  gnutls_priority_set_direct: {
    parameters: ["pointer", "buffer", "buffer"],
    result: "i32",
  },
  gnutls_credentials_set: {
    parameters: ["pointer", "i32", "pointer"],
    result: "i32",
  },
  gnutls_server_name_set: {
    parameters: ["pointer", "i32", "buffer", "usize"],
    result: "i32",
  },
  gnutls_session_set_verify_cert: {
    parameters: ["pointer", "buffer", "u32"],
    result: "void",
  },
  gnutls_session_get_verify_cert_status: {
    parameters: ["pointer"],
    result: "u32",
  },
  gnutls_certificate_verification_status_print: {
    parameters: ["u32", "i32", "buffer", "u32"],
    result: "i32",
  },
  gnutls_transport_set_int2: {
    parameters: ["pointer", "i32", "i32"],
    result: "void",
  },
  gnutls_handshake: { parameters: ["pointer"], result: "i32" },
  gnutls_record_get_direction: { parameters: ["pointer"], result: "i32" },
  gnutls_record_recv: {
    parameters: ["pointer", "buffer", "usize"],
    result: "isize",
  },
  gnutls_record_send: {
    parameters: ["pointer", "buffer", "usize"],
    result: "isize",
  },
  gnutls_bye: { parameters: ["pointer", "i32"], result: "i32" },
  gnutls_error_is_fatal: { parameters: ["i32"], result: "i32" },
  gnutls_strerror: { parameters: ["i32"], result: "pointer" },
  gnutls_strerror_name: { parameters: ["i32"], result: "pointer" },
  gnutls_alert_get: { parameters: ["pointer"], result: "i32" },
  gnutls_alert_get_name: { parameters: ["i32"], result: "pointer" },
  gnutls_protocol_get_version: { parameters: ["pointer"], result: "i32" },
  gnutls_protocol_get_name: { parameters: ["i32"], result: "pointer" },
  gnutls_cipher_get: { parameters: ["pointer"], result: "i32" },
  gnutls_cipher_get_name: { parameters: ["i32"], result: "pointer" },
  /** `gnutls_free` is a variable holding the library's `free()`. */
  gnutls_free: { type: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The opened library's symbols. */
export type GnuTls = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/** The file name every Debian and Ubuntu release since 2014 ships. */
export const LIBRARY = "libgnutls.so.30";

/**
 * Opens GnuTLS on first use.
 *
 * @throws {NbdError} without `--allow-ffi`, or when the library is missing.
 */
export function gnutlsLib(): GnuTls {
  if (lib) return lib.symbols;
  lib = openLibrary(
    LIBRARY,
    SYMBOLS,
    "The GnuTLS engine",
    "libgnutls",
    `Cannot open ${LIBRARY} for the GnuTLS engine (install libgnutls30)`,
  );
  const rc = lib.symbols.gnutls_global_init();
  if (rc < 0) {
    throw new NbdError(`gnutls_global_init failed: ${strerror(rc)}`);
  }
  return lib.symbols;
}

/** A C string the library returned, or `""`. */
export function cText(p: Deno.PointerValue): string {
  return p === null ? "" : new Deno.UnsafePointerView(p).getCString();
}

/** GnuTLS's own words for an error code, e.g. "The TLS connection was non-properly terminated." */
export function strerror(code: number): string {
  return cText(gnutlsLib().gnutls_strerror(code));
}

/** The error code's name, e.g. `"GNUTLS_E_PREMATURE_TERMINATION"`. */
export function errorName(code: number): string {
  return cText(gnutlsLib().gnutls_strerror_name(code));
}

/** Frees memory GnuTLS allocated for the caller. */
export function gnutlsFree(p: Deno.PointerValue): void {
  if (p === null) return;
  const slot = gnutlsLib().gnutls_free;
  const fn = slot === null
    ? null
    : new Deno.UnsafePointerView(slot).getPointer<typeof FREE>(0);
  if (fn === null) return;
  new Deno.UnsafeFnPointer(fn, FREE).call(p);
}

const FREE = { parameters: ["pointer"], result: "void" } as const;

/** A NUL-terminated copy of a string, for a `const char *` parameter. */
export { cString } from "../_libc.ts";

/**
 * A `gnutls_datum_t` (`{ unsigned char *data; unsigned int size; }`) over
 * `bytes`; `bytes` must stay referenced until the call returns.
 */
export function datum(bytes: Uint8Array<ArrayBuffer>): Uint8Array<ArrayBuffer> {
  const d = new Uint8Array(16);
  const view = new DataView(d.buffer);
  view.setBigUint64(
    0,
    BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))),
    true,
  );
  view.setUint32(8, bytes.length, true);
  return d;
}

/** The pointer an out-parameter (`gnutls_session_t *` and alike) received. */
export function outPointer(
  slot: BigUint64Array<ArrayBuffer>,
): Deno.PointerValue {
  return Deno.UnsafePointer.create(slot[0]!);
}

// From gnutls/gnutls.h.
export const GNUTLS_CLIENT = 1 << 1;
export const GNUTLS_NONBLOCK = 1 << 3;
export const GNUTLS_CRD_CERTIFICATE = 1;
export const GNUTLS_CRD_PSK = 4;
export const GNUTLS_X509_FMT_PEM = 1;
export const GNUTLS_PSK_KEY_HEX = 1;
export const GNUTLS_NAME_DNS = 1;
export const GNUTLS_SHUT_WR = 1;
export const GNUTLS_CRT_X509 = 1;
export const GNUTLS_E_AGAIN = -28;
export const GNUTLS_E_INTERRUPTED = -52;
export const GNUTLS_E_FATAL_ALERT_RECEIVED = -12;
export const GNUTLS_E_WARNING_ALERT_RECEIVED = -16;
export const GNUTLS_E_PREMATURE_TERMINATION = -110;
export const GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR = -348;
export const GNUTLS_CERT_INVALID = 1 << 1;
export const GNUTLS_CERT_REVOKED = 1 << 5;
export const GNUTLS_CERT_SIGNER_NOT_FOUND = 1 << 6;
export const GNUTLS_CERT_SIGNER_NOT_CA = 1 << 7;
export const GNUTLS_CERT_NOT_ACTIVATED = 1 << 9;
export const GNUTLS_CERT_EXPIRED = 1 << 10;
export const GNUTLS_CERT_UNEXPECTED_OWNER = 1 << 14;
