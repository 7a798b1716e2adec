/**
 * vsock without `--unstable-vsock`: Deno ends the process in `Deno.connect`
 * (status 70, past any `catch`), so `connect()` must refuse first, with a
 * typed error that names the flag. Each case runs in a child deno.
 */

import assert from "node:assert/strict";
import { output } from "./support/command.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;
const INFO = new URL("../examples/info.ts", import.meta.url).pathname;

const SCRIPT = `
import { connect, NbdUnsupportedError } from ${JSON.stringify(MOD)};
const [uri, trust] = Deno.args;
try {
  const nbd = await connect(uri, {
    connectTimeout: 2000,
    ...(trust === "trust" ? { unstableVsock: true } : {}),
  });
  await nbd.close();
  console.log("connected");
} catch (e) {
  console.log(JSON.stringify({
    typed: e instanceof NbdUnsupportedError,
    feature: e.feature,
    message: e.message,
  }));
}
console.log("still running");
`;

async function child(
  flags: string[],
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-vsock-test-" });
  try {
    const script = `${dir}/vsock.ts`;
    await Deno.writeTextFile(script, SCRIPT);
    const out = await output(
      Deno.execPath(),
      ["run", "--quiet", ...flags, script, ...args],
      { timeoutMs: 30_000 },
    );
    return { code: out.code, stdout: out.text, stderr: out.stderr };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("connect() over vsock without --unstable-vsock is a typed error, not the end of the process", async (t) => {
  for (
    const [label, flags] of [
      ["--allow-all (the command line is visible)", ["--allow-all"]],
      ["--allow-net only (it is not)", ["--allow-net", `--allow-read=${MOD}`]],
    ] as const
  ) {
    await t.step(label, async () => {
      const r = await child([...flags], ["nbd+vsock://2:10809/disk"]);
      assert.equal(r.code, 0, r.stderr);
      const lines = r.stdout.trim().split("\n");
      assert.equal(lines.at(-1), "still running");
      const e = JSON.parse(lines[0]!);
      assert.equal(e.typed, true, r.stdout);
      assert.equal(e.feature, "vsock");
      assert.match(e.message, /--unstable-vsock/);
    });
  }
  await t.step("with the flag, connect() goes ahead", async () => {
    const r = await child(
      ["--allow-all", "--unstable-vsock"],
      ["nbd+vsock://1:1/disk"],
    );
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /"feature":"vsock"/);
    assert.match(r.stdout, /still running/);
  });
  await t.step(
    "unstableVsock: true says the flag is set where it cannot be seen",
    async () => {
      const r = await child(
        ["--allow-net", `--allow-read=${MOD}`, "--unstable-vsock"],
        ["nbd+vsock://1:1/disk", "trust"],
      );
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stdout, /"feature":"vsock"/);
      assert.match(r.stdout, /still running/);
    },
  );
});

Deno.test("info nbd+vsock:/// without --unstable-vsock says so and exits 1", async () => {
  const { code, stderr } = await output(
    Deno.execPath(),
    ["run", "--quiet", "-A", INFO, "nbd+vsock:///"],
    { timeoutMs: 30_000 },
  );
  assert.equal(code, 1, stderr);
  assert.match(stderr, /^info: .*--unstable-vsock/);
  assert.equal(stderr.trim().split("\n").length, 1, stderr);
});
