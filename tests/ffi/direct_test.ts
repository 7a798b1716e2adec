import assert from "node:assert/strict";
import { FdStream } from "../../ffi/_fd_stream.ts";
import { connectSocket, unixAddress } from "../../ffi/_socket.ts";
import { NbdSystemCallError } from "../../ffi/errors.ts";
import { negotiate } from "../../lib/_handshake.ts";
import { Transport } from "../../lib/transport.ts";
import { FLAG_READ_ONLY, SIMPLE_REPLY_MAGIC } from "../../lib/constants.ts";
import { upgradeToTls } from "../../lib/tls/upgrade.ts";
import { makeTestPki } from "../support/certs.ts";
import { nbdkit } from "../support/servers.ts";
import { libc } from "../../ffi/_libc.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

/**
 * Starts `nbdkit` on a private Unix socket through the shared support, which
 * waits until the server accepts (the socket file appears before `listen()`).
 */
async function startNbdkit(args: string[]) {
  const server = await nbdkit(args);
  return {
    sock: server.socket!,
    [Symbol.asyncDispose]: () => server.stop(),
  };
}

Deno.test("negotiate() runs over a socket connected through libc (the direct path minus the ioctls)", async (t) => {
  await using server = await startNbdkit([
    "--filter=blocksize-policy",
    "memory",
    "size=1M",
    "blocksize-minimum=512",
    "blocksize-preferred=4096",
  ]);
  await t.step(
    "the kernel's options: no structured replies, block sizes",
    async () => {
      const fd = await connectSocket({ path: server.sock });
      const stream = new FdStream(fd);
      const transport = new Transport(stream);
      try {
        const info = await negotiate(transport, {
          exportName: "",
          structuredReplies: false,
          extendedHeaders: false,
          metaContexts: [],
          blockSizes: true,
        });
        assert.equal(info.size, 1n << 20n);
        assert.equal(info.structuredReplies, false);
        assert.equal(info.extendedHeaders, false);
        assert.equal(info.blockSizeAdvertised, true);
        assert.equal(info.blockSize.minimum, 512);
        assert.equal(info.blockSize.preferred, 4096);
        assert.equal(info.flags & FLAG_READ_ONLY, 0);
        assert.equal(transport.buffered, 0);

        // One simple request over the raw descriptor: what the kernel sends.
        const req = new Uint8Array(4 + 2 + 2 + 8 + 8 + 4); // magic, flags, type, cookie, offset, length
        const v = new DataView(req.buffer);
        v.setUint32(0, 0x25609513);
        v.setUint16(6, 0); // NBD_CMD_READ
        v.setBigUint64(8, 42n);
        v.setUint32(24, 512);
        await transport.write(req);
        const reply = await transport.readExact(4 + 4 + 8 + 512, "a reply");
        const rv = new DataView(reply.buffer);
        assert.equal(rv.getUint32(0), SIMPLE_REPLY_MAGIC);
        assert.equal(rv.getUint32(4), 0);
        assert.equal(rv.getBigUint64(8), 42n);
      } finally {
        transport.close();
      }
    },
  );
});

Deno.test("connectSocket() names the failure and errno", async () => {
  await assert.rejects(
    connectSocket({ path: "/nonexistent/nbd.sock" }),
    (e: unknown) =>
      e instanceof NbdSystemCallError && e.errnoName === "ENOENT" &&
      /Cannot connect to \/nonexistent\/nbd\.sock: connect failed with 2/.test(
        e.message,
      ),
  );
  // A port nobody listens on, on loopback.
  await assert.rejects(
    connectSocket({ hostname: "127.0.0.1", port: 1 }),
    (e: unknown) =>
      e instanceof NbdSystemCallError && e.errnoName === "ECONNREFUSED",
  );
  await assert.rejects(
    connectSocket({ hostname: "localhost", port: 1 }),
    (e: unknown) =>
      e instanceof NbdSystemCallError && e.errnoName === "ECONNREFUSED",
  );
});

Deno.test("unixAddress() encodes paths and abstract names", () => {
  const a = unixAddress("/x");
  assert.deepEqual([...a.bytes], [1, 0, 0x2f, 0x78, 0]);
  const b = unixAddress("\0x");
  assert.deepEqual([...b.bytes], [1, 0, 0, 0x78]);
  assert.throws(() => unixAddress("/" + "a".repeat(200)), RangeError);
});

Deno.test("negotiate() upgrades a libc socket to TLS (the relay path minus the ioctls)", async () => {
  await using pki = await makeTestPki();
  await using server = await startNbdkit([
    "--tls=require",
    `--tls-certificates=${pki.serverDir}`,
    "memory",
    "size=1M",
  ]);
  const fd = await connectSocket({ path: server.sock });
  const transport = new Transport(new FdStream(fd));
  try {
    const info = await negotiate(transport, {
      tls: "require",
      upgradeTls: (stream) =>
        upgradeToTls(stream, {
          tlsCertificates: pki.clientNoCertDir,
          tlsHostname: "localhost",
        }),
      structuredReplies: false,
      extendedHeaders: false,
      metaContexts: [],
      blockSizes: true,
    });
    assert.equal(info.tls, true);
    assert.equal(info.size, 1n << 20n);
    assert.equal(transport.buffered, 0);
    const req = new Uint8Array(4 + 2 + 2 + 8 + 8 + 4); // magic, flags, type, cookie, offset, length
    const v = new DataView(req.buffer);
    v.setUint32(0, 0x25609513);
    v.setBigUint64(8, 7n);
    v.setUint32(24, 4096);
    await transport.write(req);
    const reply = await transport.readExact(4 + 4 + 8 + 4096, "a reply");
    const rv = new DataView(reply.buffer);
    assert.equal(rv.getUint32(0), SIMPLE_REPLY_MAGIC);
    assert.equal(rv.getUint32(4), 0);
    assert.equal(rv.getBigUint64(8), 7n);
  } finally {
    transport.close();
  }
});
