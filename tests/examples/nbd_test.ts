import assert from "node:assert/strict";
import { nbdkit } from "../support/servers.ts";
import { runTool } from "./_tools.ts";

Deno.test("nbd dispatches to info, copy and dump", async (t) => {
  const server = await nbdkit(["pattern", "1M"]);
  try {
    await t.step("info", async () => {
      const size = await runTool("nbd", ["info", "--size", server.uri()]);
      assert.equal(size.code, 0, size.stderr);
      assert.equal(size.text, "1048576\n");
    });
    await t.step("copy", async () => {
      const copy = await runTool("nbd", ["copy", server.uri(), "null:"]);
      assert.equal(copy.code, 0, copy.stderr);
    });
  } finally {
    await server.stop();
  }
  await t.step("dump: the same bytes as examples/dump.ts", async () => {
    // Each run starts (and stops) its own server: nothing to clean up here.
    const args = ["-o", "4000", "--", "[", "nbdkit", "-s", "pattern"];
    args.push("size=4096", "]");
    const viaNbd = await runTool("nbd", ["dump", ...args]);
    const direct = await runTool("dump", args);
    assert.equal(direct.code, 0, direct.stderr);
    assert.equal(viaNbd.code, 0, viaNbd.stderr);
    assert.equal(viaNbd.stderr, "");
    // The pattern is each 8-byte offset, big-endian: 4000 is 0xfa0.
    const first =
      "0000000fa0: 00 00 00 00 00 00 0f a0  00 00 00 00 00 00 0f a8 ";
    assert.ok(viaNbd.text.startsWith(first), viaNbd.text);
    assert.deepEqual(viaNbd.stdout, direct.stdout);
  });
  await t.step("dump: a usage error names dump", async () => {
    const bad = await runTool("nbd", ["dump", "--frobnicate"]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^dump: /);
  });
});

Deno.test("nbd rejects a missing or unknown command", async () => {
  const none = await runTool("nbd", []);
  assert.equal(none.code, 1);
  assert.match(none.stderr, /^nbd: a command is required\n/);
  const bad = await runTool("nbd", ["frobnicate"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^nbd: unknown command "frobnicate"\n/);
  assert.match(bad.stderr, /info/);
  const help = await runTool("nbd", ["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.text, /copy/);
  assert.ok(help.text.includes("\n  dump     hexdump an export"), help.text);
});
