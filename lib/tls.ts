/**
 * TLS after `NBD_OPT_STARTTLS` (`doc/proto.md`, "TLS support"; libnbd's
 * `states-newstyle-opt-starttls.c` and `crypto.c`).
 *
 * Once the server has acknowledged `NBD_OPT_STARTTLS`, the handshake hands
 * the raw stream to {@linkcode upgradeToTls}, which runs the TLS handshake
 * over it and returns an encrypted {@linkcode ByteStream} to carry on with.
 *
 * Two paths, one per need. A TCP connection that sends no client
 * certificate and verifies the server against the system's roots goes
 * through `Deno.startTls`: rustls in Deno's own I/O, measured at two to
 * three times the throughput of the other path for a third of the CPU
 * (`bench/PROFILE.md`). Everything else goes through `node:tls`:
 * `Deno.startTls` takes only a `Deno.TcpConn` (no Unix socket, no descriptor
 * stream from `ffi/`), sends no client certificate (it ignores `cert` and
 * `key`), cannot turn off chain verification for `tlsVerifyPeer: false`,
 * and adds `caCerts` to the built-in roots instead of trusting only them
 * (so a CA of one's own, `tlsCertificates` or `caCerts`, would also let any
 * publicly trusted certificate for the name through). Deno's `node:tls` does all three
 * over any duplex stream, so the library adapts its own {@linkcode ByteStream}
 * into a Node `Duplex` and lets `tls.connect({ socket })` speak over it. That
 * module is loaded on first use, so clients that never need it never load
 * Node compatibility.
 *
 * @module
 */

import type { DebugHook, TlsOptions } from "./connect_options.ts";
import {
  abortReason,
  errorText,
  NbdConnectionClosedError,
  NbdError,
} from "./errors.ts";
import type { ByteStream } from "./transport.ts";

type NodeTls = typeof import("node:tls");
type NodeStream = { Duplex: typeof import("node:stream").Duplex };
type TLSSocket = import("node:tls").TLSSocket;
type Duplex = import("node:stream").Duplex;

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

/** What {@linkcode upgradeToTls} needs beyond the {@linkcode TlsOptions}. */
export interface UpgradeOptions extends TlsOptions {
  /** The TCP host name the stream was opened to; the default TLS name. */
  hostname?: string;
  /** The Unix socket path, when the stream is a Unix socket. */
  path?: string;
  /** Abandons the TLS handshake (and closes the stream) when this aborts. */
  signal?: AbortSignal;
  /** Receives a `"tls.handshake"` event once the handshake is done. */
  debug?: boolean | DebugHook;
}

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
 * Refuses, before any traffic, the kinds of TLS that Deno cannot do.
 * TLS-PSK (`tlsPskFile`, `tls-psk-file=`) needs pre-shared-key cipher suites,
 * which rustls, the TLS library under Deno, does not implement.
 *
 * @param options The TLS settings about to be used.
 * @throws {NbdTlsError} when `tlsPskFile` is set.
 *
 * @example
 * ```ts
 * import { refuseUnsupportedTls } from "@nbd/client";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => refuseUnsupportedTls({ tlsPskFile: "keys.psk" }), /TLS-PSK/);
 * ```
 */
export function refuseUnsupportedTls(options: TlsOptions): void {
  if (options.tlsPskFile !== undefined) {
    throw new NbdTlsError(
      `TLS-PSK (tlsPskFile "${options.tlsPskFile}") is not supported: Deno's TLS (rustls) has no pre-shared-key cipher suites; use X.509 certificates (tlsCertificates) instead`,
    );
  }
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
  const ca: string[] = [...(options.caCerts ?? [])];
  let cert = options.tlsClientCert;
  let key = options.tlsClientKey;
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
    if (await readOptional(dir, "ca-crl.pem") !== undefined) {
      throw new NbdTlsError(
        `TLS certificates directory "${dir}" has ca-crl.pem, but certificate revocation lists are not supported by Deno's TLS; remove it to go on without revocation checks`,
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
  const out: TlsCredentials = {};
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

/**
 * Runs the TLS handshake over a stream on which the server has just
 * acknowledged `NBD_OPT_STARTTLS`, and returns the encrypted stream.
 *
 * The server's certificate chain is verified against the CA from
 * `tlsCertificates`/`caCerts` (or the default roots), and its name against
 * `tlsHostname ?? hostname`. Over a Unix socket with no `tlsHostname` there
 * is no name to compare: the chain is still verified, the name is not
 * (libnbd verifies nothing at all there; give `tlsHostname` to check the
 * name too). `tlsVerifyPeer: false` turns both checks off. A client
 * certificate is sent when one is configured (see
 * {@linkcode loadTlsCredentials}).
 *
 * With TLS 1.3 a server that rejects the client's certificate says so only
 * after the client has finished its side of the handshake, so that failure
 * surfaces at the first read of the returned stream, as an
 * {@linkcode NbdTlsError} that says so.
 *
 * @param stream The raw stream: a `Deno.TcpConn`, a `Deno.UnixConn`, or any
 *   {@linkcode ByteStream}. It belongs to the result from now on, and is
 *   closed if the handshake fails.
 * @param options TLS settings, plus the host name or socket path the stream
 *   was opened to, an abort signal and a debug hook.
 * @returns The encrypted stream; closing it closes `stream`.
 * @throws {NbdTlsError} when PSK is asked for, the certificates cannot be
 *   read, or the handshake fails (unknown CA, name mismatch, expired
 *   certificate, protocol failure); the message includes the TLS error.
 * @throws {Error} the signal's reason when `signal` aborts.
 *
 * @example
 * ```ts ignore
 * import { upgradeToTls } from "@nbd/client";
 *
 * // After sending NBD_OPT_STARTTLS over `conn` and reading NBD_REP_ACK:
 * const conn = await Deno.connect({ hostname: "nbd.example.com", port: 10809 });
 * const secure = await upgradeToTls(conn, {
 *   hostname: "nbd.example.com",
 *   tlsCertificates: "/etc/pki/nbd",
 * });
 * ```
 */
export async function upgradeToTls(
  stream: ByteStream,
  options: UpgradeOptions,
): Promise<TlsStream> {
  let owned = true;
  try {
    refuseUnsupportedTls(options);
    const signal = options.signal;
    if (signal?.aborted) throw abortReason(signal);
    const credentials = await loadTlsCredentials(options);
    const name = options.tlsHostname ?? options.hostname;
    const verify = options.tlsVerifyPeer !== false;
    // Deno.startTls only where it trusts exactly what node:tls would: it
    // adds caCerts to the built-in roots instead of trusting only them, so
    // a CA of the user's own keeps the node:tls path.
    if (
      verify && credentials.cert === undefined &&
      credentials.ca === undefined && name !== undefined && isTcpConn(stream)
    ) {
      owned = false;
      const secure = await DenoTlsStream.start(
        stream,
        name,
        credentials,
        signal,
      );
      trace(options.debug, "tls.handshake", {
        hostname: name,
        protocol: secure.protocol,
        cipher: secure.cipher,
        verified: secure.verified,
        clientCertificate: false,
      });
      return secure;
    }
    const [tls, nodeStream]: [NodeTls, NodeStream] = await Promise.all([
      import("node:tls"),
      import("node:stream"),
    ]);
    if (signal?.aborted) throw abortReason(signal);

    const socket = tls.connect({
      socket: byteStreamDuplex(stream, nodeStream),
      ...credentials,
      rejectUnauthorized: verify,
      // SNI carries host names only, never addresses (RFC 6066).
      ...(name !== undefined && !isIpAddress(name) ? { servername: name } : {}),
      checkServerIdentity: (_host, cert) =>
        verify && name !== undefined
          ? tls.checkServerIdentity(name, cert)
          : undefined,
    });
    owned = false;
    const secure = new NodeTlsStream(
      socket,
      name,
      credentials.cert !== undefined,
    );
    await secure.handshake(signal);
    trace(options.debug, "tls.handshake", {
      hostname: name,
      protocol: secure.protocol,
      cipher: secure.cipher,
      verified: secure.verified,
      clientCertificate: credentials.cert !== undefined,
    });
    return secure;
  } finally {
    if (owned) {
      // Failed before the TLS layer took the stream over: close it here.
      try {
        stream.close();
      } catch {
        // Already closed.
      }
    }
  }
}

function trace(
  debug: boolean | DebugHook | undefined,
  event: string,
  fields: Record<string, unknown>,
): void {
  if (typeof debug === "function") debug(event, fields);
}

function isIpAddress(name: string): boolean {
  return /^[0-9.]+$/.test(name) || name.includes(":");
}

// ---------------------------------------------------------------------------
// ByteStream -> Node Duplex, so that node:tls can speak over any stream.

/** Bytes read from the raw stream per call. */
const SLAB_SIZE = 256 * 1024;
/** Below this much room left in the slab, a fresh slab is started. */
const MIN_READ = 16 * 1024 + 64;

function byteStreamDuplex(
  stream: ByteStream,
  { Duplex }: NodeStream,
): Duplex {
  // Chunks handed to node:tls are views of a slab, so the slab is never
  // reused: reads go into the room after the last chunk, then a new slab.
  let slab = new Uint8Array(SLAB_SIZE);
  let used = 0;
  let reading = false;
  let closed = false;
  const duplex: Duplex = new Duplex({
    read() {
      if (reading || closed) return;
      reading = true;
      if (slab.length - used < MIN_READ) {
        slab = new Uint8Array(SLAB_SIZE);
        used = 0;
      }
      const room = slab.subarray(used);
      stream.read(room).then((n) => {
        reading = false;
        if (closed) return;
        if (n === null) {
          duplex.push(null);
          return;
        }
        used += n;
        duplex.push(room.subarray(0, n));
      }, (e) => {
        reading = false;
        if (!closed) duplex.destroy(toError(e));
      });
    },
    write(chunk: Uint8Array, _encoding, done) {
      writeAll(stream, chunk).then(() => done(), (e) => done(toError(e)));
    },
    final(done) {
      done();
    },
    destroy(error, done) {
      closed = true;
      try {
        stream.close();
      } catch {
        // Already closed by the other side.
      }
      done(error);
    },
  });
  return duplex;
}

async function writeAll(stream: ByteStream, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await stream.write(bytes.subarray(at));
}

function toError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

// ---------------------------------------------------------------------------
// Node TLSSocket -> ByteStream.

/** Pause the TLS socket when this much decrypted data waits for a reader. */
const HIGH_WATER = 1024 * 1024;

interface Waiter {
  resolve(): void;
  reject(e: Error): void;
}

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

/** A `node:tls` session over any {@linkcode ByteStream}. */
class NodeTlsStream implements TlsStream {
  #socket: TLSSocket;
  #name: string | undefined;
  #sentCertificate: boolean;
  #chunks: Uint8Array[] = [];
  #queued = 0;
  #ended = false;
  #error: Error | undefined;
  #closed = false;
  #secure = false;
  #received = false;
  #readers: Waiter[] = [];
  #writers = new Set<(e: Error) => void>();
  #handshake: Waiter | undefined;
  #protocol: string | undefined;
  #cipher: string | undefined;
  #verified = false;

  /** @internal Use {@linkcode upgradeToTls}. */
  constructor(socket: TLSSocket, name: string | undefined, sentCert: boolean) {
    this.#socket = socket;
    this.#name = name;
    this.#sentCertificate = sentCert;
    socket.on("secureConnect", () => {
      this.#secure = true;
      // Read once: the socket forgets all this when it is destroyed.
      this.#protocol = socket.getProtocol() ?? undefined;
      this.#cipher = socket.getCipher()?.standardName;
      this.#verified = socket.authorized;
      this.#handshake?.resolve();
    });
    socket.on("data", (chunk: Uint8Array) => {
      this.#received = true;
      this.#chunks.push(chunk);
      this.#queued += chunk.length;
      if (this.#queued >= HIGH_WATER) socket.pause();
      this.#wakeReaders();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#wakeReaders();
    });
    socket.on("error", (e: Error) => this.#fail(e));
    socket.on("close", () => {
      if (!this.#secure) {
        this.#fail(new Error("the server closed the connection"));
      }
      this.#ended = true;
      this.#wakeReaders();
    });
  }

  /** The TLS version, e.g. `"TLSv1.3"`; kept after close. */
  get protocol(): string | undefined {
    return this.#protocol;
  }

  /** The cipher suite's standard name; kept after close. */
  get cipher(): string | undefined {
    return this.#cipher;
  }

  /** Whether the server's certificate chain was verified; kept after close. */
  get verified(): boolean {
    return this.#verified;
  }

  /** @internal Waits for the handshake; {@linkcode upgradeToTls} calls it. */
  async handshake(signal: AbortSignal | undefined): Promise<void> {
    if (this.#secure) return;
    const onAbort = () => {
      const reason = abortReason(signal!);
      this.#handshake?.reject(reason);
      this.close();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await new Promise<void>((resolve, reject) => {
        if (this.#error) reject(this.#error);
        else this.#handshake = { resolve, reject };
      });
    } catch (e) {
      this.close();
      throw e;
    } finally {
      this.#handshake = undefined;
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Reads decrypted bytes into `p`.
   *
   * @param p Where the bytes go.
   * @returns How many bytes were read, or `null` at the end of the stream.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async read(p: Uint8Array): Promise<number | null> {
    while (true) {
      if (this.#closed) throw closedError();
      if (this.#queued > 0) return this.#take(p);
      if (this.#error) throw this.#error;
      if (this.#ended) {
        if (!this.#received) throw this.#earlyEnd();
        return null;
      }
      await new Promise<void>((resolve, reject) =>
        this.#readers.push({ resolve, reject })
      );
    }
  }

  #take(p: Uint8Array): number {
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const chunk = this.#chunks[0]!;
      const step = Math.min(chunk.length, p.length - n);
      p.set(chunk.subarray(0, step), n);
      n += step;
      if (step === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(step);
    }
    this.#queued -= n;
    if (this.#queued < HIGH_WATER && this.#socket.isPaused()) {
      this.#socket.resume();
    }
    return n;
  }

  /**
   * Encrypts and sends all of `p`; resolves once it has been handed to the
   * raw stream, so `p` may be reused after.
   *
   * @param p The bytes to send.
   * @returns `p.length`.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  write(p: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(closedError());
    if (this.#error) return Promise.reject(this.#error);
    return new Promise<number>((resolve, reject) => {
      const fail = (e: Error) => {
        this.#writers.delete(fail);
        reject(e);
      };
      this.#writers.add(fail);
      this.#socket.write(p, (e?: Error | null) => {
        if (!this.#writers.has(fail)) return;
        this.#writers.delete(fail);
        if (e) reject(this.#error ?? this.#wrap(e));
        else resolve(p.length);
      });
    });
  }

  /**
   * Closes the TLS session and the raw stream under it, without waiting for
   * the server. Reads and writes in progress fail with
   * {@linkcode NbdConnectionClosedError}.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const error = closedError();
    for (const reader of this.#readers.splice(0)) reader.reject(error);
    for (const fail of [...this.#writers]) fail(error);
    this.#chunks = [];
    this.#queued = 0;
    this.#socket.destroy();
  }

  #fail(e: Error): void {
    if (this.#error || this.#closed) return;
    this.#error = e instanceof NbdTlsError ? e : this.#wrap(e);
    this.#handshake?.reject(this.#error);
    for (const reader of this.#readers.splice(0)) reader.reject(this.#error);
    for (const fail of [...this.#writers]) fail(this.#error);
  }

  #wakeReaders(): void {
    for (const reader of this.#readers.splice(0)) reader.resolve();
  }

  /** The server hung up right after the handshake, before saying a word. */
  #earlyEnd(): NbdTlsError {
    return new NbdTlsError(
      `The server closed the TLS connection right after the handshake, before sending anything; ${this.#rejectionHint()}`,
    );
  }

  #rejectionHint(): string {
    return this.#sentCertificate
      ? "it may not trust the client certificate that was sent"
      : REQUIRE_CERT_HINT;
  }

  #wrap(e: Error): NbdTlsError {
    const code = (e as { code?: unknown }).code;
    const codeText = typeof code === "string" ? code : undefined;
    const detail = codeText && !e.message.includes(codeText)
      ? `${codeText}: ${e.message}`
      : e.message;
    const who = this.#name ?? "the server";
    if (!this.#secure) {
      const meaning = explain(codeText, this.#name);
      return new NbdTlsError(
        `TLS handshake with ${who} failed: ${
          meaning ? `${meaning} (${detail})` : detail
        }`,
        { cause: e, ...(codeText ? { code: codeText } : {}) },
      );
    }
    const hint = this.#received ? "" : `; ${this.#rejectionHint()}`;
    return new NbdTlsError(
      `TLS connection to ${who} failed${
        this.#received ? "" : " right after the handshake"
      }: ${detail}${hint}`,
      { cause: e, ...(codeText ? { code: codeText } : {}) },
    );
  }
}

/** Whether `stream` is a plain `Deno.TcpConn`, which `Deno.startTls` takes. */
function isTcpConn(stream: ByteStream): stream is Deno.TcpConn {
  return typeof (stream as Partial<Deno.TcpConn>).setNoDelay === "function" &&
    (stream as Partial<Deno.TcpConn>).remoteAddr?.transport === "tcp";
}

/**
 * rustls's words for a failed verification, as the codes `node:tls` gives
 * (and {@linkcode explain} explains), so both paths fail alike.
 */
function rustlsCode(message: string): string | undefined {
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

/**
 * A `Deno.startTls` session: TCP, the server verified, no client
 * certificate. Reads and writes go straight to Deno's TLS connection.
 */
class DenoTlsStream implements TlsStream {
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

/** Why a server might hang up on a client that sent no certificate. */
const REQUIRE_CERT_HINT =
  "it may require a client certificate (give tlsCertificates with client-cert.pem and client-key.pem, or tlsClientCert and tlsClientKey)";

/** A failed `Deno.startTls` handshake, in the words `node:tls`'s would get. */
function handshakeError(e: unknown, name: string): NbdTlsError {
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
function explain(code: string | undefined, name: string | undefined): string {
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

function closedError(): NbdConnectionClosedError {
  return new NbdConnectionClosedError("The TLS connection is closed");
}
