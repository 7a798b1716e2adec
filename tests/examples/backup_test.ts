/**
 * `copy --dirty`: incremental backups from a qcow2 persistent dirty bitmap
 * served by qemu-nbd, and the walk and plan behind them.
 *
 * The fixture does what a backup tool does: fill a disk, take a full copy,
 * add a bitmap, let "the guest" write at scattered offsets, then copy only
 * the dirty extents onto the full copy.
 *
 * @module
 */

import assert from "node:assert/strict";
import { connect } from "../../mod.ts";
import {
  alignMap,
  type DirtyMap,
  formatMap,
  parseMask,
  planDirty,
  type StatusExtent,
  walkDirty,
} from "../../examples/copy/dirty.ts";
import {
  makeQcow2,
  nbdkit,
  qemuNbd,
  run,
  type Server,
  tempDir,
} from "../support/servers.ts";
import {
  fileHash,
  referenceBytes,
  referenceMap,
  sha256,
} from "../support/reference.ts";
import { seeded } from "../support/random.ts";
import { runTool } from "./_tools.ts";
import { nbdkitOn, restartable } from "../support/restartable.ts";
import { until } from "../support/wait.ts";
import {
  BURST_MS,
  parseRate,
  RateLimiter,
  rateState,
} from "../../examples/copy/rate.ts";
import { UsageError } from "../../examples/_cli.ts";

const SIZE = 32 * 1024 * 1024;
const MiB = 1024 * 1024;
/** The bitmap's granularity: what one dirty bit covers. */
const GRANULE = 64 * 1024;
const BITMAP = "qemu:dirty-bitmap:b0";

/**
 * Where "the guest" writes after the full copy: unaligned and sub-granule
 * writes (which dirty whole granules), one across a granule boundary, a
 * zeroed range (which the copy must write as zeroes), one longer than a
 * request, and one at the very end. In offset order.
 */
const WRITES: Array<[offset: number, length: number, zero?: "zero"]> = [
  [0, 4096],
  [3 * MiB + GRANULE, 2 * GRANULE],
  [10 * MiB - 1000, 3000],
  [12 * MiB, 2 * GRANULE, "zero"],
  [20 * MiB, MiB + 12345],
  [SIZE - GRANULE, GRANULE],
];

/** The extents the bitmap must report for {@linkcode WRITES}. */
function expectedExtents(): Array<{ offset: number; length: number }> {
  const out: Array<{ offset: number; length: number }> = [];
  for (const [offset, length] of WRITES) {
    const a = Math.floor(offset / GRANULE) * GRANULE;
    const b = Math.ceil((offset + length) / GRANULE) * GRANULE;
    const last = out.at(-1);
    if (last && last.offset + last.length >= a) {
      last.length = Math.max(last.length, b - last.offset);
    } else {
      out.push({ offset: a, length: b - a });
    }
  }
  return out;
}

/** The counters of `copy -v`'s summary for an incremental copy. */
function dirtyStats(stderr: string): {
  dirty: number;
  extents: number;
  copied: number;
  lanes: number;
  read: number;
  wrote: number;
  zeroed: number;
} {
  const m =
    /copy: (\d+) dirty bytes in (\d+) extent\(s\) of \d+, copied (\d+) in [\d.]+ s over (\d+) connection\(s\): read (\d+), wrote (\d+), zeroed (\d+)/
      .exec(stderr);
  assert.ok(m, `no summary in: ${stderr}`);
  const [dirty, extents, copied, lanes, read, wrote, zeroed] = m.slice(1).map(
    Number,
  ) as [number, number, number, number, number, number, number];
  return { dirty, extents, copied, lanes, read, wrote, zeroed };
}

/**
 * `copy -v [extra] --dirty=BITMAP source dest`, which must succeed: the
 * counters of its summary, and its stderr for the rest.
 */
async function copyDirty(
  source: string,
  dest: string,
  extra: string[] = [],
): Promise<ReturnType<typeof dirtyStats> & { stderr: string }> {
  const r = await runTool("copy", [
    "-v",
    ...extra,
    `--dirty=${BITMAP}`,
    source,
    dest,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return { ...dirtyStats(r.stderr), stderr: r.stderr };
}

/** `qemu-img compare` finds `copy` (in `format`) and the qcow2 `image` equal. */
async function assertSameImage(
  copy: string,
  format: "raw" | "qcow2",
  image: string,
): Promise<void> {
  const out = await run("qemu-img", [
    "compare",
    "-f",
    format,
    "-F",
    "qcow2",
    copy,
    image,
  ]);
  assert.match(out, /Images are identical/);
}

/** The source's line of `copy -v`: what `nbd.stats` counted. */
function sourceWire(
  stderr: string,
): { received: number; requests: Record<string, number> } {
  const m =
    /copy: source \S+: sent \d+ bytes in \d+ request\(s\) \(([^)]*)\), received (\d+) bytes/
      .exec(stderr);
  assert.ok(m, `no source wire line in: ${stderr}`);
  const requests: Record<string, number> = {};
  for (const part of m[1]!.split(", ")) {
    const [name, n] = part.split(" ");
    requests[name!] = Number(n);
  }
  return { received: Number(m[2]), requests };
}

/** What one run of the fixture made. */
interface Backup {
  dir: string;
  /** The qcow2 with bitmap `b0`, after the scattered writes. */
  image: string;
  /** The full copy taken before the bitmap was added. */
  full: string;
}

/**
 * A qcow2 filled with a pattern (a different byte per MiB), a full copy of
 * it taken with `copy`, then bitmap `b0` added and {@linkcode WRITES} made
 * through the library while qemu-nbd exports the bitmap.
 */
async function makeBackup(): Promise<Backup> {
  const dir = await tempDir();
  const image = `${dir}/disk.qcow2`;
  const full = `${dir}/full.raw`;
  await makeQcow2(
    image,
    String(SIZE),
    Array.from(
      { length: SIZE / MiB },
      (_, i) => `write -q -P ${0x40 + i} ${i * MiB} ${MiB}`,
    ),
  );

  const ro = await qemuNbd(["-r", "-f", "qcow2", image], { dir });
  try {
    const r = await runTool("copy", [ro.uri(), full]);
    assert.equal(r.code, 0, r.stderr);
  } finally {
    await ro.stop();
  }

  await run("qemu-img", [
    "bitmap",
    "--add",
    "--enable",
    "-g",
    String(GRANULE),
    image,
    "b0",
  ]);
  const rw = await qemuNbd(["-f", "qcow2", "-B", "b0", image], { dir });
  try {
    await using nbd = await connect(rw.target());
    const next = seeded(13);
    for (const [offset, length, zero] of WRITES) {
      if (zero) {
        await nbd.writeZeroes(offset, length);
        continue;
      }
      const data = new Uint8Array(length);
      for (let i = 0; i < length; i++) data[i] = next() & 0xff;
      await nbd.write(offset, data);
    }
    await nbd.flush();
  } finally {
    await rw.stop();
  }
  return { dir, image, full };
}

/** A copy of the full backup to update, named `name`. */
async function copyOfFull(b: Backup, name: string): Promise<string> {
  const path = `${b.dir}/${name}`;
  await Deno.copyFile(b.full, path);
  return path;
}

/** Serves the image writable, with its bitmap, as a backup reads it. */
function serve(b: Backup, extra: string[] = []): Promise<Server> {
  return qemuNbd([...extra, "-f", "qcow2", "-B", "b0", b.image], {
    dir: b.dir,
  });
}

/** Bytes `[offset, offset + length)` of a file. */
async function slice(
  path: string,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  return (await Deno.readFile(path)).subarray(offset, offset + length);
}

Deno.test({
  name: "copy --dirty: an incremental backup from a qemu dirty bitmap",
  async fn(t) {
    const b = await makeBackup();
    try {
      const full = await Deno.readFile(b.full);
      const src = await serve(b);
      let current: Uint8Array;
      try {
        current = await referenceBytes(src.uri());
        assert.notEqual(await sha256(current), await sha256(full));
        const want = expectedExtents();
        const dirtyBytes = want.reduce((n, e) => n + e.length, 0);
        // The range the guest zeroed reads as zero in base:allocation: it
        // is zeroed on the destination, never read.
        const zeroedBytes = WRITES.filter((w) => w[2] === "zero")
          .reduce((n, w) => n + w[1], 0);

        await t.step("--map-only prints the extents written", async () => {
          const r = await runTool("copy", [
            `--dirty=${BITMAP}`,
            "--map-only",
            src.uri(),
          ]);
          assert.equal(r.code, 0, r.stderr);
          assert.equal(r.stderr, "");
          const lines = r.text.trimEnd().split("\n").map((l) =>
            l.trim().split(/ +/).map(Number)
          );
          assert.deepEqual(lines, want.map((e) => [e.offset, e.length]));
        });

        await t.step("--map-only --json prints them as JSON", async () => {
          const r = await runTool("copy", [
            `--dirty=${BITMAP}`,
            "--map-only",
            "--json",
            src.uri(),
            `${b.dir}/never-made.raw`,
          ]);
          assert.equal(r.code, 0, r.stderr);
          assert.deepEqual(JSON.parse(r.text), want);
          // The dry run neither needs nor touches a destination.
          await assert.rejects(
            Deno.stat(`${b.dir}/never-made.raw`),
            Deno.errors.NotFound,
          );
        });

        await t.step(
          "onto the full copy gives the source's image",
          async () => {
            const inc = await copyOfFull(b, "inc.raw");
            const s = await copyDirty(src.uri(), inc);
            assert.equal(s.dirty, dirtyBytes);
            assert.equal(s.extents, want.length);
            assert.equal(s.copied, dirtyBytes);
            assert.equal(
              s.read,
              dirtyBytes - zeroedBytes,
              "read only the dirty data",
            );
            assert.equal(s.wrote, dirtyBytes - zeroedBytes);
            // An existing file has no way to punch a hole here: zero bytes.
            assert.equal(s.zeroed, zeroedBytes);
            // The library's own counters (nbd.stats) agree: the source sent
            // at most the dirty bytes (zero runs come back as holes, with no
            // data), plus headers and a handshake, and only reads and maps.
            const wire = sourceWire(s.stderr);
            assert.deepEqual(Object.keys(wire.requests).sort(), [
              "NBD_CMD_BLOCK_STATUS",
              "NBD_CMD_READ",
            ]);
            assert.ok(
              wire.received > 0 && wire.received < dirtyBytes + 64 * 1024,
              `received ${wire.received} bytes for ${dirtyBytes} dirty`,
            );
            assert.equal(await fileHash(inc), await sha256(current));
          },
        );

        await t.step(
          "no byte outside the dirty extents is written",
          async () => {
            // Marks in clean places of the destination survive the copy: it
            // writes nowhere else (nor truncates, nor zeroes).
            const inc = await copyOfFull(b, "marked.raw");
            const marks = [2 * MiB, 15 * MiB + 7, SIZE - GRANULE - 512];
            const f = await Deno.open(inc, { write: true });
            for (const m of marks) {
              await f.seek(m, Deno.SeekMode.Start);
              await f.write(new Uint8Array(512).fill(0xee));
            }
            f.close();
            const r = await runTool("copy", [
              `--dirty=${BITMAP}`,
              src.uri(),
              inc,
            ]);
            assert.equal(r.code, 0, r.stderr);
            const after = await Deno.readFile(inc);
            assert.equal(after.length, SIZE);
            const expected = current.slice();
            for (const m of marks) expected.fill(0xee, m, m + 512);
            assert.equal(await sha256(after), await sha256(expected));
          },
        );

        await t.step("onto an NBD destination", async () => {
          const copy = await copyOfFull(b, "served.raw");
          const dst = await qemuNbd(["-f", "raw", copy], { dir: b.dir });
          try {
            const s = await copyDirty(src.uri(), dst.uri(), ["--flush"]);
            assert.equal(s.read, dirtyBytes - zeroedBytes);
            // The zeroed range goes as WRITE_ZEROES, and only inside it.
            assert.equal(s.zeroed, zeroedBytes);
            assert.equal(
              await sha256(await referenceBytes(dst.uri())),
              await sha256(current),
            );
          } finally {
            await dst.stop();
          }
        });

        await t.step(
          "onto a block device, and not one of another size",
          async () => {
            const copy = await copyOfFull(b, "loop.raw");
            const short = `${b.dir}/short-loop.raw`;
            await Deno.writeFile(
              short,
              (await slice(b.full, 0, SIZE / 2)).slice(),
            );
            const before = await fingerprint(short);
            const device = (await run("losetup", ["-f", "--show", copy]))
              .trim();
            let shortDevice: string | undefined;
            try {
              const r = await copyDirty(src.uri(), device, ["--flush"]);
              assert.equal(
                r.read,
                dirtyBytes - zeroedBytes,
              );
              shortDevice = (await run("losetup", ["-f", "--show", short]))
                .trim();
              const bad = await runTool("copy", [
                `--dirty=${BITMAP}`,
                src.uri(),
                shortDevice,
              ]);
              assert.equal(bad.code, 1);
              assert.equal(
                bad.stderr,
                `copy: ${shortDevice} has ${
                  SIZE / 2
                } bytes and the source ${SIZE}: --dirty updates a copy of the same size\n`,
              );
            } finally {
              await run("losetup", ["-d", device]);
              if (shortDevice) await run("losetup", ["-d", shortDevice]);
            }
            assert.equal(await fileHash(copy), await sha256(current));
            assert.equal(await fingerprint(short), before);
          },
        );

        await t.step("with the progress bar's N/100 lines", async () => {
          const inc = await copyOfFull(b, "progress.raw");
          const r = await runTool("copy", [
            "--progress=2",
            `--dirty=${BITMAP}`,
            src.uri(),
            inc,
          ]);
          assert.equal(r.code, 0, r.stderr);
          const lines = r.stderr.trim().split("\n");
          for (const line of lines) assert.match(line, /^\d+\/100$/);
          assert.equal(lines.at(-1), "100/100");
          assert.equal(await fileHash(inc), await sha256(current));
        });

        await t.step("--dirty-flags picks the bits that mark", async () => {
          // qemu's bitmaps only ever set bit 0: a mask without it finds
          // nothing, and a copy with it reads nothing.
          const none = await runTool("copy", [
            `--dirty=${BITMAP}`,
            "--dirty-flags=0x2",
            "--map-only",
            "--json",
            src.uri(),
          ]);
          assert.equal(none.code, 0, none.stderr);
          assert.deepEqual(JSON.parse(none.text), []);
          const inc = await copyOfFull(b, "flags.raw");
          const r = await copyDirty(src.uri(), inc, [
            "--progress=2",
            "--dirty-flags=2",
          ]);
          assert.equal(r.read, 0);
          // Nothing to do is all of it done.
          assert.match(r.stderr, /^100\/100\ncopy: 0 dirty bytes/);
          assert.equal(await fileHash(inc), await sha256(full));
        });
      } finally {
        await src.stop();
      }

      await t.step("-C 2 against qemu-nbd --shared=2", async () => {
        const shared = await serve(b, ["--shared=2"]);
        try {
          const inc = await copyOfFull(b, "two.raw");
          const s = await copyDirty(shared.uri(), inc, [
            "-C",
            "2",
            "-T",
            "2",
            "--request-size=64k",
          ]);
          assert.equal(s.lanes, 2);
          assert.equal(s.read + s.zeroed, s.dirty);
          assert.ok(s.zeroed > 0, "the zeroed range is not read");
          assert.equal(await fileHash(inc), await sha256(current));
        } finally {
          await shared.stop();
        }
      });

      await t.step("qemu-img compare agrees", async () => {
        const inc = `${b.dir}/inc.raw`;
        await assertSameImage(inc, "raw", b.image);
      });
    } finally {
      await Deno.remove(b.dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy --dirty: what the guest zeroed is zeroed, not read",
  async fn(t) {
    // As the issue saw it: a pattern disk, a full copy, a bitmap, then 4 MiB
    // written and 8 MiB zeroed by the guest (qemu-io write -z).
    const dir = await tempDir();
    try {
      const image = `${dir}/disk.qcow2`;
      const full = `${dir}/full.raw`;
      await makeQcow2(image, "32M", ["write -q -P 0x61 0 32M"]);
      await run("qemu-img", [
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        image,
        full,
      ]);
      await run("qemu-img", ["bitmap", "--add", "--enable", image, "b0"]);
      await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -q -P 0x62 4M 4M",
        "-c",
        "write -q -z 16M 8M",
        image,
      ]);
      const src = await qemuNbd(["-r", "-f", "qcow2", "-B", "b0", image], {
        dir,
      });
      try {
        await t.step(
          "onto a qcow2 over qemu-nbd: zeroes as WRITE_ZEROES",
          async () => {
            const inc = `${dir}/inc.qcow2`;
            await run("qemu-img", [
              "convert",
              "-f",
              "raw",
              "-O",
              "qcow2",
              full,
              inc,
            ]);
            const dst = await qemuNbd(["-f", "qcow2", inc], { dir });
            try {
              const s = await copyDirty(src.uri(), dst.uri());
              assert.equal(s.dirty, 12 * MiB);
              assert.equal(s.read, 4 * MiB, "only the data is read");
              assert.ok(s.read < s.dirty);
              assert.equal(s.wrote, 4 * MiB);
              assert.equal(s.zeroed, 8 * MiB);
              const wire = sourceWire(s.stderr);
              assert.ok(wire.received < 5 * MiB, `received ${wire.received}`);
            } finally {
              await dst.stop();
            }
            await assertSameImage(inc, "qcow2", image);
            // The zeroed range is no data on the destination either.
            const map = JSON.parse(
              await run("qemu-img", [
                "map",
                "--output=json",
                "-f",
                "qcow2",
                inc,
              ]),
            ) as Array<
              { start: number; length: number; data: boolean; zero: boolean }
            >;
            for (const e of map) {
              if (e.start < 24 * MiB && e.start + e.length > 16 * MiB) {
                assert.equal(e.data, false, JSON.stringify(e));
                assert.equal(e.zero, true, JSON.stringify(e));
              }
            }
          },
        );
        await t.step(
          "onto a raw file: zero bytes written, still not read",
          async () => {
            const inc = `${dir}/inc.raw`;
            await Deno.copyFile(full, inc);
            const s = await copyDirty(src.uri(), inc);
            assert.equal(s.read, 4 * MiB);
            assert.equal(s.zeroed, 8 * MiB);
            await assertSameImage(inc, "raw", image);
          },
        );
      } finally {
        await src.stop();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * Starts `copy` over a source whose server the test kills and restarts
 * once the destination holds some data; returns the exit status and
 * stderr.
 */
async function copyAcrossRestart(
  extra: string[],
  dir: string,
): Promise<{ code: number; stderr: string; out: string; image: string }> {
  const image = `${dir}/src.raw`;
  const bytes = new Uint8Array(16 * MiB);
  const next = seeded(5);
  for (let i = 0; i < bytes.length; i += 4) {
    new DataView(bytes.buffer).setUint32(i, next() | 1);
  }
  await Deno.writeFile(image, bytes);
  // Slow reads, so the copy is still running when the server goes.
  await using server = await restartable(
    "nbdkit",
    (socket) =>
      nbdkitOn(socket, [
        "--filter=delay",
        "file",
        image,
        "rdelay=20ms",
      ]),
    dir,
  );
  await server.start();
  const out = `${dir}/copy-${extra.length}.raw`;
  const script = new URL("../../examples/copy.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--quiet",
      script,
      "--synchronous",
      ...extra,
      `nbd+unix:///?socket=${server.socket}`,
      out,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).spawn();
  const done = child.output();
  // A quarter of it copied: the bytes are on disk, not only promised.
  await until("a quarter of the copy", async () => {
    const info = await Deno.stat(out).catch(() => undefined);
    return (info?.blocks ?? 0) * 512 >= 4 * MiB;
  }, 30_000);
  await server.kill("SIGKILL");
  await server.start();
  const r = await done;
  return {
    code: r.code,
    stderr: new TextDecoder().decode(r.stderr),
    out,
    image,
  };
}

Deno.test({
  name: "copy --reconnect: a source restarted mid-copy",
  async fn(t) {
    const dir = await tempDir();
    try {
      await t.step("finishes, and the copy is equal", async () => {
        const r = await copyAcrossRestart(["--reconnect=20"], dir);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(await fileHash(r.out), await fileHash(r.image));
      });
      await t.step("without --reconnect the copy fails", async () => {
        const r = await copyAcrossRestart([], dir);
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, /^copy: reading /m);
      });
      await t.step("--reconnect refuses a [ CMD ] end", async () => {
        const r = await runTool("copy", [
          "--reconnect",
          "[",
          "nbdkit",
          "-s",
          "memory",
          "1M",
          "]",
          "null:",
        ]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /--reconnect needs NBD URIs/);
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** Everything about a file that a refused copy must leave alone. */
async function fingerprint(path: string): Promise<string> {
  const info = await Deno.stat(path);
  return `${info.size} ${info.mtime?.getTime()} ${await sha256(
    await Deno.readFile(path),
  )}`;
}

Deno.test({
  name: "copy --dirty: refusals are one line, exit 1, and write nothing",
  async fn(t) {
    const b = await makeBackup();
    const src = await serve(b);
    try {
      /** A runtime refusal: one line matching `message`, status 1. */
      const refused = async (args: string[], message: RegExp) => {
        const r = await runTool("copy", args);
        assert.equal(r.code, 1, r.stderr);
        assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
        assert.match(r.stderr, message);
        assert.equal(r.text, "");
      };

      await t.step("a smaller or larger file", async () => {
        for (const size of [SIZE / 2, SIZE + 512]) {
          const other = `${b.dir}/other-${size}.raw`;
          await Deno.writeFile(
            other,
            (await slice(b.full, 0, Math.min(size, SIZE))).slice(),
          );
          if (size > SIZE) {
            const f = await Deno.open(other, { write: true });
            await f.truncate(size);
            f.close();
          }
          const before = await fingerprint(other);
          await refused(
            [`--dirty=${BITMAP}`, src.uri(), other],
            new RegExp(
              `^copy: ${other} has ${size} bytes and the source ${SIZE}: --dirty updates a copy of the same size\n$`,
            ),
          );
          assert.equal(await fingerprint(other), before);
        }
      });

      await t.step("an NBD export of another size", async () => {
        const file = `${b.dir}/small-export.raw`;
        await Deno.writeFile(file, (await slice(b.full, 0, SIZE / 4)).slice());
        const before = await fingerprint(file);
        const dst = await qemuNbd(["-f", "raw", file], { dir: b.dir });
        try {
          await refused(
            [`--dirty=${BITMAP}`, src.uri(), dst.uri()],
            /^copy: nbd\+unix:.* has 8388608 bytes and the source 33554432: --dirty updates a copy of the same size\n$/,
          );
        } finally {
          await dst.stop();
        }
        assert.equal(await fingerprint(file), before);
      });

      await t.step("a missing destination is not created", async () => {
        const missing = `${b.dir}/missing.raw`;
        await refused(
          [`--dirty=${BITMAP}`, src.uri(), missing],
          /^copy: .*missing\.raw: no such file; --dirty updates an earlier full copy of the source\n$/,
        );
        await assert.rejects(Deno.stat(missing), Deno.errors.NotFound);
      });

      await t.step("a context the source does not offer", async () => {
        const inc = await copyOfFull(b, "unoffered.raw");
        const before = await fingerprint(inc);
        await refused(
          ["--dirty=qemu:dirty-bitmap:nope", src.uri(), inc],
          /^copy: nbd\+unix:.*: the source does not offer qemu:dirty-bitmap:nope; it offers base:allocation, qemu:dirty-bitmap:b0\n$/,
        );
        await refused(
          ["--dirty=qemu:dirty-bitmap:nope", "--map-only", src.uri()],
          /does not offer qemu:dirty-bitmap:nope; it offers .*qemu:dirty-bitmap:b0/,
        );
        assert.equal(await fingerprint(inc), before);
      });

      await t.step("usage errors, before anything is opened", async () => {
        const inc = await copyOfFull(b, "usage.raw");
        const before = await fingerprint(inc);
        const cases: Array<[string[], RegExp]> = [
          [
            [`--dirty=${BITMAP}`, b.full, inc],
            /needs an NBD URI as the SOURCE/,
          ],
          [[`--dirty=${BITMAP}`, src.uri(), "-"], /needs a DESTINATION that/],
          [[`--dirty=${BITMAP}`, src.uri(), "null:"], /needs a DESTINATION/],
          [["--dirty=nocolon", src.uri(), inc], /is not a metadata context/],
          [
            [`--dirty=${BITMAP}`, "--dirty-flags=0", src.uri(), inc],
            /--dirty-flags: expected a mask/,
          ],
          [
            [`--dirty=${BITMAP}`, "--dirty-flags=0x1g", src.uri(), inc],
            /--dirty-flags/,
          ],
          [
            [`--dirty=${BITMAP}`, "--no-extents", src.uri(), inc],
            /--no-extents cannot be used with --dirty/,
          ],
          [
            [`--dirty=${BITMAP}`, "--destination-is-zero", src.uri(), inc],
            /cannot be used with --dirty/,
          ],
          [["--map-only", src.uri()], /--map-only needs --dirty/],
          [["--dirty-flags=1", src.uri(), inc], /--dirty-flags needs --dirty/],
          [
            [`--dirty=${BITMAP}`, "--json", src.uri(), inc],
            /--json needs --map-only/,
          ],
          [
            [`--dirty=${BITMAP}`, src.uri()],
            /expected a SOURCE and a DESTINATION/,
          ],
        ];
        for (const [args, message] of cases) {
          const r = await runTool("copy", args);
          assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
          assert.match(r.stderr, new RegExp(`^copy: .*${message.source}`));
          assert.match(r.stderr, /\nTry 'copy --help'\.\n$/);
        }
        assert.equal(await fingerprint(inc), before);
      });
    } finally {
      await src.stop();
      await Deno.remove(b.dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "copy --dirty: any context, e.g. the zero extents of base:allocation",
  async fn() {
    const src = await nbdkit([
      "sparse-random",
      "size=16M",
      "percent=40",
      "seed=7",
      "runlength=262144",
    ]);
    try {
      const zero = (await referenceMap(src.uri())).filter((e) => e.flags & 2)
        .map((e) => ({ offset: e.offset, length: e.length }));
      assert.ok(zero.length > 1);
      const r = await runTool("copy", [
        "--dirty=base:allocation",
        "--dirty-flags=0x2",
        "--map-only",
        "--json",
        src.uri(),
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(JSON.parse(r.text), zero);
    } finally {
      await src.stop();
    }
  },
});

/** A status query that answers from `extents`, at most `most` at a time. */
function fakeStatus(
  extents: StatusExtent[],
  most: number,
  asked: Array<[number, number]>,
): (offset: number, length: number) => Promise<StatusExtent[]> {
  return (offset, length) => {
    asked.push([offset, length]);
    const out: StatusExtent[] = [];
    let pos = 0;
    for (const e of extents) {
      const end = pos + e.length;
      if (end > offset && out.length < most) {
        out.push({ length: end - Math.max(pos, offset), flags: e.flags });
      }
      pos = end;
    }
    return Promise.resolve(out);
  };
}

Deno.test("walkDirty() follows short replies to the end", async (t) => {
  const signal = new AbortController().signal;
  const extents: StatusExtent[] = [
    { length: 4096, flags: 1 },
    { length: 4096, flags: 1 },
    { length: 8192, flags: 0 },
    { length: 4096, flags: 3 },
    { length: 4096, flags: 2 },
    { length: 8192, flags: 1 },
  ];
  const size = 32768;

  await t.step("one extent per reply, continuing where it ended", async () => {
    const asked: Array<[number, number]> = [];
    const map = await walkDirty(fakeStatus(extents, 1, asked), size, 1, signal);
    assert.deepEqual(asked.map((a) => a[0]), [
      0,
      4096,
      8192,
      16384,
      20480,
      24576,
    ]);
    assert.deepEqual(map, {
      offsets: [0, 16384, 24576],
      lengths: [8192, 4096, 8192],
      bytes: 20480,
    });
  });

  await t.step("a mask picks other bits", async () => {
    const map = await walkDirty(fakeStatus(extents, 99, []), size, 2, signal);
    assert.deepEqual(map, { offsets: [16384], lengths: [8192], bytes: 8192 });
  });

  await t.step("a reply past the end is cut at the end", async () => {
    const long = [{ length: 1 << 30, flags: 1 }];
    const map = await walkDirty(fakeStatus(long, 1, []), size, 1, signal);
    assert.deepEqual(map, { offsets: [0], lengths: [size], bytes: size });
  });

  await t.step("an empty reply is an error, not a loop", async () => {
    await assert.rejects(
      walkDirty(() => Promise.resolve([]), size, 1, signal),
      /no extents returned at offset 0/,
    );
  });
});

Deno.test("alignMap(), planDirty(), formatMap() and parseMask()", async () => {
  const map: DirtyMap = {
    offsets: [100, 700, 5000],
    lengths: [200, 100, 24],
    bytes: 324,
  };
  assert.deepEqual(alignMap(map, 512, 5020), {
    offsets: [0, 4608],
    lengths: [1024, 412],
    bytes: 1436,
  });
  assert.equal(alignMap(map, 1, 5024), map);

  const items = [];
  for await (
    const item of planDirty({
      offsets: [0, 10000],
      lengths: [2500, 10],
      bytes: 2510,
    }, 1024)
  ) {
    items.push([item.offset, item.length, item.zero]);
  }
  assert.deepEqual(items, [
    [0, 1024, false],
    [1024, 1024, false],
    [2048, 452, false],
    [10000, 10, false],
  ]);

  assert.equal(formatMap(map, false), " 100  200\n 700  100\n5000   24\n");
  assert.deepEqual(JSON.parse(formatMap(map, true)), [
    { offset: 100, length: 200 },
    { offset: 700, length: 100 },
    { offset: 5000, length: 24 },
  ]);
  assert.equal(formatMap({ offsets: [], lengths: [], bytes: 0 }, true), "[]\n");

  assert.equal(parseMask("1"), 1);
  assert.equal(parseMask("0x10"), 16);
  assert.equal(parseMask("0xFFFFFFFF"), 0xffffffff);
  for (
    const bad of ["0", "-1", "0x", "0x100000000", "4294967296", "1.5", "b"]
  ) {
    assert.throws(() => parseMask(bad), /--dirty-flags/, bad);
  }
});

/** A clock that only moves when the limiter sleeps (or the test says so). */
function fakeTime(): {
  now: () => number;
  advance: (ms: number) => void;
  sleep: (ms: number) => Promise<void>;
  waits: number[];
} {
  let t = 1_000_000;
  const waits: number[] = [];
  return {
    now: () => t,
    advance: (ms) => t += ms,
    sleep: (ms) => {
      waits.push(ms);
      t += ms;
      return Promise.resolve();
    },
    waits,
  };
}

Deno.test("RateLimiter keeps a steady rate on an injected clock", async (t) => {
  const signal = new AbortController().signal;
  const KiB = 1024;
  await t.step(
    "requests are spaced by their length over the rate",
    async () => {
      const time = fakeTime();
      const limiter = new RateLimiter(MiB, rateState(), time.now, time.sleep);
      const start = time.now();
      for (let i = 0; i < 40; i++) await limiter.take(256 * KiB, signal);
      // 40 quarter-MiB requests at 1 MiB/s: 10 s, less the 50 ms of credit
      // the first one starts with, less the last one's own 250 ms.
      const elapsed = time.now() - start;
      assert.ok(
        Math.abs(elapsed - (10_000 - 250 - BURST_MS)) < 1,
        `elapsed ${elapsed}`,
      );
      // Steady: after the first, every wait is one request's time.
      for (const w of time.waits.slice(1)) {
        assert.ok(
          Math.abs(w - 250) < 1,
          `${w}`,
        );
      }
    },
  );
  await t.step("idle time earns no burst beyond BURST_MS", async () => {
    const time = fakeTime();
    const limiter = new RateLimiter(MiB, rateState(), time.now, time.sleep);
    await limiter.take(64 * KiB, signal);
    time.advance(60_000);
    time.waits.length = 0;
    const start = time.now();
    for (let i = 0; i < 16; i++) await limiter.take(64 * KiB, signal);
    // A minute idle, then 1 MiB: still about a second, not at once.
    const elapsed = time.now() - start;
    assert.ok(elapsed >= 1000 - 62.5 - BURST_MS - 1, `elapsed ${elapsed}`);
  });
  await t.step("threads sharing the state share the rate", async () => {
    const time = fakeTime();
    const state = rateState();
    const a = new RateLimiter(2 * MiB, state, time.now, time.sleep);
    const b = new RateLimiter(2 * MiB, state, time.now, time.sleep);
    const start = time.now();
    for (let i = 0; i < 20; i++) {
      await a.take(256 * KiB, signal);
      await b.take(256 * KiB, signal);
    }
    // 10 MiB at 2 MiB/s over both: about 5 s, not 2.5.
    const elapsed = time.now() - start;
    assert.ok(elapsed > 4_500 && elapsed < 5_000, `elapsed ${elapsed}`);
  });
  await t.step("an aborted signal ends the wait", async () => {
    const limiter = new RateLimiter(1, rateState());
    await limiter.take(1, signal); // within the credit
    const c = new AbortController();
    const waiting = limiter.take(1000, c.signal);
    c.abort(new Error("stop"));
    await assert.rejects(waiting, /stop/);
  });
});

Deno.test("parseRate() reads bytes per second with k, M and G", () => {
  assert.equal(parseRate("100"), 100);
  assert.equal(parseRate("500k"), 500 * 1024);
  assert.equal(parseRate("20M"), 20 * MiB);
  assert.equal(parseRate("1G"), 1024 * MiB);
  assert.equal(parseRate("1.5M"), 1.5 * MiB);
  for (const bad of ["", "0", "x", "10T", "-5", "5 MB"]) {
    assert.throws(() => parseRate(bad), UsageError, bad);
  }
});
