/**
 * TLS end to end through `connect()`: nbdkit and qemu-nbd with a throwaway
 * PKI, over TCP and Unix sockets, with and without client certificates, and
 * the refusals a user must be able to tell apart (unknown CA, wrong name,
 * missing client certificate, a server without TLS in `require` mode).
 */

import assert from "node:assert/strict";
import {
  connect,
  type ConnectOptions,
  listExports,
  NbdError,
  NbdOptionError,
  NbdTlsError,
} from "../../mod.ts";
import { OPT_STARTTLS, REP_ERR_POLICY } from "../../lib/constants.ts";
import { tlsFailure, tlsRequired, tlsRoundTrip } from "../support/tls.ts";
import { makeTestPki, startTlsNbdkits } from "../support/certs.ts";
import { startTestServer } from "../support/server.ts";
import { nbdkit, qemuNbd, type Server } from "../support/servers.ts";

const BOUND_MS = 15_000;

/** Every wait in here is bounded by a signal. */
function bounded(options: ConnectOptions = {}): ConnectOptions {
  return { signal: AbortSignal.timeout(BOUND_MS), ...options };
}

/**
 * The shared round trip, bounded.
 */
function roundTrip(
  target: string | ConnectOptions,
  options?: ConnectOptions,
): Promise<void> {
  return tlsRoundTrip(target, bounded(options));
}

/**
 * Forwards the first connection `listener` accepts to the one `connectTo`
 * opens, both ways, until both directions end: it puts a server that
 * listens on one address at another.
 */
async function relayOnce(
  listener: Deno.Listener,
  connectTo: () => Promise<Deno.Conn>,
): Promise<void> {
  const inbound = await listener.accept();
  const outbound = await connectTo();
  await Promise.allSettled([
    inbound.readable.pipeTo(outbound.writable),
    outbound.readable.pipeTo(inbound.writable),
  ]);
}

function tcpUri(server: Server, query: string, exportName = ""): string {
  return `nbds://localhost:${server.port}/${exportName}?${query}`;
}

function unixUri(server: Server, query: string): string {
  return `nbds+unix:///?socket=${server.socket}&${query}`;
}

Deno.test("TLS with nbdkit", async (t) => {
  await using pki = await makeTestPki();
  await using servers = await startTlsNbdkits(pki);
  const { tcp, unix, verifying } = servers;
  const optional = await nbdkit(
    ["--tls=on", `--tls-certificates=${pki.serverDir}`, "memory", "1M"],
    { tcp: true },
  );
  const plain = await nbdkit(["memory", "1M"], { tcp: true });
  try {
    await t.step("reads and writes over nbds:// (TCP)", async () => {
      await roundTrip(
        tcpUri(tcp, `tls-certificates=${pki.clientNoCertDir}`),
      );
    });

    await t.step(
      "reads and writes over nbds+unix:// with tls-hostname",
      async () => {
        await roundTrip(
          unixUri(
            unix,
            `tls-certificates=${pki.clientNoCertDir}&tls-hostname=localhost`,
          ),
        );
      },
    );

    await t.step(
      "reads and writes over an abstract Unix socket (socket=%00…)",
      async () => {
        // nbdkit listens on a path; a relay puts it in the abstract namespace.
        const name = `nbd-tls-${crypto.randomUUID()}`;
        const listener = Deno.listen({ transport: "unix", path: `\0${name}` });
        const relay = relayOnce(
          listener,
          () => Deno.connect({ transport: "unix", path: unix.socket! }),
        );
        try {
          await roundTrip(
            `nbds+unix:///?socket=%00${name}&tls-certificates=${pki.clientNoCertDir}&tls-hostname=localhost`,
          );
          await relay;
        } finally {
          listener.close();
        }
      },
    );

    await t.step("verifies an IPv6 address: nbds://[::1]:port/", async () => {
      // nbdkit listens on 127.0.0.1; a relay on ::1 forwards to it.
      const listener = Deno.listen({ hostname: "::1", port: 0 });
      const relay = relayOnce(
        listener,
        () => Deno.connect({ hostname: "127.0.0.1", port: tcp.port! }),
      );
      try {
        const port = (listener.addr as Deno.NetAddr).port;
        await roundTrip(
          `nbds://[::1]:${port}/?tls-certificates=${pki.clientNoCertDir}`,
        );
        await relay;
      } finally {
        listener.close();
      }
    });

    await t.step(
      "takes caCerts as PEM text instead of a directory",
      async () => {
        await roundTrip(
          { hostname: "127.0.0.1", port: tcp.port!, tls: "require" },
          { caCerts: [pki.caCert] },
        );
      },
    );

    await t.step(
      "rejects a server certificate from an unknown CA",
      async () => {
        await assert.rejects(
          connect(tcpUri(tcp, `tls-certificates=${pki.otherDir}`), bounded()),
          tlsFailure(
            "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
            /not signed by a trusted CA/,
          ),
        );
      },
    );

    await t.step("rejects a server certificate for another name", async () => {
      await assert.rejects(
        connect(
          tcpUri(
            tcp,
            `tls-certificates=${pki.clientNoCertDir}&tls-hostname=nbd.example.com`,
          ),
          bounded(),
        ),
        tlsFailure(
          "ERR_TLS_CERT_ALTNAME_INVALID",
          /not valid for the name "nbd\.example\.com"/,
        ),
      );
    });

    await t.step(
      "connects to an untrusted server only with tls-verify-peer=false",
      async () => {
        await roundTrip(
          tcpUri(
            tcp,
            `tls-certificates=${pki.otherDir}&tls-hostname=wrong.example&tls-verify-peer=false`,
          ),
        );
      },
    );

    await t.step(
      "sends the client certificate a verifying server demands",
      async () => {
        await roundTrip(
          tcpUri(verifying, `tls-certificates=${pki.clientDir}`),
        );
        await roundTrip(
          { hostname: "localhost", port: verifying.port!, tls: "require" },
          {
            caCerts: [pki.caCert],
            tlsClientCert: pki.clientCert,
            tlsClientKey: pki.clientKey,
          },
        );
      },
    );

    await t.step(
      "fails clearly without the client certificate a server demands",
      async () => {
        await assert.rejects(
          connect(
            tcpUri(verifying, `tls-certificates=${pki.clientNoCertDir}`),
            bounded(),
          ),
          tlsFailure(undefined, /it may require a client certificate/),
        );
      },
    );

    await t.step(
      "upgrades in prefer mode when the server offers TLS",
      async () => {
        await roundTrip(
          `nbd://localhost:${optional.port}/?tls-certificates=${pki.clientNoCertDir}`,
          { tls: "prefer" },
        );
      },
    );

    await t.step(
      "goes on in clear in prefer mode when the server has no TLS",
      async () => {
        const client = await connect(
          `nbd://localhost:${plain.port}/`,
          bounded({ tls: "prefer", tlsCertificates: pki.clientNoCertDir }),
        );
        try {
          assert.equal(client.tls, false);
          assert.equal((await client.read(0, 512)).length, 512);
        } finally {
          await client.close();
        }
      },
    );

    await t.step("refuses nbds:// to a server without TLS", async () => {
      await assert.rejects(
        connect(
          tcpUri(plain, `tls-certificates=${pki.clientNoCertDir}`),
          bounded(),
        ),
        tlsRequired,
      );
    });

    await t.step(
      "says TLS is required when a TLS-only server is asked in clear",
      async () => {
        await assert.rejects(
          connect(
            `nbd://localhost:${tcp.port}/`,
            bounded({ tls: "disable" }),
          ),
          (e: unknown) => {
            assert.ok(e instanceof NbdError, `got ${e}`);
            assert.match(e.message, /requires TLS/);
            return true;
          },
        );
      },
    );

    await t.step(
      "nbd:// with TLS left unset upgrades when the server requires it, verifying",
      async () => {
        await roundTrip(
          `nbd://localhost:${tcp.port}/?tls-certificates=${pki.clientNoCertDir}`,
        );
        const client = await connect(
          `nbd://localhost:${tcp.port}/?tls-certificates=${pki.clientNoCertDir}`,
          bounded(),
        );
        try {
          assert.equal(client.tls, true);
        } finally {
          await client.close();
        }
        // Verification stays on: without the CA the upgrade fails.
        await assert.rejects(
          connect(`nbd://localhost:${tcp.port}/`, bounded()),
          (e: unknown) =>
            e instanceof NbdTlsError &&
            /not signed by a trusted CA/.test(e.message),
        );
        await assert.rejects(
          listExports(
            `nbd://localhost:${tcp.port}/?tls-certificates=${pki.otherDir}`,
            bounded(),
          ),
          NbdTlsError,
        );
      },
    );

    await t.step("refuses TLS-PSK when connecting", async () => {
      await assert.rejects(
        connect(tcpUri(tcp, "tls-psk-file=/nonexistent.psk"), bounded()),
        tlsFailure(undefined, /^TLS-PSK .* is not supported/),
      );
    });
  } finally {
    await Promise.all([optional, plain].map((s) => s.stop()));
  }
});

Deno.test("TLS with qemu-nbd", async (t) => {
  await using pki = await makeTestPki();
  const dir = await Deno.makeTempDir({ prefix: "nbd-tls-qemu-" });
  const image = `${dir}/disk.raw`;
  await Deno.writeFile(image, new Uint8Array(1 << 20));
  const creds = (verify: boolean) => [
    "--object",
    `tls-creds-x509,id=tls0,dir=${pki.serverDir},endpoint=server,verify-peer=${
      verify ? "on" : "off"
    }`,
    "--tls-creds",
    "tls0",
    "-f",
    "raw",
    image,
  ];
  // qemu's x509 server credentials verify clients unless told not to.
  const verifyingTcp = await qemuNbd(creds(true), { tcp: true });
  const verifyingUnix = await qemuNbd(creds(true));
  const open = await qemuNbd(creds(false), { tcp: true });
  try {
    await t.step(
      "reads and writes with a client certificate (TCP)",
      async () => {
        await roundTrip(
          tcpUri(verifyingTcp, `tls-certificates=${pki.clientDir}`),
        );
      },
    );

    await t.step(
      "reads and writes with a client certificate (Unix)",
      async () => {
        await roundTrip(
          unixUri(verifyingUnix, `tls-certificates=${pki.clientDir}`),
        );
      },
    );

    await t.step("fails clearly without the client certificate", async () => {
      await assert.rejects(
        connect(
          tcpUri(verifyingTcp, `tls-certificates=${pki.clientNoCertDir}`),
          bounded(),
        ),
        tlsFailure(undefined, /client certificate/),
      );
    });

    await t.step(
      "fails clearly with a client certificate from another CA",
      async () => {
        await assert.rejects(
          connect(
            { hostname: "localhost", port: verifyingTcp.port!, tls: "require" },
            bounded({
              caCerts: [pki.caCert],
              tlsCertificates: pki.otherDir,
            }),
          ),
          tlsFailure(undefined, /client certificate/),
        );
      },
    );

    await t.step(
      "reads and writes without a client certificate when allowed",
      async () => {
        await roundTrip(
          tcpUri(open, `tls-certificates=${pki.clientNoCertDir}`),
        );
      },
    );

    await t.step("rejects qemu's certificate under another name", async () => {
      await assert.rejects(
        connect(
          tcpUri(
            open,
            `tls-certificates=${pki.clientNoCertDir}&tls-hostname=qemu.example`,
          ),
          bounded(),
        ),
        tlsFailure("ERR_TLS_CERT_ALTNAME_INVALID", /qemu\.example/),
      );
    });
  } finally {
    await Promise.all([verifyingTcp, verifyingUnix, open].map((s) => s.stop()));
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("TLS require mode sends nothing but STARTTLS in clear", async (t) => {
  for (const form of ["uri", "options"] as const) {
    await t.step(`when the server refuses STARTTLS (${form})`, async () => {
      await using server = await startTestServer({
        listen: "tcp",
        exports: [{ name: "secret-export", size: 1 << 20 }],
        starttls: { reply: REP_ERR_POLICY },
      });
      const attempt = form === "uri"
        ? connect(
          `nbds://127.0.0.1:${server.port}/secret-export`,
          bounded(),
        )
        : connect(
          {
            hostname: "127.0.0.1",
            port: server.port!,
            exportName: "secret-export",
          },
          bounded({ tls: "require" }),
        );
      await assert.rejects(attempt, (e: unknown) => {
        assert.ok(e instanceof NbdOptionError, `got ${e}`);
        assert.equal(e.option, OPT_STARTTLS);
        assert.match(
          e.message,
          /^TLS is required but the server will not start it/,
        );
        return true;
      });
      await server.settled();
      const log = server.log[0]!;
      const sent = log.options.map((o) => o.option);
      // NBD_OPT_ABORT may follow, which carries nothing.
      assert.equal(sent[0], OPT_STARTTLS);
      for (const o of log.options.slice(1)) {
        assert.equal(
          o.payload.length,
          0,
          `option ${o.name} sent data in clear`,
        );
      }
      assert.equal(log.exportName, undefined);
      const clear = new TextDecoder().decode(
        new Uint8Array(log.options.flatMap((o) => [...o.payload])),
      );
      assert.ok(!clear.includes("secret-export"), "export name sent in clear");
    });
  }
});
