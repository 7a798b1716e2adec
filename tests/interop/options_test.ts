/**
 * Option haggling against real servers that say no: listing refused by
 * policy, metadata contexts the server does not have, export names the
 * server canonicalises. Refusals must reach the caller as
 * `NbdOptionError`s that carry the option, the reply and the server's text.
 */

import assert from "node:assert/strict";
import { connect, listExports, NbdOptionError, probe } from "../../mod.ts";
import { rejectsBeforeTraffic, Trace } from "./_support.ts";
import {
  nbdkit,
  nbdServer,
  qemuNbd,
  run,
  type Server,
  sparseFile,
  tempDir,
} from "../support/servers.ts";

const MiB = 1024 * 1024;
const OPT_LIST = 3;

/** Checks a refused NBD_OPT_LIST: class, option, reply and server text. */
function refusedList(replyName: string, text: RegExp) {
  return (e: unknown): true => {
    assert.ok(e instanceof NbdOptionError, `got ${e}`);
    assert.equal(e.option, OPT_LIST);
    assert.equal(e.replyName, replyName);
    assert.match(e.serverMessage, text);
    assert.match(e.message, /NBD_OPT_LIST/);
    assert.ok(e.message.includes(replyName), e.message);
    return true;
  };
}

Deno.test({
  name: "options: listExports() refused by the server",
  async fn(t) {
    await t.step(
      "listExports() fails with NbdOptionError NBD_REP_ERR_POLICY when nbd-server disallows listing",
      async () => {
        const dir = await tempDir();
        let server: Server | undefined;
        try {
          await sparseFile(`${dir}/disk.img`, MiB);
          server = await nbdServer(
            { disk: { exportname: `${dir}/disk.img` } },
            { dir },
            { allowlist: false },
          );
          // A refusal is not "unsupported": the caller gets the reply type
          // and nbd-server's text, as listExports() documents.
          await assert.rejects(
            () => listExports(server!.target()),
            refusedList("NBD_REP_ERR_POLICY", /./),
          );
          // Listing is refused; the export itself is not.
          await using client = await connect(server.target("disk"));
          assert.equal(client.size, MiB);
        } finally {
          await server?.stop();
          await Deno.remove(dir, { recursive: true }).catch(() => {});
        }
      },
    );

    await t.step(
      "listExports() fails with NbdOptionError when nbdkit's exportname filter refuses",
      async () => {
        let server: Server | undefined;
        try {
          server = await nbdkit([
            "--filter=exportname",
            "memory",
            String(MiB),
            "exportname-list=error",
          ]);
          await assert.rejects(
            () => listExports(server!.target()),
            refusedList("NBD_REP_ERR_PLATFORM", /.*/),
          );
        } finally {
          await server?.stop();
        }
      },
    );

    await t.step(
      "listExports() returns [] when the server lists nothing",
      async () => {
        let server: Server | undefined;
        try {
          server = await nbdkit([
            "--filter=exportname",
            "memory",
            String(MiB),
            "exportname-list=empty",
          ]);
          assert.deepEqual(await listExports(server.target()), []);
        } finally {
          await server?.stop();
        }
      },
    );
  },
});

Deno.test({
  name:
    "options: the server's canonical export name (nbdkit exportname filter)",
  async fn(t) {
    const dir = await tempDir();
    let server: Server | undefined;
    try {
      await Deno.mkdir(`${dir}/exports`);
      await sparseFile(`${dir}/exports/disk`, MiB);
      server = await nbdkit([
        "--filter=exportname",
        "file",
        `dir=${dir}/exports`,
        "default-export=disk",
        "exportname-list=defaultonly",
      ], { dir });

      await t.step(
        "connect() to the default export reports the name the server gave it",
        async () => {
          await using client = await connect(server!.target(""));
          assert.equal(client.exportName, "disk");
          assert.equal(client.size, MiB);
        },
      );

      await t.step("probe() reports the same canonical name", async () => {
        assert.equal((await probe(server!.target(""))).exportName, "disk");
      });

      await t.step("listExports() lists it by that name", async () => {
        assert.deepEqual(
          (await listExports(server!.target())).map((e) => e.name),
          ["disk"],
        );
      });
    } finally {
      await server?.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "options: metadata contexts the server does not have (qemu-nbd)",
  async fn(t) {
    const dir = await tempDir();
    let server: Server | undefined;
    try {
      const img = `${dir}/disk.qcow2`;
      await run("qemu-img", ["create", "-q", "-f", "qcow2", img, "1M"]);
      server = await qemuNbd(["-f", "qcow2", img], { dir });

      await t.step(
        "connect() keeps the contexts the server knows and drops the rest",
        async () => {
          await using client = await connect(server!.target(), {
            metaContexts: [
              "qemu:dirty-bitmap:nosuch",
              "base:allocation",
              "example:nothing",
            ],
          });
          assert.deepEqual(client.metaContexts, ["base:allocation"]);
          const map = await client.blockStatus(0, MiB);
          assert.deepEqual(Object.keys(map), ["base:allocation"]);
        },
      );

      await t.step(
        "with none of them known, blockStatus() fails before traffic",
        async () => {
          const trace = new Trace();
          await using client = await connect(server!.target(), {
            metaContexts: ["example:nothing"],
            debug: trace.hook,
          });
          assert.deepEqual(client.metaContexts, []);
          assert.equal(client.canBlockStatus, false);
          await rejectsBeforeTraffic(
            trace,
            () => client.blockStatus(0, MiB),
            "blockStatus",
            /no metadata context was negotiated/,
          );
        },
      );

      await t.step(
        "probe() lists what the server offers, without the unknown ones",
        async () => {
          const p = await probe(server!.target());
          assert.ok(p.metaContexts.includes("base:allocation"));
          assert.ok(!p.metaContexts.includes("example:nothing"));
        },
      );
    } finally {
      await server?.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
