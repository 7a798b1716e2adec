/**
 * One check of everything `connect()` (and `probe()`, `listExports()`,
 * `openTransport()`, `attach()`) is given, before any traffic: a URI or an
 * options object, merged with overrides, into one {@linkcode ConnectOptions}.
 *
 * @module
 */

import type { ConnectOptions } from "./connect_options.ts";
import { refuseUnsupportedTls } from "./tls.ts";
import { parseUri } from "./uri.ts";

/**
 * Merges a URI or options object with extra options, checking both.
 *
 * @param target An NBD URI or an options object.
 * @param options Options that override the target's.
 * @returns The merged options.
 * @throws {TypeError} for a malformed URI or an option of the wrong type.
 * @throws {RangeError} for an option out of range.
 */
export function resolveOptions(
  target: string | ConnectOptions,
  options: ConnectOptions = {},
): ConnectOptions {
  const base = typeof target === "string" ? parseUri(target) : target;
  if (
    typeof target !== "string" &&
    (target === null || typeof target !== "object")
  ) {
    throw new TypeError("connect() takes an NBD URI or an options object");
  }
  const o: ConnectOptions = { ...base, ...options };
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
    throw new RangeError(`Invalid port ${o.port}`);
  }
  if (o.exportName !== undefined && typeof o.exportName !== "string") {
    throw new TypeError("exportName must be a string");
  }
  if (
    o.connectTimeout !== undefined &&
    (!Number.isFinite(o.connectTimeout) || o.connectTimeout < 0)
  ) {
    throw new RangeError(
      `connectTimeout must be a number of milliseconds, not ${o.connectTimeout}`,
    );
  }
  if (
    o.maxInFlight !== undefined &&
    (!Number.isInteger(o.maxInFlight) || o.maxInFlight < 1 ||
      o.maxInFlight > 65536)
  ) {
    throw new RangeError(
      `maxInFlight must be an integer from 1 to 65536, not ${o.maxInFlight}`,
    );
  }
  // PSK and anonymous TLS cannot be done here: say so before any traffic.
  if ((o.tls ?? "disable") !== "disable") refuseUnsupportedTls(o);
  return o;
}
