/**
 * `info` against a server that accepts and never speaks: ^C ends it at
 * once (status 130), and without ^C it waits one timeout, not one for the
 * probe and another for the fallback connect; `--list` of a server it
 * starts waits one timeout too.
 */

import assert from "node:assert/strict";
import { until, within } from "../support/wait.ts";
import { assertNoneLeft, cmd, marker } from "./_subprocess.ts";

const INFO = new URL("../../examples/info.ts", import.meta.url).pathname;

/** A Unix socket that accepts connections and says nothing. */
async function silentServer(): Promise<{
  uri: string;
  accepted: () => number;
  [Symbol.asyncDispose](): Promise<void>;
}> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-silent-" });
  const path = `${dir}/silent.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const conns: Deno.Conn[] = [];
  const accepting = (async () => {
    try {
      for await (const conn of listener) conns.push(conn);
    } catch {
      // Closed.
    }
  })();
  return {
    uri: `nbd+unix:///?socket=${path}`,
    accepted: () => conns.length,
    async [Symbol.asyncDispose]() {
      listener.close();
      await accepting;
      for (const c of conns) c.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

function spawnInfo(uri: string): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "-A", INFO, uri],
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(90_000),
  }).spawn();
}

Deno.test("info: one ^C while connecting ends it at once, status 130", async () => {
  await using server = await silentServer();
  const child = spawnInfo(server.uri);
  await until("info to connect", () => server.accepted() > 0, 20_000);
  const started = Date.now();
  child.kill("SIGINT");
  const out = await within(5000, "info after ^C", child.output());
  const stderr = new TextDecoder().decode(out.stderr);
  assert.ok(Date.now() - started < 3000, `${Date.now() - started} ms`);
  assert.equal(out.signal, null, "exited by itself, not killed");
  assert.equal(out.code, 130, stderr);
  assert.equal(stderr, "info: interrupted\n");
});

Deno.test("info: a server that never speaks costs one timeout, reported once", async () => {
  await using server = await silentServer();
  const started = Date.now();
  const out = await within(50_000, "info", spawnInfo(server.uri).output());
  const took = Date.now() - started;
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  assert.match(stderr, /^info: .*took longer than 30000 ms\n$/);
  assert.ok(took < 40_000, `${took} ms`);
  // The probe only: no fallback connection after the time ran out.
  assert.equal(server.accepted(), 1);
});

Deno.test("info --list [ CMD ]: a server command that never speaks costs one timeout, and is stopped", async () => {
  // sh reads the client's greeting-less silence from its stdin forever.
  const word = marker();
  const started = Date.now();
  const out = await within(
    50_000,
    "info --list",
    new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--quiet",
        "-A",
        INFO,
        "--list",
        ...cmd("sh", "-c", "read never", word),
      ],
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(90_000),
    }).output(),
  );
  const took = Date.now() - started;
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  assert.match(stderr, /^info: .*took longer than 30000 ms\n$/);
  assert.ok(took < 40_000, `${took} ms`);
  await assertNoneLeft(word, "info --list [ CMD ]");
});
