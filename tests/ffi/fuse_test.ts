/**
 * examples/fuse.ts against a real server on this host (as root, no guest):
 * the export as a file, a loop device and ext4 on it, fsync, trim and
 * zeroes reaching the server, read-only, a dying server, each way of
 * ending, and the mount points it refuses. Nothing is left mounted: each
 * test checks /proc/mounts in `finally` and cleans up (umount -l,
 * losetup -d).
 *
 * @module
 */

import assert from "node:assert/strict";
import { nbdkit, type Server, sparseFile } from "../support/servers.ts";
import { until, within } from "../support/wait.ts";

const TOOL = new URL("../../examples/fuse.ts", import.meta.url).pathname;
const SIZE = 64 << 20;
const decoder = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program with a deadline. */
async function sh(program: string, args: string[], ms = 60_000): Promise<Run> {
  const out = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(ms),
  }).output();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

/** Runs a program that must succeed; returns its stdout. */
async function must(program: string, args: string[]): Promise<string> {
  const r = await sh(program, args);
  assert.equal(r.code, 0, `${program} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

/** The read-ahead (KiB) of the mount on `dir`, from its bdi in sysfs. */
function readaheadOf(dir: string): number {
  const line = Deno.readTextFileSync("/proc/self/mountinfo").split("\n")
    .find((l) => l.split(" ")[4] === dir);
  assert.ok(line, `${dir} is not mounted`);
  const device = line.split(" ")[2];
  return Number(
    Deno.readTextFileSync(`/sys/class/bdi/${device}/read_ahead_kb`).trim(),
  );
}

function mountedAt(dir: string): boolean {
  return Deno.readTextFileSync("/proc/mounts").split("\n")
    .some((l) => l.split(" ")[1] === dir);
}

/** A running `fuse` tool. */
interface Fuse {
  child: Deno.ChildProcess;
  /** Resolves with the exit status and stderr. */
  done: Promise<{ code: number; stderr: string }>;
}

/** Starts the tool and waits (bounded) until its pidfile says it serves. */
async function startFuse(args: string[], pidfile: string): Promise<Fuse> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", TOOL, "-P", pidfile, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const done = child.output().then((o) => ({
    code: o.code,
    stderr: decoder.decode(o.stderr),
  }));
  let exited = false;
  done.then(() => exited = true);
  await until("the fuse tool to write its pidfile", async () => {
    if (exited) return true;
    try {
      return (await Deno.readTextFile(pidfile)).endsWith("\n");
    } catch {
      return false;
    }
  }, 30_000);
  if (exited) {
    const r = await done;
    throw new Error(`fuse exited with ${r.code} before serving: ${r.stderr}`);
  }
  assert.equal(Number((await Deno.readTextFile(pidfile)).trim()), child.pid);
  return { child, done };
}

/** Waits (bounded) for the tool to exit. */
function exited(
  f: Fuse,
  ms = 20_000,
): Promise<{ code: number; stderr: string }> {
  return within(ms, "the fuse tool's exit", f.done);
}

/** One test's world: a directory, an image, nbdkit serving it. */
interface World {
  dir: string;
  mnt: string;
  image: string;
  pidfile: string;
  server: Server;
  loops: string[];
  mounts: string[];
  fuses: Fuse[];
  /** The test failed already: cleaning up must not hide why. */
  failed: boolean;
}

async function world(
  nbdkitArgs?: (image: string, dir: string) => string[],
): Promise<World> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-fuse-test-" });
  const mnt = `${dir}/mnt`;
  await Deno.mkdir(mnt);
  const image = `${dir}/disk.img`;
  await sparseFile(image, SIZE);
  const server = await nbdkit(
    nbdkitArgs ? nbdkitArgs(image, dir) : ["file", image],
    { dir },
  );
  return {
    dir,
    mnt,
    image,
    pidfile: `${dir}/fuse.pid`,
    server,
    loops: [],
    mounts: [],
    fuses: [],
    failed: false,
  };
}

/** Undoes everything, then checks that nothing is left mounted. */
async function cleanUp(w: World): Promise<void> {
  for (const m of w.mounts.reverse()) {
    if (mountedAt(m)) await sh("umount", ["-l", m]);
  }
  for (const l of w.loops) await sh("losetup", ["-d", l]);
  for (const f of w.fuses) {
    try {
      f.child.kill("SIGKILL");
    } catch {
      // Gone already.
    }
    await within(20_000, "the fuse tool's exit after SIGKILL", f.done);
  }
  const left = mountedAt(w.mnt);
  if (left) await sh("umount", ["-l", w.mnt]);
  await w.server.stop();
  await Deno.remove(w.dir, { recursive: true });
  if (left && !w.failed) throw new Error(`${w.mnt} was left mounted`);
}

/**
 * Runs `test` in a new world (server, mount point, directory), marks the
 * world failed when the test throws (so cleaning up reports what it finds
 * without hiding the test's error), and cleans up either way.
 */
function inWorld(test: (w: World) => Promise<void>): Promise<void>;
function inWorld(
  nbdkitArgs: (image: string, dir: string) => string[],
  test: (w: World) => Promise<void>,
): Promise<void>;
async function inWorld(
  first:
    | ((w: World) => Promise<void>)
    | ((image: string, dir: string) => string[]),
  second?: (w: World) => Promise<void>,
): Promise<void> {
  const test = (second ?? first) as (w: World) => Promise<void>;
  const w = await world(
    second ? first as (image: string, dir: string) => string[] : undefined,
  );
  try {
    await test(w);
  } catch (e) {
    w.failed = true;
    throw e;
  } finally {
    await cleanUp(w);
  }
}

async function fuse(w: World, extra: string[] = []): Promise<Fuse> {
  const f = await startFuse([...extra, w.mnt, w.server.uri()], w.pidfile);
  w.fuses.push(f);
  return f;
}

async function unmountAndExit(w: World, f: Fuse): Promise<void> {
  await must("fusermount3", ["-u", w.mnt]);
  const r = await exited(f);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(mountedAt(w.mnt), false);
}

Deno.test("fuse serves the export as a file that takes a loop device and ext4", async () => {
  await inWorld(async (w) => {
    const f = await fuse(w);
    const st = await Deno.stat(`${w.mnt}/nbd`);
    assert.equal(st.size, SIZE);
    // Read-ahead as large as the largest request (256 pages).
    assert.equal(readaheadOf(w.mnt), 256 * 4);
    assert.deepEqual(
      Array.from(Deno.readDirSync(w.mnt), (e) => e.name),
      ["nbd"],
    );
    const loop = (await must("losetup", ["-f", "--show", `${w.mnt}/nbd`]))
      .trim();
    w.loops.push(loop);
    await must("mkfs.ext4", ["-q", "-F", loop]);
    const fs = `${w.dir}/fs`;
    await Deno.mkdir(fs);
    await must("mount", [loop, fs]);
    w.mounts.push(fs);
    const data = crypto.getRandomValues(new Uint8Array(65536));
    const big = new Uint8Array(3 << 20).map((_, i) =>
      data[i % data.length]! ^ (i >> 16)
    );
    await Deno.writeFile(`${fs}/big`, big);
    await must("umount", [fs]);
    await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3\n");
    await must("mount", [loop, fs]);
    assert.deepEqual(await Deno.readFile(`${fs}/big`), big);
    await must("umount", [fs]);
    w.mounts.pop();
    await must("losetup", ["-d", loop]);
    w.loops.pop();
    await unmountAndExit(w, f);
  });
});

Deno.test("fuse: bytes written reach the server's file after fsync; reads see the server's bytes", async () => {
  await inWorld(async (w) => {
    const f = await fuse(w);
    const seed = crypto.getRandomValues(new Uint8Array(65536));
    const pattern = new Uint8Array(1 << 20).map((_, i) =>
      seed[i % seed.length]! ^ (i >> 16)
    );
    await Deno.writeFile(`${w.dir}/src`, pattern);
    await must("dd", [
      `if=${w.dir}/src`,
      `of=${w.mnt}/nbd`,
      "bs=64K",
      "seek=16",
      "conv=notrunc,fsync",
      "status=none",
    ]);
    const image = await Deno.readFile(w.image);
    assert.deepEqual(
      image.subarray(16 * 65536, 16 * 65536 + pattern.length),
      pattern,
    );
    // Unaligned writes and reads pass through the page cache unharmed.
    const file = await Deno.open(`${w.mnt}/nbd`, { read: true, write: true });
    try {
      await file.seek(12345, Deno.SeekMode.Start);
      await file.write(new TextEncoder().encode("hello, fuse"));
      await file.syncData();
    } finally {
      file.close();
    }
    const after = await Deno.readFile(w.image);
    assert.equal(
      decoder.decode(after.subarray(12345, 12345 + 11)),
      "hello, fuse",
    );
    const direct = await must("dd", [
      `if=${w.mnt}/nbd`,
      "bs=4K",
      "skip=3",
      "count=1",
      "iflag=direct",
      "status=none",
    ]);
    assert.equal(direct.length > 0, true);
    await unmountAndExit(w, f);
  });
});

Deno.test("fuse: punch hole and zero range reach the server as write zeroes, deallocating and not", async () => {
  await inWorld((
    image,
    dir,
  ) => ["--filter=log", "file", image, `logfile=${dir}/log`], async (w) => {
    const f = await fuse(w);
    await must("fallocate", [
      "-p",
      "-o",
      "65536",
      "-l",
      "131072",
      `${w.mnt}/nbd`,
    ]);
    await must("fallocate", [
      "-z",
      "-o",
      "1048576",
      "-l",
      "65536",
      `${w.mnt}/nbd`,
    ]);
    const log = await Deno.readTextFile(`${w.dir}/log`);
    // A punch must read back as zeroes, which a trim does not promise: it
    // is a write of zeroes the server may deallocate; a zero range keeps
    // the blocks allocated.
    assert.match(log, /Zero .*offset=0x10000 count=0x20000 trim=1/);
    assert.match(log, /Zero .*offset=0x100000 count=0x10000 trim=0/);
    assert.doesNotMatch(log, /Trim /);
    await unmountAndExit(w, f);
  });
});

Deno.test("fuse -r: the file is read-only and writes fail", async () => {
  await inWorld(async (w) => {
    await Deno.writeFile(w.image, new Uint8Array(4096).fill(7));
    await Deno.truncate(w.image, SIZE);
    const f = await fuse(w, ["-r"]);
    const st = await Deno.stat(`${w.mnt}/nbd`);
    assert.equal(st.mode! & 0o777, 0o444);
    const r = await sh("dd", [
      "if=/dev/zero",
      `of=${w.mnt}/nbd`,
      "bs=4K",
      "count=1",
      "conv=notrunc",
    ]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Read-only file system|Permission denied/);
    const head = await must("dd", [
      `if=${w.mnt}/nbd`,
      "bs=16",
      "count=1",
      "status=none",
    ]);
    assert.equal(head, "\x07".repeat(16));
    await unmountAndExit(w, f);
  });
});

Deno.test("fuse: a server that dies gives EIO, not a hang, and the mount goes", async () => {
  await inWorld(async (w) => {
    const f = await fuse(w, ["--direct-io"]);
    await must("dd", [
      `if=${w.mnt}/nbd`,
      "of=/dev/null",
      "bs=1M",
      "count=1",
      "status=none",
    ]);
    w.server.kill("SIGKILL");
    assert.equal(await w.server.waitForExit(5_000), true);
    const r = await sh("dd", [
      `if=${w.mnt}/nbd`,
      "of=/dev/null",
      "bs=1M",
      "count=1",
      "skip=2",
    ], 20_000);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Input\/output error/);
    const end = await exited(f);
    assert.equal(end.code, 1);
    assert.match(end.stderr, /^fuse: /);
    assert.equal(mountedAt(w.mnt), false);
  });
});

Deno.test("fuse ends with exit 0 and nothing mounted", async (t) => {
  await inWorld(async (w) => {
    const ways: Array<[string, (f: Fuse) => Promise<unknown>]> = [
      ["fusermount3 -u", () => must("fusermount3", ["-u", w.mnt])],
      ["umount", () => must("umount", [w.mnt])],
      ["SIGINT", (f) => Promise.resolve(f.child.kill("SIGINT"))],
      ["SIGTERM", (f) => Promise.resolve(f.child.kill("SIGTERM"))],
    ];
    for (const [name, end] of ways) {
      await t.step(name, async () => {
        await Deno.remove(w.pidfile).catch(() => {});
        // --readahead 0 leaves the kernel's 128 KiB.
        const f = await fuse(w, ["--readahead", "0"]);
        assert.equal(readaheadOf(w.mnt), 128);
        assert.equal(mountedAt(w.mnt), true);
        await end(f);
        const r = await exited(f);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stderr, "");
        assert.equal(mountedAt(w.mnt), false);
      });
    }
    await t.step(
      "SIGTERM while a loop device holds the file: served until released",
      async () => {
        await Deno.remove(w.pidfile).catch(() => {});
        const f = await fuse(w);
        const loop = (await must("losetup", ["-f", "--show", `${w.mnt}/nbd`]))
          .trim();
        w.loops.push(loop);
        f.child.kill("SIGTERM");
        await until(
          "the mount to leave the tree",
          () => !mountedAt(w.mnt),
          10_000,
        );
        // Detached but still served: the loop device reads.
        await must("dd", [
          `if=${loop}`,
          "of=/dev/null",
          "bs=64K",
          "count=4",
          "iflag=direct",
          "status=none",
        ]);
        await must("losetup", ["-d", loop]);
        w.loops.pop();
        const r = await exited(f);
        assert.equal(r.code, 0, r.stderr);
      },
    );
  });
});

Deno.test("fuse refuses a bad mount point with one line naming the fix", async (t) => {
  await inWorld(async (w) => {
    const refuse = async (args: string[], pattern: RegExp, lines = 1) => {
      const r = await sh(Deno.execPath(), [
        "run",
        "-A",
        "--quiet",
        TOOL,
        ...args,
      ]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr.trim().split("\n").length, lines, r.stderr);
      assert.match(r.stderr, pattern);
    };
    await t.step("not a directory", async () => {
      await Deno.writeTextFile(`${w.dir}/plain`, "x");
      await refuse(
        [`${w.dir}/plain`, w.server.uri()],
        /^fuse: .*plain is not a directory/,
      );
    });
    await t.step("missing", async () => {
      await refuse([`${w.dir}/no/such`, w.server.uri()], /^fuse: .*mkdir /);
    });
    await t.step(
      "missing, with a slash: a directory, not a file name",
      async () => {
        await refuse([`${w.dir}/gone/`, w.server.uri()], /^fuse: .*mkdir /);
        assert.equal(mountedAt(w.dir), false);
      },
    );
    await t.step(
      "a pid file in no directory, before anything is mounted",
      async () => {
        await refuse(
          ["-P", `${w.dir}/no/pid`, w.mnt, w.server.uri()],
          /^fuse: --pidfile .* is not a directory\nTry 'fuse --help'/,
          2,
        );
        assert.equal(mountedAt(w.mnt), false);
      },
    );
    await t.step("busy: already mounted", async () => {
      const f = await fuse(w);
      await refuse(
        [w.mnt, w.server.uri()],
        /already a mount point .*fusermount3 -u /,
      );
      await unmountAndExit(w, f);
    });
    await t.step("stale: the server of a FUSE mount was killed", async () => {
      await Deno.remove(w.pidfile).catch(() => {});
      const f = await fuse(w);
      f.child.kill("SIGKILL");
      await exited(f);
      assert.equal(mountedAt(w.mnt), true);
      await refuse([w.mnt, w.server.uri()], /fusermount3 -u /);
      await must("fusermount3", ["-u", w.mnt]);
      assert.equal(mountedAt(w.mnt), false);
    });
    await t.step("usage", async () => {
      await refuse(
        [w.mnt],
        /^fuse: expected MOUNTPOINT.*\nTry 'fuse --help'/,
        2,
      );
    });
  });
});

Deno.test("fuse -C 2 spreads requests over two connections", async () => {
  await inWorld((image, dir) => [
    "--filter=log",
    // Slow reads: the reads at once below overlap for sure.
    "--filter=delay",
    "file",
    image,
    `logfile=${dir}/log`,
    "rdelay=20ms",
  ], async (w) => {
    const f = await fuse(w, ["-C", "2", "--direct-io"]);
    const data = new Uint8Array(1 << 20).map((_, i) => (i * 7) & 0xff);
    await Deno.writeFile(`${w.dir}/src`, data);
    await must("dd", [
      `if=${w.dir}/src`,
      `of=${w.mnt}/nbd`,
      "bs=64K",
      "oflag=direct",
      "conv=notrunc,fsync",
      "status=none",
    ]);
    // Reads at once, so that the second connection gets some.
    const parts = await Promise.all(
      [0, 1, 2, 3, 4, 5, 6, 7].map(async (i) => {
        const r = await sh("dd", [
          `if=${w.mnt}/nbd`,
          `of=${w.dir}/back${i}`,
          "bs=128K",
          `skip=${i}`,
          "count=1",
          "iflag=direct",
          "status=none",
        ]);
        assert.equal(r.code, 0, r.stderr);
        return await Deno.readFile(`${w.dir}/back${i}`);
      }),
    );
    const back = new Uint8Array(1 << 20);
    parts.forEach((p, i) => back.set(p, i * 131072));
    assert.deepEqual(back, data);
    const log = await Deno.readTextFile(`${w.dir}/log`);
    assert.match(log, /connection=1 (Read|Write) /);
    assert.match(log, /connection=2 (Read|Write) /);
    await unmountAndExit(w, f);
  });
});

Deno.test("fuse page cache: a new open sees the server's bytes by default and with --direct-io", async (t) => {
  await inWorld(async (w) => {
    for (const mode of [[], ["--direct-io"], ["--kernel-cache"]]) {
      await t.step(mode.join(" ") || "default (coherent)", async () => {
        await Deno.remove(w.pidfile).catch(() => {});
        const f = await fuse(w, mode);
        const first = await must("dd", [
          `if=${w.mnt}/nbd`,
          "bs=4K",
          "count=1",
          "status=none",
        ]);
        // Behind the mount's back: the server's file changes.
        const marker = `changed ${mode.join("")} ${crypto.randomUUID()}`;
        const image = await Deno.open(w.image, { write: true });
        try {
          await image.write(new TextEncoder().encode(marker));
        } finally {
          image.close();
        }
        const again = await must("dd", [
          `if=${w.mnt}/nbd`,
          "bs=4K",
          "count=1",
          "status=none",
        ]);
        if (mode[0] === "--kernel-cache") {
          // Kept across opens, the cache may still hold the first bytes;
          // or not, if anything dropped caches meanwhile: either is right.
          assert.equal(first.length, 4096);
          assert.equal(again.length, 4096);
        } else {
          assert.ok(again.startsWith(marker), again.slice(0, 60));
        }
        await unmountAndExit(w, f);
      });
    }
  });
});
