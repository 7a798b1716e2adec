/**
 * The GnuTLS engine (`tlsEngine: gnutls` from `@nbd/client/ffi`) end to end:
 * nbdkit and qemu-nbd with X.509 certificates and with TLS-PSK, and every
 * refusal as a typed error before anything but `NBD_OPT_STARTTLS` crossed
 * the wire in clear (wrong CA, a certificate from a CA that was not given,
 * wrong host, a revoked certificate, wrong key, unknown user, a server
 * without TLS).
 */

import assert from "node:assert/strict";
import {
  connect,
  type ConnectOptions,
  NbdConnectionClosedError,
} from "../../mod.ts";
import { gnutls, gnutlsIfAllowed } from "../../ffi/mod.ts";
import { libc } from "../../ffi/_libc.ts";
import { connectForKernel, hangUp } from "../../ffi/_connect.ts";
import { GnutlsStream } from "../../ffi/gnutls/stream.ts";
import { output } from "../support/command.ts";
import { tlsFailure, tlsRequired, tlsRoundTrip } from "../support/tls.ts";
import {
  makeCrlDir,
  makeOtherCaServerDir,
  makeTestPki,
} from "../support/certs.ts";
import { nbdkit, qemuNbd, type Server } from "../support/servers.ts";

// Both libraries stay loaded for the process: load them before any test,
// so the resource sanitizer does not count them against the first one.
libc();
assert.equal(gnutlsIfAllowed(), gnutls, "GnuTLS loads under --allow-ffi");

const BOUND_MS = 15_000;
const TOOLS = new URL("../../examples/", import.meta.url).pathname;
const KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER_KEY =
  "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/** Every wait bounded; the GnuTLS engine on. */
function opts(options: ConnectOptions = {}): ConnectOptions {
  return {
    signal: AbortSignal.timeout(BOUND_MS),
    tlsEngine: gnutls,
    ...options,
  };
}

/** The shared round trip, bounded, through GnuTLS. */
function roundTrip(
  target: string | ConnectOptions,
  options?: ConnectOptions,
): Promise<void> {
  return tlsRoundTrip(target, opts(options));
}

/**
 * Connects through GnuTLS and closes, checking that TLS was used: what each
 * `tls.handshake` debug event said.
 */
async function handshakes(uri: string): Promise<Record<string, unknown>[]> {
  const events: Record<string, unknown>[] = [];
  const client = await connect(
    uri,
    opts({
      debug: (event, fields) => {
        if (event === "tls.handshake") events.push(fields);
      },
    }),
  );
  try {
    assert.equal(client.tls, true, "TLS was not negotiated");
  } finally {
    await client.close();
  }
  return events;
}

/** A relay on a Unix socket to a TCP server that records what the client sent. */
interface Tap extends AsyncDisposable {
  /** The Unix socket to connect to. */
  path: string;
  /** Everything the client sent, once the relay is done. */
  sent(): Promise<Uint8Array>;
}

async function tap(port: number): Promise<Tap> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-tap-" });
  const path = `${dir}/tap.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const chunks: Uint8Array[] = [];
  const done = (async () => {
    const inbound = await listener.accept();
    const outbound = await Deno.connect({ hostname: "127.0.0.1", port });
    const record = new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        chunks.push(chunk.slice());
        controller.enqueue(chunk);
      },
    });
    await Promise.allSettled([
      inbound.readable.pipeThrough(record).pipeTo(outbound.writable),
      outbound.readable.pipeTo(inbound.writable),
    ]);
  })();
  const bounded = () =>
    Promise.race([
      done,
      new Promise<void>((_, reject) => {
        const id = setTimeout(
          () => reject(new Error("the tap did not finish")),
          BOUND_MS,
        );
        done.finally(() => clearTimeout(id));
      }),
    ]);
  return {
    path,
    async sent() {
      await bounded();
      return new Uint8Array(chunks.flatMap((c) => [...c]));
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      await bounded().catch(() => {});
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** The export name never crossed the wire in clear. */
async function assertNothingInClear(t: Tap, secret: string): Promise<void> {
  const sent = await t.sent();
  const text = new TextDecoder("latin1").decode(sent);
  assert.ok(sent.length > 0, "the client sent nothing");
  assert.ok(!text.includes(secret), `"${secret}" was sent in clear`);
}

Deno.test("GnuTLS engine with nbdkit and X.509 certificates", async (t) => {
  await using pki = await makeTestPki();
  const otherServer = await makeOtherCaServerDir(pki);
  const tls = ["--tls=require", `--tls-certificates=${pki.serverDir}`];
  const started: Server[] = [];
  const start = async (args: string[], tcp: boolean, params: string[] = []) => {
    const s = await nbdkit([...args, "memory", "1M", ...params], { tcp });
    started.push(s);
    return s;
  };
  try {
    const tcp = await start(tls, true);
    const unix = await start(tls, false);
    const verifying = await start([...tls, "--tls-verify-peer"], true);
    const other = await start(
      ["--tls=require", `--tls-certificates=${otherServer}`],
      true,
    );
    const plain = await start([], true);
    const slow = await start([...tls, "--filter=delay"], true, ["rdelay=5"]);
    const ca = `tls-certificates=${pki.clientNoCertDir}`;

    await t.step("reads and writes over nbds:// (TCP)", async () => {
      await roundTrip(`nbds://localhost:${tcp.port}/?${ca}`);
    });

    await t.step("reads and writes over a Unix socket", async () => {
      await roundTrip(
        `nbds+unix:///?socket=${unix.socket}&${ca}&tls-hostname=localhost`,
      );
    });

    await t.step("verifies an IPv4 address: nbds://127.0.0.1", async () => {
      await roundTrip(`nbds://127.0.0.1:${tcp.port}/?${ca}`);
    });

    await t.step("trusts caCerts given as PEM", async () => {
      await roundTrip(
        { hostname: "localhost", port: tcp.port!, tls: "require" },
        { caCerts: [pki.caCert] },
      );
    });

    await t.step("reports what it negotiated to the debug hook", async () => {
      const events = await handshakes(`nbds://localhost:${tcp.port}/?${ca}`);
      assert.equal(events.length, 1);
      assert.equal(events[0]!.engine, "gnutls");
      assert.equal(events[0]!.verified, true);
      assert.match(String(events[0]!.protocol), /^TLSv1\.[23]$/);
    });

    await t.step("sends the client certificate a server asks for", async () => {
      await roundTrip(
        `nbds://localhost:${verifying.port}/?tls-certificates=${pki.clientDir}`,
      );
    });

    await t.step(
      "fails typed when the server wants a client certificate",
      async () => {
        await assert.rejects(
          connect(`nbds://localhost:${verifying.port}/?${ca}`, opts()),
          tlsFailure(
            undefined,
            /GnuTLS: .*it may require a client certificate/,
          ),
        );
      },
    );

    await t.step(
      "refuses a server certificate from an unknown CA, sending nothing in clear",
      async () => {
        await using wire = await tap(tcp.port!);
        await assert.rejects(
          connect(
            `nbds+unix:///secret-export?socket=${wire.path}&tls-certificates=${pki.otherDir}&tls-hostname=localhost`,
            opts(),
          ),
          tlsFailure(
            "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
            /not signed by a trusted CA.*GnuTLS: .*issuer is unknown/,
          ),
        );
        await assertNothingInClear(wire, "secret-export");
      },
    );

    await t.step(
      "refuses a certificate signed by another CA than the one given",
      async () => {
        // other's certificate is good for localhost and trusted by its
        // own CA (the stand-in for a public root) ...
        await roundTrip(
          `nbds://localhost:${other.port}/?tls-certificates=${otherServer}`,
        );
        // ... but the client was given only its own CA.
        await assert.rejects(
          connect(`nbds://localhost:${other.port}/?${ca}`, opts()),
          tlsFailure("UNABLE_TO_VERIFY_LEAF_SIGNATURE", /not signed/),
        );
        await assert.rejects(
          connect(
            { hostname: "localhost", port: other.port!, tls: "require" },
            opts({ caCerts: [pki.caCert] }),
          ),
          tlsFailure("UNABLE_TO_VERIFY_LEAF_SIGNATURE", /not signed/),
        );
      },
    );

    await t.step(
      "refuses a certificate for another name, sending nothing in clear",
      async () => {
        await using wire = await tap(tcp.port!);
        await assert.rejects(
          connect(
            `nbds+unix:///secret-export?socket=${wire.path}&${ca}&tls-hostname=nbd.example.com`,
            opts(),
          ),
          tlsFailure(
            "ERR_TLS_CERT_ALTNAME_INVALID",
            /not valid for the name "nbd\.example\.com".*GnuTLS/,
          ),
        );
        await assertNothingInClear(wire, "secret-export");
      },
    );

    await t.step("checks a revocation list (ca-crl.pem)", async () => {
      await roundTrip(
        `nbds://localhost:${tcp.port}/?tls-certificates=${await makeCrlDir(
          pki,
          false,
        )}`,
      );
      await assert.rejects(
        connect(
          `nbds://localhost:${tcp.port}/?tls-certificates=${await makeCrlDir(
            pki,
            true,
          )}`,
          opts(),
        ),
        tlsFailure("CERT_REVOKED", /revoked/),
      );
    });

    await t.step("accepts anything with tls-verify-peer=false", async () => {
      await roundTrip(
        `nbds://localhost:${other.port}/?${ca}&tls-verify-peer=false`,
      );
    });

    await t.step(
      "close() fails a read waiting for the server, and frees it",
      async () => {
        const client = await connect(
          `nbds://localhost:${slow.port}/?${ca}`,
          opts(),
        );
        const pending = client.read(0, 4096);
        const failed = assert.rejects(pending, NbdConnectionClosedError);
        const t0 = performance.now();
        await client.close({ signal: AbortSignal.abort() });
        await failed;
        // The server would have answered after 5 s.
        assert.ok(performance.now() - t0 < 4000, "close() waited");
      },
    );

    await t.step("refuses nbds:// to a server without TLS", async () => {
      await assert.rejects(
        connect(`nbds://localhost:${plain.port}/?${ca}`, opts()),
        tlsRequired,
      );
    });

    await t.step(
      "nbd:// with TLS unset upgrades through GnuTLS when the server requires it",
      async () => {
        const events = await handshakes(`nbd://localhost:${tcp.port}/?${ca}`);
        assert.equal(events.length, 1, "one handshake");
        assert.equal(events[0]?.engine, "gnutls");
      },
    );
  } finally {
    await Promise.all(started.map((s) => s.stop()));
  }
});

Deno.test("GnuTLS engine with nbdkit --tls-psk", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-psk-" });
  const serverKeys = `${dir}/server.psk`;
  const clientKeys = `${dir}/client.psk`;
  const wrongKeys = `${dir}/wrong.psk`;
  await Deno.writeTextFile(serverKeys, `alice:${KEY}\n`);
  await Deno.writeTextFile(clientKeys, `bob:${OTHER_KEY}\nalice:${KEY}\n`);
  await Deno.writeTextFile(wrongKeys, `alice:${OTHER_KEY}\n`);
  const args = ["--tls=require", `--tls-psk=${serverKeys}`, "memory", "1M"];
  const tcp = await nbdkit(args, { tcp: true });
  const unix = await nbdkit(args);
  try {
    await t.step("reads and writes with alice's key (TCP)", async () => {
      await roundTrip(
        `nbds://localhost:${tcp.port}/?tls-psk-file=${clientKeys}&tls-username=alice`,
      );
    });

    await t.step("reads and writes with alice's key (Unix)", async () => {
      await roundTrip(
        `nbds+unix:///?socket=${unix.socket}&tls-psk-file=${clientKeys}&tls-username=alice`,
      );
    });

    await t.step(
      "prefers AES-128-GCM to ChaCha20 where the CPU has AES instructions",
      async () => {
        const aes = /^(?:flags|Features)\s*:.*\baes\b/m.test(
          await Deno.readTextFile("/proc/cpuinfo"),
        );
        const [handshake] = await handshakes(
          `nbds://localhost:${tcp.port}/?tls-psk-file=${clientKeys}&tls-username=alice`,
        );
        const cipher = handshake?.cipher;
        if (aes) assert.equal(cipher, "AES-128-GCM");
        else assert.equal(typeof cipher, "string");
      },
    );

    await t.step("takes tlsPskFile and tlsUsername as options", async () => {
      await roundTrip(
        { hostname: "127.0.0.1", port: tcp.port!, tls: "require" },
        { tlsPskFile: clientKeys, tlsUsername: "alice" },
      );
    });

    for (
      const [what, keys, user] of [
        ["with the wrong key", wrongKeys, "alice"],
        ["for a user the server does not know", clientKeys, "bob"],
      ]
    ) {
      await t.step(`fails typed ${what}, nothing in clear`, async () => {
        await using wire = await tap(tcp.port!);
        await assert.rejects(
          connect(
            `nbds+unix:///secret-export?socket=${wire.path}&tls-psk-file=${keys}&tls-username=${user}`,
            opts(),
          ),
          tlsFailure(undefined, /GnuTLS: .*may not know this user or key/),
        );
        await assertNothingInClear(wire, "secret-export");
      });
    }

    await t.step(
      "refuses before any traffic a user the key file lacks",
      async () => {
        await assert.rejects(
          connect(
            `nbds://localhost:${tcp.port}/?tls-psk-file=${clientKeys}&tls-username=carol`,
            opts(),
          ),
          tlsFailure(undefined, /has no key for user "carol"/),
        );
      },
    );

    await t.step("refuses a key file it cannot read", async () => {
      await assert.rejects(
        connect(
          `nbds://localhost:${tcp.port}/?tls-psk-file=${dir}/none.psk&tls-username=alice`,
          opts(),
        ),
        tlsFailure(undefined, /Cannot read TLS-PSK file/),
      );
    });

    await t.step(
      "every tool takes GnuTLS under --allow-ffi, and without it names the fix",
      async () => {
        const uri =
          `nbds://127.0.0.1:${tcp.port}/?tls-psk-file=${clientKeys}&tls-username=alice`;
        const run = async (tool: string[], perms: string[]) => {
          const [script, ...args] = tool;
          return await output(
            Deno.execPath(),
            ["run", ...perms, "--quiet", `${TOOLS}${script}`, ...args],
            { timeoutMs: BOUND_MS * 2 },
          );
        };
        const tools = [
          ["copy.ts", uri, "null:"],
          ["info.ts", uri],
          ["info.ts", "--list", uri],
          ["info.ts", "--map", uri],
          ["dump.ts", "-n", "64", uri],
        ];
        const perms = ["--allow-net", "--allow-read", "--allow-write"];
        for (const tool of tools) {
          const withFfi = await run(tool, [...perms, "--allow-ffi"]);
          assert.equal(withFfi.code, 0, `${tool.join(" ")}: ${withFfi.stderr}`);
          const without = await run(tool, perms);
          assert.equal(without.code, 1, tool.join(" "));
          assert.match(without.stderr, /TLS-PSK .* run with --allow-ffi/);
        }
      },
    );

    await t.step(
      "the kernel handoff's relay negotiates TLS-PSK through GnuTLS",
      async () => {
        const conn = await connectForKernel(
          {
            hostname: "127.0.0.1",
            port: tcp.port!,
            tls: "require",
            tlsPskFile: clientKeys,
            tlsUsername: "alice",
          },
          { signal: undefined, connectTimeout: BOUND_MS, relay: false },
          undefined,
        );
        try {
          assert.equal(conn.info.tls, true);
          assert.ok(conn.relay, "TLS takes the relay path");
          assert.ok(conn.relay.remote instanceof GnutlsStream);
          assert.match(String(conn.relay.remote.protocol), /^TLSv1\.[23]$/);
        } finally {
          await hangUp(conn);
        }
      },
    );

    await t.step(
      "without the engine, refuses PSK naming the fix",
      async () => {
        await assert.rejects(
          connect(
            `nbds://localhost:${tcp.port}/?tls-psk-file=${clientKeys}&tls-username=alice`,
            { signal: AbortSignal.timeout(BOUND_MS) },
          ),
          tlsFailure(undefined, /^TLS-PSK .*--allow-ffi.*tlsEngine: gnutls/),
        );
      },
    );
  } finally {
    await Promise.all([tcp.stop(), unix.stop()]);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GnuTLS engine with qemu-nbd", async (t) => {
  await using pki = await makeTestPki();
  const dir = await Deno.makeTempDir({ prefix: "nbd-gnutls-qemu-" });
  const image = `${dir}/disk.raw`;
  await Deno.writeFile(image, new Uint8Array(1 << 20));
  const pskDir = `${dir}/psk`;
  await Deno.mkdir(pskDir);
  await Deno.writeTextFile(`${pskDir}/keys.psk`, `alice:${KEY}\n`);
  const clientKeys = `${dir}/client.psk`;
  await Deno.writeTextFile(clientKeys, `alice:${KEY}\n`);
  const wrongKeys = `${dir}/wrong.psk`;
  await Deno.writeTextFile(wrongKeys, `alice:${OTHER_KEY}\n`);
  const serve = (object: string) => [
    "--object",
    object,
    "--tls-creds",
    "tls0",
    "-f",
    "raw",
    image,
  ];
  const x509 = await qemuNbd(
    serve(
      `tls-creds-x509,id=tls0,dir=${pki.serverDir},endpoint=server,verify-peer=on`,
    ),
    { tcp: true },
  );
  const psk = await qemuNbd(
    serve(`tls-creds-psk,id=tls0,dir=${pskDir},endpoint=server`),
    { tcp: true },
  );
  try {
    await t.step("reads and writes with a client certificate", async () => {
      await roundTrip(
        `nbds://localhost:${x509.port}/?tls-certificates=${pki.clientDir}`,
      );
    });

    await t.step(
      "fails typed with a client certificate from another CA",
      async () => {
        await assert.rejects(
          connect(
            { hostname: "localhost", port: x509.port!, tls: "require" },
            opts({ caCerts: [pki.caCert], tlsCertificates: pki.otherDir }),
          ),
          tlsFailure(
            undefined,
            /GnuTLS: .*may not trust the client certificate/,
          ),
        );
      },
    );

    await t.step("rejects qemu's certificate under another name", async () => {
      await assert.rejects(
        connect(
          `nbds://localhost:${x509.port}/?tls-certificates=${pki.clientDir}&tls-hostname=qemu.example`,
          opts(),
        ),
        tlsFailure("ERR_TLS_CERT_ALTNAME_INVALID", /qemu\.example/),
      );
    });

    await t.step("reads and writes with TLS-PSK", async () => {
      await roundTrip(
        `nbds://localhost:${psk.port}/?tls-psk-file=${clientKeys}&tls-username=alice`,
      );
    });

    await t.step("fails typed with the wrong PSK key", async () => {
      await assert.rejects(
        connect(
          `nbds://localhost:${psk.port}/?tls-psk-file=${wrongKeys}&tls-username=alice`,
          opts(),
        ),
        tlsFailure(undefined, /GnuTLS: .*may not know this user or key/),
      );
    });
  } finally {
    await Promise.all([x509.stop(), psk.stop()]);
    await Deno.remove(dir, { recursive: true });
  }
});
