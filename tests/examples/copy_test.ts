import assert from "node:assert/strict";
import type { Extent } from "../../mod.ts";
import { nbdkit, qemuNbd, run, type Server } from "../support/servers.ts";
import { exportHash, referenceMap, sha256 } from "../support/reference.ts";
import { runTool } from "./_tools.ts";

const SPARSE = [
  "sparse-random",
  "size=64M",
  "percent=30",
  "seed=42",
  "runlength=1048576",
  "random-content=true",
];

/** Bytes of data (not holes or zeroes) in a base:allocation map. */
function dataBytes(map: Extent[]): number {
  return map.filter((e) => (e.flags & 2) === 0).reduce(
    (n, e) => n + e.length,
    0,
  );
}

/**
 * Bytes of data an export that allocates in `page`-sized pages (nbdkit's
 * sparse array uses 32 KiB) reports after exactly the data of `map` was
 * written to it.
 */
function pagedDataBytes(
  map: Extent[],
  page: number,
): number {
  const pages = new Set<number>();
  for (const e of map) {
    if (e.flags & 2) continue;
    const last = Math.floor((e.offset + e.length - 1) / page);
    for (let p = Math.floor(e.offset / page); p <= last; p++) pages.add(p);
  }
  return pages.size * page;
}

/** The `--verbose` summary line's counters. */
function stats(
  stderr: string,
): { read: number; wrote: number; zeroed: number } {
  const m = /read (\d+), wrote (\d+), zeroed (\d+)/.exec(stderr);
  assert.ok(m, `no summary in: ${stderr}`);
  return { read: Number(m[1]), wrote: Number(m[2]), zeroed: Number(m[3]) };
}

Deno.test({
  name: "copy: an export to a file and back gives the same bytes",
  async fn() {
    const src = await nbdkit(["pattern", "8M"]);
    const dst = await nbdkit(["memory", "8M"], { dir: src.dir });
    try {
      const file = `${src.dir}/disk.img`;
      const expected = await exportHash(src.uri());

      const down = await runTool("copy", [src.uri(), file]);
      assert.equal(down.code, 0, down.stderr);
      assert.equal(await sha256(await Deno.readFile(file)), expected);

      const up = await runTool("copy", ["--flush", file, dst.uri()]);
      assert.equal(up.code, 0, up.stderr);
      assert.equal(await exportHash(dst.uri()), expected);
    } finally {
      await dst.stop();
      await src.stop();
    }
  },
});

Deno.test({
  name: "copy: a sparse export keeps its holes and is never read where zero",
  async fn(t) {
    const src = await nbdkit(SPARSE);
    try {
      const expected = await exportHash(src.uri());
      const srcMap = await referenceMap(src.uri());
      const size = 64 * 1024 * 1024;
      const data = dataBytes(srcMap);
      assert.ok(data > 0 && data < size / 2, `source has ${data} data bytes`);
      /**
       * `dst` holds the source's bytes, and data only in the pages the
       * source's data touches (nbdkit's sparse array uses 32 KiB pages);
       * everything else is still a hole.
       */
      const assertSparseCopy = async (dst: Server) => {
        assert.equal(await exportHash(dst.uri()), expected);
        assert.equal(
          dataBytes(await referenceMap(dst.uri())),
          pagedDataBytes(srcMap, 32768),
        );
      };

      await t.step("into a fresh nbdkit memory export", async () => {
        const dst = await nbdkit(["memory", "64M"], { dir: src.dir });
        try {
          const r = await runTool("copy", ["-v", src.uri(), dst.uri()]);
          assert.equal(r.code, 0, r.stderr);
          const s = stats(r.stderr);
          assert.equal(s.read, data, "only the data extents were read");
          assert.equal(s.wrote + s.zeroed, size);
          await assertSparseCopy(dst);
        } finally {
          await dst.stop();
        }
      });

      await t.step("into a new file, which stays sparse", async () => {
        const file = `${src.dir}/sparse.img`;
        const r = await runTool("copy", [src.uri(), file]);
        assert.equal(r.code, 0, r.stderr);
        const info = await Deno.stat(file);
        assert.equal(info.size, size);
        assert.equal(await sha256(await Deno.readFile(file)), expected);
        const allocated = (info.blocks ?? 0) * 512;
        assert.ok(
          allocated < data + 4 * 1024 * 1024,
          `file allocates ${allocated} bytes for ${data} bytes of data`,
        );

        // Back from the file: zero blocks are detected by reading.
        const dst = await nbdkit(["memory", "64M"], { dir: src.dir });
        try {
          const up = await runTool("copy", ["-v", file, dst.uri()]);
          assert.equal(up.code, 0, up.stderr);
          assert.equal(stats(up.stderr).wrote, data);
          await assertSparseCopy(dst);
        } finally {
          await dst.stop();
        }
      });

      await t.step("into an export without WRITE_ZEROES", async () => {
        const dst = await nbdkit(
          ["--filter=nozero", "memory", "64M"],
          { dir: src.dir },
        );
        try {
          const r = await runTool("copy", ["-v", src.uri(), dst.uri()]);
          assert.equal(r.code, 0, r.stderr);
          assert.equal(stats(r.stderr).read, data);
          assert.equal(await exportHash(dst.uri()), expected);
        } finally {
          await dst.stop();
        }
      });

      await t.step("--allocated writes every byte", async () => {
        const file = `${src.dir}/full.img`;
        const r = await runTool("copy", ["--allocated", src.uri(), file]);
        assert.equal(r.code, 0, r.stderr);
        const info = await Deno.stat(file);
        assert.ok((info.blocks ?? 0) * 512 >= size);
        assert.equal(await sha256(await Deno.readFile(file)), expected);
      });

      await t.step("--no-extents reads everything", async () => {
        const r = await runTool("copy", [
          "-v",
          "--no-extents",
          src.uri(),
          "null:",
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(stats(r.stderr).read, size);
      });
    } finally {
      await src.stop();
    }
  },
});

Deno.test({
  name: "copy: NBD to NBD over several connections when multi-conn is offered",
  async fn() {
    const src = await nbdkit(["pattern", "16M"]);
    const dst = await nbdkit(["memory", "16M"], { dir: src.dir });
    try {
      const r = await runTool("copy", [
        "-v",
        "--connections=3",
        "--requests=8",
        "--request-size=64k",
        src.uri(),
        dst.uri(),
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /over 3 connection\(s\)/);
      assert.equal(await exportHash(dst.uri()), await exportHash(src.uri()));
    } finally {
      await dst.stop();
      await src.stop();
    }
  },
});

Deno.test({
  name: "copy: stdin and stdout stream in order",
  async fn() {
    const src = await nbdkit(SPARSE);
    const dst = await nbdkit(["memory", "64M"], { dir: src.dir });
    try {
      const out = await runTool("copy", [src.uri(), "-"]);
      assert.equal(out.code, 0, out.stderr);
      assert.equal(out.stdout.length, 64 * 1024 * 1024);
      const expected = await exportHash(src.uri());
      assert.equal(await sha256(out.stdout), expected);

      const back = await runTool("copy", ["-", dst.uri()], out.stdout);
      assert.equal(back.code, 0, back.stderr);
      assert.equal(await exportHash(dst.uri()), expected);

      const file = `${src.dir}/from-stdin.img`;
      const toFile = await runTool("copy", ["-", file], out.stdout);
      assert.equal(toFile.code, 0, toFile.stderr);
      assert.equal(await sha256(await Deno.readFile(file)), expected);
    } finally {
      await dst.stop();
      await src.stop();
    }
  },
});

Deno.test({
  name: "copy: a qcow2 image served by qemu-nbd, both ways",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-" });
    try {
      const image = `${dir}/src.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", image, "32M"]);
      for (const cmd of ["write -P 0x11 0 1M", "write -P 0x22 5M 300k"]) {
        await run("qemu-io", ["-f", "qcow2", "-c", cmd, image]);
      }
      await run("qemu-img", ["convert", "-O", "raw", image, `${dir}/ref.raw`]);
      const expected = await sha256(await Deno.readFile(`${dir}/ref.raw`));

      const src = await qemuNbd(["-r", "-f", "qcow2", image], { dir });
      try {
        const r = await runTool("copy", ["-v", src.uri(), `${dir}/out.raw`]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(
          await sha256(await Deno.readFile(`${dir}/out.raw`)),
          expected,
        );
        assert.ok(stats(r.stderr).read < 32 * 1024 * 1024 / 4);
      } finally {
        await src.stop();
      }

      const target = `${dir}/dst.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", target, "32M"]);
      const dst = await qemuNbd(["-f", "qcow2", target], { dir });
      try {
        const r = await runTool("copy", [
          "--flush",
          `${dir}/ref.raw`,
          dst.uri(),
        ]);
        assert.equal(r.code, 0, r.stderr);
      } finally {
        await dst.stop();
      }
      await run("qemu-img", ["compare", "-q", image, target]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy: a server error mid-copy fails the copy with status 1",
  async fn(t) {
    await t.step("a read error on the source", async () => {
      const src = await nbdkit([
        "--filter=error",
        "pattern",
        "64M",
        "error=EIO",
        "error-pread-rate=0.05",
      ]);
      try {
        const file = `${src.dir}/partial.img`;
        const r = await runTool("copy", [src.uri(), file]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /^copy: reading nbd\+unix:.*EIO.*\n$/);
      } finally {
        await src.stop();
      }
    });
    const destinations = [
      {
        name: "a write error on the destination",
        src: ["pattern", "64M"],
        dst: [
          "--filter=error",
          "memory",
          "64M",
          "error=ENOSPC",
          "error-pwrite-rate=0.05",
        ],
        message: /^copy: writing nbd\+unix:.*ENOSPC.*\n$/,
      },
      {
        name: "a destination smaller than the source",
        src: ["pattern", "2M"],
        dst: ["memory", "1M"],
        message: /^copy: destination is too small/,
      },
      {
        name: "a read-only destination",
        src: ["pattern", "1M"],
        dst: ["-r", "memory", "1M"],
        message: /read-only/,
      },
    ];
    for (const d of destinations) {
      await t.step(d.name, async () => {
        const src = await nbdkit(d.src);
        const dst = await nbdkit(d.dst, { dir: src.dir });
        try {
          const r = await runTool("copy", [src.uri(), dst.uri()]);
          assert.equal(r.code, 1);
          assert.match(r.stderr, d.message);
        } finally {
          await dst.stop();
          await src.stop();
        }
      });
    }
  },
});

Deno.test({
  name: "copy: null: as a sink and machine-readable progress",
  async fn() {
    const src = await nbdkit(["pattern", "4M"]);
    try {
      const r = await runTool("copy", ["--progress=2", src.uri(), "null:"]);
      assert.equal(r.code, 0, r.stderr);
      const lines = r.stderr.trim().split("\n");
      assert.equal(lines.at(-1), "100/100");
      for (const line of lines) assert.match(line, /^\d+\/100$/);
    } finally {
      await src.stop();
    }
  },
});

Deno.test("copy: usage errors exit 1 with one line", async () => {
  const r = await runTool("copy", ["only-one"]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^copy: expected a SOURCE and a DESTINATION\n/);
  const bad = await runTool("copy", ["--request-size=1000", "a", "b"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^copy: --request-size/);
});

Deno.test({
  name: "copy: SIGINT stops the copy with status 130, not success",
  async fn() {
    // 100 Mbit/s: the 256 MiB copy takes 20 s unless it is stopped.
    const src = await nbdkit(["--filter=rate", "pattern", "256M", "rate=100M"]);
    const dst = await nbdkit(["memory", "256M"], { dir: src.dir });
    try {
      const script = new URL("../../examples/copy.ts", import.meta.url);
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          "--quiet",
          script.pathname,
          "--progress=2",
          src.uri(),
          dst.uri(),
        ],
        stdin: "null",
        stdout: "null",
        stderr: "piped",
        signal: AbortSignal.timeout(60_000),
      }).spawn();
      const decoder = new TextDecoder();
      let stderr = "";
      const reader = child.stderr.getReader();
      // Wait (bounded by the timeout above) until the copy is under way.
      while (!/\d+\/100\n/.test(stderr)) {
        const { value, done } = await reader.read();
        if (done) break;
        stderr += decoder.decode(value, { stream: true });
      }
      child.kill("SIGINT");
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        stderr += decoder.decode(value, { stream: true });
      }
      const status = await child.status;
      assert.equal(status.code, 130, stderr);
      assert.match(stderr, /\ncopy: interrupted\n$/);
      assert.doesNotMatch(stderr, /100\/100/);
    } finally {
      await dst.stop();
      await src.stop();
    }
  },
});

/** Whether loop devices can be made here (root, and a kernel that has them). */

Deno.test({
  name: "copy: to and from a block device",
  async fn() {
    const src = await nbdkit(SPARSE);
    const backing = `${src.dir}/loop.img`;
    await Deno.writeFile(backing, new Uint8Array(0));
    await Deno.truncate(backing, 64 * 1024 * 1024);
    const device = (await run("losetup", ["-f", "--show", backing])).trim();
    try {
      const expected = await exportHash(src.uri());
      const down = await runTool("copy", ["-v", "--flush", src.uri(), device]);
      assert.equal(down.code, 0, down.stderr);
      // A device cannot be made sparse by skipping: its zeroes are written.
      assert.equal(
        stats(down.stderr).wrote + stats(down.stderr).zeroed,
        64 << 20,
      );
      const file = `${src.dir}/from-device.img`;
      const up = await runTool("copy", [device, file]);
      assert.equal(up.code, 0, up.stderr);
      assert.equal(await sha256(await Deno.readFile(file)), expected);

      const big = await nbdkit(["pattern", "128M"], { dir: src.dir });
      try {
        const r = await runTool("copy", [big.uri(), device]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /^copy: destination is too small/);
      } finally {
        await big.stop();
      }
    } finally {
      await run("losetup", ["-d", device]);
      await src.stop();
    }
  },
});
