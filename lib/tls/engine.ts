/**
 * A TLS engine other than the built-in ones, handed to `connect()` as
 * `tlsEngine` (GnuTLS through FFI: `import { gnutls } from
 * "@nbd/client/ffi"`). The core library only knows this shape, so a
 * program that never passes an engine never loads FFI. The shape lives
 * with the options that carry it (`connect_options.ts`), so that the
 * options' types import nothing that imports them back.
 *
 * @module
 */

export type { TlsEngine } from "../connect_options.ts";
