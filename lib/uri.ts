/**
 * NBD URIs (`doc/uri.md` in the NBD repository, and libnbd's
 * `nbd_connect_uri`): `nbd://host:port/export`, `nbds://…` for TLS,
 * `nbd+unix:///export?socket=/path`, `nbd+vsock://cid:port/export`.
 *
 * The parser is strict on purpose. An NBD URI that this module accepts means
 * exactly one thing; anything it cannot place (an unknown query key, a
 * fragment, a stray character) is a `TypeError` that says what and where,
 * because a silently dropped `tls-hostname=` or a mistyped `socket=` would
 * connect somewhere other than the caller meant.
 *
 * `doc/uri.md` leaves the generic syntax to RFC 3986, and so does this
 * module: RFC 3986's own regular expression (appendix B) splits the URI, and
 * the sections below follow `doc/uri.md` from there. WHATWG `URL` is not
 * that parser. It removes dot segments from the path (`nbd://h/a/../b` would
 * name the export `b`; export names are free text), refuses what NBD URIs
 * use (an empty host after a user name, as in libnbd's
 * `nbds+unix://alice@/?socket=…`; an IPv6 zone, RFC 6874; a vsock port above
 * 65535), and quietly repairs what RFC 3986 refuses (a raw space, a second
 * `@`, an empty user name). It does check IPv6 literals here.
 *
 * @module
 */

import type { ConnectOptions } from "./connect_options.ts";
import { DEFAULT_PORT, MAX_STRING_LENGTH } from "./constants.ts";

// doc/uri.md, "NBD URI scheme" (and libnbd's vsock schemes).
interface Scheme {
  transport: "tcp" | "unix" | "vsock";
  tls: boolean;
}
const SCHEMES: ReadonlyMap<string, Scheme> = new Map([
  ["nbd", { transport: "tcp", tls: false }],
  ["nbds", { transport: "tcp", tls: true }],
  ["nbd+unix", { transport: "unix", tls: false }],
  ["nbds+unix", { transport: "unix", tls: true }],
  ["nbd+vsock", { transport: "vsock", tls: false }],
  ["nbds+vsock", { transport: "vsock", tls: true }],
]);
const SCHEME_LIST = "nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock";

/** The query keys this module understands. */
const QUERY_KEYS = [
  "socket",
  "tls-certificates",
  "tls-hostname",
  "tls-verify-peer",
  "tls-type",
  "tls-username",
  "tls-psk-file",
] as const;
type QueryKey = typeof QUERY_KEYS[number];

/** vsock's well-known CID of the host, which libnbd assumes when none is given. */
const VSOCK_HOST_CID = 2;
const MAX_U32 = 0xffffffff;

/**
 * Parses an NBD URI into the options that `connect()` takes.
 *
 * - The scheme picks the transport and TLS: `nbd` (TCP), `nbd+unix`,
 *   `nbd+vsock`, and their `nbds…` forms, which set `tls: "require"` so that
 *   the connection never falls back to clear text. The `nbd…` forms leave
 *   `tls` unset (clear text unless the caller asks for `"prefer"`), as libnbd
 *   does.
 * - TCP: the host is a name, an IPv4 address or an IPv6 literal in brackets
 *   (`[::1]`, with an optional `%25zone`); it defaults to `localhost` and the
 *   port to 10809. vsock: the host is the numeric CID, 2 (the hypervisor) by
 *   default. Unix: the authority must be empty apart from a user name, and
 *   `socket=` names the socket; `socket=%00name` names one in Linux's
 *   abstract namespace (`path` then starts with `"\0"`).
 * - The path minus its first `/`, percent-decoded, is the export name:
 *   `nbd://h/disk` is `disk`, `nbd://h//disk` is `/disk`, `nbd://h/` and
 *   `nbd://h` are the default export `""`.
 * - A user name (`nbds://alice@host/`) becomes `tlsUsername`.
 * - Query keys: `socket`, `tls-certificates`, `tls-hostname`,
 *   `tls-verify-peer` (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`),
 *   `tls-type` (`x509`, or `psk` with `tls-psk-file`; `anon` is refused),
 *   `tls-username`, `tls-psk-file` (TLS-PSK through the GnuTLS engine of
 *   `@nbd/client/ffi`; refused when connecting without it, as Deno has no
 *   TLS-PSK). Any other key is refused, `x-` keys included. `+` is a plus
 *   sign, not a space (RFC 3986, not HTML forms).
 *
 * @param uri The URI, e.g. `"nbds://example.com/disk?tls-certificates=/etc/pki/nbd"`.
 * @returns Connection options with every field the URI sets, and no others.
 * @throws {TypeError} when the URI is malformed or asks for something this
 *   library cannot do; the message names the offending part.
 *
 * @example
 * ```ts
 * import { parseUri } from "@nbd/client";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(parseUri("nbds://[::1]:10810//disk"), {
 *   hostname: "::1",
 *   port: 10810,
 *   exportName: "/disk",
 *   tls: "require",
 * });
 * assert.deepEqual(parseUri("nbd+unix:///?socket=/run/nbd.sock"), {
 *   path: "/run/nbd.sock",
 *   exportName: "",
 * });
 * ```
 */
export function parseUri(uri: string): ConnectOptions {
  const { name, scheme, authority, path, query } = splitUri(uri);
  const { user, host, port } = splitAuthority(authority);
  const params = parseQuery(query);
  const out: ConnectOptions = {};

  // "NBD URI authority": where the server is.
  if (scheme.transport === "unix") {
    if (host !== "" || port !== undefined) {
      const what = host !== "" ? `host ("${host}")` : `port (":${port}")`;
      throw invalid(
        `${name}:// takes no ${what}; the socket is named by socket=, and tls-hostname= names the server for TLS`,
      );
    }
    // "NBD URI socket parameter".
    const socket = params.get("socket");
    if (socket === undefined) {
      throw invalid(
        `${name}:// needs a socket= query parameter naming the Unix socket`,
      );
    }
    out.path = checkSocket(socket);
  } else {
    if (scheme.transport === "tcp") {
      out.hostname = host === "" ? "localhost" : host;
    } else {
      out.cid = host === ""
        ? VSOCK_HOST_CID
        : parseNumber("vsock CID", host, 0, MAX_U32);
    }
    const maxPort = scheme.transport === "tcp" ? 65535 : MAX_U32;
    out.port = port === undefined
      ? DEFAULT_PORT
      : parseNumber("port", port, 1, maxPort);
    if (params.has("socket")) {
      throw invalid(
        `socket= is only valid with nbd+unix:// and nbds+unix://, not ${name}://`,
      );
    }
  }

  // "NBD URI export name": the path except for its leading "/".
  out.exportName = checkExportName(decode(path.slice(1), "export name"));

  // "NBD URI query parameters related to TLS", and libnbd's further keys.
  if (scheme.tls) out.tls = "require";
  const certificates = nonEmpty(params, "tls-certificates");
  if (certificates !== undefined) out.tlsCertificates = certificates;
  const tlsHostname = nonEmpty(params, "tls-hostname");
  if (tlsHostname !== undefined) out.tlsHostname = tlsHostname;
  const verify = params.get("tls-verify-peer");
  if (verify !== undefined) out.tlsVerifyPeer = parseBoolean(verify);
  const type = params.get("tls-type");
  if (type !== undefined) {
    checkTlsType(type, params.get("tls-psk-file") !== undefined);
  }
  const username = nonEmpty(params, "tls-username");
  if (user !== undefined && username !== undefined && user !== username) {
    throw invalid(
      `the TLS user name is given twice, differently ("${user}@" and tls-username=${username})`,
    );
  }
  const tlsUsername = user ?? username;
  if (tlsUsername !== undefined) out.tlsUsername = tlsUsername;
  const pskFile = nonEmpty(params, "tls-psk-file");
  if (pskFile !== undefined) out.tlsPskFile = pskFile;
  return out;
}

// ---------------------------------------------------------------------------
// "Related standards": RFC 3986, then the scheme.

/** RFC 3986 appendix B: scheme, authority, path, query, fragment. */
const URI_PARTS =
  /^(?:([^:/?#]+):)?(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$/;
/** What RFC 3986 allows raw in a URI; everything else is percent-encoded. */
const NOT_URI_CHARACTER = /[^A-Za-z0-9\-._~:/?#[\]@!$&'()*+,;=%]/u;

interface UriParts {
  name: string;
  scheme: Scheme;
  authority: string;
  path: string;
  query: string | undefined;
}

function splitUri(uri: string): UriParts {
  if (typeof uri !== "string") {
    throw new TypeError(`parseUri() takes a string, not ${describeType(uri)}`);
  }
  const stray = NOT_URI_CHARACTER.exec(uri);
  if (stray !== null) {
    throw invalid(
      `character ${
        JSON.stringify(stray[0])
      } at offset ${stray.index} must be percent-encoded`,
    );
  }
  const [, schemeText = "", authority, path = "", query, fragment] = URI_PARTS
    .exec(uri)!;
  if (!/^[A-Za-z][A-Za-z0-9+.-]*$/.test(schemeText)) {
    throw invalid(`no scheme (expected ${SCHEME_LIST}, as in "nbd://host/")`);
  }
  const name = schemeText.toLowerCase();
  const scheme = SCHEMES.get(name);
  if (scheme === undefined) {
    throw invalid(`unknown scheme "${schemeText}" (expected ${SCHEME_LIST})`);
  }
  if (authority === undefined) {
    throw invalid(`it must begin with "${name}://"`);
  }
  if (fragment !== undefined) {
    throw invalid(
      `a fragment ("#${fragment}") is not allowed; write "#" in an export name as %23`,
    );
  }
  if (/[[\]]/.test(path) || /[[\]]/.test(query ?? "")) {
    throw invalid(
      `"[" and "]" may only enclose an IPv6 address; percent-encode them elsewhere (%5B, %5D)`,
    );
  }
  return { name, scheme, authority, path, query };
}

// ---------------------------------------------------------------------------
// "NBD URI authority": [userinfo "@"] host [":" port], RFC 3986 section 3.2.

interface Authority {
  user: string | undefined;
  host: string;
  port: string | undefined;
}

function splitAuthority(authority: string): Authority {
  const at = authority.lastIndexOf("@");
  const hostPort = authority.slice(at + 1);
  let user: string | undefined;
  if (at >= 0) {
    const userinfo = authority.slice(0, at);
    if (userinfo.includes("@")) {
      throw invalid(
        `more than one "@" in "${authority}"; percent-encode "@" in a user name as %40`,
      );
    }
    if (userinfo.includes(":")) {
      throw invalid(
        "a password in the URI is not supported; the user name (before @) is only used for TLS",
      );
    }
    if (userinfo === "") throw invalid(`the user name before "@" is empty`);
    user = decode(userinfo, "user name");
  }

  let host: string;
  let port: string | undefined;
  if (hostPort.startsWith("[")) {
    const close = hostPort.indexOf("]");
    if (close < 0) throw invalid(`"[" without "]" in "${hostPort}"`);
    host = parseIpLiteral(hostPort.slice(1, close));
    const after = hostPort.slice(close + 1);
    if (after !== "" && !after.startsWith(":")) {
      throw invalid(
        `unexpected "${after}" after "${hostPort.slice(0, close + 1)}"`,
      );
    }
    if (after !== "") port = after.slice(1);
  } else {
    if (/[[\]]/.test(hostPort)) {
      throw invalid(`"]" without "[" in "${hostPort}"`);
    }
    const [name, ...ports] = hostPort.split(":");
    if (ports.length > 1) {
      throw invalid(
        `"${hostPort}" has more than one ":"; write an IPv6 address in brackets, as in nbd://[::1]/`,
      );
    }
    host = decode(name!, "host");
    port = ports[0];
  }
  // RFC 3986 allows an empty port ("host:"), which means the default.
  return { user, host, port: port === "" ? undefined : port };
}

/** `[address]` or `[address%25zone]` (RFC 6874), without the brackets. */
function parseIpLiteral(literal: string): string {
  if (/^v/i.test(literal)) {
    throw invalid(`IPvFuture addresses ("[${literal}]") are not supported`);
  }
  const zoneAt = literal.indexOf("%25");
  const address = zoneAt < 0 ? literal : literal.slice(0, zoneAt);
  if (!URL.canParse(`nbd://[${address}]/`)) {
    throw invalid(`"[${literal}]" is not a valid IPv6 address`);
  }
  if (zoneAt < 0) return address;
  const zone = decode(literal.slice(zoneAt + 3), "IPv6 zone");
  if (zone === "") throw invalid(`the IPv6 zone in "[${literal}]" is empty`);
  return `${address}%${zone}`;
}

/** A port or a vsock CID: decimal digits, from `min` to `max`. */
function parseNumber(
  what: string,
  text: string,
  min: number,
  max: number,
): number {
  if (!/^[0-9]+$/.test(text)) {
    throw invalid(`${what} "${text}" is not a number`);
  }
  const value = Number(text);
  if (value < min || value > max) {
    throw invalid(`${what} ${text} is out of range (${min} to ${max})`);
  }
  return value;
}

// ---------------------------------------------------------------------------
// "NBD URI export name" and "NBD URI socket parameter".

function checkExportName(name: string): string {
  if (name.includes("\0")) {
    throw invalid(
      "the export name contains NUL (%00), which NBD export names cannot hold",
    );
  }
  const length = new TextEncoder().encode(name).length;
  if (length > MAX_STRING_LENGTH) {
    throw invalid(
      `the export name is ${length} bytes long; NBD allows at most ${MAX_STRING_LENGTH}`,
    );
  }
  return name;
}

function checkSocket(socket: string): string {
  if (socket === "") throw invalid("socket= is empty");
  if (socket === "\0") {
    throw invalid("socket=%00 names no socket in the abstract namespace");
  }
  if (socket.indexOf("\0", 1) >= 0) {
    throw invalid(
      "socket= contains NUL (%00) after its start; only a leading %00 (the abstract namespace) is allowed",
    );
  }
  return socket;
}

// ---------------------------------------------------------------------------
// Query parameters: "key=value" pairs split on "&", each side percent-decoded
// as RFC 3986 says (so "+" stays "+"), not read as an HTML form.

function parseQuery(query: string | undefined): Map<QueryKey, string> {
  const params = new Map<QueryKey, string>();
  for (const part of query?.split("&") ?? []) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const key = decode(eq < 0 ? part : part.slice(0, eq), "query key");
    const value = eq < 0 ? "" : decode(part.slice(eq + 1), key);
    if (!(QUERY_KEYS as readonly string[]).includes(key)) {
      throw invalid(
        `unknown query parameter "${key}" (known: ${
          [...QUERY_KEYS].sort().join(", ")
        })`,
      );
    }
    if (params.has(key as QueryKey)) {
      throw invalid(`query parameter "${key}" is given twice`);
    }
    params.set(key as QueryKey, value);
  }
  return params;
}

function nonEmpty(
  params: Map<QueryKey, string>,
  key: QueryKey,
): string | undefined {
  const value = params.get(key);
  if (value === "") throw invalid(`${key}= is empty`);
  return value;
}

function parseBoolean(value: string): boolean {
  const lower = value.toLowerCase();
  if (["1", "true", "yes", "on"].includes(lower)) return true;
  if (["0", "false", "no", "off"].includes(lower)) return false;
  throw invalid(
    `tls-verify-peer must be true or false (or 1/0, yes/no, on/off), not "${value}"`,
  );
}

/**
 * Checks `tls-type` against the credentials the URI gives: `x509` (the
 * default) unless a PSK file is given, `psk` exactly when one is (the PSK
 * itself needs the GnuTLS engine, which connecting checks), never `anon`,
 * which authenticates nobody.
 */
function checkTlsType(type: string, pskFile: boolean): void {
  const lower = type.toLowerCase();
  if (lower === "x509" && !pskFile) return;
  if (lower === "psk" && pskFile) return;
  if (lower === "x509") {
    throw invalid(
      "tls-type=x509 contradicts tls-psk-file=, which asks for TLS-PSK; use tls-type=psk or leave it out",
    );
  }
  if (lower === "psk") {
    throw invalid(
      "tls-type=psk needs tls-psk-file=FILE, a file of username:hexkey lines as libnbd reads it",
    );
  }
  if (lower === "anon") {
    throw invalid(
      "tls-type=anon is not supported: anonymous TLS authenticates nobody; use X.509 certificates (tls-certificates=) or TLS-PSK (tls-psk-file=)",
    );
  }
  throw invalid(`tls-type must be x509 or psk, not "${type}"`);
}

/** Decodes `%XX` escapes as UTF-8; `what` names the part for errors. */
function decode(text: string, what: string): string {
  const bad = /%(?![0-9A-Fa-f]{2})/.exec(text);
  if (bad !== null) {
    throw invalid(
      `bad percent-encoding "${
        text.slice(bad.index, bad.index + 3)
      }" in the ${what}`,
    );
  }
  try {
    return decodeURIComponent(text);
  } catch {
    throw invalid(`the ${what} is not valid UTF-8 once percent-decoded`);
  }
}

function invalid(reason: string): TypeError {
  return new TypeError(`Invalid NBD URI: ${reason}`);
}

function describeType(value: unknown): string {
  return value === null ? "null" : typeof value;
}

/**
 * Writes connection options as an NBD URI that {@linkcode parseUri} reads
 * back to the same options.
 *
 * `tls: "require"` gives an `nbds…` scheme; any other mode gives `nbd…`,
 * which {@linkcode parseUri} reads back with `tls` unset (so `"prefer"` does
 * not survive the trip: the URI spec has no way to say it). The default
 * port is left out. What a URI cannot carry, PEM text (`caCerts`,
 * `tlsClientCert`, `tlsClientKey`) and the negotiation options, is left out
 * too, as libnbd's `nbd_get_uri` does.
 *
 * @param options Where the server is, which export, and TLS settings.
 * @returns The URI, e.g. `"nbds://example.com/disk?tls-certificates=/etc/pki/nbd"`.
 * @throws {TypeError} when the options name more than one place (hostname,
 *   path, cid), or hold a value no URI can carry (a NUL in an export name, a
 *   port out of range).
 *
 * @example
 * ```ts
 * import { formatUri, parseUri } from "@nbd/client";
 * import assert from "node:assert/strict";
 *
 * const uri = formatUri({
 *   path: "/run/nbd.sock",
 *   exportName: "my disk",
 *   tls: "require",
 *   tlsHostname: "nbd.example.com",
 * });
 * assert.equal(
 *   uri,
 *   "nbds+unix:///my%20disk?socket=/run/nbd.sock&tls-hostname=nbd.example.com",
 * );
 * assert.equal(parseUri(uri).exportName, "my disk");
 * ```
 */
export function formatUri(options: ConnectOptions): string {
  if (options === null || typeof options !== "object") {
    throw new TypeError(
      `formatUri() takes an options object, not ${describeType(options)}`,
    );
  }
  const places = [options.hostname, options.path, options.cid]
    .filter((x) => x !== undefined);
  if (places.length > 1) {
    throw new TypeError(
      "formatUri(): give only one of hostname, path and cid to say where the server is",
    );
  }
  const tls = options.tls === "require" ? "s" : "";
  const user = options.tlsUsername === undefined
    ? ""
    : `${encode(options.tlsUsername, USERINFO_SAFE)}@`;

  let scheme: string;
  let authority: string;
  const query: string[] = [];
  if (options.path !== undefined) {
    if (options.port !== undefined) {
      throw new TypeError("formatUri(): a Unix socket (path) takes no port");
    }
    scheme = `nbd${tls}+unix`;
    authority = user;
    query.push(`socket=${encode(checkSocketOption(options.path), QUERY_SAFE)}`);
  } else if (options.cid !== undefined) {
    scheme = `nbd${tls}+vsock`;
    authority = `${user}${checkInteger("cid", options.cid, 0, MAX_U32)}${
      formatPort(options.port, MAX_U32)
    }`;
  } else {
    scheme = `nbd${tls}`;
    authority = `${user}${formatHost(options.hostname ?? "localhost")}${
      formatPort(options.port, 65535)
    }`;
  }

  const exportName = options.exportName ?? "";
  if (typeof exportName !== "string") {
    throw new TypeError("formatUri(): exportName must be a string");
  }
  if (exportName.includes("\0")) {
    throw new TypeError(
      "formatUri(): the export name contains NUL, which NBD export names cannot hold",
    );
  }
  const path = `/${encode(exportName, PATH_SAFE)}`;

  const settings: Array<[string, string | undefined]> = [
    ["tls-certificates", options.tlsCertificates],
    ["tls-hostname", options.tlsHostname],
    ["tls-verify-peer", options.tlsVerifyPeer?.toString()],
    ["tls-psk-file", options.tlsPskFile],
  ];
  for (const [key, value] of settings) {
    if (value !== undefined) query.push(`${key}=${encode(value, QUERY_SAFE)}`);
  }
  return `${scheme}://${authority}${path}${
    query.length > 0 ? `?${query.join("&")}` : ""
  }`;
}

// ---------------------------------------------------------------------------
// Formatting helpers.

/** Characters written raw in each part; everything else is `%XX`. */
const UNRESERVED = "A-Za-z0-9\\-._~";
const PATH_SAFE = new RegExp(`[${UNRESERVED}!$&'()*+,;=:@/]`);
// "&", "=" and "+" are escaped in values so that no reader splits or
// form-decodes them; ";" because some readers (libvirt's) split on it.
const QUERY_SAFE = new RegExp(`[${UNRESERVED}!$'()*,:@/?]`);
// ":" would start a password.
const USERINFO_SAFE = new RegExp(`[${UNRESERVED}!$&'()*+,;=]`);
const HOST_SAFE = USERINFO_SAFE;
const ZONE_SAFE = new RegExp(`[${UNRESERVED}]`);

/** Percent-encodes every UTF-8 byte of `text` that `safe` does not allow. */
function encode(text: string, safe: RegExp): string {
  if (!text.isWellFormed()) {
    throw new TypeError(
      `formatUri(): ${JSON.stringify(text)} is not well-formed Unicode`,
    );
  }
  let out = "";
  for (const byte of new TextEncoder().encode(text)) {
    const c = String.fromCharCode(byte);
    out += byte < 0x80 && safe.test(c)
      ? c
      : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

function formatHost(hostname: string): string {
  if (typeof hostname !== "string" || hostname === "") {
    throw new TypeError("formatUri(): hostname must be a non-empty string");
  }
  if (!hostname.includes(":")) return encode(hostname, HOST_SAFE);
  const zoneAt = hostname.indexOf("%");
  const address = zoneAt < 0 ? hostname : hostname.slice(0, zoneAt);
  if (!/^[0-9A-Fa-f:.]+$/.test(address)) {
    throw new TypeError(
      `formatUri(): hostname "${hostname}" has ":" but is not an IPv6 address (give it without brackets)`,
    );
  }
  const zone = zoneAt < 0
    ? ""
    : `%25${encode(hostname.slice(zoneAt + 1), ZONE_SAFE)}`;
  return `[${address}${zone}]`;
}

function formatPort(port: number | undefined, max: number): string {
  if (port === undefined) return "";
  checkInteger("port", port, 1, max);
  return port === DEFAULT_PORT ? "" : `:${port}`;
}

function checkInteger(
  name: string,
  value: number,
  min: number,
  max: number,
): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new TypeError(
      `formatUri(): ${name} must be an integer from ${min} to ${max}, not ${value}`,
    );
  }
  return value;
}

function checkSocketOption(path: string): string {
  if (typeof path !== "string" || path === "" || path === "\0") {
    throw new TypeError("formatUri(): path must name a socket");
  }
  if (path.indexOf("\0", 1) >= 0) {
    throw new TypeError(
      "formatUri(): path contains NUL after its start; only a leading NUL (the abstract namespace) is allowed",
    );
  }
  return path;
}
