import assert from "node:assert/strict";
import type { Extent } from "../../mod.ts";
import {
  nbdkit,
  qemuNbd,
  run,
  runBytes,
  type Server,
} from "../support/servers.ts";
import {
  exportHash,
  fileHash,
  referenceMap,
  sha256,
} from "../support/reference.ts";
import {
  concat,
  infoExportPayload,
  newstyleGreeting,
  optionReply,
  startTestServer,
} from "../support/server.ts";
import { until, within } from "../support/wait.ts";
import {
  FLAG_HAS_FLAGS,
  OPT_GO,
  REP_ACK,
  REP_ERR_UNSUP,
  REP_INFO,
} from "../../lib/constants.ts";
import { runTool } from "./_tools.ts";
import {
  assertNoneLeft,
  cmd,
  interruptOnceRunning,
  marker,
} from "./_subprocess.ts";

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
      assert.equal(await fileHash(file), expected);

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
        assert.equal(await fileHash(file), expected);
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
        assert.equal(await fileHash(file), expected);
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
        "--threads=3",
        "--requests=8",
        "--request-size=64k",
        src.uri(),
        dst.uri(),
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /over 3 connection\(s\)/);
      // Every thread's requests are counted, not only this one's.
      // (The commands are listed in the order the threads' counts merge.)
      assert.match(r.stderr, /copy: source .*[(, ]NBD_CMD_READ 256[,)]/);
      assert.match(r.stderr, /copy: destination .*[(, ]NBD_CMD_WRITE 256[,)]/);
      assert.equal(await exportHash(dst.uri()), await exportHash(src.uri()));
      // As nbdcopy: no more connections than threads, which default to
      // the processor count.
      const capped = Math.min(4, navigator.hardwareConcurrency || 1);
      const defaults = await runTool("copy", [
        "-v",
        "-C",
        "4",
        src.uri(),
        dst.uri(),
      ]);
      assert.equal(defaults.code, 0, defaults.stderr);
      assert.match(
        defaults.stderr,
        new RegExp(`over ${capped} connection\\(s\\)`),
      );
      const one = await runTool("copy", [
        "-v",
        "-C",
        "4",
        "-T",
        "1",
        src.uri(),
        dst.uri(),
      ]);
      assert.equal(one.code, 0, one.stderr);
      assert.match(one.stderr, /over 1 connection\(s\)/);
      assert.equal(await exportHash(dst.uri()), await exportHash(src.uri()));
    } finally {
      await dst.stop();
      await src.stop();
    }
  },
});

/**
 * The reads nbdkit's log filter recorded, in the order it logged their
 * start and end, and the most it had in flight at once.
 */
async function loggedReads(
  file: string,
): Promise<{ offsets: number[]; most: number }> {
  const offsets: number[] = [];
  let open = 0;
  let most = 0;
  for (const line of (await Deno.readTextFile(file)).split("\n")) {
    const start = / Read id=\d+ offset=(0x[0-9a-f]+) /.exec(line);
    if (start) {
      offsets.push(Number(start[1]));
      most = Math.max(most, ++open);
    } else if (/ \.\.\.Read id=\d+ return/.test(line)) open--;
  }
  return { offsets, most };
}

Deno.test({
  name: "copy: --synchronous sends one request at a time, in order",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-sync-" });
    const log = `${dir}/requests.log`;
    const src = await nbdkit([
      "--filter=log",
      "--filter=delay",
      "pattern",
      "4M",
      `logfile=${log}`,
      // Slow enough that requests sent together overlap in the log.
      "rdelay=2ms",
    ], { dir });
    try {
      const copy = (extra: string[]) =>
        runTool("copy", [...extra, "--request-size=64k", src.uri(), "null:"]);
      const parallel = await copy(["-C", "4"]);
      assert.equal(parallel.code, 0, parallel.stderr);
      const before = await loggedReads(log);
      // Without it requests overlap, so the check below can fail.
      assert.ok(before.most > 1, `at most ${before.most} in flight`);

      await Deno.truncate(log);
      const sync = await copy(["--synchronous", "-C", "4", "-v"]);
      assert.equal(sync.code, 0, sync.stderr);
      assert.match(sync.stderr, /over 1 connection\(s\)/);
      const { offsets, most } = await loggedReads(log);
      assert.equal(most, 1);
      assert.deepEqual(
        offsets,
        Array.from({ length: 64 }, (_, i) => i * 65536),
      );
    } finally {
      await src.stop();
      await Deno.remove(dir, { recursive: true });
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
      assert.equal(await fileHash(file), expected);
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
      const expected = await fileHash(`${dir}/ref.raw`);

      const src = await qemuNbd(["-r", "-f", "qcow2", image], { dir });
      try {
        const r = await runTool("copy", ["-v", src.uri(), `${dir}/out.raw`]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(await fileHash(`${dir}/out.raw`), expected);
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
      assert.equal(await fileHash(file), expected);

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

// ---------------------------------------------------------------------------
// Hardening (issue 9): nothing is lost, and one ^C is enough.
// ---------------------------------------------------------------------------

/** A file's bytes and metadata, to show that a refused copy left it alone. */
async function snapshot(
  path: string,
): Promise<{ hash: string; size: number; mtime: number | undefined }> {
  const info = await Deno.stat(path);
  return {
    hash: await fileHash(path),
    size: info.size,
    mtime: info.mtime?.getTime(),
  };
}

/** Bytes that are never zero in any 4 KiB block, so all of them are data. */
function dataBytes32(size: number): Uint8Array {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 131 + 7) % 251 + 1;
  return bytes;
}

Deno.test({
  name: "copy: the same file as source and destination is refused, as cp does",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-same-" });
    try {
      const file = `${dir}/disk.img`;
      const contents = dataBytes32(1 << 20);
      await Deno.writeFile(file, contents);
      let before = await snapshot(file);
      /** Each check starts from the same bytes, whatever the last one did. */
      const reset = async () => {
        await Deno.writeFile(file, contents);
        before = await snapshot(file);
      };
      const refused = async (source: string, destination: string) => {
        await reset();
        const r = await runTool("copy", [source, destination]);
        assert.equal(r.code, 1, r.stderr);
        assert.equal(
          r.stderr,
          `copy: '${source}' and '${destination}' are the same file\n`,
        );
        assert.deepEqual(await snapshot(file), before);
      };

      await t.step("the same path", () => refused(file, file));
      await t.step("through a symbolic link", async () => {
        await Deno.symlink(file, `${dir}/link.img`);
        await refused(file, `${dir}/link.img`);
        await refused(`${dir}/link.img`, file);
      });
      await t.step("through a hard link", async () => {
        await Deno.link(file, `${dir}/hard.img`);
        await refused(`${dir}/hard.img`, file);
      });
      await t.step("through a relative path", async () => {
        await reset();
        const r = await runTool("copy", [
          file,
          `${dir}/../${dir.split("/").at(-1)}/disk.img`,
        ]);
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, /are the same file\n$/);
        assert.deepEqual(await snapshot(file), before);
      });
      await t.step("stdin redirected from the destination", async () => {
        await reset();
        const script = new URL("../../examples/copy.ts", import.meta.url);
        const out = await new Deno.Command("sh", {
          args: [
            "-c",
            `exec "$0" run -A --quiet "$1" - "$2" < "$2"`,
            Deno.execPath(),
            script.pathname,
            file,
          ],
          stdout: "null",
          stderr: "piped",
          signal: AbortSignal.timeout(60_000),
        }).output();
        const stderr = new TextDecoder().decode(out.stderr);
        assert.equal(out.code, 1, stderr);
        assert.equal(stderr, `copy: '-' and '${file}' are the same file\n`);
        assert.deepEqual(await snapshot(file), before);
      });
      await t.step("a different file is still copied", async () => {
        await reset();
        const r = await runTool("copy", [file, `${dir}/other.img`]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(await fileHash(`${dir}/other.img`), before.hash);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy: the same block device as source and destination is refused",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-same-dev-" });
    const backing = `${dir}/loop.img`;
    await Deno.writeFile(backing, dataBytes32(4 << 20));
    const expected = await fileHash(backing);
    const device = (await run("losetup", ["-f", "--show", backing])).trim();
    let attached = true;
    try {
      const refused = async (source: string, destination: string) => {
        const r = await runTool("copy", ["--flush", source, destination]);
        assert.equal(r.code, 1, r.stderr);
        assert.equal(
          r.stderr,
          `copy: '${source}' and '${destination}' are the same file\n`,
        );
      };
      await t.step("the same path", () => refused(device, device));
      await t.step("through a symbolic link", async () => {
        await Deno.symlink(device, `${dir}/link`);
        await refused(`${dir}/link`, device);
      });
      await t.step("through a second device node", async () => {
        // Another inode with the same major:minor is the same device.
        const [major, minor] = (await run("stat", ["-c", "%t %T", device]))
          .trim().split(" ").map((h) => String(parseInt(h, 16)));
        await run("mknod", [`${dir}/node`, "b", major!, minor!]);
        await refused(device, `${dir}/node`);
      });
      await run("losetup", ["-d", device]);
      attached = false;
      assert.equal(await fileHash(backing), expected);
    } finally {
      if (attached) await run("losetup", ["-d", device]);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy: every argument is checked before the destination is touched",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-args-" });
    try {
      const source = `${dir}/source.img`;
      const destination = `${dir}/destination.img`;
      await Deno.writeFile(source, dataBytes32(1 << 20));
      const keep = new TextEncoder().encode("keep me\n");
      const cases: { args: string[]; message: RegExp }[] = [
        // Descriptor 99 is not open in the child.
        {
          args: ["--progress=99", source, destination],
          message: /^copy: --progress=99: .*not open/,
        },
        { args: ["--progress=x", source, destination], message: /--progress/ },
        { args: ["-C", "0", source, destination], message: /--connections/ },
        { args: ["-T", "0", source, destination], message: /--threads/ },
        { args: ["-R", "0", source, destination], message: /--requests/ },
        { args: ["--queue-size=1q", source, destination], message: /--queue/ },
        { args: ["--request-size=1000", source, destination], message: /size/ },
        { args: ["--sparse=many", source, destination], message: /--sparse/ },
        { args: ["null:", destination], message: /null: can only be/ },
        { args: ["nbd+unix:///", destination], message: /socket/ },
        { args: [source, destination, "extra"], message: /expected a SOURCE/ },
        { args: ["--bogus", source, destination], message: /unknown option/ },
      ];
      for (const c of cases) {
        await t.step(c.args.join(" ").replaceAll(dir, "DIR"), async () => {
          await Deno.writeFile(destination, keep);
          const before = await snapshot(destination);
          const r = await runTool("copy", c.args);
          assert.equal(r.code, 1, r.stderr);
          assert.match(r.stderr.split("\n")[0]!, c.message);
          assert.deepEqual(await snapshot(destination), before);
        });
      }
      await t.step("a progress descriptor that is open works", async () => {
        const r = await runTool("copy", ["--progress=2", source, destination]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stderr.trim().split("\n").at(-1), "100/100");
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * How soon one SIGINT must end a copy: the tool gives itself 2 s, the rest
 * is room for a loaded machine. The old behaviour took 30 s or forever.
 */
const ONE_SIGINT_MS = 4_000;

/** A `copy` child whose stderr is collected, for the ^C tests. */
function spawnCopy(args: string[], stdin: "null" | "piped" = "null"): {
  child: Deno.ChildProcess;
  stderr: Promise<string>;
} {
  const script = new URL("../../examples/copy.ts", import.meta.url);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", script.pathname, ...args],
    stdin,
    stdout: "null",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).spawn();
  return { child, stderr: new Response(child.stderr).text() };
}

/**
 * Sends one SIGINT and waits, at most `ms`, for the child to exit.
 *
 * @returns The exit status, how long it took, and stderr.
 */
async function interrupt(
  copy: { child: Deno.ChildProcess; stderr: Promise<string> },
  ms: number,
): Promise<{ status: Deno.CommandStatus; elapsed: number; stderr: string }> {
  const started = performance.now();
  copy.child.kill("SIGINT");
  try {
    const status = await within(ms, "copy after one SIGINT", copy.child.status);
    return {
      status,
      elapsed: performance.now() - started,
      stderr: await copy.stderr,
    };
  } catch (e) {
    copy.child.kill("SIGKILL");
    await copy.child.status;
    throw new Error(`${(e as Error).message}; stderr: ${await copy.stderr}`);
  }
}

/**
 * An NBD server that negotiates one export (fixed newstyle, NBD_OPT_GO;
 * every other option unsupported) and then never reads again, so that a
 * client writing to it fills the socket and stays blocked.
 */
function startDeafServer(
  dir: string,
  size: number,
): { uri: string; negotiated: Promise<void>; close(): void } {
  const path = `${dir}/deaf.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const conns: Deno.Conn[] = [];
  const readExact = async (conn: Deno.Conn, n: number) => {
    const buf = new Uint8Array(n);
    for (let got = 0; got < n;) {
      const r = await conn.read(buf.subarray(got));
      if (r === null) throw new Error("client went away");
      got += r;
    }
    return buf;
  };
  const negotiated = (async () => {
    const conn = await listener.accept();
    conns.push(conn);
    await conn.write(newstyleGreeting());
    await readExact(conn, 4); // client flags
    for (let i = 0; i < 32; i++) {
      const header = new DataView((await readExact(conn, 16)).buffer);
      const option = header.getUint32(8);
      await readExact(conn, header.getUint32(12));
      if (option !== OPT_GO) {
        await conn.write(optionReply(option, REP_ERR_UNSUP));
        continue;
      }
      await conn.write(concat(
        optionReply(OPT_GO, REP_INFO, infoExportPayload(size, FLAG_HAS_FLAGS)),
        optionReply(OPT_GO, REP_ACK),
      ));
      return; // and never read again
    }
    throw new Error("no NBD_OPT_GO in 32 options");
  })();
  return {
    uri: `nbd+unix:///?socket=${path}`,
    negotiated,
    close() {
      for (const c of conns) c.close();
      listener.close();
    },
  };
}

Deno.test({
  name: "copy: one SIGINT ends a copy to a server that stopped reading",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-deaf-" });
    const size = 32 << 20;
    const server = startDeafServer(dir, size);
    try {
      const source = `${dir}/source.img`;
      await Deno.writeFile(source, dataBytes32(size));
      const copy = spawnCopy(["--no-progress", source, server.uri]);
      await within(30_000, "negotiation", server.negotiated);
      // Let the writes fill the socket: nothing can be observed of it from
      // here, and a SIGINT sent before the socket is full still tests the
      // same close.
      await new Promise((resolve) => setTimeout(resolve, 300));
      const r = await interrupt(copy, 10_000);
      assert.equal(r.status.signal, null, "exited by itself, not the signal");
      assert.equal(r.status.code, 130, r.stderr);
      assert.match(r.stderr, /copy: interrupted\n$/);
      assert.ok(r.elapsed < ONE_SIGINT_MS, `took ${r.elapsed.toFixed(0)} ms`);
    } finally {
      server.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy: one SIGINT ends a copy still connecting to a silent server",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-silent-" });
    try {
      const file = `${dir}/disk.img`;
      await Deno.writeFile(file, dataBytes32(1 << 20));
      for (const side of ["source", "destination"] as const) {
        await t.step(`as the ${side}`, async () => {
          await using server = await startTestServer({ stallHandshake: true });
          const args = side === "source"
            ? [server.uri, `${dir}/out.img`]
            : [file, server.uri];
          const copy = spawnCopy(["--no-progress", ...args]);
          await until(
            "the copy to connect",
            () => server.log.length > 0,
            30_000,
          );
          const r = await interrupt(copy, 10_000);
          assert.equal(
            r.status.signal,
            null,
            "exited by itself, not the signal",
          );
          assert.equal(r.status.code, 130, r.stderr);
          assert.equal(r.stderr, "copy: interrupted\n");
          assert.ok(
            r.elapsed < ONE_SIGINT_MS,
            `took ${r.elapsed.toFixed(0)} ms`,
          );
        });
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy: one SIGINT ends a copy from a stdin that never ends",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-stdin-" });
    try {
      const out = `${dir}/out.img`;
      // stdin stays open and empty: the copy waits in a read that no signal
      // can cut short.
      const copy = spawnCopy(["--no-progress", "-", out], "piped");
      const exists = () => Deno.stat(out).then(() => true, () => false);
      await until("the destination to be opened", exists, 30_000);
      const r = await interrupt(copy, 10_000);
      await copy.child.stdin.close().catch(() => {});
      assert.equal(r.status.signal, null, "exited by itself, not the signal");
      assert.equal(r.status.code, 130, r.stderr);
      assert.equal(r.stderr, "copy: interrupted\n");
      assert.ok(r.elapsed < ONE_SIGINT_MS, `took ${r.elapsed.toFixed(0)} ms`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** The `-v` line of one NBD end: `copy: source NAME: sent …`. */
function wire(stderr: string, role: "source" | "destination"): {
  sent: number;
  received: number;
  requests: Record<string, number>;
} {
  const m = new RegExp(
    `^copy: ${role} .*: sent (\\d+) bytes in \\d+ request\\(s\\) \\((.*)\\), received (\\d+) bytes in \\d+ chunk\\(s\\)$`,
    "m",
  ).exec(stderr);
  assert.ok(m, `no ${role} line in: ${stderr}`);
  const requests: Record<string, number> = {};
  if (m[2] !== "none") {
    for (const part of m[2]!.split(", ")) {
      const [name, n] = part.split(" ");
      requests[name!] = Number(n);
    }
  }
  return { sent: Number(m[1]), received: Number(m[3]), requests };
}

Deno.test({
  name:
    "copy: [ qemu-nbd -r -f qcow2 x.qcow2 ] and [ nbdkit -s ... ] as source and destination, as nbdcopy takes them",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-" });
    try {
      const image = `${dir}/src.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", image, "8M"]);
      for (const c of ["write -P 0x11 0 1M", "write -P 0x22 5M 300k"]) {
        await run("qemu-io", ["-f", "qcow2", "-c", c, image]);
      }
      const source = cmd("qemu-nbd", "-r", "-f", "qcow2", image);
      await t.step("qcow2 to a file: nbdcopy's bytes", async () => {
        const r = await runTool("copy", ["-v", ...source, `${dir}/ours.raw`]);
        assert.equal(r.code, 0, r.stderr);
        await run("nbdcopy", ["--", ...source, `${dir}/theirs.raw`]);
        assert.deepEqual(
          await Deno.readFile(`${dir}/ours.raw`),
          await Deno.readFile(`${dir}/theirs.raw`),
        );
        // nbd.stats: only the data was read, and it all came over the wire.
        const s = wire(r.stderr, "source");
        const data = 1024 * 1024 + 300 * 1024;
        assert.ok(s.requests["NBD_CMD_READ"]! >= 1);
        assert.ok(s.requests["NBD_CMD_BLOCK_STATUS"]! >= 1);
        assert.equal(s.requests["NBD_CMD_WRITE"], undefined);
        // qcow2 allocates in 64 KiB clusters.
        const read = stats(r.stderr).read;
        assert.ok(read >= data && read <= data + 64 * 1024, `read ${read}`);
        // Handshake and reply headers are all that comes beside the data.
        assert.ok(s.received >= read && s.received < read + 16 * 1024);
      });
      await t.step(
        "a file to [ nbdkit -s memory ]; [ nbdkit -s pattern ] to stdout as nbdcopy",
        async () => {
          const r = await runTool("copy", [
            "-v",
            `${dir}/ours.raw`,
            ...cmd("nbdkit", "-s", "memory", "8M"),
          ]);
          assert.equal(r.code, 0, r.stderr);
          const d = wire(r.stderr, "destination");
          assert.ok(d.requests["NBD_CMD_WRITE"]! >= 1);
          assert.equal(d.requests["NBD_CMD_READ"], undefined);
          assert.ok(d.sent >= 1024 * 1024 + 300 * 1024);
          // Each run starts its own server, and what it held goes with it:
          // reading back is compared on a server with fixed content.
          const back = await runTool("copy", [
            ...cmd("nbdkit", "-s", "pattern", "1M"),
            "-",
          ]);
          assert.equal(back.code, 0, back.stderr);
          const theirs = await runBytes("nbdcopy", [
            "--",
            ...cmd("nbdkit", "pattern", "1M"),
            "-",
          ]);
          assert.deepEqual(back.stdout, theirs);
        },
      );
      await t.step("[ nbdkit memory 1G ] to null: reads nothing", async () => {
        const r = await runTool("copy", [
          "-v",
          ...cmd("nbdkit", "memory", "1G"),
          "null:",
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(stats(r.stderr).read, 0);
        const s = wire(r.stderr, "source");
        assert.equal(s.requests["NBD_CMD_READ"], undefined);
        assert.ok(s.requests["NBD_CMD_BLOCK_STATUS"]! >= 1);
      });
      await t.step(
        "--dirty from [ qemu-nbd -B b0 ] onto a full copy",
        async () => {
          const full = `${dir}/full.raw`;
          await run("qemu-img", ["convert", "-O", "raw", image, full]);
          await run("qemu-img", ["bitmap", "--add", image, "b0"]);
          for (const c of ["write -P 0x44 64k 4k", "write -P 0x55 7M 128k"]) {
            await run("qemu-io", ["-f", "qcow2", "-c", c, image]);
          }
          const r = await runTool("copy", [
            "-v",
            "--dirty=qemu:dirty-bitmap:b0",
            ...cmd("qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", image),
            full,
          ]);
          assert.equal(r.code, 0, r.stderr);
          await run("qemu-img", [
            "convert",
            "-O",
            "raw",
            image,
            `${dir}/now.raw`,
          ]);
          assert.deepEqual(
            await Deno.readFile(full),
            await Deno.readFile(`${dir}/now.raw`),
          );
          // Only the dirty clusters were read.
          const s = wire(r.stderr, "source");
          assert.ok(s.received < 2 * 64 * 1024 + 128 * 1024 + 16 * 1024);
        },
      );
      await t.step(
        "--dirty from a command onto a command of another size",
        async () => {
          const r = await runTool("copy", [
            "--dirty=base:allocation",
            ...source,
            ...cmd("nbdkit", "-s", "memory", "4M"),
          ]);
          assert.equal(r.code, 1);
          assert.match(
            r.stderr,
            /^copy: \[ nbdkit -s memory 4M \] has 4194304 bytes and the source 8388608: --dirty updates a copy of the same size\n$/,
          );
        },
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "copy: a server command that fails is one line, and no server outlives the copy",
  async fn(t) {
    const m = marker();
    const dir = await Deno.makeTempDir({ prefix: "nbd-copy-" });
    try {
      const image = `${dir}/${m}.raw`;
      await run("qemu-img", ["create", "-q", "-f", "raw", image, "1M"]);
      await t.step("fails to start: its stderr, one line", async () => {
        const r = await runTool("copy", [
          ...cmd("qemu-nbd", "-r", "-f", "qcow2", `${dir}/${m}.missing`),
          "null:",
        ]);
        assert.equal(r.code, 1);
        assert.match(
          r.stderr,
          /^copy: The server command qemu-nbd exited with status 1: .*Could not open/,
        );
        assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
        await assertNoneLeft(m, "a failed start");
      });
      const cases: Array<[string, string[]]> = [
        ["qemu-nbd to null:", [
          ...cmd("qemu-nbd", "-r", "-f", "raw", image),
          "null:",
        ]],
        ["a file to nbdkit -s", [
          image,
          ...cmd("nbdkit", "-s", "-e", m, "memory", "1M"),
        ]],
        ["nbdkit on a socket to a file", [
          ...cmd("nbdkit", "-e", m, "memory", "1M"),
          `${dir}/out`,
        ]],
        ["a destination too small", [
          image,
          ...cmd("nbdkit", "-s", "-e", m, "memory", "4k"),
        ]],
      ];
      for (const [label, args] of cases) {
        await t.step(label, async () => {
          const r = await runTool("copy", args);
          assert.equal(r.code, label.endsWith("too small") ? 1 : 0, r.stderr);
          await assertNoneLeft(m, label);
        });
      }
      await t.step("^C halfway", async () => {
        await interruptOnceRunning(
          "copy",
          [
            ...cmd(
              "nbdkit",
              "-s",
              "-e",
              m,
              "--filter=delay",
              "memory",
              "64M",
              "rdelay=1",
            ),
            "null:",
            "--no-extents",
          ],
          m,
          500,
        );
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
