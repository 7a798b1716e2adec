/**
 * `dump` against `nbddump` 1.22 (the Debian 13 root): byte for byte on
 * several exports and ranges, in colour and without, and for a server run
 * as `[ CMD ]`; the two places nbddump is plainly wrong are spelt out.
 *
 * @module
 */

import assert from "node:assert/strict";
import { formatLine, HexDumper, parseU64 } from "../../examples/dump.ts";
import { UsageError } from "../../examples/_cli.ts";
import {
  nbdkit,
  qemuNbd,
  run,
  runBytes,
  type Server,
  tempDir,
} from "../support/servers.ts";
import { runTool } from "./_tools.ts";

const dec = new TextDecoder();

/** nbddump 1.22's stdout for `args` and a URI. */
async function nbddump(args: string[], uri: string): Promise<string> {
  return dec.decode(await runBytes("nbddump", [...args, uri], "trixie"));
}

/** Ours, which must succeed. */
async function ours(args: string[], uri: string): Promise<string> {
  const r = await runTool("dump", [...args, uri]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, "");
  return r.text;
}

interface Fixture {
  name: string;
  start(dir: string): Promise<Server>;
  /**
   * Argument sets on which nbddump is right, so the two must agree: a range
   * that starts at 0 or on a line unlike zeroes, and ends at the export's
   * end or on a line unlike the one before (see the next test for why).
   */
  ranges: string[][];
}

/** Every byte value, so every class of character shows. */
function allBytes(): Uint8Array {
  const out = new Uint8Array(4096 + 777);
  for (let i = 0; i < 256; i++) out[i] = i;
  for (let i = 256; i < 512; i++) out[i] = 255 - (i - 256);
  out.fill(0x41, 2048, 2048 + 100);
  for (let i = 4096; i < out.length; i++) out[i] = (i * 13) & 0xff;
  return out;
}

const FIXTURES: Fixture[] = [
  {
    name: "nbdkit data: text in zeroes",
    start: (dir) =>
      nbdkit([
        "data",
        '@0x1000 "hello, world!" @0x2345 1 2 3 "xyz~ \t" @0x3000',
      ], { dir }),
    ranges: [
      [],
      ["--color"],
      ["--no-color"],
      ["-o", "4101", "-n", "5"],
      ["--offset=4096", "--length=32"],
      ["--skip=9029", "--limit=28"],
      ["-o", "12287"],
      ["-o", "12288"],
      ["-n", "16"],
      ["--color", "-o", "4096"],
    ],
  },
  {
    name: "a file of every byte value, odd size",
    start: async (dir) => {
      const path = `${dir}/bytes.img`;
      await Deno.writeFile(path, allBytes());
      return nbdkit(["file", path], { dir });
    },
    ranges: [
      [],
      ["--color"],
      ["-o", "255", "-n", "200"],
      ["-o", "4096", "--color"],
      ["-n", "4000000"],
    ],
  },
  {
    name: "nbdkit pattern: no line repeats",
    start: (dir) => nbdkit(["pattern", "100005"], { dir }),
    ranges: [[], ["-o", "7", "-n", "1000"], ["-o", "99990"], [
      "--color",
      "-n",
      "200",
    ]],
  },
  {
    name: "qemu-nbd: a qcow2 with holes and a zeroed range",
    start: async (dir) => {
      const image = `${dir}/disk.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", image, "3M"]);
      await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 64k 64k",
        "-c",
        "write -z 80k 4k",
        "-c",
        "write -P 0x61 2M 5",
        image,
      ]);
      return qemuNbd(["-r", "-f", "qcow2", image], { dir });
    },
    ranges: [[], ["--color"], ["-o", "65536", "-n", "20496"]],
  },
];

Deno.test("dump equals nbddump 1.22", async (t) => {
  for (const fixture of FIXTURES) {
    const dir = await tempDir("trixie");
    const server = await fixture.start(dir);
    try {
      for (const args of fixture.ranges) {
        await t.step(
          `${fixture.name}: ${args.join(" ") || "(all)"}`,
          async () => {
            const want = await nbddump(args, server.uri());
            assert.equal(await ours(args, server.uri()), want);
          },
        );
      }
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("dump of a [ CMD ] equals nbddump 1.22's", async () => {
  const cmd = ["[", "nbdkit", "data", '@0x20 "[ CMD ]" @0x100', "]"];
  const want = dec.decode(
    await runBytes("nbddump", ["--", ...cmd], "trixie"),
  );
  assert.match(want, /\[ CMD \]/);
  const r = await runTool("dump", ["--", ...cmd]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.text, want);
});

Deno.test("dump differs from nbddump 1.22 where nbddump is plainly wrong", async (t) => {
  const dir = await tempDir("trixie");
  const server = await nbdkit(["data", "@0x2345 1 2 3 @0x3000"], { dir });
  try {
    await t.step(
      "--offset: nbddump starts with a '*' that follows nothing",
      async () => {
        // nbddump only exempts offset 0 from collapsing, so a dump that
        // starts in zeroes opens with '*', never saying where it starts.
        assert.equal(
          await nbddump(["-o", "1", "-n", "100"], server.uri()),
          "*\n",
        );
        assert.equal(
          await ours(["-o", "1", "-n", "100"], server.uri()),
          "0000000001: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n" +
            "*\n" +
            "0000000061: 00 00 00 00                                      |....            |\n",
        );
      },
    );
    await t.step(
      "--length: nbddump collapses the range's last line, even a short one",
      async () => {
        // nbddump exempts only the export's last line, so a shorter range
        // ends in '*' and hides its own end (here a 1-byte line).
        const head =
          "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n";
        assert.equal(await nbddump(["-n", "17"], server.uri()), `${head}*\n`);
        assert.equal(
          await ours(["-n", "17"], server.uri()),
          `${head}0000000010: 00                                               |.               |\n`,
        );
      },
    );
    await t.step("an offset past the end is an error", async () => {
      const r = await runTool("dump", ["-o", "99999", server.uri()]);
      assert.equal(r.code, 1);
      assert.equal(r.text, "");
      assert.match(
        r.stderr,
        /^dump: offset 99999 is past the end of the export \(12288 bytes\)\n$/,
      );
    });
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("dump reads no hole: zero extents come from block status", async () => {
  const dir = await tempDir();
  const stats = `${dir}/stats.txt`;
  // 1 GiB of which 4 KiB is data; nbdkit's stats filter counts what is read.
  const server = await nbdkit([
    "--filter=stats",
    "data",
    "@536870912 1 2 3 4 @1073741824",
    `statsfile=${stats}`,
  ], { dir });
  let out: string;
  try {
    out = await ours([], server.uri());
  } finally {
    await server.stop();
  }
  try {
    assert.equal(
      out,
      "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n" +
        "*\n" +
        "0020000000: 01 02 03 04 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n" +
        "0020000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n" +
        "*\n" +
        "003ffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n",
    );
    const text = await Deno.readTextFile(stats);
    const m = /^read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)/m
      .exec(text);
    assert.ok(m, text);
    const unit = { bytes: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 };
    const read = Number(m[1]) * unit[m[2] as keyof typeof unit];
    assert.ok(read <= 4 * 1024 * 1024, `read ${read} bytes of 1 GiB: ${text}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("HexDumper and parseU64()", async (t) => {
  await t.step("a zero run's lines are skipped, not visited", () => {
    const d = new HexDumper(0, 2 ** 50, false);
    const text = d.zeroes(2 ** 50 - 16) + d.data(new Uint8Array(16).fill(1)) +
      d.finish();
    assert.equal(
      text,
      formatLine(0, new Uint8Array(16), 16, false) + "*\n" +
        formatLine(2 ** 50 - 16, new Uint8Array(16).fill(1), 16, false),
    );
  });
  await t.step("pieces split inside lines give the same text", () => {
    const bytes = new Uint8Array(1000).map((
      _,
      i,
    ) => (i % 7 === 0 ? 0 : i & 0xff));
    const whole = new HexDumper(3, 1003, true);
    const a = whole.data(bytes) + whole.finish();
    const split = new HexDumper(3, 1003, true);
    let b = "";
    for (let o = 0; o < 1000; o += 37) {
      b += split.data(bytes.subarray(o, o + 37));
    }
    assert.equal(a, b + split.finish());
  });
  await t.step("numbers as sscanf reads them", () => {
    assert.equal(parseU64("4096", "length"), 4096n);
    assert.equal(parseU64(" 7", "length"), 7n);
    assert.equal(parseU64("+3", "length"), 3n);
    assert.equal(parseU64("5x", "length"), 5n);
    assert.equal(parseU64("0x1000", "offset"), 0n);
    assert.equal(parseU64("-1", "length"), (1n << 64n) - 1n);
    assert.equal(parseU64("99999999999999999999", "length"), (1n << 64n) - 1n);
    assert.throws(
      () => parseU64("abc", "length"),
      (e) =>
        e instanceof UsageError &&
        e.message === "could not parse --length option: abc",
    );
  });
});

Deno.test("dump whose reader goes away ends quietly with 141, as nbddump", async () => {
  const script = new URL("../../examples/dump.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--quiet",
      script,
      "[",
      "nbdkit",
      "-s",
      "pattern",
      "64M",
      "]",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).spawn();
  const reader = child.stdout.getReader();
  const first = await reader.read();
  assert.ok(first.value && first.value.length > 0);
  await reader.cancel();
  const status = await child.status;
  const stderr = new TextDecoder().decode(
    new Uint8Array(await new Response(child.stderr).arrayBuffer()),
  );
  assert.equal(status.code, 141);
  assert.equal(stderr, "");
});
