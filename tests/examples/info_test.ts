import assert from "node:assert/strict";
import { makeTestPki } from "../support/certs.ts";
import {
  nbdkit,
  qemuNbd,
  run,
  type Server,
  tempDir,
  TRIXIE_ROOT,
} from "../support/servers.ts";
import { runTool } from "./_tools.ts";

type Json = Record<string, unknown>;

/** nbdinfo's own answer, without probing content (tested on its own). */
async function nbdinfo(args: string[]): Promise<Json> {
  return JSON.parse(await run("nbdinfo", ["--no-content", "--json", ...args]));
}

/**
 * `info ARGS` succeeds and prints exactly what `nbdinfo ARGS` prints.
 *
 * @returns Our output, for further checks.
 */
async function printsAsNbdinfo(args: string[]): Promise<string> {
  const ours = await runTool("info", args);
  assert.equal(ours.code, 0, ours.stderr);
  assert.equal(ours.text, await run("nbdinfo", args));
  return ours.text;
}

/**
 * Every field nbdinfo printed must be in ours with the same value, but for
 * `skip` (and `content`, which depends on the file(1) each one finds;
 * tests/examples/info_more_test.ts compares it).
 */
function assertCovers(
  ours: Json,
  theirs: Json,
  where: string,
  skip: string[] = [],
): void {
  for (const [key, value] of Object.entries(theirs)) {
    if (key === "exports") continue;
    assert.deepEqual(ours[key], value, `${where}: field "${key}"`);
  }
  const a = (ours.exports ?? []) as Json[];
  const b = (theirs.exports ?? []) as Json[];
  assert.equal(a.length, b.length, `${where}: number of exports`);
  for (let i = 0; i < b.length; i++) {
    for (const [key, value] of Object.entries(b[i]!)) {
      if (key === "content" || skip.includes(key)) continue;
      assert.deepEqual(
        a[i]![key],
        value,
        `${where}: export ${i} field "${key}"`,
      );
    }
  }
}

/** nbdkit's arguments for "disk": 1 MiB in memory with block size limits. */
const LIMITED = [
  "-e",
  "disk",
  "--filter=blocksize-policy",
  "memory",
  "1M",
  "blocksize-minimum=512",
  "blocksize-preferred=4096",
  "blocksize-maximum=65536",
];

Deno.test({
  name: "info --json carries nbdinfo --json's fields and values",
  async fn(t) {
    const server = await nbdkit(LIMITED);
    try {
      const uri = server.uri("disk");
      await t.step("default mode", async () => {
        const ours = await runTool("info", ["--json", uri]);
        assert.equal(ours.code, 0, ours.stderr);
        const doc = JSON.parse(ours.text);
        assertCovers(doc, await nbdinfo([uri]), "info --json");
        const e = doc.exports[0];
        assert.equal(e["export-size-str"], "1M");
        assert.equal(e.block_size_minimum, 512);
        assert.equal(e.can_block_status_payload, false);
        assert.equal(typeof doc.extended, "boolean");
      });
      await t.step("--size matches nbdinfo --size", async () => {
        await printsAsNbdinfo(["--size", uri]);
      });
      await t.step("text mode names every flag and block size", async () => {
        const ours = await runTool("info", [uri]);
        assert.equal(ours.code, 0, ours.stderr);
        assert.match(
          ours.text,
          /^protocol: newstyle-fixed without TLS, using (structured|extended) packets$/m,
        );
        assert.match(ours.text, /^export="disk":$/m);
        assert.match(ours.text, /^\texport-size: 1048576 \(1M\)$/m);
        assert.match(ours.text, /^\t\tbase:allocation$/m);
        assert.match(ours.text, /^\tcan_multi_conn: true$/m);
        assert.match(ours.text, /^\tblock_size_maximum: 65536 \(64K\)$/m);
        assert.match(ours.text, /^\tcan_block_status_payload: false$/m);
      });
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name: "info --can and --is exit 0 for yes and 2 for no, like nbdinfo",
  async fn() {
    const rw = await nbdkit(["memory", "1M"]);
    const ro = await nbdkit(["-r", "memory", "1M"], { dir: rw.dir });
    try {
      const cases: Array<[string[], string]> = [
        [["--can", "flush"], rw.uri()],
        [["--can", "write"], rw.uri()],
        [["--can", "write"], ro.uri()],
        [["--is", "read-only"], ro.uri()],
        [["--is", "read-only"], rw.uri()],
        [["--is", "tls"], rw.uri()],
        [["--can", "multi-conn"], rw.uri()],
        [["--can", "structured-reply"], rw.uri()],
        [["--can", "connect"], rw.uri()],
      ];
      for (const [args, uri] of cases) {
        const ours = await runTool("info", [...args, uri]);
        const theirs = await new Deno.Command("nbdinfo", {
          args: [...args, uri],
          stdout: "null",
          stderr: "null",
        }).output();
        assert.equal(ours.code, theirs.code, `${args.join(" ")} ${uri}`);
        assert.equal(ours.text, "");
      }
      const bad = await runTool("info", ["--can", "fly", rw.uri()]);
      assert.equal(bad.code, 1);
      assert.match(
        bad.stderr,
        /^info: unknown --can\/--is\/--has option: fly\n/,
      );
    } finally {
      await ro.stop();
      await rw.stop();
    }
  },
});

Deno.test({
  name: "info --map and --map --totals match nbdinfo on a sparse export",
  async fn(t) {
    const server = await nbdkit([
      "data",
      'data=@0x10000 1 2 3 @0x200000 "hello" @0x400000 0',
      "size=8M",
    ]);
    try {
      const uri = server.uri();
      await t.step("--map --json", async () => {
        const ours = await runTool("info", ["--map", "--json", uri]);
        assert.equal(ours.code, 0, ours.stderr);
        const theirs = JSON.parse(
          await run("nbdinfo", ["--map", "--json", uri]),
        );
        assert.deepEqual(JSON.parse(ours.text), theirs);
        assert.ok(theirs.length > 2);
      });
      await t.step("--map text", async () => {
        await printsAsNbdinfo(["--map", uri]);
      });
      await t.step("--map --totals", async () => {
        await printsAsNbdinfo(["--map", "--totals", uri]);
        const json = await runTool("info", [
          "--map",
          "--totals",
          "--json",
          uri,
        ]);
        assert.deepEqual(
          JSON.parse(json.text),
          JSON.parse(
            await run("nbdinfo", ["--map", "--totals", "--json", uri]),
          ),
        );
      });
      await t.step("an unknown context fails with one line", async () => {
        const ours = await runTool("info", ["--map=qemu:nope", uri]);
        assert.equal(ours.code, 1);
        assert.equal(
          ours.stderr,
          'info: --map: server does not support metadata context "qemu:nope"\n',
        );
        assert.equal(ours.text, "");
      });
    } finally {
      await server.stop();
    }
  },
});

/** nbdkit's arguments for two exports, "a" and "b", that NBD_OPT_LIST lists. */
const LISTED = [
  "--filter=exportname",
  "memory",
  "1M",
  "exportname-list=explicit",
  "exportname=a",
  "exportname=b",
  "exportdesc=fixed:a disk",
];

Deno.test({
  name: "info --list shows every export as nbdinfo --list does",
  async fn() {
    const server = await nbdkit(LISTED);
    try {
      const uri = server.uri();
      const ours = await runTool("info", ["--list", "--json", uri]);
      assert.equal(ours.code, 0, ours.stderr);
      const doc = JSON.parse(ours.text);
      assertCovers(doc, await nbdinfo(["--list", uri]), "info --list --json");
      assert.deepEqual(doc.exports.map((e: Json) => e["export-name"]), [
        "a",
        "b",
      ]);
      const text = await runTool("info", ["--list", uri]);
      assert.match(text.text, /^export="a":$/m);
      assert.match(text.text, /^export="b":$/m);
      assert.match(text.text, /^\tdescription: a disk$/m);
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name:
    "info against qemu-nbd shows qemu's contexts, allocation depth and dirty bitmaps",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-info-" });
    const image = `${dir}/disk.qcow2`;
    await run("qemu-img", ["create", "-q", "-f", "qcow2", image, "4M"]);
    await run("qemu-img", ["bitmap", "--add", image, "b0"]);
    await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x55 1M 64k", image]);
    const server = await qemuNbd(
      ["-f", "qcow2", "-x", "disk", "-D", "a qcow2", "-A", "-B", "b0", image],
      { dir },
    );
    try {
      const uri = server.uri("disk");
      const ours = await runTool("info", ["--json", uri]);
      assert.equal(ours.code, 0, ours.stderr);
      const doc = JSON.parse(ours.text);
      assertCovers(doc, await nbdinfo([uri]), "info --json (qemu-nbd)");
      assert.ok(doc.exports[0].contexts.includes("qemu:allocation-depth"));

      await printsAsNbdinfo(["--map=qemu:allocation-depth", uri]);
      const dirty = await printsAsNbdinfo(["--map=qemu:dirty-bitmap:b0", uri]);
      assert.match(dirty, / 1 {2}dirty\n/);
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "info fails with one line and status 1",
  async fn(t) {
    await t.step("no server at the socket", async () => {
      const r = await runTool("info", [
        "nbd+unix:///?socket=/nonexistent/nbd.sock",
      ]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^info: .+\n$/);
      assert.equal(r.text, "");
    });
    await t.step("no such export", async () => {
      const server = await nbdkit(["-e", "disk", "memory", "1M"]);
      try {
        // nbdkit serves any name unless told otherwise; the exportname
        // filter is what makes an unknown name an error.
        const strict = await nbdkit(
          [
            "--filter=exportname",
            "memory",
            "1M",
            "exportname-strict=true",
            "exportname=disk",
          ],
          { dir: server.dir },
        );
        try {
          const r = await runTool("info", [strict.uri("missing")]);
          assert.equal(r.code, 1);
          assert.match(r.stderr, /^info: .+\n$/);
        } finally {
          await strict.stop();
        }
      } finally {
        await server.stop();
      }
    });
    await t.step("usage", async () => {
      const r = await runTool("info", []);
      assert.equal(r.code, 1);
      assert.match(
        r.stderr,
        /^info: a URI or \[ CMD ARGS \.\.\. \] is required\n/,
      );
      const both = await runTool("info", ["--size", "--list", "nbd://x"]);
      assert.equal(both.code, 1);
      assert.match(both.stderr, /you cannot use --list and --size together/);
    });
  },
});

Deno.test({
  name: "info --json matches nbdinfo on oldstyle and simple-reply servers",
  async fn(t) {
    for (const [label, flag] of [["oldstyle", "-o"], ["no SR", "--no-sr"]]) {
      await t.step(label!, async () => {
        const server = await nbdkit([flag!, "pattern", "4M"]);
        try {
          const ours = await runTool("info", ["--json", server.uri()]);
          assert.equal(ours.code, 0, ours.stderr);
          const doc = JSON.parse(ours.text);
          assertCovers(doc, await nbdinfo([server.uri()]), label!);
          assert.equal(doc.exports[0].contexts, undefined);
          assert.equal(doc.exports[0].block_size_minimum, undefined);
          const map = await runTool("info", ["--map", server.uri()]);
          assert.equal(map.code, 1);
          assert.match(map.stderr, /does not support metadata context/);
        } finally {
          await server.stop();
        }
      });
    }
  },
});

Deno.test({
  name: "info and copy over TLS: nbds+unix:// with a certificate directory",
  async fn() {
    const pki = await makeTestPki();
    try {
      const server = await nbdkit([
        "--tls=require",
        `--tls-certificates=${pki.serverDir}`,
        "memory",
        "1M",
      ]);
      try {
        const uri = `nbds+unix:///?socket=${server.socket}` +
          `&tls-certificates=${pki.clientNoCertDir}&tls-hostname=localhost`;
        const ours = await runTool("info", ["--json", uri]);
        assert.equal(ours.code, 0, ours.stderr);
        const doc = JSON.parse(ours.text);
        // libnbd rebuilds the URI without tls-hostname; ours keeps every
        // parameter the user gave, so that it still connects.
        assertCovers(doc, await nbdinfo([uri]), "info --json (TLS)", ["uri"]);
        assert.equal(doc.exports[0].uri, uri);
        assert.equal(doc.TLS, true);
        assert.equal((await runTool("info", ["--is", "tls", uri])).code, 0);
        const copy = await runTool("copy", [uri, "null:"]);
        assert.equal(copy.code, 0, copy.stderr);
      } finally {
        await server.stop();
      }
    } finally {
      await pki.remove();
    }
  },
});

/**
 * nbdinfo 1.22 from the Debian 13 root, with the root's view of socket
 * paths put back as the host sees them (every socket here is under the
 * root's /tmp).
 */
async function nbdinfo122(args: string[]): Promise<string> {
  const out = await run("nbdinfo", args, "trixie");
  return out.replaceAll("socket=/tmp/", `socket=${TRIXIE_ROOT}/tmp/`);
}

/** Keys in order, for objects nested one level (`exports[]`). */
function keyOrder(doc: Json): string[][] {
  const exports = (doc.exports ?? []) as Json[];
  return [Object.keys(doc), ...exports.map((e) => Object.keys(e))];
}

/** One export that three tools describe: ours, nbdinfo 1.22 and 1.14. */
interface Described {
  name: string;
  start(): Promise<Server>;
  exportName: string;
  /** Contexts whose --map to compare; none without block status. */
  maps: string[];
  /**
   * libnbd 1.22 sends `NBD_OPT_LIST_META_CONTEXT` even without structured
   * replies and prints what the server lists; the spec says a client
   * SHOULD NOT, and this client does not. Only `contexts` may differ.
   */
  contextsWithoutStructuredReplies?: boolean;
}

/** nbdinfo 1.22's output without its contexts (text or JSON). */
function withoutContexts(text: string): string {
  return text.replace(/^\tcontexts:\n(\t\t.*\n)*/m, "");
}

/** `server`, whose `stop()` also removes `dir` (its images). */
function removingDir(server: Server, dir: string): Server {
  return {
    ...server,
    stop: async () => {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

const DESCRIBED: Described[] = [
  {
    name: "nbdkit 1.32 memory with block size limits",
    start: () => nbdkit(LIMITED, { reach: "trixie" }),
    exportName: "disk",
    maps: ["base:allocation"],
  },
  {
    name: "nbdkit 1.42 sparse data",
    start: () =>
      nbdkit(
        ["data", 'data=@0x10000 1 2 3 @0x200000 "hello"', "size=8M"],
        { peers: "trixie" },
      ),
    exportName: "",
    maps: ["base:allocation"],
  },
  {
    name: "nbdkit 1.32 oldstyle",
    start: () => nbdkit(["-o", "pattern", "4M"], { reach: "trixie" }),
    exportName: "",
    maps: [],
  },
  {
    name: "nbdkit 1.42 without structured replies",
    start: () => nbdkit(["--no-sr", "pattern", "4M"], { peers: "trixie" }),
    exportName: "",
    maps: [],
    contextsWithoutStructuredReplies: true,
  },
  {
    name: "qemu-nbd 10 qcow2: extended headers, block status payload",
    start: async () => {
      const dir = await tempDir("trixie");
      const image = `${dir}/disk.qcow2`;
      await run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", image, "4M"],
        "trixie",
      );
      await run("qemu-img", ["bitmap", "--add", image, "b0"], "trixie");
      await run(
        "qemu-io",
        ["-f", "qcow2", "-c", "write -P 0x55 1M 64k", image],
        "trixie",
      );
      const server = await qemuNbd(
        ["-f", "qcow2", "-x", "disk", "-D", "a qcow2", "-A", "-B", "b0", image],
        { dir, peers: "trixie" },
      );
      return removingDir(server, dir);
    },
    exportName: "disk",
    maps: ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"],
  },
  {
    name: "qemu-nbd 7.2 read-only raw",
    start: async () => {
      const dir = await tempDir("trixie");
      const image = `${dir}/disk.raw`;
      await run("qemu-img", ["create", "-q", "-f", "raw", image, "2M"]);
      await run("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 64k", image]);
      const server = await qemuNbd(
        ["-f", "raw", "-r", "-x", "ro", image],
        { dir },
      );
      return removingDir(server, dir);
    },
    exportName: "ro",
    maps: ["base:allocation"],
  },
];

Deno.test({
  name:
    "info prints what nbdinfo 1.22 prints, field for field, and covers nbdinfo 1.14",
  async fn(t) {
    for (const d of DESCRIBED) {
      await t.step(d.name, async () => {
        const server = await d.start();
        try {
          const uri = server.uri(d.exportName);
          const text = await runTool("info", ["--no-content", uri]);
          assert.equal(text.code, 0, text.stderr);
          let theirsText = await nbdinfo122(["--no-content", uri]);
          const json = await runTool("info", ["--no-content", "--json", uri]);
          assert.equal(json.code, 0, json.stderr);
          const ours = JSON.parse(json.text);
          const theirs = JSON.parse(
            await nbdinfo122(["--no-content", "--json", uri]),
          );
          if (d.contextsWithoutStructuredReplies) {
            assert.ok(theirs.exports[0].contexts.length > 0);
            assert.equal(ours.exports[0].contexts, undefined);
            delete theirs.exports[0].contexts;
            assert.notEqual(withoutContexts(theirsText), theirsText);
            theirsText = withoutContexts(theirsText);
          }
          assert.equal(text.text, theirsText);
          assert.deepEqual(ours, theirs);
          assert.deepEqual(keyOrder(ours), keyOrder(theirs), "field order");
          // nbdinfo 1.14 knows fewer fields; those it prints agree.
          assertCovers(ours, await nbdinfo([uri]), `${d.name} (1.14)`);
          for (const context of d.maps) {
            const map = await runTool("info", [`--map=${context}`, uri]);
            assert.equal(map.code, 0, map.stderr);
            assert.equal(map.text, await nbdinfo122([`--map=${context}`, uri]));
            const mapJson = await runTool("info", [
              `--map=${context}`,
              "--json",
              uri,
            ]);
            assert.deepEqual(
              JSON.parse(mapJson.text),
              JSON.parse(
                await nbdinfo122([`--map=${context}`, "--json", uri]),
              ),
              `--map=${context} --json`,
            );
          }
          if (d.maps.length > 0) {
            const totals = await runTool("info", ["--map", "--totals", uri]);
            assert.equal(
              totals.text,
              await nbdinfo122(["--map", "--totals", uri]),
            );
          }
        } finally {
          await server.stop();
        }
      });
    }
    await t.step("--list against both versions", async () => {
      const server = await nbdkit(LISTED, { peers: "trixie" });
      try {
        const uri = server.uri();
        const ours = await runTool("info", ["--list", uri]);
        assert.equal(ours.code, 0, ours.stderr);
        assert.equal(
          ours.text,
          await nbdinfo122(["--no-content", "--list", uri]),
        );
        const json = await runTool("info", ["--list", "--json", uri]);
        assert.deepEqual(
          JSON.parse(json.text),
          JSON.parse(
            await nbdinfo122(["--no-content", "--list", "--json", uri]),
          ),
        );
        assertCovers(
          JSON.parse(json.text),
          await nbdinfo(["--list", uri]),
          "--list (1.14)",
        );
      } finally {
        await server.stop();
      }
    });
  },
});
