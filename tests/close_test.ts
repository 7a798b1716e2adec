/**
 * `close()`: the drain before `NBD_CMD_DISC` (against a real nbdkit, which
 * 1.32 needs), and a signal that bounds the whole close even when the
 * server stops reading.
 */

import assert from "node:assert/strict";
import { connect } from "../lib/connect.ts";
import type { NbdClient } from "../lib/client.ts";
import { NbdConnectionClosedError } from "../lib/errors.ts";
import { writeAll } from "./support/io.ts";
import { oldstyleGreeting } from "./support/server.ts";
import { nbdkit, tempDir } from "./support/servers.ts";
import { within } from "./support/wait.ts";

const MiB = 1024 * 1024;

/**
 * Runs `body` with a client of a server that negotiates (oldstyle: the
 * server only speaks) and then never reads, and with the server's end.
 */
async function stalledServer(
  body: (nbd: NbdClient, server: Deno.Conn) => Promise<void>,
): Promise<void> {
  const dir = await tempDir();
  const path = `${dir}/stalled.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const accepted = listener.accept().then(async (conn) => {
    await writeAll(conn, oldstyleGreeting(256 * MiB, 1));
    return conn;
  });
  let server: Deno.Conn | undefined;
  try {
    const nbd = await connect({ path, connectTimeout: 5000 });
    server = await accepted;
    await body(nbd, server);
  } finally {
    server?.close();
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("close({ signal }) bounds the whole close when the server stops reading", async () => {
  await stalledServer(async (nbd, server) => {
    // Fill the socket: these writes can never finish, and their callers
    // give up; NBD_CMD_DISC queues behind them.
    const gaveUp = new AbortController();
    const writes = Array.from(
      { length: 8 },
      (_, i) =>
        nbd.write(i * 4 * MiB, new Uint8Array(4 * MiB), {
          signal: gaveUp.signal,
        }).catch((e) => e),
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    gaveUp.abort();
    for (const e of await Promise.all(writes)) {
      assert.equal((e as Error).name, "AbortError");
    }
    const started = Date.now();
    await within(
      3000,
      "close({ signal })",
      nbd.close({ signal: AbortSignal.timeout(300) }),
    );
    assert.ok(Date.now() - started < 2000, `${Date.now() - started} ms`);
    assert.equal(nbd.state, "closed");
    await assert.rejects(nbd.read(0, 512), NbdConnectionClosedError);
    // The socket was torn down: the server reads what was sent, then EOF.
    const drained = (async () => {
      const buf = new Uint8Array(MiB);
      try {
        while (await server.read(buf) !== null) { /* discard */ }
      } catch {
        // A reset is an end too.
      }
    })();
    await within(3000, "EOF at the server", drained);
  });
});

Deno.test("close() with no signal is bounded too when the server stops reading", async () => {
  await stalledServer(async (nbd) => {
    const gaveUp = AbortSignal.timeout(200);
    const writes = Array.from(
      { length: 8 },
      (_, i) =>
        nbd.write(i * 4 * MiB, new Uint8Array(4 * MiB), { signal: gaveUp })
          .catch(() => {}),
    );
    await Promise.all(writes);
    // The drain (2 s) and the goodbye (2 s) each give up, then the socket
    // is torn down.
    await within(8000, "close()", nbd.close());
    assert.equal(nbd.state, "closed");
  });
});

Deno.test({
  name:
    "close() drains replies owed to aborted reads before NBD_CMD_DISC (nbdkit stays up)",
  async fn() {
    const server = await nbdkit([
      "--filter=delay",
      "memory",
      "16M",
      "rdelay=100ms",
    ]);
    try {
      for (let cycle = 0; cycle < 20; cycle++) {
        const nbd = await connect(server.target(), { connectTimeout: 5000 });
        const gaveUp = new AbortController();
        const reads = Array.from(
          { length: 16 },
          (_, i) =>
            nbd.read(i * 4096, 4096, { signal: gaveUp.signal }).then(
              () => "read",
              (e: Error) => e.name,
            ),
        );
        // Every read reaches nbdkit, then every caller gives up.
        await new Promise((resolve) => setTimeout(resolve, 20));
        gaveUp.abort();
        assert.deepEqual(
          new Set(await Promise.all(reads)),
          new Set(["AbortError"]),
        );
        await within(5000, `close() in cycle ${cycle}`, nbd.close());
      }
      // nbdkit is still there once every delayed reply is due, and answers.
      await new Promise((resolve) => setTimeout(resolve, 1500));
      assert.equal(await server.waitForExit(0), false, await server.log());
      const nbd = await connect(server.target(), { connectTimeout: 5000 });
      try {
        assert.equal((await nbd.read(0, 512)).length, 512);
      } finally {
        await nbd.close();
      }
      const log = await server.log();
      assert.doesNotMatch(log, /assert/i);
      // nbdkit says so when a connection ends while it still owes replies.
      assert.doesNotMatch(log, /aborting sleep because of connection close/);
    } finally {
      await server.stop();
    }
  },
});

Deno.test("close() lets no request still waiting for a slot go out", async () => {
  const server = await nbdkit([
    "--filter=delay",
    "memory",
    "1M",
    "rdelay=200ms",
  ]);
  try {
    const sent: unknown[] = [];
    const nbd = await connect(server.target(), {
      maxInFlight: 1,
      debug: (event, fields) => {
        if (event === "send command") sent.push(fields.command);
      },
    });
    const first = nbd.read(0, 4096);
    const queued = nbd.read(4096, 4096).then(() => undefined, (e) => e);
    const closing = nbd.close();
    assert.equal((await first).length, 4096);
    const e = await queued;
    assert.ok(e instanceof NbdConnectionClosedError, String(e));
    assert.match(
      e.message,
      /^Cannot send NBD_CMD_READ: the connection is closing/,
    );
    await within(5000, "close()", closing);
    assert.deepEqual(sent, ["NBD_CMD_READ", "NBD_CMD_DISC"]);
  } finally {
    await server.stop();
  }
});
