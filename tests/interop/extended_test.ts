/**
 * Extended headers against a server that speaks them: qemu-nbd 10 from the
 * Debian 13 root. What only 64-bit requests and replies allow: one block
 * status reply describing more than 4 GiB, one trim and one write-zeroes of
 * more than 4 GiB, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` chunks, and the offset
 * every extended reply carries, checked against its request by a wire tap
 * that reads the socket itself (`_wiretap.ts`), beside the client's own
 * debug hook.
 */

import assert from "node:assert/strict";
import { type NbdClient, STATE_HOLE, STATE_ZERO } from "../../mod.ts";
import { FLAG_BLOCK_STAT_PAYLOAD } from "../../lib/constants.ts";
import { assertBytes, fill, isZero, Trace } from "./_support.ts";
import { connectThrough, type WireTap, withTap } from "./_wiretap.ts";
import { qemuNbd, run } from "../support/servers.ts";
import { within } from "../support/wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const SIZE = 16 * GiB;
const FOUR_GIB = 4 * GiB;
const HOLE = STATE_HOLE | STATE_ZERO;
const ALLOCATION = "base:allocation";
const BITMAP = "qemu:dirty-bitmap:b0";
const DEPTH = "qemu:allocation-depth";

const CMD_WRITE = 1;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;
const REPLY_TYPE_BLOCK_STATUS_EXT = 6;

/** What both the tap and the debug hook must agree on after a test. */
function sameRequests(tap: WireTap, trace: Trace): void {
  const hook = trace.commands().filter((c) => c.command !== "NBD_CMD_DISC");
  const wire = tap.requests.filter((r) => r.type !== 2); // NBD_CMD_DISC
  assert.equal(wire.length, hook.length, "requests on the wire vs the hook");
  for (const [i, r] of wire.entries()) {
    const h = hook[i]!;
    assert.ok(r.extended, `request ${i} is not an extended request`);
    assert.equal(r.cookie, BigInt(h.cookie as number), `request ${i}: cookie`);
    assert.equal(r.offset, BigInt(h.offset as number), `request ${i}: offset`);
    // A write's length on the wire is its payload's.
    assert.equal(r.length, BigInt(h.length as number), `request ${i}: length`);
  }
}

Deno.test({
  name:
    "qemu-nbd 10: extended headers on a 16 GiB sparse raw image (64-bit block status, trim and write zeroes)",
  async fn(t) {
    await withTap(async (dir) => {
      const img = `${dir}/big.raw`;
      await run(
        "qemu-img",
        ["create", "-q", "-f", "raw", img, "16G"],
        "trixie",
      );
      // Data at the start and at 12 GiB; the rest is a hole.
      await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        `write -P 0x22 ${12 * GiB} 1M`,
        img,
      ], "trixie");
      return await qemuNbd(["-f", "raw", "--discard=unmap", img], {
        dir,
        peers: "trixie",
      });
    }, async (tap) => {
      const trace = new Trace();
      await using client = await connectThrough(tap, trace, [ALLOCATION]);

      await t.step(
        "connect() negotiates extended headers, and the export advertises NBD_FLAG_BLOCK_STAT_PAYLOAD",
        () => {
          assert.equal(client.extendedHeaders, true);
          assert.equal(client.structuredReplies, true);
          assert.equal(client.size, SIZE);
          assert.ok(
            trace.events.some((e) =>
              e.event === "send option" &&
              e.fields.option === "NBD_OPT_EXTENDED_HEADERS"
            ),
            "NBD_OPT_EXTENDED_HEADERS was not sent",
          );
          assert.notEqual(
            client.flags & FLAG_BLOCK_STAT_PAYLOAD,
            0,
            `flags 0x${client.flags.toString(16)}`,
          );
        },
      );

      await t.step(
        "blockStatus() gets extents longer than 4 GiB in one NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk",
        async () => {
          let map: Awaited<ReturnType<NbdClient["blockStatus"]>> = {};
          const sent = await tap.requestsDuring(CMD_BLOCK_STATUS, async () => {
            map = await client.blockStatus(MiB, SIZE - MiB);
          });
          assert.equal(sent.length, 1, "one request");
          assert.equal(sent[0]!.length, BigInt(SIZE - MiB), "its length");
          const extents = map[ALLOCATION]!;
          assert.deepEqual(extents[0], {
            offset: MiB,
            length: 12 * GiB - MiB,
            flags: HOLE,
          });
          assert.ok(extents[0]!.length > FOUR_GIB);
          assert.equal(extents[1]?.offset, 12 * GiB);
          assert.equal(extents[1]?.flags & STATE_ZERO, 0, "data at 12 GiB");
          const chunks = tap.chunksOf(sent[0]!.cookie);
          assert.deepEqual(
            chunks.map((c) => [c.kind, c.type]),
            [["extended", REPLY_TYPE_BLOCK_STATUS_EXT]],
          );
          assert.ok(
            trace.events.some((e) =>
              e.event === "recv chunk" &&
              BigInt(e.fields.cookie as number) === sent[0]!.cookie &&
              e.fields.type === "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"
            ),
            "the debug hook did not report the BLOCK_STATUS_EXT chunk",
          );
        },
      );

      await t.step(
        "trim() of 6.5 GiB goes as one request and leaves a hole",
        async () => {
          for (const at of [2 * GiB, 7 * GiB]) {
            await client.write(at, fill(5, at, MiB));
          }
          const length = 6 * GiB + 512 * MiB;
          const sent = await tap.requestsDuring(
            CMD_TRIM,
            () => client.trim(GiB, length),
          );
          assert.deepEqual(
            sent.map((r) => [r.offset, r.length]),
            [[BigInt(GiB), BigInt(length)]],
          );
          for (const at of [2 * GiB, 7 * GiB]) {
            assert.ok(isZero(await client.read(at, MiB)), `zeroes at ${at}`);
          }
          const after = await client.blockStatus(GiB, length);
          assert.deepEqual(after[ALLOCATION]![0]!.offset, GiB);
          assert.ok(
            after[ALLOCATION]![0]!.length >= length,
            `the trimmed range is one hole: ${
              JSON.stringify(after[ALLOCATION]!.slice(0, 3))
            }`,
          );
          assert.equal(after[ALLOCATION]![0]!.flags, HOLE);
        },
      );

      await t.step(
        "writeZeroes() of 6 GiB with fastZero goes as one request",
        async () => {
          for (const at of [3 * GiB, 8 * GiB]) {
            await client.write(at, fill(6, at, MiB));
          }
          const length = 6 * GiB;
          const sent = await tap.requestsDuring(
            CMD_WRITE_ZEROES,
            () => client.writeZeroes(3 * GiB, length, { fastZero: true }),
          );
          assert.deepEqual(
            sent.map((r) => [r.offset, r.length]),
            [[BigInt(3 * GiB), BigInt(length)]],
          );
          for (const at of [3 * GiB, 8 * GiB]) {
            assert.ok(isZero(await client.read(at, MiB)), `zeroes at ${at}`);
          }
          const after = await client.blockStatus(3 * GiB, length);
          const zeroed = after[ALLOCATION]!;
          assert.ok(
            zeroed.every((e) =>
              e.offset >= 3 * GiB + length || (e.flags & STATE_ZERO) !== 0
            ),
            `zeroed range: ${JSON.stringify(zeroed.slice(0, 4))}`,
          );
        },
      );

      await t.step(
        "every extended reply names its request's offset (reads, writes, block status, in flight)",
        async () => {
          const pending: Promise<unknown>[] = [];
          for (let i = 0; i < 64; i++) {
            // Far apart and unaligned, so that a wrong offset shows.
            const at = (i * 251 * MiB + i * 4097) % (SIZE - 2 * MiB);
            if (i % 3 === 0) {
              pending.push(client.write(at, fill(7, at, 8 * KiB)));
            } else if (i % 3 === 1) pending.push(client.read(at, 96 * KiB));
            else pending.push(client.blockStatus(at, 64 * MiB));
          }
          await within(30_000, "requests in flight", Promise.all(pending));
          // A read that qemu splits into data and hole chunks: the header
          // offset is the request's, not the chunk's.
          const mixed = await client.read(12 * GiB - 64 * KiB, 256 * KiB);
          assertBytes(
            mixed.subarray(64 * KiB, 64 * KiB + 192 * KiB),
            new Uint8Array(192 * KiB).fill(0x22),
            "data at 12 GiB",
          );
          assert.ok(isZero(mixed.subarray(0, 64 * KiB)));
          assert.deepEqual(tap.problems, []);
          assert.ok(tap.replies.length > 64);
          assert.ok(
            tap.replies.every((r) => r.kind === "extended"),
            "a reply that is not extended",
          );
          assert.ok(
            tap.requests.some((r) => r.type === CMD_WRITE),
            "writes went through the tap",
          );
          sameRequests(tap, trace);
        },
      );
    });
  },
});

Deno.test({
  name:
    "qemu-nbd 10: extended headers on a 16 GiB qcow2 over a backing file, with a dirty bitmap and allocation depth",
  async fn(t) {
    await withTap(async (dir) => {
      // base: data at [0, 1M). top: bitmap b0 enabled, then data at
      // [10G, 10G+1M), which b0 records as dirty.
      const base = `${dir}/base.qcow2`;
      const top = `${dir}/top.qcow2`;
      const q = ["-q", "-f", "qcow2"];
      await run("qemu-img", ["create", ...q, base, "16G"], "trixie");
      await run(
        "qemu-io",
        ["-f", "qcow2", "-c", "write -P 0xcd 0 1M", base],
        "trixie",
      );
      await run(
        "qemu-img",
        ["create", ...q, "-b", base, "-F", "qcow2", top],
        "trixie",
      );
      await run(
        "qemu-img",
        ["bitmap", "--add", "--enable", top, "b0"],
        "trixie",
      );
      await run(
        "qemu-io",
        ["-f", "qcow2", "-c", `write -P 0xab ${10 * GiB} 1M`, top],
        "trixie",
      );
      return await qemuNbd(
        ["-f", "qcow2", "-B", "b0", "-A", "-r", top],
        { dir, peers: "trixie" },
      );
    }, async (tap) => {
      const trace = new Trace();
      await using client = await connectThrough(tap, trace, [
        ALLOCATION,
        BITMAP,
        DEPTH,
      ]);

      await t.step(
        "one block status request answers every context with one BLOCK_STATUS_EXT chunk each",
        async () => {
          assert.equal(client.extendedHeaders, true);
          assert.deepEqual(
            [...client.metaContexts].sort(),
            [ALLOCATION, DEPTH, BITMAP],
          );
          let map: Awaited<ReturnType<NbdClient["blockStatus"]>> = {};
          const sent = await tap.requestsDuring(CMD_BLOCK_STATUS, async () => {
            map = await client.blockStatus(MiB, SIZE - MiB);
          });
          assert.equal(sent.length, 1);
          const chunks = tap.chunksOf(sent[0]!.cookie);
          assert.deepEqual(
            chunks.map((c) => c.type),
            [6, 6, 6],
            "three BLOCK_STATUS_EXT chunks",
          );
          assert.equal(chunks.filter((c) => c.flags & 1).length, 1, "one DONE");
          // Past the backing data and before 10 GiB: nothing anywhere.
          const first = (ctx: string) => map[ctx]![0]!;
          assert.deepEqual(first(ALLOCATION), {
            offset: MiB,
            length: 10 * GiB - MiB,
            flags: HOLE,
          });
          // Unallocated in the whole chain: depth 0, flags 0.
          assert.deepEqual(first(DEPTH), {
            offset: MiB,
            length: 10 * GiB - MiB,
            flags: 0,
          });
          // Clean up to the write at 10 GiB.
          assert.deepEqual(first(BITMAP), {
            offset: MiB,
            length: 10 * GiB - MiB,
            flags: 0,
          });
          for (const ctx of [ALLOCATION, DEPTH, BITMAP]) {
            assert.ok(first(ctx).length > FOUR_GIB, ctx);
            const dirty = map[ctx]![1]!;
            assert.equal(dirty.offset, 10 * GiB, `${ctx} second extent`);
          }
          // The dirty range, and the top layer's allocation (depth 1).
          assert.equal(map[BITMAP]![1]!.flags, 1);
          assert.equal(map[DEPTH]![1]!.flags, 1);
          assert.equal(map[ALLOCATION]![1]!.flags & STATE_ZERO, 0);
        },
      );

      await t.step(
        "the backing file's data shows through at depth 2, and every reply's offset matches",
        async () => {
          const head = await client.blockStatus(0, 4 * MiB);
          assert.deepEqual(head[DEPTH]![0], {
            offset: 0,
            length: MiB,
            flags: 2,
          });
          assertBytes(
            await client.read(0, 64 * KiB),
            new Uint8Array(64 * KiB).fill(0xcd),
            "through the chain",
          );
          assert.deepEqual(tap.problems, []);
          assert.ok(tap.replies.every((r) => r.kind === "extended"));
          sameRequests(tap, trace);
        },
      );
    });
  },
});
