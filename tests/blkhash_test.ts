/**
 * blkhash: the MD5 under it, the accumulator against a direct computation
 * of the construction, and `blkhash()` over real exports against nbdcopy
 * 1.24's `--blkhash` (the Debian sid root).
 *
 * @module
 */

import assert from "node:assert/strict";
import { blkhash, Blkhasher, connect, toHex } from "../mod.ts";
import { md5 } from "../lib/_md5.ts";
import {
  makeQcow2,
  nbdkit,
  qemuNbd,
  run,
  type Server,
} from "./support/servers.ts";
import { sidBlkhash, sidTempDir } from "./support/sid.ts";
import { seeded } from "./support/random.ts";

const enc = new TextEncoder();

/** The construction written out plainly: the spec the class must meet. */
async function plainBlkhash(
  name: "SHA-1" | "SHA-256" | "SHA-512",
  data: Uint8Array,
  block: number,
): Promise<string> {
  const parts: Uint8Array[] = [];
  for (let o = 0; o < data.length; o += block) {
    const d = await crypto.subtle.digest(
      name,
      data.slice(o, Math.min(data.length, o + block)),
    );
    parts.push(new Uint8Array(d));
  }
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(data.length), true);
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0) + 8);
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  all.set(len, at);
  return toHex(new Uint8Array(await crypto.subtle.digest(name, all)));
}

/** Bytes with runs of zeroes between random data. */
function mixed(size: number, seed: number): Uint8Array {
  const rand = seeded(seed);
  const out = new Uint8Array(size);
  for (let o = 0; o < size; o += 20000) {
    if ((o / 20000) % 3 === 1) continue; // a zero run
    for (let i = o; i < Math.min(size, o + 20000); i++) {
      out[i] = rand() & 0xff;
    }
  }
  return out;
}

Deno.test("md5() matches the RFC 1321 test suite", async (t) => {
  const vectors: Array<[string, string]> = [
    ["", "d41d8cd98f00b204e9800998ecf8427e"],
    ["a", "0cc175b9c0f1b6a831c399e269772661"],
    ["abc", "900150983cd24fb0d6963f7d28e17f72"],
    ["message digest", "f96b697d7cb7938d525a2f31aaf161d0"],
    ["abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"],
    [
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
      "d174ab98d277d9f5a5611c2c9f419d9f",
    ],
    [
      "1234567890".repeat(8),
      "57edf4a22be3c955ac49da2e2107b67a",
    ],
  ];
  for (const [text, hex] of vectors) {
    await t.step(`md5(${JSON.stringify(text.slice(0, 20))})`, () => {
      assert.equal(toHex(md5(enc.encode(text))), hex);
    });
  }
  await t.step("padding at every length around a block boundary", async () => {
    // Against md5sum, for lengths 50..130 (one and two padding blocks).
    const data = mixed(130, 7);
    const dir = await Deno.makeTempDir({ prefix: "nbd-md5-" });
    try {
      for (const n of [55, 56, 57, 63, 64, 65, 119, 120, 128]) {
        await Deno.writeFile(`${dir}/x`, data.subarray(0, n));
        const want = (await run("md5sum", [`${dir}/x`])).split(" ")[0];
        assert.equal(toHex(md5(data.subarray(0, n))), want, `length ${n}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
  await t.step("a view into a larger buffer hashes only its bytes", () => {
    const big = enc.encode("xxabcxx");
    assert.equal(
      toHex(md5(big.subarray(2, 5))),
      "900150983cd24fb0d6963f7d28e17f72",
    );
  });
});

Deno.test("Blkhasher follows the blkhash construction", async (t) => {
  const data = mixed(300_001, 1);
  await t.step(
    "whole image in one update equals the plain construction",
    async () => {
      for (
        const [d, name] of [["sha1", "SHA-1"], ["sha256", "SHA-256"], [
          "sha512",
          "SHA-512",
        ]] as const
      ) {
        for (const block of [512, 4096, 65536]) {
          const h = new Blkhasher(d, block, data.length);
          await h.update(0, data);
          assert.equal(await h.hex(), await plainBlkhash(name, data, block));
        }
      }
    },
  );
  await t.step(
    "pieces in any order, zero ranges unread, give the same",
    async () => {
      const want = await plainBlkhash("SHA-256", data, 4096);
      const h = new Blkhasher("sha256", 4096, data.length);
      const cuts: Array<[number, number]> = [];
      for (let o = 0; o < data.length; o += 7777) {
        cuts.push([o, Math.min(data.length, o + 7777)]);
      }
      const rand = seeded(3);
      cuts.sort(() => (rand() % 3) - 1);
      await Promise.all(cuts.map(([a, b]) => {
        const part = data.subarray(a, b);
        return part.every((x) => x === 0)
          ? h.zero(a, b - a)
          : h.update(a, part);
      }));
      assert.equal(await h.hex(), want);
    },
  );
  await t.step("a stream (no size) ends its last block short", async () => {
    const h = new Blkhasher("sha256", 65536);
    for (let o = 0; o < data.length; o += 65536) {
      await h.update(o, data.subarray(o, o + 65536));
    }
    assert.equal(await h.hex(), await plainBlkhash("SHA-256", data, 65536));
  });
  await t.step("pieces handed to the hasher over the same table", async () => {
    const main = new Blkhasher("sha256", 65536, data.length);
    const other = Blkhasher.fromShared(main.shared!);
    // Split inside blocks so both hold parts of the same block.
    await main.update(0, data.subarray(0, 100_000));
    await other.update(100_000, data.subarray(100_000));
    await main.addPieces(other.pieces());
    assert.equal(await main.hex(), await plainBlkhash("SHA-256", data, 65536));
  });
  await t.step("an empty image hashes its length alone", async () => {
    const h = new Blkhasher("sha256", 65536, 0);
    assert.equal(
      await h.hex(),
      await plainBlkhash("SHA-256", new Uint8Array(0), 65536),
    );
  });
  await t.step(
    "a block given twice, a missing block, bad parameters",
    async () => {
      const h = new Blkhasher("sha256", 4096, 8192);
      await h.zero(0, 4096);
      await assert.rejects(h.update(0, new Uint8Array(4096)), /hashed already/);
      await assert.rejects(h.final(), /block 1 was never hashed/);
      await assert.rejects(h.zero(4096, 8192), RangeError);
      assert.throws(() => new Blkhasher("sha256", 3000), RangeError);
      assert.throws(
        // deno-lint-ignore no-explicit-any
        () => new Blkhasher("crc32" as any, 4096),
        (e) =>
          e instanceof TypeError && /unknown digest "crc32"/.test(e.message),
      );
    },
  );
});

/** An export under the sid root, so its nbdcopy reaches the socket. */
interface Fixture {
  name: string;
  start(dir: string): Promise<Server>;
}

const FIXTURES: Fixture[] = [
  {
    name: "nbdkit pattern, odd size",
    start: (dir) => nbdkit(["pattern", "3000001"], { dir }),
  },
  {
    name: "sparse file with data at odd places",
    start: async (dir) => {
      const path = `${dir}/sparse.img`;
      const f = await Deno.open(path, { create: true, write: true });
      try {
        await f.truncate(9 * 1024 * 1024 + 4321);
        for (const at of [0, 70_000, 4 * 1024 * 1024 - 10, 9 * 1024 * 1024]) {
          await f.seek(at, Deno.SeekMode.Start);
          await f.write(mixed(3000, at));
        }
      } finally {
        f.close();
      }
      return nbdkit(["file", path], { dir });
    },
  },
  {
    name: "qemu-nbd qcow2 with a zeroed cluster range",
    start: async (dir) => {
      const image = `${dir}/disk.qcow2`;
      await makeQcow2(image, "6M", [
        "write -P 0x5a 0 5M",
        "write -z 1M 2M",
        "write -P 0x11 3000000 12345",
      ]);
      return qemuNbd(["-f", "qcow2", image], { dir });
    },
  },
];

Deno.test("blkhash() equals nbdcopy 1.24's --blkhash", async (t) => {
  for (const fixture of FIXTURES) {
    const dir = await sidTempDir();
    const server = await fixture.start(dir);
    try {
      for (const spec of ["sha256", "md5/4k", "sha1/512", "sha512/1M"]) {
        await t.step(`${fixture.name}, ${spec}`, async () => {
          const [digest, size] = spec.split("/") as [
            "sha256" | "md5" | "sha1" | "sha512",
            string | undefined,
          ];
          const blockSize = size === undefined
            ? 65536
            : size.endsWith("k")
            ? Number(size.slice(0, -1)) * 1024
            : size.endsWith("M")
            ? Number(size.slice(0, -1)) * 1024 * 1024
            : Number(size);
          await using nbd = await connect(server.target(), {
            metaContexts: ["base:allocation"],
          });
          const ours = await blkhash(nbd, { digest, blockSize });
          assert.equal(ours, await sidBlkhash(server.uri(), spec));
        });
      }
      await t.step(
        `${fixture.name}: a range, without block status`,
        async () => {
          await using nbd = await connect(server.target());
          const ours = await blkhash(nbd, {
            offset: 1024 * 1024,
            length: 1024 * 1024 + 512,
            blockSize: 4096,
            concurrency: 2,
          });
          // The range read whole and hashed in one piece.
          const h = new Blkhasher("sha256", 4096, 1024 * 1024 + 512);
          await h.update(0, await nbd.read(1024 * 1024, 1024 * 1024 + 512));
          assert.equal(ours, await h.hex());
        },
      );
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("blkhash() reads only data where block status says zero", async () => {
  const dir = await sidTempDir();
  // 64 MiB of memory, one MiB of it written: the rest is never read.
  const server = await nbdkit(["memory", "64M"], { dir });
  try {
    await using nbd = await connect(server.target(), {
      metaContexts: ["base:allocation"],
    });
    await nbd.write(5 * 1024 * 1024, mixed(1024 * 1024, 9));
    const before = nbd.stats.requests["NBD_CMD_READ"] ?? 0;
    const ours = await blkhash(nbd, { digest: "sha256" });
    const reads = (nbd.stats.requests["NBD_CMD_READ"] ?? 0) - before;
    assert.ok(reads <= 2, `read ${reads} times`);
    assert.equal(ours, await sidBlkhash(server.uri()));
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("blkhash() stops on an aborted signal", async () => {
  const dir = await sidTempDir();
  const server = await nbdkit(["pattern", "64M"], { dir });
  try {
    await using nbd = await connect(server.target());
    const controller = new AbortController();
    controller.abort(new Error("stop"));
    await assert.rejects(
      blkhash(nbd, { signal: controller.signal }),
      /stop/,
    );
    await assert.rejects(
      blkhash(nbd, { offset: 1, length: 64 * 1024 * 1024 }),
      RangeError,
    );
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
