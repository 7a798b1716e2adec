/**
 * The GnuTLS engine: `connect(uri, { tlsEngine: gnutls })`. GnuTLS is what
 * libnbd, qemu and nbdkit use for NBD's TLS, and what every Debian and
 * Ubuntu machine has; through it the client trusts exactly what libnbd
 * trusts (the CA of `tlsCertificates` or `caCerts` only, else the system's),
 * checks a revocation list (`ca-crl.pem`), presents a client certificate,
 * and does TLS-PSK (`tlsPskFile`, `tlsUsername`).
 *
 * @module
 */

import type { ConnectTarget } from "../../lib/connect_options.ts";
import { errorText } from "../../lib/errors.ts";
import { readTlsFiles } from "../../lib/tls/credentials.ts";
import type { TlsEngine } from "../../lib/connect_options.ts";
import { NbdTlsError } from "../../lib/tls/error.ts";
import type { TlsStream } from "../../lib/tls/stream.ts";
import type { UpgradeOptions } from "../../lib/tls/upgrade.ts";
import type { ByteStream } from "../../lib/transport.ts";
import { FdStream } from "../_fd_stream.ts";
import { libc, O_CLOEXEC, O_RDONLY } from "../_libc.ts";
import { connectSocket } from "../_socket.ts";
import {
  cString,
  datum,
  GNUTLS_CLIENT,
  GNUTLS_CRD_CERTIFICATE,
  GNUTLS_CRD_PSK,
  GNUTLS_NAME_DNS,
  GNUTLS_PSK_KEY_HEX,
  GNUTLS_X509_FMT_PEM,
  gnutlsLib,
  outPointer,
  strerror,
} from "./_lib.ts";
import { findPskKey } from "./psk.ts";
import { GnutlsStream, type SessionParts } from "./stream.ts";

/** libnbd's and qemu's priority for PSK: GnuTLS's default plus the PSK key exchanges. */
const PSK_PRIORITY = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

/**
 * The same with ChaCha20 after AES-128-GCM, for CPUs with AES instructions.
 * A TLS 1.3 external PSK is bound to SHA-256, which rules out AES-256-GCM
 * (SHA-384), so GnuTLS's default order falls to ChaCha20-Poly1305, measured
 * at a quarter of AES-128-GCM's throughput where AES is in hardware.
 */
const PSK_PRIORITY_AES =
  "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305:+ECDHE-PSK:+DHE-PSK:+PSK";

let aesInHardware: boolean | undefined;

/**
 * Whether the CPU has AES instructions (x86's `aes` flag, arm64's `aes`
 * feature), from the first processor of /proc/cpuinfo. Read through libc:
 * Deno grants that file only to `--allow-all`, and this engine runs with
 * `--allow-ffi` anyway.
 */
function hasAes(): boolean {
  if (aesInHardware !== undefined) return aesInHardware;
  aesInHardware = false;
  const c = libc();
  const fd = c.open(cString("/proc/cpuinfo"), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return aesInHardware;
  try {
    // The first processor's block is a few KiB; its flags are enough.
    const buf = new Uint8Array(16 * 1024);
    const n = Number(c.read(fd, buf, BigInt(buf.length)));
    if (n > 0) {
      const text = new TextDecoder().decode(buf.subarray(0, n));
      aesInHardware = /^(?:flags|Features)\s*:.*\baes\b/m.test(text);
    }
  } finally {
    c.close(fd);
  }
  return aesInHardware;
}

/**
 * GnuTLS (`libgnutls.so.30`) through FFI, as a `tlsEngine` for
 * `connect()`, `probe()` and the other entry points. Needs `--allow-ffi`.
 *
 * With it, `connect()` dials TLS connections with a libc socket of its own
 * and, after `NBD_OPT_STARTTLS`, runs GnuTLS over that descriptor. A
 * connection it did not dial (a server `command`) falls back to the
 * built-in TLS, except for TLS-PSK, which is then refused.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { gnutls } from "@nbd/client/ffi";
 *
 * await using nbd = await connect(
 *   "nbds://localhost/disk?tls-psk-file=/etc/nbd/keys.psk&tls-username=alice",
 *   { tlsEngine: gnutls },
 * );
 * const block = new Uint8Array(4096);
 * await nbd.read(0, block);
 * ```
 */
export const gnutls: TlsEngine = Object.freeze({
  name: "gnutls",
  psk: true,
  dial,
  upgrade,
});

/**
 * {@linkcode gnutls} when this process may use FFI (`--allow-ffi`) and
 * GnuTLS loads, else `undefined`: what a tool passes as `tlsEngine` so that
 * it runs with and without `--allow-ffi`.
 *
 * @returns The engine, or `undefined` without FFI or without the library.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { gnutlsIfAllowed } from "@nbd/client/ffi";
 *
 * const tlsEngine = gnutlsIfAllowed();
 * await using nbd = await connect("nbds://localhost/", {
 *   ...(tlsEngine ? { tlsEngine } : {}),
 * });
 * ```
 */
export function gnutlsIfAllowed(): TlsEngine | undefined {
  if (Deno.build.os !== "linux") return undefined;
  try {
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") {
      return undefined;
    }
    gnutlsLib();
    return gnutls;
  } catch {
    return undefined;
  }
}

async function dial(
  target: ConnectTarget,
  signal?: AbortSignal,
): Promise<ByteStream> {
  gnutlsLib();
  const fd = await connectSocket(target, signal ? { signal } : {});
  return new FdStream(fd);
}

async function upgrade(
  stream: ByteStream,
  options: UpgradeOptions,
): Promise<TlsStream | undefined> {
  if (!(stream instanceof FdStream) || stream.closed) return undefined;
  const parts = await sessionFor(options);
  let fd: number;
  try {
    fd = stream.release();
  } catch (e) {
    gnutlsLib().gnutls_deinit(parts.session);
    parts.freeCredentials();
    throw e;
  }
  const secure = new GnutlsStream(fd, parts);
  // The handshake's caller still holds the raw stream and closes it on a
  // deadline or an abort (the connect timeout, the kernel handoff's own):
  // that close must now end the session, or its poll would wait on.
  Object.defineProperty(stream, "close", {
    value: () => secure.close(),
    configurable: true,
  });
  await secure.handshake(options.signal);
  return secure;
}

/** Reads the credentials and sets up a client session that uses them. */
async function sessionFor(options: UpgradeOptions): Promise<SessionParts> {
  const g = gnutlsLib();
  const name = options.tlsHostname ?? options.hostname;
  const psk = options.tlsPskFile !== undefined;
  const verify = !psk && options.tlsVerifyPeer !== false;
  const credentials = psk
    ? await pskCredentials(options.tlsPskFile!, options.tlsUsername)
    : await certificateCredentials(options);
  const slot = new BigUint64Array(1);
  check(g.gnutls_init(slot, GNUTLS_CLIENT), "gnutls_init");
  const session = outPointer(slot);
  const pinned: Uint8Array[] = [];
  try {
    if (psk) {
      check(
        g.gnutls_priority_set_direct(
          session,
          cString(hasAes() ? PSK_PRIORITY_AES : PSK_PRIORITY),
          null,
        ),
        "gnutls_priority_set_direct",
      );
    } else {
      check(
        g.gnutls_set_default_priority(session),
        "gnutls_set_default_priority",
      );
    }
    check(
      g.gnutls_credentials_set(
        session,
        psk ? GNUTLS_CRD_PSK : GNUTLS_CRD_CERTIFICATE,
        credentials.pointer,
      ),
      "gnutls_credentials_set",
    );
    // SNI carries host names only, never addresses (RFC 6066).
    if (name !== undefined && !isIpAddress(name)) {
      const bytes = new TextEncoder().encode(name);
      check(
        g.gnutls_server_name_set(
          session,
          GNUTLS_NAME_DNS,
          bytes,
          BigInt(bytes.length),
        ),
        "gnutls_server_name_set",
      );
    }
    if (verify) {
      // Chain always; the name when there is one (an address is matched
      // against the certificate's IP addresses). GnuTLS keeps the name's
      // pointer, not a copy: the session's parts hold the bytes.
      const checked = name === undefined ? null : cString(name);
      if (checked !== null) pinned.push(checked);
      g.gnutls_session_set_verify_cert(session, checked, 0);
    }
  } catch (e) {
    g.gnutls_deinit(session);
    credentials.free();
    throw e;
  }
  return {
    session,
    freeCredentials: credentials.free,
    name,
    sentCertificate: credentials.sentCertificate,
    verify,
    psk,
    pinned,
  };
}

interface Credentials {
  pointer: Deno.PointerValue;
  free: () => void;
  sentCertificate: boolean;
}

async function certificateCredentials(
  options: UpgradeOptions,
): Promise<Credentials> {
  const files = await readTlsFiles(options, true);
  const g = gnutlsLib();
  const slot = new BigUint64Array(1);
  check(
    g.gnutls_certificate_allocate_credentials(slot),
    "gnutls_certificate_allocate_credentials",
  );
  const pointer = outPointer(slot);
  const free = once(() => g.gnutls_certificate_free_credentials(pointer));
  try {
    if (options.tlsVerifyPeer !== false) {
      if (files.ca !== undefined) {
        for (const pem of files.ca) {
          const bytes = pemBytes(pem);
          const n = g.gnutls_certificate_set_x509_trust_mem(
            pointer,
            datum(bytes),
            GNUTLS_X509_FMT_PEM,
          );
          if (n <= 0) {
            throw new NbdTlsError(
              `Cannot use the CA certificate${
                options.tlsCertificates !== undefined
                  ? ` of "${options.tlsCertificates}"`
                  : " of caCerts"
              }: ${n < 0 ? `GnuTLS: ${strerror(n)}` : "no certificate in it"}`,
            );
          }
        }
      } else {
        // No CA of one's own: the system's roots, as libnbd does.
        const n = g.gnutls_certificate_set_x509_system_trust(pointer);
        if (n < 0) {
          throw new NbdTlsError(
            `Cannot load the system's CA certificates: GnuTLS: ${strerror(n)}`,
          );
        }
      }
      if (files.crl !== undefined) {
        const bytes = pemBytes(files.crl);
        const n = g.gnutls_certificate_set_x509_crl_mem(
          pointer,
          datum(bytes),
          GNUTLS_X509_FMT_PEM,
        );
        if (n < 0) {
          throw new NbdTlsError(
            `Cannot use the revocation list ca-crl.pem of "${options.tlsCertificates}": GnuTLS: ${
              strerror(n)
            }`,
          );
        }
      }
    }
    if (files.cert !== undefined && files.key !== undefined) {
      const cert = pemBytes(files.cert);
      const key = pemBytes(files.key);
      const rc = g.gnutls_certificate_set_x509_key_mem(
        pointer,
        datum(cert),
        datum(key),
        GNUTLS_X509_FMT_PEM,
      );
      if (rc < 0) {
        throw new NbdTlsError(
          `Cannot use the client certificate and key: GnuTLS: ${strerror(rc)}`,
        );
      }
    }
  } catch (e) {
    free();
    throw e;
  }
  return { pointer, free, sentCertificate: files.cert !== undefined };
}

async function pskCredentials(
  file: string,
  username: string | undefined,
): Promise<Credentials> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (e) {
    throw new NbdTlsError(
      `Cannot read TLS-PSK file "${file}": ${errorText(e)}`,
      { cause: e },
    );
  }
  const key = findPskKey(text, username ?? loginName(), file);
  const g = gnutlsLib();
  const slot = new BigUint64Array(1);
  check(
    g.gnutls_psk_allocate_client_credentials(slot),
    "gnutls_psk_allocate_client_credentials",
  );
  const pointer = outPointer(slot);
  const free = once(() => g.gnutls_psk_free_client_credentials(pointer));
  const hex = new TextEncoder().encode(key.hexKey) as Uint8Array<ArrayBuffer>;
  const rc = g.gnutls_psk_set_client_credentials(
    pointer,
    cString(key.username),
    datum(hex),
    GNUTLS_PSK_KEY_HEX,
  );
  if (rc < 0) {
    free();
    throw new NbdTlsError(
      `Cannot use the key of "${key.username}" in TLS-PSK file "${file}": GnuTLS: ${
        strerror(rc)
      }`,
    );
  }
  return { pointer, free, sentCertificate: false };
}

/** libnbd's default PSK user: the login name. */
function loginName(): string {
  let name: string | undefined;
  try {
    name = Deno.env.get("USER") ?? Deno.env.get("LOGNAME");
  } catch {
    // No --allow-env: say what to set instead.
  }
  if (!name) {
    throw new NbdTlsError(
      "TLS-PSK needs a user name: set tlsUsername (tls-username=); the login name ($USER) is not available",
    );
  }
  return name;
}

function pemBytes(pem: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(pem) as Uint8Array<ArrayBuffer>;
}

function check(rc: number, call: string): void {
  if (rc < 0) throw new NbdTlsError(`${call} failed: GnuTLS: ${strerror(rc)}`);
}

function once(f: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    f();
  };
}

function isIpAddress(name: string): boolean {
  return /^[0-9.]+$/.test(name) || name.includes(":");
}
