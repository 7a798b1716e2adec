/**
 * One check of everything `connect()` (and `probe()`, `listExports()`,
 * `openTransport()`, `attach()`) is given, before any traffic: a URI or an
 * options object, merged with overrides, into one {@linkcode ConnectOptions}
 * whose every field has the right type and range. A mistake is a
 * `TypeError` (wrong type, unknown mode) or a `RangeError` (out of range)
 * that names the option.
 *
 * @module
 */

import type { ConnectOptions, TlsMode } from "./connect_options.ts";
import { MAX_TIMER_MS } from "./_deadline.ts";
import { reconnectPolicy } from "./reconnect.ts";
import { checkCommand } from "./_subprocess.ts";
import { refuseUnsupportedTls } from "./tls/upgrade.ts";
import { parseUri } from "./uri.ts";

const TLS_MODES: readonly TlsMode[] = ["disable", "prefer", "require"];
/** The most connections one client opens (nbdcopy's default is 4). */
const MAX_CONNECTIONS = 16;

const STRINGS = [
  "hostname",
  "path",
  "exportName",
  "tlsCertificates",
  "tlsClientCert",
  "tlsClientKey",
  "tlsHostname",
  "tlsUsername",
  "tlsPskFile",
] as const;

const BOOLEANS = [
  "tlsVerifyPeer",
  "structuredReplies",
  "extendedHeaders",
  "blockSizes",
  "listMetaContexts",
  "unstableVsock",
  "socketActivation",
] as const;

/** How a value looks in a message: strings quoted, objects by kind. */
export function shown(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return "an object";
  if (typeof value === "function") return "a function";
  return String(value);
}

/**
 * Checks a millisecond option: a finite number from 0 to what a timer can
 * wait ({@linkcode MAX_TIMER_MS}, about 24.8 days).
 *
 * @throws {RangeError} otherwise.
 */
export function checkMilliseconds(name: string, value: unknown): void {
  if (
    typeof value !== "number" || !Number.isFinite(value) || value < 0 ||
    value > MAX_TIMER_MS
  ) {
    throw new RangeError(
      `${name} must be a number of milliseconds from 0 to ${MAX_TIMER_MS} (timers cannot wait longer), not ${
        shown(value)
      }`,
    );
  }
}

/**
 * Checks that `signal`, when given, is an `AbortSignal`.
 *
 * @throws {TypeError} otherwise.
 */
export function checkSignal(where: string, signal: unknown): void {
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw new TypeError(
      `${where}: signal must be an AbortSignal, not ${shown(signal)}`,
    );
  }
}

/** Checks every field of merged options; see the module doc. */
function check(o: ConnectOptions): void {
  const fields = o as Record<string, unknown>;
  for (const key of STRINGS) {
    const v = fields[key];
    if (v !== undefined && typeof v !== "string") {
      throw new TypeError(`${key} must be a string, not ${shown(v)}`);
    }
  }
  for (const key of BOOLEANS) {
    const v = fields[key];
    if (v !== undefined && typeof v !== "boolean") {
      throw new TypeError(`${key} must be true or false, not ${shown(v)}`);
    }
  }
  const where = [o.hostname, o.path, o.cid].filter((x) => x !== undefined);
  if (where.length > 1) {
    throw new TypeError(
      "Give only one of hostname, path and cid to say where the server is",
    );
  }
  if (
    o.port !== undefined &&
    (!Number.isInteger(o.port) || o.port < 0 || o.port > 0xffffffff)
  ) {
    throw new RangeError(`Invalid port ${shown(o.port)}`);
  }
  if (
    o.cid !== undefined &&
    (!Number.isInteger(o.cid) || o.cid < 0 || o.cid > 0xffffffff)
  ) {
    throw new RangeError(
      `cid must be an integer from 0 to 4294967295, not ${shown(o.cid)}`,
    );
  }
  const engine: unknown = o.tlsEngine;
  if (
    engine !== undefined &&
    (engine === null || typeof engine !== "object" ||
      typeof (engine as { upgrade?: unknown }).upgrade !== "function")
  ) {
    throw new TypeError(
      `tlsEngine must be a TLS engine such as gnutls from @nbd/client/ffi, not ${
        shown(engine)
      }`,
    );
  }
  if (o.tls !== undefined && !TLS_MODES.includes(o.tls)) {
    throw new TypeError(
      `tls must be "disable", "prefer" or "require", not ${shown(o.tls)}`,
    );
  }
  for (const key of ["caCerts", "metaContexts"] as const) {
    const list: unknown = o[key];
    if (
      list !== undefined &&
      (!Array.isArray(list) || !list.every((x) => typeof x === "string"))
    ) {
      throw new TypeError(
        `${key} must be an array of strings, not ${shown(list)}${
          typeof list === "string" ? ` (write [${shown(list)}])` : ""
        }`,
      );
    }
  }
  checkSignal("connect()", o.signal);
  if (
    o.debug !== undefined && typeof o.debug !== "boolean" &&
    typeof o.debug !== "function"
  ) {
    throw new TypeError(
      `debug must be true, false or a function, not ${shown(o.debug)}`,
    );
  }
  if (o.connectTimeout !== undefined) {
    checkMilliseconds("connectTimeout", o.connectTimeout);
  }
  if (o.openTimeout !== undefined) {
    checkMilliseconds("openTimeout", o.openTimeout);
  }
  reconnectPolicy(o.reconnect);
  if (
    o.connections !== undefined &&
    (!Number.isInteger(o.connections) || o.connections < 1 ||
      o.connections > MAX_CONNECTIONS)
  ) {
    throw new RangeError(
      `connections must be an integer from 1 to ${MAX_CONNECTIONS}, not ${
        shown(o.connections)
      }`,
    );
  }
  if (o.command !== undefined) {
    checkCommand(o.command);
    if (where.length > 0) {
      throw new TypeError(
        "Give either command or where the server is (hostname, path, cid), not both",
      );
    }
    if (o.reconnect !== undefined && o.reconnect !== false) {
      throw new TypeError(
        "reconnect cannot be used with command: the server lives and dies with its subprocess",
      );
    }
    if ((o.connections ?? 1) > 1) {
      throw new TypeError("connections cannot be used with command");
    }
  } else if (o.socketActivation !== undefined) {
    throw new TypeError("socketActivation needs command");
  }
  if (
    o.maxInFlight !== undefined &&
    (!Number.isInteger(o.maxInFlight) || o.maxInFlight < 1 ||
      o.maxInFlight > 65536)
  ) {
    throw new RangeError(
      `maxInFlight must be an integer from 1 to 65536, not ${
        shown(o.maxInFlight)
      }`,
    );
  }
}

/**
 * Merges a URI or options object with extra options, checking both.
 *
 * @param target An NBD URI or an options object.
 * @param options Options that override the target's.
 * @returns The merged options.
 * @throws {TypeError} for a malformed URI, an option of the wrong type or
 *   an unknown TLS mode.
 * @throws {RangeError} for an option out of range (a port, a count, a
 *   timeout of 2^31 ms or more).
 */
export function resolveOptions(
  target: string | ConnectOptions,
  options: ConnectOptions = {},
): ConnectOptions {
  if (
    typeof target !== "string" &&
    (target === null || typeof target !== "object")
  ) {
    throw new TypeError("connect() takes an NBD URI or an options object");
  }
  if (options === null || typeof options !== "object") {
    throw new TypeError(
      `connect() takes options as an object, not ${shown(options)}`,
    );
  }
  const base = typeof target === "string" ? parseUri(target) : target;
  const o: ConnectOptions = { ...base, ...options };
  check(o);
  // PSK and anonymous TLS cannot be done here: say so before any traffic.
  if ((o.tls ?? "disable") !== "disable") refuseUnsupportedTls(o);
  return o;
}
