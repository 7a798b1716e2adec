/**
 * What only qemu-nbd offers: block status beyond `base:allocation` (a
 * persistent dirty bitmap and the allocation depth of a backing chain),
 * named and described exports, and read-only serving. Expected extents
 * come from what the test wrote with qemu-io, and are cross-checked with
 * the reference client (`nbdinfo --map`) and `qemu-nbd --list`.
 */

import assert from "node:assert/strict";
import {
  connect,
  type Extent,
  listExports,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdOptionError,
  probe,
  STATE_HOLE,
  STATE_ZERO,
} from "../../mod.ts";
import {
  assertBytes,
  extentsOf,
  isZero,
  READ_ONLY,
  refusesWritesBeforeTraffic,
  Trace,
} from "./_support.ts";
import { referenceMap } from "../support/reference.ts";
import {
  type Peers,
  qemuNbd,
  run,
  type Server,
  tempDir,
} from "../support/servers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const BITMAP = "qemu:dirty-bitmap:bitmap0";
const DEPTH = "qemu:allocation-depth";
const ALLOCATION = "base:allocation";
const HOLE = STATE_HOLE | STATE_ZERO;

/** Extents from a list of [offset, length, flags], for readable tables. */
function extents(...rows: Array<[number, number, number]>): Extent[] {
  return rows.map(([offset, length, flags]) => ({ offset, length, flags }));
}

/** Exports as `qemu-nbd --list` prints them: name and description. */
async function qemuList(
  server: Server,
): Promise<Array<{ name: string; description: string; contexts: string[] }>> {
  const text = await run(
    "qemu-nbd",
    ["--list", "-k", server.socket!],
    server.peers,
  );
  const out: Array<{ name: string; description: string; contexts: string[] }> =
    [];
  for (const line of text.split("\n")) {
    const name = line.match(/^ export: '(.*)'$/);
    if (name) out.push({ name: name[1]!, description: "", contexts: [] });
    const description = line.match(/^ {2}description: (.*)$/);
    if (description && out.length) out.at(-1)!.description = description[1]!;
    const context = line.match(/^ {3}(\S+:\S+)$/);
    if (context && out.length) out.at(-1)!.contexts.push(context[1]!);
  }
  return out;
}

/** qemu 7.2 from the host, qemu 10 from the Debian 13 root. */
const QEMU: Array<[Peers, string]> = [
  ["host", "qemu-nbd"],
  ["trixie", "qemu-nbd 10"],
];

for (const [peers, label] of QEMU) {
  Deno.test({
    name: `${label}: a qcow2 overlay with a dirty bitmap and allocation depth`,
    async fn(t) {
      const dir = await tempDir(peers);
      let server: Server | undefined;
      try {
        // base: 0xcd at [0, 64K). top (backing base): bitmap0 enabled, then
        // 0xab at [1M, 1M+64K), which the bitmap records as dirty.
        const base = `${dir}/base.qcow2`;
        const top = `${dir}/top.qcow2`;
        await run(
          "qemu-img",
          ["create", "-q", "-f", "qcow2", base, "64M"],
          peers,
        );
        await run(
          "qemu-io",
          ["-f", "qcow2", "-c", "write -P 0xcd 0 64k", base],
          peers,
        );
        await run("qemu-img", [
          "create",
          "-q",
          "-f",
          "qcow2",
          "-b",
          base,
          "-F",
          "qcow2",
          top,
        ], peers);
        await run(
          "qemu-img",
          ["bitmap", "--add", "--enable", top, "bitmap0"],
          peers,
        );
        await run(
          "qemu-io",
          ["-f", "qcow2", "-c", "write -P 0xab 1M 64k", top],
          peers,
        );
        server = await qemuNbd([
          "-f",
          "qcow2",
          "-B",
          "bitmap0",
          "-A",
          "-x",
          "top",
          "-D",
          "overlay",
          top,
        ], { dir, peers });
        const trace = new Trace();
        await using client = await connect(server.target("top"), {
          metaContexts: [ALLOCATION, BITMAP, DEPTH],
          debug: trace.hook,
        });

        await t.step(
          "connect() negotiates base:allocation, the dirty bitmap and the allocation depth",
          async () => {
            assert.deepEqual(
              [...client.metaContexts].sort(),
              [ALLOCATION, DEPTH, BITMAP],
            );
            const p = await probe(server!.target("top"));
            assert.deepEqual([...p.metaContexts].sort(), [
              ALLOCATION,
              DEPTH,
              BITMAP,
            ]);
            const listed = await qemuList(server!);
            assert.deepEqual([...listed[0]!.contexts].sort(), [
              ALLOCATION,
              DEPTH,
              BITMAP,
            ]);
          },
        );

        await t.step(
          "read() sees the backing file's data through the overlay",
          async () => {
            assertBytes(
              await client.read(0, 64 * KiB),
              new Uint8Array(64 * KiB).fill(0xcd),
              "from base",
            );
            assertBytes(
              await client.read(MiB, 64 * KiB),
              new Uint8Array(64 * KiB).fill(0xab),
              "from top",
            );
          },
        );

        await t.step(
          "read() of an unallocated range takes NBD_REPLY_TYPE_OFFSET_HOLE chunks as zeroes",
          async () => {
            const from = trace.events.length;
            const back = await client.read(0, 2 * MiB);
            const chunks = trace.events.slice(from).filter((e) =>
              e.event === "recv chunk"
            ).map((e) => e.fields.type);
            // qemu-nbd sends holes for what block status calls zero.
            assert.ok(
              chunks.includes("NBD_REPLY_TYPE_OFFSET_HOLE"),
              `${chunks}`,
            );
            assert.ok(
              chunks.includes("NBD_REPLY_TYPE_OFFSET_DATA"),
              `${chunks}`,
            );
            assertBytes(
              back.subarray(0, 64 * KiB),
              new Uint8Array(64 * KiB).fill(0xcd),
              "data before the hole",
            );
            assert.ok(isZero(back.subarray(64 * KiB, MiB)), "the hole");
            assertBytes(
              back.subarray(MiB, MiB + 64 * KiB),
              new Uint8Array(64 * KiB).fill(0xab),
              "data after the hole",
            );
            assert.ok(isZero(back.subarray(MiB + 64 * KiB)), "the tail");

            // With df the server must not fragment: one data chunk, holes and all.
            const dfFrom = trace.events.length;
            const whole = await client.read(0, 2 * MiB, { df: true });
            const dfChunks = trace.events.slice(dfFrom).filter((e) =>
              e.event === "recv chunk"
            ).map((e) => e.fields.type);
            assert.deepEqual(dfChunks, ["NBD_REPLY_TYPE_OFFSET_DATA"]);
            assertBytes(whole, back, "the same bytes with df");
          },
        );

        await t.step(
          "blockStatus() reports the dirty extents qemu-io left in bitmap0",
          async () => {
            assert.deepEqual(
              await extentsOf(client, BITMAP, 0, SIZE),
              extents(
                [0, MiB, 0],
                [MiB, 64 * KiB, 1],
                [MiB + 64 * KiB, SIZE - MiB - 64 * KiB, 0],
              ),
            );
          },
        );

        await t.step(
          "blockStatus() reports allocation depth 2 in the backing file, 1 in the overlay, 0 elsewhere",
          async () => {
            assert.deepEqual(
              await extentsOf(client, DEPTH, 0, SIZE),
              extents(
                [0, 64 * KiB, 2],
                [64 * KiB, MiB - 64 * KiB, 0],
                [MiB, 64 * KiB, 1],
                [MiB + 64 * KiB, SIZE - MiB - 64 * KiB, 0],
              ),
            );
            assert.deepEqual(
              await extentsOf(client, ALLOCATION, 0, SIZE),
              extents(
                [0, 64 * KiB, 0],
                [64 * KiB, MiB - 64 * KiB, HOLE],
                [MiB, 64 * KiB, 0],
                [MiB + 64 * KiB, SIZE - MiB - 64 * KiB, HOLE],
              ),
            );
          },
        );

        await t.step(
          "writes through NBD dirty the enabled bitmap and allocate in the overlay",
          async () => {
            await client.write(2 * MiB, new Uint8Array(64 * KiB).fill(1));
            await client.writeZeroes(3 * MiB, 64 * KiB);
            const dirty = (await extentsOf(client, BITMAP, 0, SIZE)).filter((
              e,
            ) => e.flags === 1);
            assert.deepEqual(
              dirty,
              extents(
                [MiB, 64 * KiB, 1],
                [2 * MiB, 64 * KiB, 1],
                [3 * MiB, 64 * KiB, 1],
              ),
            );
            const depth = await extentsOf(client, DEPTH, 2 * MiB, 2 * MiB);
            assert.deepEqual(
              depth,
              extents(
                [2 * MiB, 64 * KiB, 1],
                [2 * MiB + 64 * KiB, MiB - 64 * KiB, 0],
                [3 * MiB, 64 * KiB, 1],
                [3 * MiB + 64 * KiB, MiB - 64 * KiB, 0],
              ),
            );
            for (
              const e of await extentsOf(client, ALLOCATION, 3 * MiB, 64 * KiB)
            ) {
              assert.ok(e.flags & STATE_ZERO, "zeroed range reads as zero");
            }
          },
        );

        await t.step(
          "blockStatus() with reqOne returns one extent per context",
          async () => {
            const one = await client.blockStatus(0, SIZE, { reqOne: true });
            assert.deepEqual(one[ALLOCATION], extents([0, 64 * KiB, 0]));
            assert.deepEqual(one[DEPTH], extents([0, 64 * KiB, 2]));
            assert.deepEqual(one[BITMAP], extents([0, MiB, 0]));
          },
        );

        await t.step(
          "blockStatus() agrees with the reference client (nbdinfo --map)",
          async () => {
            for (const context of [ALLOCATION, DEPTH, BITMAP]) {
              assert.deepEqual(
                await extentsOf(client, context, 0, SIZE),
                await referenceMap(server!.uri("top"), context, peers),
                context,
              );
            }
          },
        );
      } finally {
        await server?.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    },
  });

  Deno.test({
    name: `${label}: a read-only raw image as a named, described export`,
    async fn(t) {
      const dir = await tempDir(peers);
      let server: Server | undefined;
      try {
        const img = `${dir}/disk.raw`;
        await run("qemu-img", ["create", "-q", "-f", "raw", img, "16M"], peers);
        await run(
          "qemu-io",
          ["-f", "raw", "-c", "write -P 0x5a 0 1M", img],
          peers,
        );
        server = await qemuNbd(
          ["-f", "raw", "-r", "-x", "disk", "-D", "a raw disk", img],
          { dir, peers },
        );

        await t.step(
          "listExports() returns what qemu-nbd --list shows",
          async () => {
            const ours = await listExports(server!.target());
            assert.deepEqual(ours, [{
              name: "disk",
              description: "a raw disk",
            }]);
            const theirs = await qemuList(server!);
            assert.deepEqual(
              theirs.map(({ name, description }) => ({ name, description })),
              ours,
            );
          },
        );

        await t.step(
          "connect() to an export qemu-nbd does not serve fails with NBD_REP_ERR_UNKNOWN",
          async () => {
            for (const name of ["", "nope"]) {
              await assert.rejects(
                () => connect(server!.target(name)),
                (e: unknown) => {
                  assert.ok(e instanceof NbdOptionError, `got ${e}`);
                  assert.equal(e.replyName, "NBD_REP_ERR_UNKNOWN");
                  assert.equal(e.option, 7);
                  assert.match(e.message, /NBD_OPT_GO/);
                  assert.match(e.serverMessage, new RegExp(`'${name}'`));
                  return true;
                },
              );
            }
          },
        );

        await t.step(
          "connect() takes the nbd+unix URI of the export",
          async () => {
            await using byUri = await connect(server!.uri("disk"));
            assert.equal(byUri.exportName, "disk");
            assert.equal(byUri.size, 16 * MiB);
          },
        );

        await t.step(
          "a read-only export (-r) refuses writes before sending them",
          async () => {
            const trace = new Trace();
            await using client = await connect(server!.target("disk"), {
              debug: trace.hook,
            });
            assert.equal(client.readOnly, true);
            await refusesWritesBeforeTraffic(trace, client, 512);
            assert.throws(
              () => client.writable(),
              (e: unknown) =>
                e instanceof Error && e.name === "NbdUnsupportedError" &&
                READ_ONLY.test(e.message),
            );
            assertBytes(
              await client.read(0, MiB),
              new Uint8Array(MiB).fill(0x5a),
              "what qemu-io wrote",
            );
            assert.ok(isZero(await client.read(MiB, MiB)));
          },
        );
      } finally {
        await server?.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    },
  });

  Deno.test({
    name: `${label}: I/O errors from the image (blkdebug) reach the caller`,
    async fn(t) {
      const dir = await tempDir(peers);
      let server: Server | undefined;
      try {
        const img = `${dir}/disk.raw`;
        await run("qemu-img", ["create", "-q", "-f", "raw", img, "1M"], peers);
        await run(
          "qemu-io",
          ["-f", "raw", "-c", "write -P 0x11 0 1M", img],
          peers,
        );
        // Reads of sector 16 (offset 8 KiB) fail with EIO, writes of sector
        // 32 (offset 16 KiB) with ENOSPC, every time.
        server = await qemuNbd([
          "--image-opts",
          [
            "driver=raw",
            "file.driver=blkdebug",
            `file.image.filename=${img}`,
            "file.inject-error.0.event=read_aio",
            "file.inject-error.0.errno=5",
            "file.inject-error.0.sector=16",
            "file.inject-error.1.event=write_aio",
            "file.inject-error.1.errno=28",
            "file.inject-error.1.sector=32",
          ].join(","),
        ], { dir, peers });
        const expectError = (
          command: string,
          errno: number,
          name: string,
          message: string,
        ) =>
        (e: unknown) => {
          assert.ok(e instanceof NbdCommandError, `got ${e}`);
          assert.equal(e.command, command);
          assert.equal(e.errno, errno);
          assert.equal(e.errnoName, name);
          assert.equal(e.serverMessage, message);
          assert.match(
            e.message,
            new RegExp(`failed with ${errno} \\(${name}\\)`),
          );
          return true;
        };

        await t.step(
          "with simple replies, a failed read and write each fail alone",
          async () => {
            await using client = await connect(server!.target(), {
              structuredReplies: false,
            });
            await assert.rejects(
              () => client.read(8 * KiB, 4 * KiB),
              expectError("NBD_CMD_READ", 5, "EIO", ""),
            );
            await assert.rejects(
              () => client.write(16 * KiB, new Uint8Array(4 * KiB)),
              expectError("NBD_CMD_WRITE", 28, "ENOSPC", ""),
            );
            assertBytes(
              await client.read(0, 4 * KiB),
              new Uint8Array(4 * KiB).fill(0x11),
              "after the errors",
            );
          },
        );

        await t.step(
          "with structured replies, error chunks carry qemu's message",
          async () => {
            await using client = await connect(server!.target());
            assert.equal(client.structuredReplies, true);
            // df takes qemu's plain read path, which answers an I/O error with
            // an error chunk.
            await assert.rejects(
              () => client.read(8 * KiB, 4 * KiB, { df: true }),
              expectError("NBD_CMD_READ", 5, "EIO", "reading from file failed"),
            );
            await assert.rejects(
              () => client.write(16 * KiB, new Uint8Array(4 * KiB)),
              expectError(
                "NBD_CMD_WRITE",
                28,
                "ENOSPC",
                "writing to file failed",
              ),
            );
            assert.equal(client.failure, undefined);
            assertBytes(
              await client.read(0, 4 * KiB),
              new Uint8Array(4 * KiB).fill(0x11),
              "after the errors",
            );
          },
        );

        await t.step(
          `${
            peers === "host" ? "qemu-nbd 7.2" : label
          } hangs up on a failed sparse read; the client fails it without hanging`,
          async () => {
            // Without df, qemu 7.2 treats the read error as a failure to send
            // the reply and disconnects ("Failed to send reply: reading from
            // file failed"); libnbd sees the same.
            await using client = await connect(server!.target());
            await assert.rejects(
              () => client.read(8 * KiB, 4 * KiB),
              (e: unknown) =>
                e instanceof NbdConnectionClosedError &&
                /Server closed the connection/.test(e.message),
            );
            await assert.rejects(
              () => client.read(0, 4 * KiB),
              (e: unknown) =>
                e instanceof NbdConnectionClosedError &&
                /the connection failed/.test(e.message),
            );
          },
        );
      } finally {
        await server?.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    },
  });
}
