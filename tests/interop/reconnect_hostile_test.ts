/**
 * What a hostile review of reconnecting found, each kept as a test: a
 * server that hangs up after every handshake (no storm, the timeout ends
 * it), a server back without TLS (refused, nothing sent in clear), an
 * aborted request held for a reconnect (dropped, never replayed), a debug
 * hook that throws (the connections go on), a connection given up for good
 * (no longer counted), a server that breaks the protocol (not dialled
 * again: the client fails, nothing waits for a connection forever).
 */

import assert from "node:assert/strict";
import {
  connect,
  NbdConnectionClosedError,
  NbdExportChangedError,
  NbdProtocolError,
} from "../../mod.ts";
import { makeTestPki } from "../support/certs.ts";
import { nbdkitOn, restartable } from "../support/restartable.ts";
import { Builder, startTestServer } from "../support/server.ts";
import { until, within } from "../support/wait.ts";

const OPT_GO = 7;
const SANE = { sanitizeOps: true, sanitizeResources: true };

Deno.test({
  name:
    "reconnect: a server that hangs up after every handshake gets a backoff and the timeout ends it",
  ...SANE,
  fn: async () => {
    await using server = await startTestServer({
      maxConnections: 100_000,
      onOption: (opt, ctx) =>
        opt.option === OPT_GO ? [...ctx.defaultReply(), "drop"] : undefined,
    });
    const nbd = await connect(server.uri, {
      reconnect: { timeout: 1000, delay: 50 },
    });
    try {
      await until("the client to give up", () => nbd.state === "failed", 5000);
      assert.ok(
        server.log.length < 60,
        `${server.log.length} connections before giving up`,
      );
      await assert.rejects(nbd.read(0, 512), NbdConnectionClosedError);
    } finally {
      await nbd.close();
    }
  },
});

for (const tls of [undefined, "prefer"] as const) {
  Deno.test({
    name: `reconnect: a server back without TLS is refused (tls ${
      tls ?? "unset"
    }), nothing sent in clear`,
    ...SANE,
    fn: async () => {
      await using pki = await makeTestPki();
      await using server = await restartable("nbdkit", (s) =>
        nbdkitOn(s, [
          "--tls=require",
          `--tls-certificates=${pki.serverDir}`,
          "memory",
          "1M",
        ]));
      await server.start();
      const nbd = await connect({ path: server.socket }, {
        ...(tls ? { tls } : {}),
        tlsCertificates: pki.clientDir,
        tlsHostname: "localhost",
        reconnect: { timeout: 3000 },
      });
      try {
        assert.equal(nbd.tls, true);
        await server.kill("SIGKILL");
        const write = nbd.write(0, new Uint8Array(512).fill(0x53)).then(
          () => "written",
          (e: unknown) => e,
        );
        await server.start(nbdkitOn(server.socket, [
          "--filter=log",
          "memory",
          "1M",
          `logfile=${server.dir}/clear.log`,
        ]));
        const outcome = await within(10_000, "the held write", write);
        assert.ok(
          outcome instanceof NbdConnectionClosedError,
          `the write went out: ${outcome}`,
        );
        const log = await Deno.readTextFile(`${server.dir}/clear.log`)
          .catch(() => "");
        assert.doesNotMatch(log, / Write /, "a write reached the clear server");
      } finally {
        await nbd.close();
      }
    },
  });
}

Deno.test({
  name:
    "reconnect: an aborted request held for a reconnect is dropped, never replayed",
  ...SANE,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "nbd-held-" });
    try {
      const path = `${dir}/disk.img`;
      await Deno.writeFile(path, new Uint8Array(1 << 20));
      await using server = await restartable(
        "nbdkit",
        (s) => nbdkitOn(s, ["file", `file=${path}`]),
        dir,
      );
      await server.start();
      const nbd = await connect({ path: server.socket }, {
        reconnect: { timeout: 10_000 },
      });
      try {
        await server.kill("SIGKILL");
        await assert.rejects(
          nbd.write(0, new Uint8Array(4096).fill(0xaa), {
            signal: AbortSignal.timeout(100),
          }),
          (e: unknown) => e instanceof DOMException,
        );
        await server.start();
        await within(10_000, "a read after the restart", nbd.read(8192, 512));
        assert.equal(
          (await Deno.readFile(path))[0],
          0,
          "the aborted write landed",
        );
      } finally {
        await nbd.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "reconnect: a debug hook that throws breaks nothing",
  ...SANE,
  fn: async () => {
    await using server = await restartable(
      "nbdkit",
      (s) => nbdkitOn(s, ["memory", "1M"]),
    );
    await server.start();
    const nbd = await connect({ path: server.socket }, {
      reconnect: { timeout: 10_000 },
      debug: (event) => {
        if (event === "connection lost" || event === "reconnected") {
          throw new Error(`the hook fails on ${event}`);
        }
      },
    });
    try {
      await server.kill("SIGKILL");
      await server.start();
      await within(10_000, "a read after the restart", nbd.read(0, 512));
      assert.equal(nbd.reconnects, 1);
    } finally {
      await nbd.close();
    }
  },
});

Deno.test({
  name: "connections: one given up for good is no longer counted",
  ...SANE,
  fn: async () => {
    await using server = await restartable(
      "nbdkit",
      (s) => nbdkitOn(s, ["memory", "1M"]),
    );
    await server.start();
    const nbd = await connect({ path: server.socket }, {
      connections: 2,
      reconnect: { timeout: 500 },
    });
    try {
      assert.equal(nbd.connections, 2);
      await server.kill("SIGKILL");
      await until("both to be given up", () => nbd.state === "failed", 5000);
      assert.equal(nbd.connections, 0);
    } finally {
      await nbd.close();
    }
  },
});

for (
  const [when, connections] of [
    ["with requests in flight", 1],
    ["with requests in flight, on one of two connections", 2],
    ["while idle", 1],
  ] as const
) {
  Deno.test({
    name:
      `reconnect: a server that breaks the protocol ${when} fails the client, no request waits forever`,
    ...SANE,
    fn: async () => {
      const idle = when === "while idle";
      // A reply header with a magic no reply has: a violation, not a loss.
      const garbage = (cookie: bigint) =>
        new Builder().u32(0xdeadbeef).u32(0).u64(cookie).u64(0).u64(0).done();
      await using server = await startTestServer({
        onCommand: (req, ctx) => {
          if (ctx.state.log.id !== 0 || req.index !== (idle ? 0 : 1)) {
            return undefined;
          }
          // Idle: the read is answered, then garbage follows unasked.
          return idle
            ? ctx.defaultReply().then((r) => [...r, garbage(99n)])
            : [garbage(req.cookie)];
        },
      });
      const nbd = await connect(server.uri, {
        connections,
        reconnect: { timeout: 10_000, delay: 10 },
      });
      try {
        if (idle) {
          await within(5_000, "the first read", nbd.read(0, 512));
        } else {
          const reads = await within(
            5_000,
            "reads",
            Promise.allSettled(
              Array.from({ length: 6 }, (_, i) => nbd.read(i * 512, 512)),
            ),
          );
          assert.ok(
            reads.some((r) =>
              r.status === "rejected" && r.reason instanceof NbdProtocolError
            ),
            "a read got the garbage",
          );
        }
        // Neither up nor given up, it was "reconnecting" for good.
        await until("the client to fail", () => nbd.state === "failed");
        const later = await within(
          5_000,
          "a read after the violation",
          nbd.read(0, 512).then(() => undefined, (e: unknown) => e),
        );
        assert.ok(later instanceof NbdConnectionClosedError, String(later));
        assert.match(later.message, /Bad reply magic 0xdeadbeef/);
        assert.equal(nbd.reconnects, 0);
        assert.equal(server.log.length, connections, "no connection again");
      } finally {
        await within(5_000, "close()", nbd.close());
      }
    },
  });
}

Deno.test("exportChanges() counts losing TLS as another export", async () => {
  const { exportChanges } = await import("../../lib/reconnect.ts");
  const info = {
    exportName: "",
    description: "",
    size: 1n,
    flags: 1,
    blockSize: { minimum: 1, preferred: 4096, maximum: 0xffffffff },
    blockSizeAdvertised: false,
    protocol: "fixed newstyle" as const,
    structuredReplies: true,
    extendedHeaders: false,
    tls: true,
    metaContexts: new Map<number, string>(),
  };
  assert.deepEqual(exportChanges(info, { ...info, tls: false }), [
    "TLS is no longer in use",
  ]);
  assert.ok(NbdExportChangedError);
});
