import assert from "node:assert/strict";
import { nbdkit } from "../support/servers.ts";
import { runTool } from "./_tools.ts";

Deno.test({
  name: "nbd dispatches to info and copy",
  async fn() {
    const server = await nbdkit(["pattern", "1M"]);
    try {
      const size = await runTool("nbd", ["info", "--size", server.uri()]);
      assert.equal(size.code, 0, size.stderr);
      assert.equal(size.text, "1048576\n");
      const copy = await runTool("nbd", ["copy", server.uri(), "null:"]);
      assert.equal(copy.code, 0, copy.stderr);
    } finally {
      await server.stop();
    }
  },
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
});
