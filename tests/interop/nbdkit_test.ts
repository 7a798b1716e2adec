/**
 * nbdkit plugins whose content is known without writing it: block status
 * must agree with the bytes (sparse-random, data), with the reference
 * client (`nbdinfo --map`, `nbdcopy`), and sparse-random's own check of
 * what is written gives a real server errno without any filter.
 */

import assert from "node:assert/strict";
import {
  connect,
  type Extent,
  NbdCommandError,
  STATE_HOLE,
  STATE_ZERO,
} from "../../mod.ts";
import { extentsOf, isZero, readAll } from "./_support.ts";
import { referenceBytes, referenceMap, sha256 } from "../support/reference.ts";
import { nbdkit, type Peers, type Server } from "../support/servers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** nbdkit 1.32 and libnbd 1.14 from the host; 1.42 and 1.22 from the root. */
const NBDKIT: Array<[Peers, string]> = [
  ["host", "nbdkit"],
  ["trixie", "nbdkit 1.42"],
];

for (const [peers, label] of NBDKIT) {
  Deno.test({
    name: `${label} sparse-random: block status agrees with the bytes`,
    async fn(t) {
      const size = 64 * MiB;
      let server: Server | undefined;
      try {
        server = await nbdkit([
          "sparse-random",
          `size=${size}`,
          "seed=42",
          "percent=30",
          "runlength=1048576",
        ], { peers });
        await using client = await connect(server.target(), {
          metaContexts: ["base:allocation"],
        });
        let map: Extent[] = [];

        await t.step(
          "blockStatus() tiles the export as nbdinfo --map does",
          async () => {
            map = await extentsOf(client, "base:allocation", 0, size);
            assert.deepEqual(
              map,
              await referenceMap(server!.uri(), "base:allocation", peers),
            );
            assert.ok(map.length > 4, `only ${map.length} extents`);
            assert.ok(map.some((e) => e.flags === 0));
            assert.ok(map.some((e) => e.flags === (STATE_HOLE | STATE_ZERO)));
          },
        );

        await t.step(
          "ranges block status calls zero read as zeroes, and data ranges do not",
          async () => {
            for (const e of map) {
              const bytes = await client.read(e.offset, e.length);
              if (e.flags & STATE_ZERO) {
                assert.ok(isZero(bytes), `zero extent at ${e.offset}`);
              } else {
                // Each 4 KiB block of data is one random non-zero byte repeated.
                for (let at = 0; at < bytes.length; at += 4 * KiB) {
                  assert.notEqual(bytes[at], 0, `data at ${e.offset + at}`);
                }
              }
            }
          },
        );

        await t.step(
          "readable() streams the export to the same SHA-256 as nbdcopy",
          async () => {
            const ours = await readAll(client.readable(), "readable()");
            assert.equal(ours.length, size);
            assert.equal(
              await sha256(ours),
              await sha256(await referenceBytes(server!.uri(), peers)),
            );
          },
        );

        await t.step(
          "write() of the bytes already there succeeds, of others fails with EIO",
          async () => {
            // sparse-random checks each write against its own content.
            const data = map.find((e) => e.flags === 0)!;
            const same = await client.read(data.offset, 64 * KiB);
            await client.write(data.offset, same);
            const different = same.map((b) => b ^ 0xff);
            await assert.rejects(
              () => client.write(data.offset, different),
              (e: unknown) => {
                assert.ok(e instanceof NbdCommandError, `got ${e}`);
                assert.equal(e.command, "NBD_CMD_WRITE");
                assert.equal(e.errno, 5);
                assert.equal(e.errnoName, "EIO");
                assert.equal(e.offset, data.offset);
                assert.match(e.message, /failed with 5 \(EIO\)/);
                return true;
              },
            );
            assert.equal(client.failure, undefined);
            assert.deepEqual(await client.read(data.offset, 64 * KiB), same);
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name:
      `${label} data: bytes placed by the data expression read back exactly`,
    async fn(t) {
      let server: Server | undefined;
      try {
        server = await nbdkit([
          "data",
          "0xde 0xad 0xbe 0xef @0x10000 1 2 3 4",
          "size=1M",
        ], { peers });
        await using client = await connect(server.target(), {
          metaContexts: ["base:allocation"],
        });

        await t.step("read() returns the expression's bytes", async () => {
          const all = await client.read(0, MiB);
          assert.deepEqual([...all.subarray(0, 4)], [0xde, 0xad, 0xbe, 0xef]);
          assert.deepEqual([...all.subarray(0x10000, 0x10004)], [1, 2, 3, 4]);
          all.fill(0, 0, 4).fill(0, 0x10000, 0x10004);
          assert.ok(isZero(all), "nothing else");
        });

        await t.step(
          "blockStatus() marks the placed bytes as data and agrees with nbdinfo",
          async () => {
            const map = await extentsOf(client, "base:allocation", 0, MiB);
            assert.deepEqual(
              map,
              await referenceMap(server!.uri(), "base:allocation", peers),
            );
            const at = (offset: number) =>
              map.find((e) =>
                e.offset <= offset && offset < e.offset + e.length
              )!;
            assert.equal(at(0).flags & STATE_ZERO, 0);
            assert.equal(at(0x10000).flags & STATE_ZERO, 0);
            assert.ok(at(MiB - 1).flags & STATE_ZERO);
          },
        );

        await t.step(
          "write() and writeZeroes() change it, as nbdcopy then sees",
          async () => {
            await client.write(0x20000, new Uint8Array(4096).fill(7));
            await client.writeZeroes(0, 4096);
            await client.flush();
            const theirs = await referenceBytes(server!.uri(), peers);
            assert.ok(isZero(theirs.subarray(0, 4096)));
            assert.deepEqual([...theirs.subarray(0x10000, 0x10004)], [
              1,
              2,
              3,
              4,
            ]);
            assert.ok(theirs.subarray(0x20000, 0x21000).every((b) => b === 7));
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });
}
