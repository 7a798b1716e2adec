/**
 * `lib/tls/` on its own: credentials, refusals, and `upgradeToTls` over a
 * connection whose fixed-newstyle greeting and `NBD_OPT_STARTTLS` are done by
 * hand here, against nbdkit with a throwaway PKI.
 */

import assert from "node:assert/strict";
import {
  OPT_ABORT,
  OPT_STARTTLS,
  OPTION_REPLY_MAGIC,
  REP_ACK,
} from "../lib/constants.ts";
import { NbdConnectionClosedError } from "../lib/errors.ts";
import { loadTlsCredentials, readTlsFiles } from "../lib/tls/credentials.ts";
import type { TlsEngine } from "../lib/connect_options.ts";
import { resolveOptions } from "../lib/_resolve_options.ts";
import { NbdTlsError } from "../lib/tls/error.ts";
import type { TlsStream } from "../lib/tls/stream.ts";
import {
  refuseUnsupportedTls,
  type UpgradeOptions,
  upgradeToTls,
} from "../lib/tls/upgrade.ts";
import type { ByteStream } from "../lib/transport.ts";
import { encodeOption } from "../lib/_wire.ts";
import type { Server } from "./support/servers.ts";
import { makeTestPki, startTlsNbdkits } from "./support/certs.ts";
import { readExact, writeAll } from "./support/io.ts";

/** Reads one option reply header and asserts it is an empty ACK to `opt`. */
async function expectAck(s: ByteStream, opt: number): Promise<void> {
  const r = await readExact(s, 8 + 4 + 4 + 4); // magic, option, type, length
  const v = new DataView(r.buffer);
  assert.equal(v.getBigUint64(0), OPTION_REPLY_MAGIC);
  assert.equal(v.getUint32(8), opt);
  assert.equal(v.getUint32(12), REP_ACK);
  assert.equal(v.getUint32(16), 0);
}

/** Greets a fixed-newstyle server and gets NBD_OPT_STARTTLS acknowledged. */
async function startTls(conn: Deno.Conn): Promise<void> {
  await readExact(conn, 8 + 8 + 2); // NBDMAGIC, IHAVEOPT, handshake flags
  await writeAll(conn, new Uint8Array([0, 0, 0, 3])); // FIXED_NEWSTYLE|NO_ZEROES
  await writeAll(conn, encodeOption(OPT_STARTTLS));
  await expectAck(conn, OPT_STARTTLS);
}

async function openTcp(server: Server): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({
    hostname: "127.0.0.1",
    port: server.port!,
  });
  await startTls(conn);
  return conn;
}

async function openUnix(server: Server): Promise<Deno.UnixConn> {
  const conn = await Deno.connect({ transport: "unix", path: server.socket! });
  await startTls(conn);
  return conn;
}

/** Proves the TLS stream carries NBD: NBD_OPT_ABORT is acknowledged. */
async function abortOverTls(secure: ByteStream): Promise<void> {
  await writeAll(secure, encodeOption(OPT_ABORT));
  await expectAck(secure, OPT_ABORT);
}

/**
 * Upgrades `conn`, lets `check` look at the TLS stream, proves that the
 * stream carries NBD, and closes it.
 */
async function carriesNbd(
  conn: Deno.Conn,
  options: UpgradeOptions,
  check: (secure: TlsStream) => void = () => {},
): Promise<void> {
  const secure = await upgradeToTls(conn, options);
  try {
    check(secure);
    await abortOverTls(secure);
  } finally {
    secure.close();
  }
}

/**
 * How a TLS session the server refuses fails: in the handshake, or (TLS
 * 1.3, where the client's side of the handshake completes first) with the
 * first exchange after it; `undefined` if neither failed.
 */
async function sessionFailure(
  conn: Deno.Conn,
  options: UpgradeOptions,
): Promise<unknown> {
  const secure = await upgradeToTls(conn, options).catch((e) => e);
  if (secure instanceof Error) return secure;
  try {
    return await abortOverTls(secure).then(() => undefined, (e) => e);
  } finally {
    secure.close();
  }
}

function assertTlsError(code: string | undefined, message: RegExp) {
  return (e: unknown): boolean => {
    assert.ok(e instanceof NbdTlsError, `expected NbdTlsError, got ${e}`);
    if (code !== undefined) assert.equal(e.code, code);
    assert.match(e.message, message);
    return true;
  };
}

Deno.test("loadTlsCredentials()", async (t) => {
  await using pki = await makeTestPki();

  await t.step(
    "reads ca-cert.pem and the client pair from the directory",
    async () => {
      const c = await loadTlsCredentials({ tlsCertificates: pki.clientDir });
      assert.deepEqual(c, {
        ca: [pki.caCert],
        cert: pki.clientCert,
        key: pki.clientKey,
      });
    },
  );

  await t.step(
    "sends no certificate when the directory has only the CA",
    async () => {
      const c = await loadTlsCredentials({
        tlsCertificates: pki.clientNoCertDir,
      });
      assert.deepEqual(c, { ca: [pki.caCert] });
    },
  );

  await t.step("adds caCerts to the directory's CA", async () => {
    const c = await loadTlsCredentials({
      tlsCertificates: pki.clientNoCertDir,
      caCerts: ["extra"],
    });
    assert.deepEqual(c.ca, ["extra", pki.caCert]);
  });

  await t.step(
    "prefers tlsClientCert and tlsClientKey to the directory's pair",
    async () => {
      const c = await loadTlsCredentials({
        tlsCertificates: pki.clientDir,
        tlsClientCert: "C",
        tlsClientKey: "K",
      });
      assert.equal(c.cert, "C");
      assert.equal(c.key, "K");
    },
  );

  await t.step("uses the default roots when nothing names a CA", async () => {
    assert.deepEqual(await loadTlsCredentials({}), {});
  });

  await t.step("refuses a directory that does not exist", async () => {
    await assert.rejects(
      loadTlsCredentials({ tlsCertificates: `${pki.root}/nowhere` }),
      assertTlsError(
        undefined,
        /^Cannot use TLS certificates directory ".*\/nowhere": /,
      ),
    );
  });

  await t.step("refuses a client certificate without its key", async () => {
    const dir = `${pki.root}/half`;
    await Deno.mkdir(dir);
    await Deno.copyFile(
      `${pki.clientDir}/client-cert.pem`,
      `${dir}/client-cert.pem`,
    );
    await assert.rejects(
      loadTlsCredentials({ tlsCertificates: dir }),
      assertTlsError(undefined, /has client-cert\.pem but no client-key\.pem$/),
    );
    await assert.rejects(
      loadTlsCredentials({ tlsClientKey: "K" }),
      assertTlsError(
        undefined,
        /^tlsClientKey was given without tlsClientCert$/,
      ),
    );
  });

  await t.step(
    "refuses ca-crl.pem rather than ignore revocations",
    async () => {
      const dir = `${pki.root}/crl`;
      await Deno.mkdir(dir);
      await Deno.writeTextFile(`${dir}/ca-crl.pem`, "");
      await assert.rejects(
        loadTlsCredentials({ tlsCertificates: dir }),
        assertTlsError(
          undefined,
          /certificate revocation lists are not supported/,
        ),
      );
    },
  );
});

Deno.test("refuseUnsupportedTls() refuses TLS-PSK by name", () => {
  assert.throws(
    () => refuseUnsupportedTls({ tlsPskFile: "/etc/keys.psk" }),
    assertTlsError(
      undefined,
      /^TLS-PSK \(tlsPskFile "\/etc\/keys\.psk"\) is not supported: Deno's TLS \(rustls\) has no pre-shared-key cipher suites/,
    ),
  );
  refuseUnsupportedTls({ tlsCertificates: "/etc/pki/nbd" });
});

Deno.test("upgradeToTls()", async (t) => {
  await using pki = await makeTestPki();
  await using servers = await startTlsNbdkits(pki);
  const { tcp, unix, verifying } = servers;
  await t.step(
    "verifies chain and host name over TCP and carries options",
    async () => {
      await carriesNbd(await openTcp(tcp), {
        hostname: "localhost",
        tlsCertificates: pki.clientNoCertDir,
      }, (secure) => {
        assert.equal(secure.verified, true);
        assert.match(secure.protocol ?? "", /^TLSv1\.[23]$/);
      });
    },
  );

  await t.step("tells the debug hook what was negotiated", async () => {
    const events: Array<[string, Record<string, unknown>]> = [];
    const secure = await upgradeToTls(await openTcp(tcp), {
      hostname: "localhost",
      tlsCertificates: pki.clientNoCertDir,
      debug: (event, fields) => events.push([event, fields]),
    });
    secure.close();
    assert.deepEqual(events, [["tls.handshake", {
      hostname: "localhost",
      protocol: secure.protocol,
      cipher: secure.cipher,
      verified: true,
      clientCertificate: false,
    }]]);
  });

  await t.step(
    "checks an IP address against the certificate's IP names",
    async () => {
      await carriesNbd(await openTcp(tcp), {
        hostname: "127.0.0.1",
        caCerts: [pki.caCert],
      });
    },
  );

  await t.step("rejects a certificate from an unknown CA", async () => {
    await assert.rejects(
      upgradeToTls(await openTcp(tcp), {
        hostname: "localhost",
        tlsCertificates: pki.otherDir,
      }),
      assertTlsError(
        "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
        /^TLS handshake with localhost failed: the server's certificate is not signed by a trusted CA/,
      ),
    );
  });

  await t.step("rejects a certificate for another name", async () => {
    await assert.rejects(
      upgradeToTls(await openTcp(tcp), {
        hostname: "localhost",
        tlsHostname: "nbd.example.com",
        tlsCertificates: pki.clientNoCertDir,
      }),
      assertTlsError(
        "ERR_TLS_CERT_ALTNAME_INVALID",
        /^TLS handshake with nbd\.example\.com failed: the server's certificate is not valid for the name "nbd\.example\.com"; set tlsHostname/,
      ),
    );
  });

  await t.step("accepts anything with tlsVerifyPeer: false", async () => {
    await carriesNbd(await openTcp(tcp), {
      hostname: "nbd.example.com",
      tlsCertificates: pki.otherDir,
      tlsVerifyPeer: false,
    }, (secure) => assert.equal(secure.verified, false));
  });

  await t.step("works over a Unix socket, checking the chain", async () => {
    await carriesNbd(await openUnix(unix), {
      path: unix.socket!,
      tlsCertificates: pki.clientNoCertDir,
    }, (secure) => assert.equal(secure.verified, true));
    await assert.rejects(
      upgradeToTls(await openUnix(unix), {
        path: unix.socket!,
        tlsCertificates: pki.otherDir,
      }),
      assertTlsError(
        "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
        /^TLS handshake with the server failed/,
      ),
    );
  });

  await t.step("checks tlsHostname over a Unix socket", async () => {
    await assert.rejects(
      upgradeToTls(await openUnix(unix), {
        path: unix.socket!,
        tlsHostname: "nbd.example.com",
        tlsCertificates: pki.clientNoCertDir,
      }),
      assertTlsError("ERR_TLS_CERT_ALTNAME_INVALID", /nbd\.example\.com/),
    );
    const secure = await upgradeToTls(await openUnix(unix), {
      path: unix.socket!,
      tlsHostname: "localhost",
      tlsCertificates: pki.clientNoCertDir,
    });
    secure.close();
  });

  await t.step(
    "sends the client certificate a verifying server asks for",
    async () => {
      await carriesNbd(await openTcp(verifying), {
        hostname: "localhost",
        tlsCertificates: pki.clientDir,
      });
    },
  );

  await t.step(
    "reports a verifying server that wanted a client certificate",
    async () => {
      // TLS 1.3: the client's side of the handshake completes; the server's
      // refusal arrives with the first read.
      const failure = await sessionFailure(await openTcp(verifying), {
        hostname: "localhost",
        tlsCertificates: pki.clientNoCertDir,
      });
      assertTlsError(undefined, /it may require a client certificate/)(
        failure,
      );
    },
  );

  await t.step(
    "reports a client certificate the server does not trust",
    async () => {
      // The other directory's CA cannot verify the server; trust ours too.
      const failure = await sessionFailure(await openTcp(verifying), {
        hostname: "localhost",
        caCerts: [pki.caCert],
        tlsCertificates: pki.otherDir,
        tlsVerifyPeer: true,
      });
      assertTlsError(
        undefined,
        /it may not trust the client certificate that was sent/,
      )(failure);
    },
  );

  await t.step(
    "refuses TLS-PSK before the handshake and closes the stream",
    async () => {
      const conn = await openTcp(tcp);
      await assert.rejects(
        upgradeToTls(conn, { hostname: "localhost", tlsPskFile: "keys.psk" }),
        assertTlsError(undefined, /^TLS-PSK/),
      );
      await assert.rejects(
        conn.read(new Uint8Array(1)),
        Deno.errors.BadResource,
      );
    },
  );

  await t.step(
    "reads and writes at once, and close() fails a pending read",
    async () => {
      const secure: TlsStream = await upgradeToTls(await openTcp(tcp), {
        hostname: "localhost",
        tlsCertificates: pki.clientNoCertDir,
      });
      const header = new Uint8Array(20);
      const reading = readExact(secure, 20).then((b) => header.set(b));
      await writeAll(secure, encodeOption(OPT_ABORT));
      await reading;
      assert.equal(new DataView(header.buffer).getUint32(12), REP_ACK);
      const pending = secure.read(new Uint8Array(1));
      secure.close();
      await assert.rejects(pending, NbdConnectionClosedError);
      await assert.rejects(
        secure.write(encodeOption(OPT_ABORT)),
        NbdConnectionClosedError,
      );
    },
  );
});

Deno.test(
  "upgradeToTls() gives up when the signal aborts",
  async () => {
    // A peer that never answers the ClientHello.
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const accepted = listener.accept();
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: (listener.addr as Deno.NetAddr).port,
    });
    const peer = await accepted;
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new Error("gave up")),
      100,
    );
    try {
      await assert.rejects(
        upgradeToTls(conn, {
          hostname: "localhost",
          signal: controller.signal,
        }),
        /^Error: gave up$/,
      );
    } finally {
      clearTimeout(timer);
      peer.close();
      listener.close();
    }
  },
);

Deno.test("a tlsEngine takes the handshake", async (t) => {
  const fakeStream = (): ByteStream & { closed: number } => {
    const s = {
      closed: 0,
      read: () => Promise.resolve(null),
      write: (p: Uint8Array) => Promise.resolve(p.length),
      close: () => {
        s.closed++;
      },
    };
    return s;
  };
  const secure: TlsStream = {
    protocol: "TLSv1.3",
    cipher: "AES-128-GCM",
    verified: true,
    read: () => Promise.resolve(null),
    write: (p: Uint8Array) => Promise.resolve(p.length),
    close: () => {},
  };
  const engine = (
    upgrade: TlsEngine["upgrade"],
  ): TlsEngine => ({ name: "fake", psk: true, upgrade });

  await t.step("upgradeToTls() returns the engine's stream", async () => {
    const raw = fakeStream();
    const events: Record<string, unknown>[] = [];
    const seen: UpgradeOptions[] = [];
    const out = await upgradeToTls(raw, {
      hostname: "nbd.example",
      tlsPskFile: "keys.psk",
      tlsEngine: engine((_s, o) => {
        seen.push(o);
        return Promise.resolve(secure);
      }),
      debug: (event, fields) => {
        if (event === "tls.handshake") events.push(fields);
      },
    });
    assert.equal(out, secure);
    assert.equal(raw.closed, 0, "the engine owns the raw stream");
    assert.equal(seen[0]?.tlsPskFile, "keys.psk");
    assert.equal(events[0]?.engine, "fake");
    assert.equal(events[0]?.cipher, "AES-128-GCM");
  });

  await t.step(
    "an engine that cannot use the stream leaves it to the built-in path",
    async () => {
      const raw = fakeStream();
      await assert.rejects(
        upgradeToTls(raw, {
          tlsPskFile: "keys.psk",
          tlsEngine: engine(() => Promise.resolve(undefined)),
        }),
        (e: unknown) =>
          e instanceof NbdTlsError &&
          /needs a socket the fake engine opened itself/.test(e.message),
      );
      assert.equal(raw.closed, 1);
    },
  );

  await t.step(
    "a failing engine's error comes through, stream closed",
    async () => {
      const raw = fakeStream();
      await assert.rejects(
        upgradeToTls(raw, {
          tlsEngine: engine(() => Promise.reject(new NbdTlsError("no"))),
        }),
        /^NbdTlsError: no$/,
      );
      assert.equal(raw.closed, 1);
    },
  );

  await t.step("resolveOptions() checks the option's shape", () => {
    for (const bad of [5, null, {}, "gnutls", { upgrade: 1 }]) {
      assert.throws(
        () => resolveOptions("nbd://h/", { tlsEngine: bad as never }),
        (e: unknown) =>
          e instanceof TypeError && /^tlsEngine must be a TLS engine/.test(
            e.message,
          ),
      );
    }
    const ok = engine(() => Promise.resolve(undefined));
    assert.equal(resolveOptions("nbds://h/", { tlsEngine: ok }).tlsEngine, ok);
    // With an engine that has PSK, a PSK file is no longer refused.
    resolveOptions("nbds://h/?tls-psk-file=k.psk", { tlsEngine: ok });
  });

  await t.step(
    "readTlsFiles() hands ca-crl.pem to an engine that checks it",
    async () => {
      const dir = await Deno.makeTempDir({ prefix: "nbd-crl-" });
      try {
        await Deno.writeTextFile(`${dir}/ca-cert.pem`, "CA");
        await Deno.writeTextFile(`${dir}/ca-crl.pem`, "CRL");
        const files = await readTlsFiles({ tlsCertificates: dir }, true);
        assert.deepEqual(files, { crl: "CRL", ca: ["CA"] });
        await assert.rejects(
          readTlsFiles({ tlsCertificates: dir }, false),
          /revocation lists are not supported.*--allow-ffi/,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  );
});
