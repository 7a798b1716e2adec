import assert from "node:assert/strict";
import { have, nbdkit, runTool } from "./_servers.ts";

const ROOT = new URL("../../", import.meta.url).pathname;

Deno.test({
  name: "nbd dispatches to info and copy",
  ignore: !have("nbdkit"),
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

// `deno compile` needs the denort runtime: from its download site, or from
// DENORT_BIN. Machines without either skip this test.
Deno.test({
  name: "the compiled dist/nbd runs info against nbdkit",
  ignore: !have("nbdkit") || !Deno.env.get("DENORT_BIN"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-compile-" });
    const server = await nbdkit(["memory", "1M"], dir);
    try {
      const out = `${dir}/nbd`;
      const build = await new Deno.Command(Deno.execPath(), {
        args: [
          "compile",
          "--quiet",
          "--allow-net",
          "--allow-read",
          "--allow-write",
          "--allow-ffi",
          "--output",
          out,
          `${ROOT}examples/nbd.ts`,
        ],
        stdout: "null",
        stderr: "piped",
        signal: AbortSignal.timeout(120_000),
      }).output();
      assert.ok(build.success, new TextDecoder().decode(build.stderr));
      const run = await new Deno.Command(out, {
        args: ["info", "--json", server.uri()],
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(30_000),
      }).output();
      assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
      const doc = JSON.parse(new TextDecoder().decode(run.stdout));
      assert.equal(doc.exports[0]["export-size"], 1048576);
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
