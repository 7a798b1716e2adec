/**
 * The GnuTLS engine's parts on their own: the PSK key file, the mapping of
 * verification results to codes, when `connect()` lets the engine dial,
 * and the stream's life cycle (an aborted handshake, close() waking a
 * read) against servers that never answer.
 */

import assert from "node:assert/strict";
import { connect, NbdTlsError } from "../../mod.ts";
import { findPskKey, gnutls, gnutlsIfAllowed } from "../../ffi/mod.ts";
import { libc } from "../../ffi/_libc.ts";
import { socketPair } from "../../ffi/_relay.ts";
import { FdStream } from "../../ffi/_fd_stream.ts";
import { verifyCode } from "../../ffi/gnutls/stream.ts";
import {
  GNUTLS_CERT_EXPIRED,
  GNUTLS_CERT_INVALID,
  GNUTLS_CERT_NOT_ACTIVATED,
  GNUTLS_CERT_REVOKED,
  GNUTLS_CERT_SIGNER_NOT_FOUND,
  GNUTLS_CERT_UNEXPECTED_OWNER,
  strerror,
} from "../../ffi/gnutls/_lib.ts";
import { engineDial, refuseUnsupportedTls } from "../../lib/tls/upgrade.ts";
import { upgradeToTls } from "../../lib/tls/upgrade.ts";

// Both libraries stay loaded for the process: load them before any test.
libc();
assert.equal(gnutlsIfAllowed(), gnutls);

const BOUND_MS = 10_000;

Deno.test("findPskKey() reads libnbd's username:hexkey lines", async (t) => {
  const file = "alice:00ff\nbob:0123456789ABCDEF\r\n\ncarol:aa\n";

  await t.step("finds the user's line, any case of hex", () => {
    assert.deepEqual(findPskKey(file, "bob", "k"), {
      username: "bob",
      hexKey: "0123456789ABCDEF",
    });
    assert.equal(findPskKey(file, "carol", "k").hexKey, "aa");
  });

  await t.step("names the user the file lacks", () => {
    assert.throws(
      () => findPskKey(file, "dave", "keys.psk"),
      (e: unknown) =>
        e instanceof NbdTlsError &&
        /TLS-PSK file "keys\.psk" has no key for user "dave"/.test(e.message),
    );
  });

  await t.step("refuses a malformed line by number", () => {
    for (const bad of ["alice", ":00ff", "alice:0g", "alice:abc", "alice:"]) {
      assert.throws(
        () => findPskKey(`bob:00\n${bad}\n`, "alice", "k"),
        (e: unknown) =>
          e instanceof NbdTlsError && /line 2 is not "username:hexkey"/.test(
            e.message,
          ),
        bad,
      );
    }
  });

  await t.step("takes only the first colon as the separator", () => {
    assert.throws(() => findPskKey("a:b:00\n", "a", "k"), NbdTlsError);
  });
});

Deno.test("verifyCode() gives node:tls's codes for GnuTLS's status bits", () => {
  const invalid = GNUTLS_CERT_INVALID;
  assert.equal(
    verifyCode(invalid | GNUTLS_CERT_SIGNER_NOT_FOUND),
    "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  );
  assert.equal(
    verifyCode(invalid | GNUTLS_CERT_UNEXPECTED_OWNER),
    "ERR_TLS_CERT_ALTNAME_INVALID",
  );
  assert.equal(verifyCode(invalid | GNUTLS_CERT_EXPIRED), "CERT_HAS_EXPIRED");
  assert.equal(
    verifyCode(invalid | GNUTLS_CERT_NOT_ACTIVATED),
    "CERT_NOT_YET_VALID",
  );
  assert.equal(verifyCode(invalid | GNUTLS_CERT_REVOKED), "CERT_REVOKED");
  // An unknown signer says more than a name mismatch on the same chain.
  assert.equal(
    verifyCode(
      invalid | GNUTLS_CERT_SIGNER_NOT_FOUND | GNUTLS_CERT_UNEXPECTED_OWNER,
    ),
    "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  );
  assert.equal(verifyCode(invalid), undefined);
});

Deno.test("strerror() is GnuTLS's own text", () => {
  assert.match(strerror(-28), /again/i); // GNUTLS_E_AGAIN
});

Deno.test("refuseUnsupportedTls() lets PSK through only with an engine that has it", () => {
  assert.throws(
    () => refuseUnsupportedTls({ tlsPskFile: "k.psk" }),
    /--allow-ffi and pass tlsEngine: gnutls/,
  );
  refuseUnsupportedTls({ tlsPskFile: "k.psk", tlsEngine: gnutls });
  assert.throws(
    () =>
      refuseUnsupportedTls({
        tlsPskFile: "k.psk",
        tlsEngine: { ...gnutls, name: "x", psk: false },
      }),
    NbdTlsError,
  );
});

Deno.test("engineDial() lets the engine dial only when TLS is asked for", () => {
  const at = { hostname: "localhost", port: 1 };
  assert.equal(engineDial({ ...at }), undefined);
  assert.equal(engineDial({ ...at, tls: "require" }), undefined);
  assert.equal(engineDial({ ...at, tlsEngine: gnutls }), undefined);
  assert.equal(
    engineDial({ ...at, tlsEngine: gnutls, tls: "disable" }),
    undefined,
  );
  for (
    const o of [
      { tls: "require" as const },
      { tls: "prefer" as const },
      { tlsPskFile: "k.psk" },
      { tlsCertificates: "/etc/pki/nbd" },
    ]
  ) {
    assert.equal(
      typeof engineDial({ ...at, tlsEngine: gnutls, ...o }),
      "function",
      JSON.stringify(o),
    );
  }
  // An engine without dial() works over Deno.connect's streams.
  const { dial: _, ...noDial } = gnutls;
  assert.equal(
    engineDial({ ...at, tls: "require", tlsEngine: noDial }),
    undefined,
  );
});

Deno.test("the GnuTLS engine over a socket", async (t) => {
  await t.step(
    "leaves a stream without a descriptor to the built-in path",
    async () => {
      const closed: string[] = [];
      const stream = {
        read: () => Promise.resolve(null),
        write: (p: Uint8Array) => Promise.resolve(p.length),
        close: () => closed.push("closed"),
      };
      assert.equal(
        await gnutls.upgrade(stream, { tlsCertificates: "/nonexistent" }),
        undefined,
      );
      assert.deepEqual(closed, []);
      // PSK has no built-in path: refused, and the stream closed.
      await assert.rejects(
        upgradeToTls(stream, {
          tlsPskFile: "/nonexistent.psk",
          tlsEngine: gnutls,
        }),
        /needs a socket the gnutls engine opened itself/,
      );
      assert.deepEqual(closed, ["closed"]);
    },
  );

  await t.step(
    "gives up a handshake the server never answers when the signal aborts",
    async () => {
      const [ours, theirs] = socketPair();
      try {
        const controller = new AbortController();
        const timer = setTimeout(
          () => controller.abort(new Error("gave up")),
          100,
        );
        await assert.rejects(
          upgradeToTls(new FdStream(ours), {
            tlsVerifyPeer: false,
            tlsEngine: gnutls,
            signal: controller.signal,
          }),
          /gave up/,
        );
        clearTimeout(timer);
      } finally {
        libc().close(theirs);
      }
    },
  );

  await t.step(
    "says so when the server hangs up in the handshake",
    async () => {
      const [ours, theirs] = socketPair();
      libc().close(theirs);
      await assert.rejects(
        upgradeToTls(new FdStream(ours), {
          tlsVerifyPeer: false,
          tlsEngine: gnutls,
          hostname: "nbd.example",
          signal: AbortSignal.timeout(BOUND_MS),
        }),
        (e: unknown) =>
          e instanceof NbdTlsError &&
          /^TLS handshake with nbd\.example failed: GnuTLS: /.test(e.message),
      );
    },
  );
});

/**
 * A server that says the fixed newstyle greeting, acknowledges
 * `NBD_OPT_STARTTLS`, and then says nothing more: a TLS handshake that
 * never ends. `done` settles when the client closes its socket.
 */
function silentAfterStartTls(): {
  port: number;
  done: Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
} {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let conn: Deno.Conn | undefined;
  const done = (async () => {
    conn = await listener.accept();
    const w = conn.writable.getWriter();
    const greeting = new Uint8Array(8 + 8 + 2);
    greeting.set(new TextEncoder().encode("NBDMAGICIHAVEOPT"));
    greeting[17] = 3; // FIXED_NEWSTYLE | NO_ZEROES
    await w.write(greeting);
    // Client flags (4) and the option header (16): NBD_OPT_STARTTLS.
    const r = conn.readable.getReader({ mode: "byob" });
    let got = 0;
    let buf = new Uint8Array(20);
    while (got < 20) {
      const { value, done } = await r.read(buf.subarray(got));
      if (done || value === undefined) return;
      got += value.length;
      buf = new Uint8Array(value.buffer);
    }
    const ack = new Uint8Array(8 + 4 + 4 + 4);
    const view = new DataView(ack.buffer);
    view.setBigUint64(0, 0x3e889045565a9n); // option reply magic
    view.setUint32(8, 5); // NBD_OPT_STARTTLS
    view.setUint32(12, 1); // NBD_REP_ACK
    await w.write(ack);
    // The ClientHello, then the client's close.
    for (;;) {
      const { done } = await r.read(new Uint8Array(4096));
      if (done) break;
    }
    r.releaseLock();
    w.releaseLock();
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    done,
    async [Symbol.asyncDispose]() {
      listener.close();
      try {
        conn?.close();
      } catch {
        // Closed by the client's side already.
      }
      await done.catch(() => {});
    },
  };
}

Deno.test("connect() with the GnuTLS engine: the connect timeout ends a handshake the server never answers", async () => {
  await using server = silentAfterStartTls();
  const t0 = performance.now();
  await assert.rejects(
    connect(`nbds://127.0.0.1:${server.port}/`, {
      tlsEngine: gnutls,
      tlsVerifyPeer: false,
      connectTimeout: 300,
    }),
    /300 ms/,
  );
  // The client let go of its socket: the session ended with the timeout.
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    server.done,
    new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error("the client kept its socket open")),
        3000,
      );
    }),
  ]).finally(() => clearTimeout(timer));
  assert.ok(performance.now() - t0 < BOUND_MS);
});
