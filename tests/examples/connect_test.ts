import assert from "node:assert/strict";
import { runTool } from "./_tools.ts";

Deno.test("connect: a usage mistake is status 1, as for info and copy", async () => {
  for (
    const args of [[], ["-d", "/dev/nbd0", "extra"], ["--no-such-option"]]
  ) {
    const direct = await runTool("connect", args);
    assert.equal(direct.code, 1, `connect ${args.join(" ")}: ${direct.stderr}`);
    assert.match(direct.stderr, /^connect: /);
    const viaNbd = await runTool("nbd", ["connect", ...args]);
    assert.equal(viaNbd.code, 1, `nbd connect ${args.join(" ")}`);
  }
  const info = await runTool("info", []);
  assert.equal(info.code, 1);
});
