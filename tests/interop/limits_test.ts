/**
 * The edges real servers let us reach: exports beyond 4 GiB (where one
 * request header cannot cover a whole trim, zero or block status) and
 * beyond `Number.MAX_SAFE_INTEGER`, and export names with spaces, non-ASCII
 * text, URI delimiters, or the full 4096 bytes the spec allows.
 */

import assert from "node:assert/strict";
import {
  connect,
  listExports,
  probe,
  STATE_HOLE,
  STATE_ZERO,
} from "../../mod.ts";
import { isZero, Trace } from "./_support.ts";
import {
  nbdkit,
  type Peers,
  qemuNbd,
  run,
  type Server,
  tempDir,
} from "../support/servers.ts";

const KiB = 1024;
const GiB = 1024 * 1024 * KiB;
const TiB = 1024 * GiB;
/**
 * doc/proto.md, "Block size constraints": without advertised sizes "a
 * client desiring maximum interoperability SHOULD constrain its requests to
 * a minimum block size of 2^9 (512)". libnbd does (nbdinfo --map asks for
 * 4294966784 bytes, 2^32 - 512, not 2^32 - 1).
 */
const INTEROP_MIN_BLOCK = 512;

/** nbdkit 1.32 from the host, 1.42 from the Debian 13 root. */
const NBDKIT: Array<[Peers, string]> = [
  ["host", "nbdkit"],
  ["trixie", "nbdkit 1.42"],
];

for (const [peers, label] of NBDKIT) {
  Deno.test({
    name: `limits: a 1 TiB export without block size hints (${label} memory)`,
    async fn(t) {
      let server: Server | undefined;
      try {
        server = await nbdkit(["memory", "1T"], { peers });
        const trace = new Trace();
        await using client = await connect(server.target(), {
          metaContexts: ["base:allocation"],
          debug: trace.hook,
        });
        assert.equal(client.size, TiB);
        assert.equal(client.sizeBigInt, BigInt(TiB));

        await t.step(
          "read() and write() reach the last block of a 1 TiB export",
          async () => {
            const last = TiB - 4 * KiB;
            await client.write(last, new Uint8Array(4 * KiB).fill(0x42));
            const back = await client.read(last, 4 * KiB);
            assert.ok(back.every((b) => b === 0x42));
          },
        );

        await t.step(
          "writeZeroes() and trim() beyond 4 GiB split into 512-aligned requests",
          async () => {
            const from = trace.commands().length;
            // 9 GiB: more than two requests' worth at 32-bit lengths.
            await client.write(0, new Uint8Array(4 * KiB).fill(1));
            await client.writeZeroes(0, 9 * GiB);
            await client.trim(0, 9 * GiB);
            const parts = trace.commands().slice(from).filter((c) =>
              c.command === "NBD_CMD_WRITE_ZEROES" ||
              c.command === "NBD_CMD_TRIM"
            );
            for (const command of ["NBD_CMD_WRITE_ZEROES", "NBD_CMD_TRIM"]) {
              const mine = parts.filter((p) => p.command === command);
              assert.ok(
                mine.length >= 3,
                `${command}: ${mine.length} requests`,
              );
              assert.equal(
                mine.reduce((sum, p) => sum + (p.length as number), 0),
                9 * GiB,
                `${command} covers the range exactly`,
              );
            }
            // Splitting at 2^32 - 1 would start the second request at offset
            // 4294967295; libnbd keeps to 512 (2^32 - 512).
            for (const p of parts) {
              assert.equal(
                (p.offset as number) % INTEROP_MIN_BLOCK,
                0,
                `${p.command} at offset ${p.offset} is not 512-aligned`,
              );
              assert.equal(
                (p.length as number) % INTEROP_MIN_BLOCK,
                0,
                `${p.command} of ${p.length} bytes is not 512-aligned`,
              );
            }
            assert.ok(isZero(await client.read(0, 4 * KiB)));
          },
        );

        // Last: nbdkit 1.32 aborts (an assertion in
        // extents_to_block_descriptors) on a block status of 2^32 - 1 bytes.
        await t.step(
          "blockStatus() beyond 4 GiB asks for a 512-aligned length, as libnbd does",
          async () => {
            const from = trace.commands().length;
            let failure: unknown;
            let map: Awaited<ReturnType<typeof client.blockStatus>> = {};
            try {
              map = await client.blockStatus(0, TiB);
            } catch (e) {
              failure = e;
            }
            const sent = trace.commands().slice(from);
            assert.equal(sent[0]?.command, "NBD_CMD_BLOCK_STATUS");
            // 4294967295 bytes would crash nbdkit 1.32 (see above), failing
            // the request with NbdConnectionClosedError.
            assert.equal(
              (sent[0]!.length as number) % INTEROP_MIN_BLOCK,
              0,
              `block status of ${sent[0]!.length} bytes is not 512-aligned`,
            );
            assert.equal(
              failure,
              undefined,
              `blockStatus() failed: ${failure}`,
            );
            const extents = map["base:allocation"]!;
            assert.equal(extents[0]!.offset, 0);
            assert.equal(extents[0]!.flags, STATE_HOLE | STATE_ZERO);
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name: `limits: an export of 2^63 - 1 bytes (${label} null)`,
    async fn(t) {
      let server: Server | undefined;
      try {
        const size = 2n ** 63n - 1n;
        server = await nbdkit(["null", `size=${size}`], { peers });
        await using client = await connect(server.target(), {
          metaContexts: ["base:allocation"],
        });

        await t.step(
          "size throws RangeError beyond Number.MAX_SAFE_INTEGER; sizeBigInt is exact",
          async () => {
            assert.throws(
              () => client.size,
              (e: unknown) =>
                e instanceof RangeError && /use sizeBigInt/.test(e.message),
            );
            assert.equal(client.sizeBigInt, size);
            assert.equal((await probe(server!.target())).sizeBigInt, size);
          },
        );

        await t.step(
          "read() works up to Number.MAX_SAFE_INTEGER and refuses offsets past it",
          async () => {
            const at = 2 ** 53 - 4096;
            assert.ok(isZero(await client.read(at, 4096)));
            await assert.rejects(
              () => client.read(2 ** 53, 4096),
              (e: unknown) =>
                e instanceof RangeError && /offset must be/.test(e.message),
            );
          },
        );

        await t.step(
          "blockStatus() near the end of the range a number can address",
          async () => {
            const at = 2 ** 53 - 2 * 4096;
            const map = await client.blockStatus(at, 4096);
            const first = map["base:allocation"]![0]!;
            assert.equal(first.offset, at);
            assert.ok(first.flags & STATE_ZERO);
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });
}

Deno.test({
  name: "limits: export names with spaces, non-ASCII text and URI delimiters",
  async fn(t) {
    const dir = await tempDir();
    let server: Server | undefined;
    try {
      const img = `${dir}/disk.raw`;
      await run("qemu-img", ["create", "-q", "-f", "raw", img, "1M"]);
      const name = "disk é/名前 with spaces?&#%";
      const description = "déscription ✓";
      server = await qemuNbd(
        ["-f", "raw", "-x", name, "-D", description, img],
        { dir },
      );

      await t.step(
        "listExports() returns the name and description intact",
        async () => {
          assert.deepEqual(await listExports(server!.target()), [
            { name, description },
          ]);
        },
      );

      await t.step("connect() and probe() take the name as is", async () => {
        await using client = await connect(server!.target(name));
        assert.equal(client.exportName, name);
        assert.equal(client.description, description);
        assert.equal((await probe(server!.target(name))).exportName, name);
      });

      await t.step(
        "connect() takes the name percent-encoded in a URI",
        async () => {
          await using client = await connect(server!.uri(name));
          assert.equal(client.exportName, name);
          assert.equal(client.size, 1024 * KiB);
        },
      );
    } finally {
      await server?.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "limits: an export name of the spec's full 4096 bytes (nbdkit)",
  async fn(t) {
    let server: Server | undefined;
    try {
      // nbdkit memory serves whatever name the client asks for.
      server = await nbdkit(["memory", "1M"]);
      const longest = "é".repeat(2048); // 4096 bytes of UTF-8

      await t.step("connect() with a 4096-byte name succeeds", async () => {
        await using client = await connect(server!.target(longest));
        assert.equal(client.exportName, longest);
        assert.equal(client.size, 1024 * KiB);
      });

      await t.step(
        "connect() with a 4097-byte name fails with RangeError, and the server carries on",
        async () => {
          await assert.rejects(
            () => connect(server!.target(longest + "x")),
            (e: unknown) =>
              e instanceof RangeError && /4097 bytes/.test(e.message),
          );
          await using client = await connect(server!.target());
          assert.equal(client.size, 1024 * KiB);
          assert.equal(client.failure, undefined);
        },
      );
    } finally {
      await server?.stop();
    }
  },
});
