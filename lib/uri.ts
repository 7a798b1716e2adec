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
 * @module
 */

import type { ConnectOptions } from "./connect_options.ts";
import { DEFAULT_PORT, MAX_STRING_LENGTH } from "./constants.ts";

type Transport = "tcp" | "unix" | "vsock";

interface Scheme {
  transport: Transport;
  tls: boolean;
}

const SCHEMES: Readonly<Record<string, Scheme>> = {
  "nbd": { transport: "tcp", tls: false },
  "nbds": { transport: "tcp", tls: true },
  "nbd+unix": { transport: "unix", tls: false },
  "nbds+unix": { transport: "unix", tls: true },
  "nbd+vsock": { transport: "vsock", tls: false },
  "nbds+vsock": { transport: "vsock", tls: true },
};

const SCHEME_LIST = "nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock";

/** The query keys this module understands, in the order it writes them. */
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
 * RFC 3986 allows only these characters to appear raw in a URI; everything
 * else must be percent-encoded.
 */
const URI_CHARACTER = /[A-Za-z0-9\-._~:/?#[\]@!$&'()*+,;=%]/;

function invalid(reason: string): TypeError {
  return new TypeError(`Invalid NBD URI: ${reason}`);
}

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
 *   `tls-type` (only `x509`: `psk` and `anon` are refused), `tls-username`,
 *   `tls-psk-file` (recorded, then refused when connecting, as Deno has no
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
  if (typeof uri !== "string") {
    throw new TypeError(`parseUri() takes a string, not ${describeType(uri)}`);
  }
  checkCharacters(uri);

  const colon = uri.indexOf(":");
  const schemeText = colon < 0 ? "" : uri.slice(0, colon);
  if (!/^[A-Za-z][A-Za-z0-9+.-]*$/.test(schemeText)) {
    throw invalid(`no scheme (expected ${SCHEME_LIST}, as in "nbd://host/")`);
  }
  const schemeName = schemeText.toLowerCase();
  const scheme = SCHEMES[schemeName];
  if (scheme === undefined) {
    throw invalid(`unknown scheme "${schemeText}" (expected ${SCHEME_LIST})`);
  }
  let rest = uri.slice(colon + 1);
  if (!rest.startsWith("//")) {
    throw invalid(`it must begin with "${schemeName}://"`);
  }
  rest = rest.slice(2);
  const hash = rest.indexOf("#");
  if (hash >= 0) {
    throw invalid(
      `a fragment ("${
        rest.slice(hash)
      }") is not allowed; write "#" in an export name as %23`,
    );
  }

  const authorityEnd = firstIndexOf(rest, "/?");
  const authority = rest.slice(0, authorityEnd);
  rest = rest.slice(authorityEnd);
  const question = rest.indexOf("?");
  const path = question < 0 ? rest : rest.slice(0, question);
  const query = question < 0 ? undefined : rest.slice(question + 1);
  if (/[[\]]/.test(path) || (query !== undefined && /[[\]]/.test(query))) {
    throw invalid(
      `"[" and "]" may only enclose an IPv6 address; percent-encode them elsewhere (%5B, %5D)`,
    );
  }

  const out: ConnectOptions = {};
  const { user, host, port } = splitAuthority(authority);
  const params = parseQuery(query);

  // Where the server is.
  if (scheme.transport === "tcp") {
    out.hostname = host === "" ? "localhost" : host;
    out.port = port === undefined ? DEFAULT_PORT : parsePort(port, 65535);
  } else if (scheme.transport === "vsock") {
    out.cid = host === "" ? VSOCK_HOST_CID : parseCid(host);
    out.port = port === undefined ? DEFAULT_PORT : parsePort(port, MAX_U32);
  } else {
    if (host !== "" || port !== undefined) {
      const what = host !== "" ? `host ("${host}")` : `port (":${port}")`;
      throw invalid(
        `${schemeName}:// takes no ${what}; the socket is named by socket=, and tls-hostname= names the server for TLS`,
      );
    }
    const socket = params.get("socket");
    if (socket === undefined) {
      throw invalid(
        `${schemeName}:// needs a socket= query parameter naming the Unix socket`,
      );
    }
    out.path = checkSocket(socket);
  }
  if (scheme.transport !== "unix" && params.has("socket")) {
    throw invalid(
      `socket= is only valid with nbd+unix:// and nbds+unix://, not ${schemeName}://`,
    );
  }

  // Which export.
  out.exportName = path === "" ? "" : checkExportName(
    percentDecode(path.slice(1), "export name"),
  );

  // TLS.
  if (scheme.tls) out.tls = "require";
  const certificates = params.get("tls-certificates");
  if (certificates !== undefined) {
    out.tlsCertificates = nonEmpty("tls-certificates", certificates);
  }
  const tlsHostname = params.get("tls-hostname");
  if (tlsHostname !== undefined) {
    out.tlsHostname = nonEmpty("tls-hostname", tlsHostname);
  }
  const verify = params.get("tls-verify-peer");
  if (verify !== undefined) out.tlsVerifyPeer = parseBoolean(verify);
  const type = params.get("tls-type");
  if (type !== undefined) checkTlsType(type);
  const username = params.get("tls-username");
  if (username !== undefined) nonEmpty("tls-username", username);
  if (user !== undefined && username !== undefined && user !== username) {
    throw invalid(
      `the TLS user name is given twice, differently ("${user}@" and tls-username=${username})`,
    );
  }
  const tlsUsername = user ?? username;
  if (tlsUsername !== undefined) out.tlsUsername = tlsUsername;
  const pskFile = params.get("tls-psk-file");
  if (pskFile !== undefined) {
    out.tlsPskFile = nonEmpty("tls-psk-file", pskFile);
  }
  return out;
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
      throw new TypeError(
        "formatUri(): a Unix socket (path) takes no port",
      );
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

  if (options.tlsCertificates !== undefined) {
    query.push(
      `tls-certificates=${encode(options.tlsCertificates, QUERY_SAFE)}`,
    );
  }
  if (options.tlsHostname !== undefined) {
    query.push(`tls-hostname=${encode(options.tlsHostname, QUERY_SAFE)}`);
  }
  if (options.tlsVerifyPeer !== undefined) {
    query.push(`tls-verify-peer=${options.tlsVerifyPeer ? "true" : "false"}`);
  }
  if (options.tlsPskFile !== undefined) {
    query.push(`tls-psk-file=${encode(options.tlsPskFile, QUERY_SAFE)}`);
  }
  return `${scheme}://${authority}${path}${
    query.length > 0 ? `?${query.join("&")}` : ""
  }`;
}

// ---------------------------------------------------------------------------
// Parsing helpers.

function checkCharacters(uri: string): void {
  for (let i = 0; i < uri.length; i++) {
    const c = uri[i]!;
    if (!URI_CHARACTER.test(c)) {
      const shown = JSON.stringify(String.fromCodePoint(uri.codePointAt(i)!));
      throw invalid(
        `character ${shown} at offset ${i} must be percent-encoded`,
      );
    }
  }
}

function firstIndexOf(s: string, chars: string): number {
  for (let i = 0; i < s.length; i++) {
    if (chars.includes(s[i]!)) return i;
  }
  return s.length;
}

interface Authority {
  user: string | undefined;
  host: string;
  port: string | undefined;
}

function splitAuthority(authority: string): Authority {
  let user: string | undefined;
  let hostPort = authority;
  const at = authority.indexOf("@");
  if (at >= 0) {
    const userinfo = authority.slice(0, at);
    hostPort = authority.slice(at + 1);
    if (hostPort.includes("@")) {
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
    user = percentDecode(userinfo, "user name");
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
    const colon = hostPort.indexOf(":");
    if (colon >= 0 && hostPort.indexOf(":", colon + 1) >= 0) {
      throw invalid(
        `"${hostPort}" has more than one ":"; write an IPv6 address in brackets, as in nbd://[::1]/`,
      );
    }
    const rawHost = colon < 0 ? hostPort : hostPort.slice(0, colon);
    if (colon >= 0) port = hostPort.slice(colon + 1);
    host = percentDecode(rawHost, "host");
  }
  // RFC 3986 allows an empty port ("host:"), which means the default.
  if (port === "") port = undefined;
  return { user, host, port };
}

function parseIpLiteral(literal: string): string {
  if (/^v/i.test(literal)) {
    throw invalid(`IPvFuture addresses ("[${literal}]") are not supported`);
  }
  const zoneAt = literal.indexOf("%25");
  const address = zoneAt < 0 ? literal : literal.slice(0, zoneAt);
  let valid = address.includes(":") && /^[0-9A-Fa-f:.]+$/.test(address);
  if (valid) {
    try {
      new URL(`http://[${address}]/`);
    } catch {
      valid = false;
    }
  }
  if (!valid) throw invalid(`"[${literal}]" is not a valid IPv6 address`);
  if (zoneAt < 0) return address;
  const zone = percentDecode(literal.slice(zoneAt + 3), "IPv6 zone");
  if (zone === "") throw invalid(`the IPv6 zone in "[${literal}]" is empty`);
  return `${address}%${zone}`;
}

function parsePort(text: string, max: number): number {
  if (!/^[0-9]+$/.test(text)) throw invalid(`port "${text}" is not a number`);
  const port = Number(text);
  if (port < 1 || port > max) {
    throw invalid(`port ${text} is out of range (1 to ${max})`);
  }
  return port;
}

function parseCid(text: string): number {
  if (!/^[0-9]+$/.test(text)) {
    throw invalid(`vsock CID "${text}" is not a number`);
  }
  const cid = Number(text);
  if (cid > MAX_U32) {
    throw invalid(`vsock CID ${text} is out of range (0 to ${MAX_U32})`);
  }
  return cid;
}

function parseQuery(query: string | undefined): Map<QueryKey, string> {
  const params = new Map<QueryKey, string>();
  if (query === undefined) return params;
  for (const part of query.split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const key = percentDecode(eq < 0 ? part : part.slice(0, eq), "query key");
    const value = eq < 0 ? "" : percentDecode(part.slice(eq + 1), key);
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

const UTF8 = new TextDecoder("utf-8", { fatal: true });

/** Decodes `%XX` escapes as UTF-8; `what` names the part for errors. */
function percentDecode(text: string, what: string): string {
  if (!text.includes("%")) return text;
  const bytes: number[] = [];
  const encoder = new TextEncoder();
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === "%") {
      const hex = text.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) {
        throw invalid(
          `bad percent-encoding "${text.slice(i, i + 3)}" in the ${what}`,
        );
      }
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(...encoder.encode(c));
    }
  }
  try {
    return UTF8.decode(new Uint8Array(bytes));
  } catch {
    throw invalid(`the ${what} is not valid UTF-8 once percent-decoded`);
  }
}

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

function nonEmpty(key: string, value: string): string {
  if (value === "") throw invalid(`${key}= is empty`);
  return value;
}

function parseBoolean(value: string): boolean {
  switch (value.toLowerCase()) {
    case "1":
    case "true":
    case "yes":
    case "on":
      return true;
    case "0":
    case "false":
    case "no":
    case "off":
      return false;
  }
  throw invalid(
    `tls-verify-peer must be true or false (or 1/0, yes/no, on/off), not "${value}"`,
  );
}

function checkTlsType(type: string): void {
  switch (type.toLowerCase()) {
    case "x509":
      return;
    case "psk":
      throw invalid(
        "tls-type=psk is not supported: Deno's TLS (rustls) has no pre-shared-key cipher suites; use X.509 certificates (tls-certificates=)",
      );
    case "anon":
      throw invalid(
        "tls-type=anon is not supported: anonymous TLS authenticates nobody, and Deno's TLS (rustls) does not offer it; use X.509 certificates (tls-certificates=)",
      );
  }
  throw invalid(`tls-type must be x509, not "${type}"`);
}

function describeType(value: unknown): string {
  return value === null ? "null" : typeof value;
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
const HOST_SAFE = new RegExp(`[${UNRESERVED}!$&'()*+,;=]`);

function encode(text: string, safe: RegExp): string {
  if (!text.isWellFormed()) {
    throw new TypeError(
      `formatUri(): ${JSON.stringify(text)} is not well-formed Unicode`,
    );
  }
  let out = "";
  for (const c of text) {
    if (safe.test(c)) {
      out += c;
      continue;
    }
    for (const byte of new TextEncoder().encode(c)) {
      out += `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
    }
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
    : `%25${encode(hostname.slice(zoneAt + 1), new RegExp(`[${UNRESERVED}]`))}`;
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
