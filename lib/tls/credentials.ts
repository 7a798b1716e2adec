/**
 * Gathering what a TLS handshake trusts and presents: the CA, the client
 * certificate and key (`tlsCertificates`, `caCerts`, `tlsClientCert`,
 * `tlsClientKey`), and refusing before any traffic what the built-in TLS
 * cannot do.
 *
 * @module
 */

import type { TlsOptions } from "../connect_options.ts";
import { errorText } from "../errors.ts";
import { NbdTlsError } from "./error.ts";

/** Certificates in PEM, as read from the options and the directory. */
export interface TlsCredentials {
  /** CA certificates to trust instead of the system's; absent for the system's. */
  ca?: string[];
  /** Client certificate chain, for servers that ask for one. */
  cert?: string;
  /** Private key of {@linkcode TlsCredentials.cert}. */
  key?: string;
}

/**
 * Gathers the PEM text that the TLS handshake needs.
 *
 * `tlsCertificates` names a directory in the layout qemu, nbdkit and libnbd
 * use: `ca-cert.pem` (the CA that signed the server's certificate) and, for
 * servers that verify clients, `client-cert.pem` with `client-key.pem`.
 * `caCerts` adds CA certificates to those; `tlsClientCert` and
 * `tlsClientKey` take precedence over the directory's pair. With no CA at
 * all, the default root store is used, as libnbd falls back to the system's.
 *
 * @param options The TLS settings.
 * @returns The certificates; a field is absent when nothing provides it.
 * @throws {NbdTlsError} when the directory or a file in it cannot be read,
 *   when a directory has `ca-crl.pem` (revocation lists are not supported
 *   by Deno's TLS, and ignoring one would trust revoked certificates), or
 *   when a client certificate comes without its key, or a key without its
 *   certificate.
 *
 * @example
 * ```ts
 * import { loadTlsCredentials } from "@nbd/client";
 *
 * const credentials = await loadTlsCredentials({
 *   caCerts: ["-----BEGIN CERTIFICATE-----\n..."],
 * });
 * console.log(credentials.ca?.length); // 1
 * ```
 */
export async function loadTlsCredentials(
  options: TlsOptions,
): Promise<TlsCredentials> {
  const { crl: _, ...credentials } = await readTlsFiles(options, false);
  return credentials;
}

/** {@linkcode TlsCredentials} plus the directory's revocation list. */
export interface TlsFiles extends TlsCredentials {
  /** `ca-crl.pem` of `tlsCertificates`, PEM. */
  crl?: string;
}

/**
 * Reads what {@linkcode loadTlsCredentials} describes; with `crlSupported`
 * a `ca-crl.pem` is returned instead of refused, for an engine that checks
 * revocation (GnuTLS).
 */
export async function readTlsFiles(
  options: TlsOptions,
  crlSupported: boolean,
): Promise<TlsFiles> {
  const ca: string[] = [...(options.caCerts ?? [])];
  let cert = options.tlsClientCert;
  let key = options.tlsClientKey;
  let crl: string | undefined;
  const dir = options.tlsCertificates;
  if (dir !== undefined) {
    let info: Deno.FileInfo;
    try {
      info = await Deno.stat(dir);
    } catch (e) {
      throw new NbdTlsError(
        `Cannot use TLS certificates directory "${dir}": ${errorText(e)}`,
        { cause: e },
      );
    }
    if (!info.isDirectory) {
      throw new NbdTlsError(
        `TLS certificates directory "${dir}" is not a directory`,
      );
    }
    crl = await readOptional(dir, "ca-crl.pem");
    if (crl !== undefined && !crlSupported) {
      throw new NbdTlsError(
        `TLS certificates directory "${dir}" has ca-crl.pem, but certificate revocation lists are not supported by Deno's TLS; remove it to go on without revocation checks, or run with --allow-ffi and pass tlsEngine: gnutls from @nbd/client/ffi, which checks it`,
      );
    }
    const dirCa = await readOptional(dir, "ca-cert.pem");
    if (dirCa !== undefined) ca.push(dirCa);
    if (cert === undefined && key === undefined) {
      const dirCert = await readOptional(dir, "client-cert.pem");
      const dirKey = await readOptional(dir, "client-key.pem");
      if ((dirCert === undefined) !== (dirKey === undefined)) {
        const [has, lacks] = dirCert === undefined
          ? ["client-key.pem", "client-cert.pem"]
          : ["client-cert.pem", "client-key.pem"];
        throw new NbdTlsError(
          `TLS certificates directory "${dir}" has ${has} but no ${lacks}`,
        );
      }
      cert = dirCert;
      key = dirKey;
    }
  }
  if ((cert === undefined) !== (key === undefined)) {
    throw new NbdTlsError(
      cert === undefined
        ? "tlsClientKey was given without tlsClientCert"
        : "tlsClientCert was given without tlsClientKey",
    );
  }
  const out: TlsFiles = crl === undefined ? {} : { crl };
  if (ca.length > 0) out.ca = ca;
  if (cert !== undefined && key !== undefined) {
    out.cert = cert;
    out.key = key;
  }
  return out;
}

async function readOptional(
  dir: string,
  name: string,
): Promise<string | undefined> {
  const file = `${dir.replace(/\/+$/, "")}/${name}`;
  try {
    return await Deno.readTextFile(file);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new NbdTlsError(`Cannot read "${file}": ${errorText(e)}`, {
      cause: e,
    });
  }
}
