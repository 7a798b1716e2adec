/**
 * What a connection is made of: where the server is, which export, how to
 * negotiate. {@linkcode parseUri} returns this shape and `connect()` takes it.
 *
 * @module
 */

import type { TlsStream } from "./tls/stream.ts";
import type { ByteStream } from "./transport.ts";

/** How to treat TLS: as libnbd's `nbd_set_tls` (disable, allow, require). */
export type TlsMode = "disable" | "prefer" | "require";

/** A trace event for the `debug` hook. */
export type DebugHook = (
  event: string,
  fields: Record<string, unknown>,
) => void;

/** Where the server is and which export to use. */
export interface ConnectTarget {
  /** TCP host name or address (IPv6 without brackets). */
  hostname?: string;
  /** TCP or vsock port; 10809 by default for TCP. */
  port?: number;
  /**
   * Unix socket path. A leading NUL (`"\0name"`) names a socket in the Linux
   * abstract namespace.
   */
  path?: string;
  /** vsock context id (`nbd+vsock://`). */
  cid?: number;
  /** Export name; `""` is the server's default export. */
  exportName?: string;
}

/** TLS settings; see the README's TLS section. */
export interface TlsOptions {
  /** `"require"` for `nbds://`; `"disable"` by default. */
  tls?: TlsMode;
  /**
   * A directory in the layout qemu and nbdkit use: `ca-cert.pem`, and for a
   * client certificate `client-cert.pem` and `client-key.pem`.
   */
  tlsCertificates?: string;
  /** CA certificates in PEM, in addition to (or instead of) the system's. */
  caCerts?: string[];
  /** Client certificate chain in PEM (mutual TLS). */
  tlsClientCert?: string;
  /** Client private key in PEM (mutual TLS). */
  tlsClientKey?: string;
  /** The name the server certificate must carry; the host name by default. */
  tlsHostname?: string;
  /**
   * Set to `false` to accept any server certificate. Verification is on
   * unless this is given as `false` by name.
   */
  tlsVerifyPeer?: boolean;
  /**
   * User name for TLS-PSK: the line of `tlsPskFile` to use. The login name
   * (`$USER`) by default, as libnbd.
   */
  tlsUsername?: string;
  /**
   * TLS-PSK keys, in the file format of libnbd, nbdkit and qemu
   * (`username:hexkey` lines). Needs `tlsEngine` (Deno's own TLS has no
   * PSK); refused at connect without it.
   */
  tlsPskFile?: string;
  /**
   * The TLS engine to use instead of Deno's: `gnutls` from
   * `@nbd/client/ffi` (needs `--allow-ffi`) trusts only the given CA,
   * checks a revocation list, and does TLS-PSK.
   */
  tlsEngine?: TlsEngine;
}

/** How to negotiate. */
export interface NegotiationOptions {
  /**
   * Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`, for example
   * `["base:allocation", "qemu:dirty-bitmap:bitmap0"]`.
   */
  metaContexts?: string[];
  /**
   * Also ask which metadata contexts the server offers for the export
   * (`NBD_OPT_LIST_META_CONTEXT`, every namespace), on the same connection
   * before it selects any: their names are then the client's
   * `availableMetaContexts`. Default false for `connect()`, true for
   * `probe()`.
   */
  listMetaContexts?: boolean;
  /** Ask for structured replies (default true). */
  structuredReplies?: boolean;
  /** Ask for extended headers when the server offers them (default true). */
  extendedHeaders?: boolean;
  /** Ask for `NBD_INFO_BLOCK_SIZE` and obey it (default true). */
  blockSizes?: boolean;
  /** Give up on the handshake or any request when this aborts. */
  signal?: AbortSignal;
  /** Trace every option, command and reply; `true` prints to stderr. */
  debug?: boolean | DebugHook;
}

/** Everything `connect()` takes. */
export interface ConnectOptions
  extends ConnectTarget, TlsOptions, NegotiationOptions {
  /** Requests in flight at once on this connection (default 64). */
  maxInFlight?: number;
  /**
   * Milliseconds allowed for connecting and negotiating (default 30000; 0
   * for no limit), so that a server that accepts and then says nothing
   * cannot hang the caller even without a `signal`. At most 2^31 - 1 (about
   * 24.8 days, the longest a timer waits): a larger value is a RangeError.
   */
  connectTimeout?: number;
  /**
   * Deno connects over vsock only with `--unstable-vsock`, and without it
   * ends the process. `connect()` therefore uses vsock only when it sees the
   * flag on its command line (readable under `--allow-all`) or when this is
   * `true`: set it when the flag is given but not visible (no
   * `--allow-all`, `deno.json`'s `"unstable": ["vsock"]`, `deno compile`).
   */
  unstableVsock?: boolean;
  /**
   * Survive a lost connection (end of stream, reset, a server restart, an
   * `ESHUTDOWN` soft disconnect): requests are held, the same target is
   * dialled again with the same negotiation, and once it is known to be the
   * same export they are replayed in order. `true` keeps dialling for 30 s;
   * `{ timeout, delay, maxDelay }` in milliseconds sets the limits. Off by
   * default. See the README's "Reconnecting" section for what is replayed.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * Open this many connections (1 to 16, default 1) when the export
   * advertises `NBD_FLAG_CAN_MULTI_CONN`; one otherwise. Requests go to the
   * connection with the fewest outstanding.
   */
  connections?: number;
  /**
   * Keep trying the first connect for this many milliseconds (QEMU's
   * `open-timeout`) instead of failing at the first refusal. Default 0: one
   * attempt.
   */
  openTimeout?: number;
  /**
   * Run the server as this subprocess (`["nbdkit", "-s", "memory", "1G"]`)
   * and speak NBD over its stdin and stdout; it is stopped on close. No
   * `hostname`, `path` or `cid` then.
   */
  command?: string[];
  /**
   * With `command`: start the server listening on a private Unix socket
   * instead of stdin/stdout (for servers without a stdio mode, such as
   * `qemu-nbd`; `nbdkit` and `qemu-nbd` are known).
   */
  socketActivation?: boolean;
}

/** How a client survives a lost connection; see `ConnectOptions.reconnect`. */
export interface ReconnectOptions {
  /**
   * How long to keep dialling after the connection is lost, in milliseconds,
   * before every held request fails. Default 30000.
   */
  timeout?: number;
  /** The first pause between attempts, in milliseconds. Default 50. */
  delay?: number;
  /** The longest pause between attempts, in milliseconds. Default 2000. */
  maxDelay?: number;
}

/** What `upgradeToTls()` needs beyond the {@linkcode TlsOptions}. */
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

/**
 * A TLS implementation `upgradeToTls()` hands the handshake to.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nbd/client";
 * import { gnutls } from "@nbd/client/ffi";
 *
 * await using client = await connect(
 *   "nbds://localhost/disk?tls-psk-file=/etc/nbd/keys.psk&tls-username=alice",
 *   { tlsEngine: gnutls },
 * );
 * ```
 */
export interface TlsEngine {
  /** A short name for traces and messages, e.g. `"gnutls"`. */
  readonly name: string;
  /** Whether the engine does TLS-PSK (`tlsPskFile`). */
  readonly psk: boolean;
  /**
   * Opens the connection to the server in the form the engine works on
   * best (GnuTLS: a socket descriptor of its own). `connect()` calls it
   * instead of `Deno.connect` when TLS is asked for.
   *
   * @param target Where the server is.
   * @param signal Abandons connecting.
   * @returns The raw stream, in clear until the upgrade.
   */
  dial?(target: ConnectTarget, signal?: AbortSignal): Promise<ByteStream>;
  /**
   * Runs the TLS handshake over `stream`, after `NBD_OPT_STARTTLS` was
   * acknowledged.
   *
   * @param stream The raw stream; the engine owns it once it returns a
   *   stream or throws.
   * @param options What to trust and present, with the name to check.
   * @returns The encrypted stream, or `undefined` when the engine cannot
   *   work over this kind of stream (the built-in path then runs).
   * @throws {NbdTlsError} when the handshake fails.
   */
  upgrade(
    stream: ByteStream,
    options: UpgradeOptions,
  ): Promise<TlsStream | undefined>;
}
