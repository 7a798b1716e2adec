/**
 * `dump -o` past 2^53 against `nbddump` 1.22 (the Debian 13 root): reads
 * at bigint offsets, their lines' offsets exact.
 *
 * @module
 */

import assert from "node:assert/strict";
import { formatLine } from "../../examples/dump.ts";
import {
  nbdkit,
  qemuNbd,
  runBytes,
  type Server,
  tempDir,
} from "../support/servers.ts";
import { runTool } from "./_tools.ts";

const dec = new TextDecoder();
const SIZE = 2n ** 62n;
const PAST = 2n ** 53n;

async function nbddump(args: string[], uri: string): Promise<string> {
  return dec.decode(await runBytes("nbddump", [...args, uri], "trixie"));
}

async function ours(args: string[], uri: string): Promise<string> {
  const r = await runTool("dump", [...args, uri]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, "");
  return r.text;
}

async function withServer(
  start: (dir: string) => Promise<Server>,
  body: (uri: string) => Promise<void>,
): Promise<void> {
  const dir = await tempDir("trixie");
  const server = await start(dir);
  try {
    await body(server.uri());
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

Deno.test("dump -o past 2^53 prints what nbddump 1.22 prints", async (t) => {
  await t.step(
    "nbdkit 1.42 pattern of 2^62 bytes: each word its own offset",
    async () => {
      await withServer(
        (dir) => nbdkit(["pattern", `size=${SIZE}`], { dir, peers: "trixie" }),
        async (uri) => {
          const ranges = [
            ["-o", String(PAST + 4096n), "-n", "64"],
            ["-o", String(PAST - 32n), "-n", "64"],
            ["-o", String(PAST + 8n), "-n", "37"],
            ["-o", String(SIZE - 64n)],
          ];
          for (const args of ranges) {
            const want = await nbddump(args, uri);
            assert.equal(await ours(args, uri), want, args.join(" "));
          }
          // The pattern is the offset itself: the last line says 2^62 - 16.
          const last = await ours(["-o", String(SIZE - 16n)], uri);
          assert.match(last, /^3ffffffffffffff0: 3f ff ff ff ff ff ff f0 /);
        },
      );
    },
  );
  await t.step(
    "qemu-nbd 10 null-co of 2^62 bytes (extended headers), to its end",
    async () => {
      await withServer(
        (dir) =>
          qemuNbd([
            "-r",
            "--image-opts",
            `driver=null-co,size=${SIZE},read-zeroes=on`,
          ], { dir, peers: "trixie" }),
        async (uri) => {
          const args = ["-o", String(SIZE - 64n)];
          // nbddump collapses a first line of zeroes into a "*" that
          // follows nothing; ours prints it (see examples/dump.ts).
          const first = formatLine(SIZE - 64n, new Uint8Array(16), 16, false);
          assert.equal(await ours(args, uri), first + await nbddump(args, uri));
        },
      );
    },
  );
});
