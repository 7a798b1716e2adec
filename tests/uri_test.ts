/**
 * `parseUri` and `formatUri`: every example of `doc/uri.md` and of libnbd's
 * `nbd_connect_uri`, then malformed URIs, each with its exact message.
 */

import assert from "node:assert/strict";
import type { ConnectOptions } from "../lib/connect_options.ts";
import { formatUri, parseUri } from "../lib/uri.ts";

const KNOWN =
  "known: socket, tls-certificates, tls-hostname, tls-psk-file, tls-type, tls-username, tls-verify-peer";

/** URI, then the options it means. */
const VALID: Array<[string, ConnectOptions]> = [
  // doc/uri.md, "NBD URI components".
  ["nbd://example.com:10809/export", {
    hostname: "example.com",
    port: 10809,
    exportName: "export",
  }],
  ["nbd+unix:///export?socket=nbd.sock", {
    path: "nbd.sock",
    exportName: "export",
  }],
  // doc/uri.md, "NBD URI export name".
  ["nbd://example.com/disk", {
    hostname: "example.com",
    port: 10809,
    exportName: "disk",
  }],
  ["nbd+unix:///disk?socket=sock", { path: "sock", exportName: "disk" }],
  ["nbd://example.com/", {
    hostname: "example.com",
    port: 10809,
    exportName: "",
  }],
  ["nbd://example.com", {
    hostname: "example.com",
    port: 10809,
    exportName: "",
  }],
  ["nbd://example.com//disk", {
    hostname: "example.com",
    port: 10809,
    exportName: "/disk",
  }],
  ["nbd://example.com/hello%20world", {
    hostname: "example.com",
    port: 10809,
    exportName: "hello world",
  }],
  // doc/uri.md, "NBD URI socket parameter": the abstract namespace.
  ["nbd+unix:///?socket=%00/abstract", {
    path: "\0/abstract",
    exportName: "",
  }],
  // libnbd's nbd_connect_uri examples.
  ["nbds://example.com", {
    hostname: "example.com",
    port: 10809,
    exportName: "",
    tls: "require",
  }],
  ["nbd+unix:///foo?socket=/tmp/nbd.sock", {
    path: "/tmp/nbd.sock",
    exportName: "foo",
  }],
  ["nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs", {
    path: "/tmp/nbd.sock",
    exportName: "",
    tls: "require",
    tlsCertificates: "certs",
    tlsUsername: "alice",
  }],
  ["nbd+vsock:///", { cid: 2, port: 10809, exportName: "" }],
  // Authority forms.
  ["nbd+vsock://2:10809/e", { cid: 2, port: 10809, exportName: "e" }],
  ["nbds+vsock://3:10810/disk", {
    cid: 3,
    port: 10810,
    exportName: "disk",
    tls: "require",
  }],
  ["nbd://[::1]/", { hostname: "::1", port: 10809, exportName: "" }],
  ["nbd://[2001:db8::7]:10810/x", {
    hostname: "2001:db8::7",
    port: 10810,
    exportName: "x",
  }],
  ["nbd://[fe80::1%25eth0]/", {
    hostname: "fe80::1%eth0",
    port: 10809,
    exportName: "",
  }],
  ["nbd://192.0.2.1:1/x", { hostname: "192.0.2.1", port: 1, exportName: "x" }],
  ["nbd:///", { hostname: "localhost", port: 10809, exportName: "" }],
  ["nbd://h:/x", { hostname: "h", port: 10809, exportName: "x" }],
  ["NBDS://Example.COM/Disk", {
    hostname: "Example.COM",
    port: 10809,
    exportName: "Disk",
    tls: "require",
  }],
  // Export names are free text.
  ["nbd://h/a%2Fb", { hostname: "h", port: 10809, exportName: "a/b" }],
  ["nbd://h/caf%C3%A9", { hostname: "h", port: 10809, exportName: "café" }],
  ["nbd://h/a+b", { hostname: "h", port: 10809, exportName: "a+b" }],
  ["nbd://h/?", { hostname: "h", port: 10809, exportName: "" }],
  // TLS query parameters.
  [
    "nbds://h/d?tls-certificates=/etc/pki/nbd&tls-hostname=nbd.example.com&tls-verify-peer=false",
    {
      hostname: "h",
      port: 10809,
      exportName: "d",
      tls: "require",
      tlsCertificates: "/etc/pki/nbd",
      tlsHostname: "nbd.example.com",
      tlsVerifyPeer: false,
    },
  ],
  ["nbds://h/?tls-verify-peer=0", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsVerifyPeer: false,
  }],
  ["nbds://h/?tls-verify-peer=ON", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsVerifyPeer: true,
  }],
  ["nbds://alice@h/?tls-type=PSK&tls-psk-file=/etc/nbd/keys.psk", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsUsername: "alice",
    tlsPskFile: "/etc/nbd/keys.psk",
  }],
  ["nbds://h/?tls-type=x509&&tls-username=bob", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsUsername: "bob",
  }],
  ["nbds://alice@h/?tls-username=alice", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsUsername: "alice",
  }],
  ["nbds://h/?tls-psk-file=/etc/keys.psk", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsPskFile: "/etc/keys.psk",
  }],
  // nbd: leaves TLS to the caller, settings and all.
  ["nbd://h/?tls-certificates=c%26d", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tlsCertificates: "c&d",
  }],
  ["nbds+unix:///?socket=/s&tls-hostname=localhost", {
    path: "/s",
    exportName: "",
    tls: "require",
    tlsHostname: "localhost",
  }],
];

/**
 * RFC 3986 reads these as below; WHATWG `URL` would not (it removes dot
 * segments, normalises IPv6 literals, refuses zones, vsock ports above 65535
 * and an empty host after a user name), so they pin the parser to RFC 3986.
 */
const RFC3986_NOT_WHATWG: Array<[string, ConnectOptions]> = [
  ["nbd://h/a/../b", { hostname: "h", port: 10809, exportName: "a/../b" }],
  ["nbd://h/./x", { hostname: "h", port: 10809, exportName: "./x" }],
  ["nbd://h/%2e%2e/x", { hostname: "h", port: 10809, exportName: "../x" }],
  ["nbd://h//disk/.", { hostname: "h", port: 10809, exportName: "/disk/." }],
  ["nbd://[2001:DB8:0::7]/", {
    hostname: "2001:DB8:0::7",
    port: 10809,
    exportName: "",
  }],
  ["nbd://[fe80::1%25eth0]:10810/x", {
    hostname: "fe80::1%eth0",
    port: 10810,
    exportName: "x",
  }],
  ["nbd+vsock://3:65536/", { cid: 3, port: 65536, exportName: "" }],
  ["nbds+unix://alice@/?socket=/s", {
    path: "/s",
    exportName: "",
    tls: "require",
    tlsUsername: "alice",
  }],
  // A byte order mark is part of the name, not dropped.
  ["nbd://h/%EF%BB%BFx", { hostname: "h", port: 10809, exportName: "\ufeffx" }],
];

/** The query is RFC 3986, not an HTML form: "+" is a plus sign. */
const PLUS: Array<[string, ConnectOptions]> = [
  ["nbds://h/?tls-hostname=a+b", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsHostname: "a+b",
  }],
  ["nbds://h/?tls-hostname=a%2Bb", {
    hostname: "h",
    port: 10809,
    exportName: "",
    tls: "require",
    tlsHostname: "a+b",
  }],
  ["nbd+unix:///a+b?socket=/run/a+b%20c.sock", {
    path: "/run/a+b c.sock",
    exportName: "a+b",
  }],
];

/** URI, then the exact message of the TypeError. */
const INVALID: Array<[string, string]> = [
  [
    "",
    'no scheme (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock, as in "nbd://host/")',
  ],
  [
    "example.com/disk",
    'no scheme (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock, as in "nbd://host/")',
  ],
  [
    "http://example.com/",
    'unknown scheme "http" (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock)',
  ],
  [
    "nbd+tcp://example.com/",
    'unknown scheme "nbd+tcp" (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock)',
  ],
  ["nbd:example.com", 'it must begin with "nbd://"'],
  ["nbd+unix:/disk?socket=s", 'it must begin with "nbd+unix://"'],
  [
    "nbd://h/disk#1",
    'a fragment ("#1") is not allowed; write "#" in an export name as %23',
  ],
  ["nbd://h/hello world", 'character " " at offset 13 must be percent-encoded'],
  ["nbd://h/café", 'character "é" at offset 11 must be percent-encoded'],
  ["nbd://h/a\nb", 'character "\\n" at offset 9 must be percent-encoded'],
  [
    "nbd://h/a[1]",
    '"[" and "]" may only enclose an IPv6 address; percent-encode them elsewhere (%5B, %5D)',
  ],
  ["nbd://h/?foo=1", `unknown query parameter "foo" (${KNOWN})`],
  ["nbd://h/?x-debug=1", `unknown query parameter "x-debug" (${KNOWN})`],
  [
    "nbd://h/?tls_hostname=x",
    `unknown query parameter "tls_hostname" (${KNOWN})`,
  ],
  [
    "nbd://h/?tls-hostname=a&tls-hostname=b",
    'query parameter "tls-hostname" is given twice',
  ],
  [
    "nbd://h/?socket=/s",
    "socket= is only valid with nbd+unix:// and nbds+unix://, not nbd://",
  ],
  [
    "nbds+vsock:///?socket=/s",
    "socket= is only valid with nbd+unix:// and nbds+unix://, not nbds+vsock://",
  ],
  [
    "nbd+unix:///disk",
    "nbd+unix:// needs a socket= query parameter naming the Unix socket",
  ],
  [
    "nbds+unix:///?tls-hostname=h",
    "nbds+unix:// needs a socket= query parameter naming the Unix socket",
  ],
  [
    "nbd+unix://localhost/?socket=/s",
    'nbd+unix:// takes no host ("localhost"); the socket is named by socket=, and tls-hostname= names the server for TLS',
  ],
  [
    "nbd+unix://:10809/?socket=/s",
    'nbd+unix:// takes no port (":10809"); the socket is named by socket=, and tls-hostname= names the server for TLS',
  ],
  ["nbd+unix:///?socket=", "socket= is empty"],
  ["nbd+unix:///?socket", "socket= is empty"],
  [
    "nbd+unix:///?socket=%00",
    "socket=%00 names no socket in the abstract namespace",
  ],
  [
    "nbd+unix:///?socket=/a%00b",
    "socket= contains NUL (%00) after its start; only a leading %00 (the abstract namespace) is allowed",
  ],
  [
    "nbd://h/a%00b",
    "the export name contains NUL (%00), which NBD export names cannot hold",
  ],
  ["nbd://h/%zz", 'bad percent-encoding "%zz" in the export name'],
  ["nbd://h/a%2", 'bad percent-encoding "%2" in the export name'],
  ["nbd://h/%C3", "the export name is not valid UTF-8 once percent-decoded"],
  [
    "nbd+unix:///?socket=%FF",
    "the socket is not valid UTF-8 once percent-decoded",
  ],
  [
    "nbd://h/?tls-hostname=%G0",
    'bad percent-encoding "%G0" in the tls-hostname',
  ],
  ["nbd://h:99999/", "port 99999 is out of range (1 to 65535)"],
  ["nbd://h:0/", "port 0 is out of range (1 to 65535)"],
  ["nbd://h:abc/", 'port "abc" is not a number'],
  ["nbd://h:-1/", 'port "-1" is not a number'],
  [
    "nbd://::1/",
    '"::1" has more than one ":"; write an IPv6 address in brackets, as in nbd://[::1]/',
  ],
  ["nbd://[::1/", '"[" without "]" in "[::1"'],
  [
    "nbd://::1]/",
    '"]" without "[" in "::1]"',
  ],
  ["nbd://h]/", '"]" without "[" in "h]"'],
  ["nbd://[zz::1]/", '"[zz::1]" is not a valid IPv6 address'],
  ["nbd://[127.0.0.1]/", '"[127.0.0.1]" is not a valid IPv6 address'],
  [
    "nbd://[1:2:3:4:5:6:7:8:9]/",
    '"[1:2:3:4:5:6:7:8:9]" is not a valid IPv6 address',
  ],
  ["nbd://[v1.x]/", 'IPvFuture addresses ("[v1.x]") are not supported'],
  ["nbd://[::1]x/", 'unexpected "x" after "[::1]"'],
  ["nbd://[fe80::1%25]/", 'the IPv6 zone in "[fe80::1%25]" is empty'],
  [
    "nbd://a@b@h/",
    'more than one "@" in "a@b@h"; percent-encode "@" in a user name as %40',
  ],
  [
    "nbds://alice:secret@h/",
    "a password in the URI is not supported; the user name (before @) is only used for TLS",
  ],
  ["nbds://@h/", 'the user name before "@" is empty'],
  ["nbd+vsock://abc/", 'vsock CID "abc" is not a number'],
  [
    "nbd+vsock://4294967296/",
    "vsock CID 4294967296 is out of range (0 to 4294967295)",
  ],
  [
    "nbd+vsock://2:4294967296/",
    "port 4294967296 is out of range (1 to 4294967295)",
  ],
  [
    "nbds://h/?tls-verify-peer=maybe",
    'tls-verify-peer must be true or false (or 1/0, yes/no, on/off), not "maybe"',
  ],
  [
    "nbds://h/?tls-verify-peer",
    'tls-verify-peer must be true or false (or 1/0, yes/no, on/off), not ""',
  ],
  [
    "nbds://h/?tls-type=psk",
    "tls-type=psk needs tls-psk-file=FILE, a file of username:hexkey lines as libnbd reads it",
  ],
  [
    "nbds://h/?tls-type=x509&tls-psk-file=k.psk",
    "tls-type=x509 contradicts tls-psk-file=, which asks for TLS-PSK; use tls-type=psk or leave it out",
  ],
  [
    "nbds://h/?tls-type=anon",
    "tls-type=anon is not supported: anonymous TLS authenticates nobody; use X.509 certificates (tls-certificates=) or TLS-PSK (tls-psk-file=)",
  ],
  ["nbds://h/?tls-type=openpgp", 'tls-type must be x509 or psk, not "openpgp"'],
  [
    "nbds://alice@h/?tls-username=bob",
    'the TLS user name is given twice, differently ("alice@" and tls-username=bob)',
  ],
  ["nbds://h/?tls-certificates=", "tls-certificates= is empty"],
  ["nbds://h/?tls-hostname=", "tls-hostname= is empty"],
  ["nbds://h/?tls-username=", "tls-username= is empty"],
  ["nbds://h/?tls-psk-file=", "tls-psk-file= is empty"],
  // A name that Object.prototype holds is not a scheme.
  [
    "constructor://h/",
    'unknown scheme "constructor" (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock)',
  ],
  [
    `nbd://h/${"x".repeat(4097)}`,
    "the export name is 4097 bytes long; NBD allows at most 4096",
  ],
];

Deno.test("parseUri()", async (t) => {
  for (const [uri, want] of [...VALID, ...RFC3986_NOT_WHATWG, ...PLUS]) {
    await t.step(`reads ${JSON.stringify(uri)}`, () => {
      assert.deepEqual(parseUri(uri), want);
    });
  }
  for (const [uri, message] of INVALID) {
    await t.step(`refuses ${JSON.stringify(uri.slice(0, 60))}`, () => {
      assert.throws(() => parseUri(uri), (e: unknown) => {
        assert.ok(e instanceof TypeError, `expected TypeError, got ${e}`);
        assert.equal(e.message, `Invalid NBD URI: ${message}`);
        return true;
      });
    });
  }
  await t.step("refuses a value that is not a string", () => {
    assert.throws(
      () => parseUri(42 as unknown as string),
      new TypeError("parseUri() takes a string, not number"),
    );
  });
  await t.step("accepts an export name of exactly 4096 bytes", () => {
    assert.equal(
      parseUri(`nbd://h/${"%C3%A9".repeat(2048)}`).exportName,
      "é".repeat(2048),
    );
  });
});

/** URI, then how formatUri writes back what parseUri read. */
const CANONICAL: Array<[string, string]> = [
  ["nbd://example.com:10809/export", "nbd://example.com/export"],
  ["nbd://example.com", "nbd://example.com/"],
  ["nbd://example.com//disk", "nbd://example.com//disk"],
  ["nbd://example.com/hello%20world", "nbd://example.com/hello%20world"],
  ["nbd+unix:///?socket=%00/abstract", "nbd+unix:///?socket=%00/abstract"],
  [
    "nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs",
    "nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs",
  ],
  ["nbd+vsock:///", "nbd+vsock://2/"],
  ["nbds+vsock://3:10810/disk", "nbds+vsock://3:10810/disk"],
  ["nbd://[fe80::1%25eth0]:1/", "nbd://[fe80::1%25eth0]:1/"],
  ["NBDS://h/caf%c3%a9", "nbds://h/caf%C3%A9"],
  ["nbd://h/a%2Fb?", "nbd://h/a/b"],
  [
    "nbds://h/?tls-verify-peer=0&tls-hostname=x&tls-type=x509",
    "nbds://h/?tls-hostname=x&tls-verify-peer=false",
  ],
  ["nbds://h/?tls-username=b%40c", "nbds://b%40c@h/"],
  [
    "nbd://h/?tls-certificates=a%26b%3Dc+d",
    "nbd://h/?tls-certificates=a%26b%3Dc%2Bd",
  ],
];

/** Options that go through formatUri and parseUri unchanged. */
const ROUND_TRIP: ConnectOptions[] = [
  { hostname: "localhost", port: 10809, exportName: "" },
  { hostname: "::1", port: 10810, exportName: "/disk", tls: "require" },
  { hostname: "nbd.example.com", port: 1, exportName: "a b&c=d#e?f%g+h" },
  { path: "/run/nbd.sock", exportName: "my disk" },
  { path: "\0abstract", exportName: "x", tls: "require", tlsHostname: "n" },
  { cid: 2, port: 10809, exportName: "" },
  { cid: 4294967295, port: 4294967295, exportName: "é", tls: "require" },
  {
    hostname: "h",
    port: 10809,
    exportName: "e",
    tls: "require",
    tlsCertificates: "/etc/pki/my nbd",
    tlsHostname: "nbd.example.com",
    tlsVerifyPeer: true,
    tlsUsername: "alice:x@y",
    tlsPskFile: "/etc/keys.psk",
  },
  {
    hostname: "h",
    port: 10809,
    exportName: "",
    tlsCertificates: "c",
    tlsVerifyPeer: false,
  },
  { hostname: "h", port: 10809, exportName: "a/../b", tlsHostname: "a+b" },
  { cid: 3, port: 65536, exportName: "./x" },
  { path: "/run/a+b.sock", exportName: "+", tlsCertificates: "/c+d" },
];

Deno.test("formatUri()", async (t) => {
  for (const [uri, canonical] of CANONICAL) {
    await t.step(`writes ${JSON.stringify(uri)} as ${canonical}`, () => {
      assert.equal(formatUri(parseUri(uri)), canonical);
      assert.deepEqual(parseUri(canonical), parseUri(uri));
    });
  }
  for (const options of ROUND_TRIP) {
    await t.step(`round-trips ${JSON.stringify(options)}`, () => {
      assert.deepEqual(parseUri(formatUri(options)), options);
    });
  }
  await t.step("fills in localhost and leaves out the default port", () => {
    assert.equal(formatUri({}), "nbd://localhost/");
    assert.equal(
      formatUri({ port: 10809, exportName: "d" }),
      "nbd://localhost/d",
    );
  });
  await t.step(
    'writes tls: "prefer" as nbd:, which has no way to say it',
    () => {
      assert.equal(
        formatUri({ hostname: "h", tls: "prefer", tlsHostname: "n" }),
        "nbd://h/?tls-hostname=n",
      );
    },
  );
  await t.step("leaves out what a URI cannot carry", () => {
    assert.equal(
      formatUri({
        hostname: "h",
        caCerts: ["PEM"],
        tlsClientCert: "PEM",
        tlsClientKey: "PEM",
        metaContexts: ["base:allocation"],
      }),
      "nbd://h/",
    );
  });

  const refusals: Array<[ConnectOptions, string]> = [
    [
      { hostname: "h", path: "/s" },
      "formatUri(): give only one of hostname, path and cid to say where the server is",
    ],
    [
      { path: "/s", port: 1 },
      "formatUri(): a Unix socket (path) takes no port",
    ],
    [
      { hostname: "h", exportName: "a\0b" },
      "formatUri(): the export name contains NUL, which NBD export names cannot hold",
    ],
    [
      { hostname: "h", port: 65536 },
      "formatUri(): port must be an integer from 1 to 65535, not 65536",
    ],
    [
      { cid: -1 },
      "formatUri(): cid must be an integer from 0 to 4294967295, not -1",
    ],
    [{ path: "" }, "formatUri(): path must name a socket"],
    [
      { path: "/a\0b" },
      "formatUri(): path contains NUL after its start; only a leading NUL (the abstract namespace) is allowed",
    ],
    [
      { hostname: "[::1]" },
      'formatUri(): hostname "[::1]" has ":" but is not an IPv6 address (give it without brackets)',
    ],
    [
      { hostname: "h", exportName: "\ud800" },
      'formatUri(): "\\ud800" is not well-formed Unicode',
    ],
  ];
  for (const [options, message] of refusals) {
    await t.step(`refuses ${JSON.stringify(options)}`, () => {
      assert.throws(() => formatUri(options), new TypeError(message));
    });
  }
});
