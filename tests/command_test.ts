/**
 * Servers run as the client's own subprocess (`connect({ command })`), over
 * pipes and on a private socket, and the counters of `nbd.stats`. Every
 * server gets a unique export name, so the check that none outlives its
 * client looks for exactly that process.
 */

import assert from "node:assert/strict";
import {
  connect,
  listExports,
  NbdConnectionClosedError,
  NbdError,
  probe,
  probeExports,
} from "../mod.ts";
import { until } from "./support/wait.ts";

/** Whether a process whose command line holds `marker` still runs. */
async function running(marker: string): Promise<boolean> {
  for await (const entry of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const line = await Deno.readTextFile(`/proc/${entry.name}/cmdline`);
      const stat = await Deno.readTextFile(`/proc/${entry.name}/stat`);
      if (line.includes(marker) && !/^\d+ \(.*\) Z/.test(stat)) return true;
    } catch {
      // Gone while we looked.
    }
  }
  return false;
}

function marker(): string {
  return `nbd-test-${crypto.randomUUID()}`;
}

Deno.test("connect({ command }) speaks NBD over a subprocess's stdin and stdout", async () => {
  const name = marker();
  const nbd = await connect({
    command: ["nbdkit", "-s", "--exit-with-parent", "-e", name, "memory", "1G"],
  });
  try {
    assert.equal(nbd.size, 1024 ** 3);
    await nbd.write(4096, new Uint8Array(8192).fill(7));
    assert.deepEqual(await nbd.read(4096, 8192), new Uint8Array(8192).fill(7));
    assert.ok(await running(name), "the server runs while the client is open");
  } finally {
    await nbd.close();
  }
  assert.equal(await running(name), false, "the server is gone after close");
});

Deno.test("connect({ command, socketActivation }) starts a server on a private socket", async (t) => {
  await t.step("qemu-nbd -r on a qcow2", async () => {
    const dir = await Deno.makeTempDir({ prefix: "nbd-command-" });
    try {
      const img = `${dir}/x.qcow2`;
      const made = await new Deno.Command("qemu-img", {
        args: ["create", "-q", "-f", "qcow2", img, "64M"],
      }).output();
      assert.ok(made.success);
      const name = marker();
      const nbd = await connect({
        command: ["qemu-nbd", "-r", "-f", "qcow2", "-x", name, img],
        socketActivation: true,
        exportName: name,
        metaContexts: ["base:allocation"],
      });
      try {
        assert.equal(nbd.size, 64 * 1024 * 1024);
        assert.equal(nbd.readOnly, true);
        assert.ok((await nbd.read(0, 65536)).every((b) => b === 0));
        const map = await nbd.blockStatus(0, nbd.size);
        assert.ok(map["base:allocation"]!.length >= 1);
      } finally {
        await nbd.close();
      }
      await until("qemu-nbd to exit", async () => !await running(name));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
  await t.step("nbdkit memory", async () => {
    const name = marker();
    const nbd = await connect({
      command: ["nbdkit", "-e", name, "memory", "1M"],
      socketActivation: true,
      exportName: name,
    });
    try {
      assert.equal(nbd.size, 1024 * 1024);
    } finally {
      await nbd.close();
    }
    assert.equal(await running(name), false);
  });
});

Deno.test("connect({ command }) says why a server did not start, and leaves nothing running", async (t) => {
  await t.step("its stderr is in the error", async () => {
    const name = marker();
    const e = await connect({
      command: ["nbdkit", "-s", "-e", name, "no-such-plugin-here"],
    }).then(() => assert.fail("connected"), (e: unknown) => e);
    assert.ok(e instanceof NbdConnectionClosedError, String(e));
    assert.match(e.message, /The server command nbdkit exited with status 1/);
    assert.match(e.message, /no-such-plugin-here/);
    assert.equal(await running(name), false);
  });
  await t.step("a program that does not exist", async () => {
    await assert.rejects(
      connect({ command: ["no-such-nbd-server-here"] }),
      (e: unknown) =>
        e instanceof NbdError &&
        /Cannot start the server command no-such-nbd-server-here/.test(
          e.message,
        ),
    );
  });
  await t.step(
    "a server that never speaks: the timeout names the command, not an address",
    async () => {
      for (const call of [connect, probe, probeExports, listExports]) {
        const name = marker();
        const e = await call({
          command: ["sh", "-c", "read never", name],
          connectTimeout: 300,
        }).then(() => assert.fail("connected"), (e: unknown) => e);
        assert.ok(e instanceof NbdError, String(e));
        assert.match(
          e.message,
          /Connecting to the server command sh and negotiating took longer than 300 ms/,
        );
        assert.doesNotMatch(e.message, /localhost/);
        assert.equal(await running(name), false);
      }
    },
  );
  await t.step("a socket server that exits before listening", async () => {
    const e = await connect({
      command: ["qemu-nbd", "-f", "qcow2", "/nonexistent/x.qcow2"],
      socketActivation: true,
    }).then(() => assert.fail("connected"), (e: unknown) => e);
    assert.ok(e instanceof NbdConnectionClosedError, String(e));
    assert.match(e.message, /qemu-nbd exited with status 1/);
    assert.match(e.message, /nonexistent/);
  });
});

Deno.test("connect({ command }) refuses what cannot go with it, before starting anything", async () => {
  await assert.rejects(connect({ command: [] }), TypeError);
  await assert.rejects(
    connect({ command: ["nbdkit", 1 as never] }),
    TypeError,
  );
  await assert.rejects(
    connect({ command: ["nbdkit", "-s"], path: "/x" }),
    /either command or where the server is/,
  );
  await assert.rejects(
    connect({ command: ["nbdkit", "-s"], reconnect: true }),
    /reconnect cannot be used with command/,
  );
  await assert.rejects(
    connect({ command: ["nbdkit", "-s"], connections: 2 }),
    TypeError,
  );
  await assert.rejects(connect({ socketActivation: true }), TypeError);
});

Deno.test("connect({ command, socketActivation }) names the servers it knows", async () => {
  await assert.rejects(
    connect({ command: ["nbd-server", "-C", "/x"], socketActivation: true }),
    (e: unknown) =>
      e instanceof TypeError &&
      /knows how to start nbdkit and qemu-nbd/.test(e.message),
  );
});

Deno.test("nbd.stats counts bytes, chunks and requests by command", async () => {
  const nbd = await connect({
    command: ["nbdkit", "-s", "--exit-with-parent", "memory", "1M"],
  });
  try {
    const before = nbd.stats;
    assert.ok(before.bytesSent > 0 && before.bytesReceived > 0, "handshake");
    assert.equal(before.chunksSent, 0);
    for (let i = 0; i < 3; i++) {
      await nbd.write(i * 4096, new Uint8Array(4096).fill(i));
    }
    await nbd.read(0, 65536);
    await nbd.flush();
    const s = nbd.stats;
    assert.deepEqual(s.requests, {
      NBD_CMD_WRITE: 3,
      NBD_CMD_READ: 1,
      NBD_CMD_FLUSH: 1,
    });
    assert.equal(s.chunksSent, 5);
    assert.ok(s.chunksReceived >= 5);
    assert.ok(s.bytesSent - before.bytesSent >= 3 * 4096 + 5 * 28);
    assert.ok(s.bytesReceived - before.bytesReceived >= 65536);
  } finally {
    await nbd.close();
  }
});

Deno.test("probe() and listExports() take a command too, and stop its server", async () => {
  const name = marker();
  const command = [
    "nbdkit",
    "-s",
    "--exit-with-parent",
    "-e",
    name,
    "memory",
    "1M",
  ];
  const p = await probe({ command });
  assert.equal(p.size, 1024 * 1024);
  assert.ok(p.metaContexts.includes("base:allocation"));
  const listed = await listExports({ command });
  assert.equal(listed.length, 1);
  await until("the servers to exit", async () => !await running(name));
});
