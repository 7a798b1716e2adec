/**
 * `copy --blkhash`: the digest printed after a copy, against nbdcopy 1.24
 * (the Debian sid root) on the same source, whatever the destination.
 *
 * @module
 */

import assert from "node:assert/strict";
import { parseBlkhash } from "../../examples/copy/options.ts";
import { UsageError } from "../../examples/_cli.ts";
import { makeQcow2, nbdkit, qemuNbd, type Server } from "../support/servers.ts";
import { runSid, sidBlkhash, sidTempDir } from "../support/sid.ts";
import { fileHash } from "../support/reference.ts";
import { runTool } from "./_tools.ts";

const MiB = 1024 * 1024;

/** A sparse file with a few data runs, some across 128 MiB stripes. */
async function sparseImage(path: string, size: number): Promise<void> {
  const f = await Deno.open(path, { create: true, write: true });
  try {
    await f.truncate(size);
    for (const at of [0, 77_777, 128 * MiB - 5000, 200 * MiB + 3, size - 999]) {
      if (at >= size) continue;
      await f.seek(at, Deno.SeekMode.Start);
      const n = Math.min(10_000, size - at);
      await f.write(new Uint8Array(n).map((_, i) => (i * 31 + at) & 0xff));
    }
  } finally {
    f.close();
  }
}

Deno.test("parseBlkhash() reads --blkhash as nbdcopy 1.24", async (t) => {
  await t.step("no value is sha256/64k", () => {
    assert.deepEqual(parseBlkhash(true), {
      digest: "sha256",
      blockSize: 65536,
    });
  });
  await t.step("a digest, and a digest with a size", () => {
    assert.deepEqual(parseBlkhash("md5"), { digest: "md5", blockSize: 65536 });
    assert.deepEqual(parseBlkhash("sha1/4k"), {
      digest: "sha1",
      blockSize: 4096,
    });
    assert.deepEqual(parseBlkhash("sha512/1M"), {
      digest: "sha512",
      blockSize: MiB,
    });
  });
  await t.step("an unknown digest or a size that is not a power of two", () => {
    assert.throws(
      () => parseBlkhash("foo"),
      (e) =>
        e instanceof UsageError &&
        /unknown digest algorithm 'foo'/.test(e.message),
    );
    assert.throws(
      () => parseBlkhash("sha256/3"),
      (e) => e instanceof UsageError && /not a power of two: 3/.test(e.message),
    );
    assert.throws(() => parseBlkhash("sha256/"), UsageError);
  });
});

/** A source under the sid root and what to call it on the command line. */
interface Source {
  name: string;
  /** Starts what is needed; the word for both tools. */
  open(dir: string): Promise<{ word: string; server?: Server }>;
}

const SOURCES: Source[] = [
  {
    name: "nbdkit pattern of an odd size",
    open: async (dir) => {
      const server = await nbdkit(["pattern", String(5 * MiB + 4097)], { dir });
      return { word: server.uri(), server };
    },
  },
  {
    name: "a sparse file (as a file)",
    open: async (dir) => {
      const path = `${dir}/src.img`;
      await sparseImage(path, 3 * MiB + 1234);
      return { word: path };
    },
  },
  {
    name: "qemu-nbd with a zeroed range",
    open: async (dir) => {
      const image = `${dir}/disk.qcow2`;
      await makeQcow2(image, "7M", ["write -P 0x33 0 6M", "write -z 2M 3M"]);
      const server = await qemuNbd(["-f", "qcow2", image], { dir });
      return { word: server.uri(), server };
    },
  },
];

Deno.test("copy --blkhash prints what nbdcopy 1.24 prints", async (t) => {
  for (const source of SOURCES) {
    const dir = await sidTempDir();
    const { word, server } = await source.open(dir);
    try {
      for (const spec of [undefined, "md5", "sha1/4k", "sha512/1M"]) {
        await t.step(
          `${source.name}, ${spec ?? "default"}, to null:`,
          async () => {
            const option = spec === undefined
              ? "--blkhash"
              : `--blkhash=${spec}`;
            const r = await runTool("copy", [option, word, "null:"]);
            assert.equal(r.code, 0, r.stderr);
            assert.equal(r.text, `${await sidBlkhash(word, spec)}\n`);
          },
        );
      }
      await t.step(
        `${source.name}: to a file, hash in --blkhash-file`,
        async () => {
          const out = `${dir}/copy.raw`;
          const file = `${dir}/hash.txt`;
          const r = await runTool("copy", [
            "--blkhash=sha256",
            `--blkhash-file=${file}`,
            word,
            out,
          ]);
          assert.equal(r.code, 0, r.stderr);
          assert.equal(r.text, "", "nothing on stdout with --blkhash-file");
          // nbdcopy writes its file the same way; both must agree byte for byte.
          const theirs = `${dir}/theirs.txt`;
          const n = await runSid("nbdcopy", [
            "--blkhash",
            `--blkhash-file=${theirs}`,
            "--",
            word,
            "null:",
          ]);
          assert.equal(n.code, 0, n.stderr);
          assert.equal(
            await Deno.readTextFile(file),
            await Deno.readTextFile(theirs),
          );
          // And the copy is the source: its own blkhash is the same.
          assert.equal(
            await sidBlkhash(out),
            (await Deno.readTextFile(file)).trim(),
          );
        },
      );
    } finally {
      await server?.stop();
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("copy --blkhash over threads equals nbdcopy 1.24's", async (t) => {
  // 300 MiB and a bit: three stripes shared by two threads, data across
  // a stripe boundary, the rest holes that are hashed unread.
  const dir = await sidTempDir();
  const path = `${dir}/big.img`;
  await sparseImage(path, 300 * MiB + 513);
  const server = await nbdkit(["file", path], { dir });
  try {
    const want = await sidBlkhash(server.uri());
    await t.step("NBD source, two threads, to a file", async () => {
      const out = `${dir}/out.raw`;
      const r = await runTool("copy", [
        "-v",
        "-T",
        "2",
        "-C",
        "2",
        "--blkhash",
        server.uri(),
        out,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /over 2 connection\(s\)/);
      assert.equal(r.text, `${want}\n`);
      assert.equal(await fileHash(out), await fileHash(path));
    });
    await t.step("file source, two threads, md5, to null:", async () => {
      const r = await runTool("copy", [
        "-T",
        "2",
        "--blkhash=md5",
        path,
        "null:",
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.text, `${await sidBlkhash(path, "md5")}\n`);
    });
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("copy --blkhash to NBD and to stdout equals nbdcopy 1.24's", async (t) => {
  const dir = await sidTempDir();
  const path = `${dir}/src.img`;
  await sparseImage(path, 6 * MiB + 100);
  const dst = await nbdkit(["memory", String(6 * MiB + 100)], { dir });
  try {
    const want = await sidBlkhash(path, "sha1");
    await t.step("to nbdkit memory, whose own hash then agrees", async () => {
      const r = await runTool("copy", ["--blkhash=sha1", path, dst.uri()]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.text, `${want}\n`);
      assert.equal(await sidBlkhash(dst.uri(), "sha1"), want);
    });
    await t.step("to stdout, the hash after the data", async () => {
      const r = await runTool("copy", ["--blkhash=sha1", path, "-"]);
      assert.equal(r.code, 0, r.stderr);
      const data = r.stdout.subarray(0, 6 * MiB + 100);
      assert.deepEqual(data, await Deno.readFile(path));
      assert.equal(
        new TextDecoder().decode(r.stdout.subarray(6 * MiB + 100)),
        `${want}\n`,
      );
    });
  } finally {
    await dst.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("copy --blkhash from a stream and its refusals", async (t) => {
  const dir = await sidTempDir();
  try {
    await t.step("stdin of an odd length", async () => {
      const bytes = new Uint8Array(200_003).map((_, i) => (i * 7) & 0xff);
      bytes.fill(0, 65536, 3 * 65536);
      const path = `${dir}/in.bin`;
      await Deno.writeFile(path, bytes);
      const r = await runTool("copy", ["--blkhash", "-", "null:"], bytes);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.text, `${await sidBlkhash(path)}\n`);
    });
    await t.step("--blkhash with --dirty is refused", async () => {
      const r = await runTool("copy", [
        "--blkhash",
        "--dirty=qemu:dirty-bitmap:b0",
        "nbd+unix:///?socket=/nonexistent",
        `${dir}/x`,
      ]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /--blkhash cannot be used with --dirty/);
    });
    await t.step(
      "an unknown digest is refused as nbdcopy refuses it",
      async () => {
        const r = await runTool("copy", ["--blkhash=crc", "-", "null:"]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /unknown digest algorithm 'crc'/);
      },
    );
    await t.step(
      "a table too large, or a hash file that cannot be written, is refused before the destination is touched",
      async () => {
        const server = await nbdkit(["null", "1T"]);
        try {
          const dst = `${dir}/kept.img`;
          await Deno.writeTextFile(dst, "ORIGINAL");
          const big = await runTool("copy", [
            "--blkhash=sha512/512",
            server.uri(),
            dst,
          ]);
          assert.equal(big.code, 1);
          assert.match(
            big.stderr,
            /--blkhash: .* GiB table .* larger block size/,
          );
          const file = await runTool("copy", [
            "--blkhash",
            `--blkhash-file=${dir}/missing/h`,
            server.uri(),
            dst,
          ]);
          assert.equal(file.code, 1);
          assert.match(file.stderr, /--blkhash-file=.* is not a directory/);
          assert.equal(await Deno.readTextFile(dst), "ORIGINAL");
        } finally {
          await server.stop();
        }
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
