/**
 * `copy` beside nbdcopy 1.22 (libnbd 1.22, from the Debian 13 root) on the
 * same exports, with today's servers (nbdkit 1.42, qemu-nbd 10 with
 * extended headers): both copies leave the same bytes and the same
 * extent map, and each reads what the other wrote. The comparisons with
 * the host's nbdcopy 1.14 are in `copy_test.ts`.
 */

import assert from "node:assert/strict";
import { connect, type Extent } from "../../mod.ts";
import {
  nbdkit,
  qemuNbd,
  run,
  runBytes,
  type Server,
  tempDir,
} from "../support/servers.ts";
import {
  exportHash,
  fileHash,
  referenceMap,
  sha256,
} from "../support/reference.ts";
import { runTool } from "./_tools.ts";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** Bytes of data (not zero) in a base:allocation map. */
function dataBytes(map: Extent[]): number {
  return map.filter((e) => (e.flags & 2) === 0).reduce(
    (n, e) => n + e.length,
    0,
  );
}

/** nbdcopy 1.22 from the root; fails the test on a non-zero exit. */
async function nbdcopy122(args: string[]): Promise<void> {
  await runBytes("nbdcopy", args, "trixie");
}

/**
 * Runs `body` in a fresh directory under the root; every server it pushes
 * onto `servers` is stopped (last first) and the directory removed after.
 */
async function inRoot(
  body: (dir: string, servers: Server[]) => Promise<void>,
): Promise<void> {
  const dir = await tempDir("trixie");
  const servers: Server[] = [];
  try {
    await body(dir, servers);
  } finally {
    for (const s of servers.reverse()) await s.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/**
 * Two empty raw images of `size` in `dir`, "ours" and "theirs", each served
 * writable by qemu-nbd 10 (pushed onto `servers`).
 */
async function twoDestinations(
  dir: string,
  size: string,
  servers: Server[],
): Promise<[Server, Server]> {
  const dsts: Server[] = [];
  for (const name of ["ours", "theirs"]) {
    const img = `${dir}/${name}.raw`;
    await run(
      "qemu-img",
      ["create", "-q", "-f", "raw", img, size],
      "trixie",
    );
    const dst = await qemuNbd(["-f", "raw", "--discard=unmap", img], {
      dir,
      peers: "trixie",
    });
    servers.push(dst);
    dsts.push(dst);
  }
  return dsts as [Server, Server];
}

Deno.test({
  name:
    "copy and nbdcopy 1.22: a sparse nbdkit 1.42 export into qemu-nbd 10 gives the same bytes and map",
  async fn() {
    await inRoot(async (dir, servers) => {
      const src = await nbdkit([
        "sparse-random",
        "size=64M",
        "percent=30",
        "seed=7",
        "runlength=1048576",
        "random-content=true",
      ], { dir, peers: "trixie" });
      servers.push(src);
      const expected = await exportHash(src.uri(), "trixie");
      const srcMap = await referenceMap(src.uri(), "base:allocation", "trixie");
      const data = dataBytes(srcMap);
      assert.ok(data > 0 && data < 32 * MiB, `source has ${data} data bytes`);

      const [ours, theirs] = await twoDestinations(dir, "64M", servers);
      const r = await runTool("copy", ["-v", src.uri(), ours.uri()]);
      assert.equal(r.code, 0, r.stderr);
      await nbdcopy122([src.uri(), theirs.uri()]);

      for (const [label, dst] of [["copy", ours], ["nbdcopy 1.22", theirs]]) {
        const d = dst as Server;
        assert.equal(
          await exportHash(d.uri(), "trixie"),
          expected,
          label as string,
        );
        assert.equal(await exportHash(d.uri()), expected, `${label} (1.14)`);
      }
      // Both leave data exactly where the source has it (a raw file on
      // qemu-nbd allocates what is written, and zeroes stay holes).
      assert.deepEqual(
        await referenceMap(ours.uri(), "base:allocation", "trixie"),
        await referenceMap(theirs.uri(), "base:allocation", "trixie"),
      );
    });
  },
});

Deno.test({
  name:
    "copy and nbdcopy 1.22: a qcow2 over qemu-nbd 10 to a file, and each reads what the other wrote",
  async fn() {
    await inRoot(async (dir, servers) => {
      const image = `${dir}/src.qcow2`;
      const q = ["-f", "qcow2"];
      await run("qemu-img", ["create", "-q", ...q, image, "32M"], "trixie");
      for (const cmd of ["write -P 0x11 0 1M", "write -P 0x22 5M 300k"]) {
        await run("qemu-io", [...q, "-c", cmd, image], "trixie");
      }
      const src = await qemuNbd(["-r", ...q, image], { dir, peers: "trixie" });
      servers.push(src);
      const r = await runTool("copy", [src.uri(), `${dir}/ours.raw`]);
      assert.equal(r.code, 0, r.stderr);
      await nbdcopy122([src.uri(), `${dir}/theirs.raw`]);
      const ours = await Deno.readFile(`${dir}/ours.raw`);
      assert.equal(ours.length, 32 * MiB);
      assert.equal(
        await sha256(ours),
        await fileHash(`${dir}/theirs.raw`),
      );

      // nbdcopy 1.22 writes into an nbdkit 1.42 export; ours reads it back.
      const mem = await nbdkit(["memory", "32M"], { dir, peers: "trixie" });
      servers.push(mem);
      await nbdcopy122([`${dir}/ours.raw`, mem.uri()]);
      const back = await runTool("copy", [mem.uri(), `${dir}/back.raw`]);
      assert.equal(back.code, 0, back.stderr);
      assert.equal(await fileHash(`${dir}/back.raw`), await sha256(ours));
      // And the other way: ours writes, nbdcopy 1.22 reads.
      const mem2 = await nbdkit(["memory", "32M"], { dir, peers: "trixie" });
      servers.push(mem2);
      const up = await runTool("copy", [
        "--flush",
        `${dir}/ours.raw`,
        mem2.uri(),
      ]);
      assert.equal(up.code, 0, up.stderr);
      assert.equal(await exportHash(mem2.uri(), "trixie"), await sha256(ours));
    });
  },
});

Deno.test({
  name:
    "copy and nbdcopy 1.22: a 6 GiB sparse image across the 4 GiB mark, over extended headers",
  async fn() {
    await inRoot(async (dir, servers) => {
      const src = `${dir}/src.raw`;
      await run("qemu-img", ["create", "-q", "-f", "raw", src, "6G"], "trixie");
      await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x33 1M 1M",
        "-c",
        `write -P 0x44 ${4 * GiB - 512 * 1024} 1M`,
        "-c",
        `write -P 0x55 ${5 * GiB} 2M`,
        src,
      ], "trixie");
      const from = await qemuNbd(["-r", "-f", "raw", src], {
        dir,
        peers: "trixie",
      });
      servers.push(from);
      const [ours, theirs] = await twoDestinations(dir, "6G", servers);
      const r = await runTool("copy", ["-v", from.uri(), ours.uri()]);
      assert.equal(r.code, 0, r.stderr);
      const read = /read (\d+)/.exec(r.stderr);
      assert.ok(read, r.stderr);
      assert.ok(Number(read[1]) <= 8 * MiB, `read ${read[1]} bytes of 6 GiB`);
      await nbdcopy122([from.uri(), theirs.uri()]);

      // Both copies leave the same map, with data where the source has
      // it (qemu's raw driver reports its first 4 KiB as data; both copies
      // find it zero and leave a hole).
      const srcMap = await referenceMap(
        from.uri(),
        "base:allocation",
        "trixie",
      );
      const oursMap = await referenceMap(
        ours.uri(),
        "base:allocation",
        "trixie",
      );
      assert.deepEqual(
        oursMap,
        await referenceMap(theirs.uri(), "base:allocation", "trixie"),
      );
      assert.equal(dataBytes(oursMap), 4 * MiB);
      await using a = await connect(from.target());
      await using b = await connect(ours.target());
      assert.equal(b.extendedHeaders, true);
      for (const e of srcMap.filter((x) => (x.flags & 2) === 0)) {
        const [x, y] = await Promise.all([
          a.read(e.offset, e.length),
          b.read(e.offset, e.length),
        ]);
        assert.equal(await sha256(y), await sha256(x), `data at ${e.offset}`);
      }
    });
  },
});
