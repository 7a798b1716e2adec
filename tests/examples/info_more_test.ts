/**
 * `info` beyond the report of one export at a URI: servers it starts itself
 * (`[ CMD ARGS … ]`), `--content`, `--uri`, and the feature tests with
 * their negations, each against nbdinfo on the same export.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  insideRoot,
  makeQcow2,
  nbdkit,
  qemuNbd,
  run,
  tempDir,
  TRIXIE_ROOT,
} from "../support/servers.ts";
import { output } from "../support/command.ts";
import { runTool } from "./_tools.ts";
import {
  assertNoneLeft,
  cmd,
  interruptOnceRunning,
  marker,
  runToolWith,
} from "./_subprocess.ts";

type Json = Record<string, unknown>;

/** nbdinfo 1.22, from the Debian 13 root, with socket paths as seen here. */
async function nbdinfo122(args: string[]): Promise<string> {
  const out = await run("nbdinfo", args, "trixie");
  return out.replaceAll("socket=/tmp/", `socket=${TRIXIE_ROOT}/tmp/`);
}

/** nbdinfo 1.22's exit status and stderr, from the Debian 13 root. */
async function nbdinfo122Status(
  args: string[],
): Promise<{ code: number; stderr: string }> {
  const { code, stderr } = await output(
    "chroot",
    [TRIXIE_ROOT, "nbdinfo", ...args.map(insideRoot)],
    { timeoutMs: 30_000 },
  );
  return { code, stderr };
}

function exportOf(doc: Json): Json {
  return (doc.exports as Json[])[0]!;
}

Deno.test({
  name:
    "info [ nbdkit -s memory 1G ] prints what nbdinfo 1.22 prints for [ nbdkit memory 1G ], contexts included",
  async fn() {
    // The same nbdkit 1.42 for both: ours over pipes, nbdinfo's on the
    // socket it hands over.
    const ours = cmd("chroot", TRIXIE_ROOT, "nbdkit", "-s", "memory", "1G");
    const theirs = ["--", ...cmd("nbdkit", "memory", "1G")];
    const json = await runTool("info", ["--no-content", "--json", ...ours]);
    assert.equal(json.code, 0, json.stderr);
    const expected = JSON.parse(
      await nbdinfo122(["--no-content", "--json", ...theirs]),
    );
    // Listed on the one connection that then goes on to transmission.
    assert.deepEqual(exportOf(expected).contexts, ["base:allocation"]);
    const doc = JSON.parse(json.text);
    assert.deepEqual(doc, expected);
    assert.deepEqual(
      Object.keys(exportOf(doc)),
      Object.keys(exportOf(expected)),
    );
    // No uri: the server is gone once the tool is (nbdinfo leaves it out too).
    assert.equal(exportOf(doc).uri, undefined);
    const text = await runTool("info", ["--no-content", ...ours]);
    assert.equal(text.code, 0, text.stderr);
    assert.equal(text.text, await nbdinfo122(["--no-content", ...theirs]));
    const size = await runTool("info", ["--size", ...ours]);
    assert.equal(size.text, await nbdinfo122(["--size", ...theirs]));
    const map = await runTool("info", ["--map", ...ours]);
    assert.equal(map.code, 0, map.stderr);
    assert.equal(map.text, await nbdinfo122(["--map", ...theirs]));
  },
});

Deno.test({
  name:
    "info --list [ CMD ]: one server start lists and describes every export, as nbdinfo 1.22 --list does",
  async fn() {
    // Two exports with a description; the default one is refused, so a
    // client that asked for "" instead of the listed names would fail.
    const plugin = [
      "--filter=exportname",
      "memory",
      "1M",
      "exportname=a",
      "exportname=b",
      "exportname-list=explicit",
      "exportname-strict=true",
      "exportdesc=fixed:disk",
    ];
    const ours = cmd("chroot", TRIXIE_ROOT, "nbdkit", "-s", ...plugin);
    const theirs = ["--", ...cmd("nbdkit", ...plugin)];
    const text = await runTool("info", ["--list", ...ours]);
    assert.equal(text.code, 0, text.stderr);
    assert.equal(text.text, await nbdinfo122(["--list", ...theirs]));
    assert.match(text.text, /^export="a":\n\tdescription: disk\n/m);
    assert.match(text.text, /^export="b":\n/m);
    const json = await runTool("info", ["--list", "--json", ...ours]);
    assert.equal(json.code, 0, json.stderr);
    assert.deepEqual(
      JSON.parse(json.text),
      JSON.parse(await nbdinfo122(["--list", "--json", ...theirs])),
    );
    // One start and one connection, where the server could take several
    // (on its socket, not over pipes): nbdkit's log filter sees one.
    const dir = await tempDir();
    try {
      const log = `${dir}/log`;
      const logged = await runTool("info", [
        "--list",
        ...cmd("nbdkit", "--filter=log", ...plugin, `logfile=${log}`),
      ]);
      assert.equal(logged.code, 0, logged.stderr);
      const connects = (await Deno.readTextFile(log)).split("\n")
        .filter((l) => / Preconnect /.test(l));
      assert.equal(connects.length, 1, connects.join("\n"));
      // With --content each export is read, over a start of its own.
      const content = await runTool("info", [
        "--list",
        "--content",
        "--json",
        ...cmd("nbdkit", "-s", ...plugin),
      ]);
      assert.equal(content.code, 0, content.stderr);
      const exports = JSON.parse(content.text).exports as Json[];
      assert.deepEqual(exports.map((e) => e["export-name"]), ["a", "b"]);
      for (const e of exports) assert.equal(typeof e.content, "string");
      await assertNoneLeft("exportname-strict", "info --list [ CMD ]");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "info --list [ CMD ] of an oldstyle server shows its one export, as info --list URI does",
  async fn() {
    // Oldstyle has no list: its one export is the list, over a URI or not.
    const word = marker();
    const server = [
      "nbdkit",
      "-s",
      "--oldstyle",
      "memory",
      "1M",
      `-D${word}.x=1`,
    ];
    const listed = await runTool("info", ["--list", ...cmd(...server)]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.match(listed.text, /^protocol: oldstyle/);
    assert.match(listed.text, /^export="":\n\texport-size: 1048576 \(1M\)\n/m);
    const shown = await runTool("info", ["--no-content", ...cmd(...server)]);
    assert.equal(shown.code, 0, shown.stderr);
    assert.equal(listed.text, shown.text);
    await assertNoneLeft(word, "info --list [ oldstyle CMD ]");
  },
});

Deno.test({
  name:
    "info [ nbdkit memory 1G ] starts nbdkit on a socket and says what nbdinfo 1.14 says",
  async fn() {
    const onSocket = await runTool("info", [
      "--json",
      ...cmd("nbdkit", "memory", "1G"),
    ]);
    assert.equal(onSocket.code, 0, onSocket.stderr);
    const overPipes = await runTool("info", [
      "--json",
      ...cmd("nbdkit", "-s", "memory", "1G"),
    ]);
    assert.equal(overPipes.code, 0, overPipes.stderr);
    assert.deepEqual(JSON.parse(onSocket.text), JSON.parse(overPipes.text));
    const theirs = JSON.parse(
      await run("nbdinfo", ["--json", "--", ...cmd("nbdkit", "memory", "1G")]),
    );
    const ours = JSON.parse(onSocket.text);
    for (const [key, value] of Object.entries(theirs)) {
      if (key !== "exports") assert.deepEqual(ours[key], value, key);
    }
    for (const [key, value] of Object.entries(exportOf(theirs))) {
      // Both ran the same file(1) on the same zeroes.
      assert.deepEqual(exportOf(ours)[key], value, key);
    }
  },
});

Deno.test({
  name:
    "info [ qemu-nbd -r -f qcow2 x.qcow2 ]: the report, the map and the size as nbdinfo gives them",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-test-" });
    try {
      const image = `${dir}/x.qcow2`;
      await makeQcow2(image, "4M", ["write -P 0x55 1M 64k"]);
      const target = cmd("qemu-nbd", "-r", "-f", "qcow2", image);
      const json = await runTool("info", ["--json", ...target]);
      assert.equal(json.code, 0, json.stderr);
      const ours = JSON.parse(json.text);
      const theirs = JSON.parse(
        await run("nbdinfo", ["--json", "--", ...target]),
      );
      for (const [key, value] of Object.entries(exportOf(theirs))) {
        assert.deepEqual(exportOf(ours)[key], value, key);
      }
      assert.equal(exportOf(ours)["is_read_only"], true);
      assert.equal(exportOf(ours)["export-size"], 4 * 1024 * 1024);
      for (const mode of [["--map"], ["--map", "--totals"], ["--size"]]) {
        const r = await runTool("info", [...mode, ...target]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(
          r.text,
          await run("nbdinfo", [...mode, "--", ...target]),
          mode.join(" "),
        );
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "info: a server command that fails to start is one line with its stderr",
  async fn(t) {
    const cases: Array<[string, string[], RegExp]> = [
      [
        "nbdkit without its plugin",
        ["nbdkit", "-s", "nosuchplugin"],
        /^info: The server command nbdkit exited with status 1: .*nosuchplugin/,
      ],
      [
        "qemu-nbd without its image",
        ["qemu-nbd", "-r", "-f", "qcow2", "/nonexistent/x.qcow2"],
        /^info: The server command qemu-nbd exited with status 1: .*Could not open '\/nonexistent\/x\.qcow2'/,
      ],
      [
        "no such program",
        ["no-such-nbd-server"],
        /^info: Cannot start the server command no-such-nbd-server: /,
      ],
    ];
    for (const [label, words, pattern] of cases) {
      await t.step(label, async () => {
        const r = await runTool("info", cmd(...words));
        assert.equal(r.code, 1);
        assert.equal(r.text, "");
        assert.match(r.stderr, pattern);
        assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
      });
    }
    await t.step("a [ without ] is a usage error", async () => {
      const r = await runTool("info", ["[", "nbdkit", "-s", "memory", "1M"]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^info: a server command starts with \[ but/);
    });
  },
});

Deno.test({
  name: "info: no server it started outlives it",
  async fn(t) {
    const m = marker();
    const dir = await Deno.makeTempDir({ prefix: "nbd-test-" });
    try {
      const image = `${dir}/${m}.raw`;
      await run("qemu-img", ["create", "-q", "-f", "raw", image, "1M"]);
      const cases: Array<[string, string[]]> = [
        ["nbdkit over pipes", [
          "--size",
          ...cmd("nbdkit", "-s", "-e", m, "memory", "1M"),
        ]],
        ["nbdkit on a socket", cmd("nbdkit", "-e", m, "memory", "1M")],
        ["qemu-nbd", ["--map", ...cmd("qemu-nbd", "-r", "-f", "raw", image)]],
        ["a --can answer of no", [
          "--can",
          "trim",
          ...cmd("qemu-nbd", "-r", "-f", "raw", image),
        ]],
        ["a server that fails", cmd("nbdkit", "-s", "-e", m, "nosuchplugin")],
      ];
      for (const [label, args] of cases) {
        await t.step(label, async () => {
          const r = await runTool("info", args);
          assert.notEqual(r.code, 130, r.stderr);
          await assertNoneLeft(m, label);
        });
      }
      await t.step("^C while the server is opening the export", async () => {
        // The handshake is under way once nbdkit runs; 300 ms let it reach
        // NBD_OPT_GO, which the filter holds.
        await interruptOnceRunning(
          "info",
          cmd(
            "nbdkit",
            "-s",
            "-e",
            m,
            "--filter=delay",
            "memory",
            "1M",
            "delay-open=20",
          ),
          m,
          300,
        );
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

const FEATURES = [
  "connect",
  "read",
  "write",
  "read-only",
  "rotational",
  "tls",
  "structured-reply",
  "extended-headers",
  "block-status-payload",
  "cache",
  "df",
  "fast-zero",
  "flush",
  "fua",
  "multi-conn",
  "trim",
  "zero",
];
const TESTS = ["--can", "--is", "--has", "--cannot", "--isnt", "--hasnt"];

Deno.test({
  name:
    "info --can/--is/--has and --cannot/--isnt/--hasnt exit as nbdinfo 1.22 does",
  async fn(t) {
    const dir = await tempDir("trixie");
    const image = `${dir}/disk.qcow2`;
    await run(
      "qemu-img",
      ["create", "-q", "-f", "qcow2", image, "1M"],
      "trixie",
    );
    const servers = [
      [
        "nbdkit 1.42 memory",
        await nbdkit(["memory", "1M"], { peers: "trixie" }),
      ],
      [
        "nbdkit 1.42 read-only",
        await nbdkit(["-r", "memory", "1M"], { peers: "trixie" }),
      ],
      [
        "qemu-nbd 10 qcow2",
        await qemuNbd(["-f", "qcow2", image], { dir, peers: "trixie" }),
      ],
    ] as const;
    try {
      for (const [label, server] of servers) {
        await t.step(label, async () => {
          const uri = server.uri();
          const codes = new Set<number>();
          // Every feature, each under one of the six options in turn.
          for (let i = 0; i < FEATURES.length * 2; i++) {
            const args = [
              TESTS[i % TESTS.length]!,
              FEATURES[i % FEATURES.length]!,
            ];
            const ours = await runTool("info", [...args, uri]);
            const theirs = await nbdinfo122Status([...args, uri]);
            assert.equal(
              ours.code,
              theirs.code,
              `${args.join(" ")}: ${ours.stderr}`,
            );
            assert.equal(ours.text, "");
            codes.add(ours.code);
          }
          assert.deepEqual([...codes].sort(), [0, 2]);
        });
      }
      const [, rw] = servers[0];
      await t.step("spellings: nbdinfo's own list, in any case", async () => {
        for (
          const word of [
            "Multi_Conn",
            "structured replies",
            "eh",
            "FAST-ZERO",
            "readonly",
            "block status payload",
            "read only",
            "blockstatus",
            "extendedheaders",
            "structuredreply",
          ]
        ) {
          const ours = await runTool("info", ["--can", word, rw.uri()]);
          const theirs = await nbdinfo122Status(["--can", word, rw.uri()]);
          assert.equal(ours.code, theirs.code, word);
        }
      });
      await t.step(
        "the last feature named counts, and any negation negates it",
        async () => {
          for (
            const args of [
              ["--is", "read-only", "--can", "trim"],
              ["--can", "trim", "--is", "read-only"],
              ["--can", "trim", "--cannot", "flush"],
              ["--hasnt", "extended-headers", "--has", "structured-reply"],
              ["--has", "structured-reply", "--hasnt", "extended-headers"],
              ["--is", "read-only", "--cannot", "trim"],
              ["--cannot", "trim", "--is", "read-only"],
            ]
          ) {
            const ours = await runTool("info", [...args, rw.uri()]);
            const theirs = await nbdinfo122Status([...args, rw.uri()]);
            assert.equal(ours.code, theirs.code, args.join(" "));
          }
        },
      );
      await t.step("an unknown feature: nbdinfo's line, status 1", async () => {
        for (const test of ["--has", "--hasnt"]) {
          const ours = await runTool("info", [test, "fly", rw.uri()]);
          const theirs = await nbdinfo122Status([test, "fly", rw.uri()]);
          assert.equal(ours.code, 1);
          assert.equal(theirs.code, 1);
          assert.equal(
            ours.stderr.split("\n")[0],
            theirs.stderr.split("\n")[0]!.replace(/^nbdinfo:/, "info:"),
          );
        }
      });
      await t.step("over a server command", async () => {
        const words = cmd(
          "chroot",
          TRIXIE_ROOT,
          "nbdkit",
          "-s",
          "-r",
          "memory",
          "1M",
        );
        const theirs = ["--", ...cmd("nbdkit", "-r", "memory", "1M")];
        for (
          const args of [["--is", "read-only"], ["--cannot", "write"], [
            "--can",
            "trim",
          ], ["--hasnt", "structured-reply"]]
        ) {
          const ours = await runTool("info", [...args, ...words]);
          const them = await nbdinfo122Status([...args, ...theirs]);
          assert.equal(ours.code, them.code, args.join(" "));
        }
      });
      await t.step(
        "a server that cannot be reached: 1, whichever way",
        async () => {
          const gone = `nbd+unix:///?socket=${dir}/none.sock`;
          for (const test of ["--can", "--cannot"]) {
            const ours = await runTool("info", [test, "connect", gone]);
            const theirs = await nbdinfo122Status([test, "connect", gone]);
            assert.equal(ours.code, 1);
            assert.equal(theirs.code, 1);
          }
        },
      );
    } finally {
      for (const [, s] of servers) await s.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** The first `n` bytes of a file, put in a file of their own. */
async function head(path: string, n: number, to: string): Promise<void> {
  const data = await Deno.readFile(path);
  await Deno.writeFile(to, data.subarray(0, n));
}

Deno.test({
  name:
    "info --content: what file(1) says of the first 8 KiB, when it is there",
  async fn(t) {
    const dir = await tempDir("trixie");
    const disk = `${dir}/script.img`;
    const script = new TextEncoder().encode("#!/bin/sh\necho hello\n");
    const data = new Uint8Array(64 * 1024);
    data.set(script);
    await Deno.writeFile(disk, data);
    await head(disk, 8192, `${dir}/head`);
    const expected = (await run("file", ["-b", `${dir}/head`])).trimEnd();
    assert.match(expected, /script/);
    const server = await nbdkit(["file", disk], { reach: "trixie", dir });
    const noFile = await Deno.makeTempDir({ prefix: "nbd-test-path-" });
    try {
      const uri = server.uri();
      await t.step(
        "with file(1): the field, where nbdinfo puts it",
        async () => {
          const json = await runTool("info", ["--json", uri]);
          assert.equal(json.code, 0, json.stderr);
          const ours = exportOf(JSON.parse(json.text));
          assert.equal(ours.content, expected);
          assert.deepEqual(Object.keys(ours).slice(0, 3), [
            "export-name",
            "content",
            "uri",
          ]);
          // nbdinfo 1.14 runs the same file(1) here.
          const theirs = exportOf(
            JSON.parse(await run("nbdinfo", ["--json", uri])),
          );
          assert.equal(theirs.content, expected);
          assert.deepEqual(Object.keys(theirs).slice(0, 3), [
            "export-name",
            "content",
            "uri",
          ]);
          const text = await runTool("info", [uri]);
          assert.match(
            text.text,
            new RegExp(
              `\\texport-size: 65536 \\(64K\\)\\n\\tcontent: ${
                expected.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
              }\\n\\turi: `,
            ),
          );
          const command = await runTool("info", [
            "--json",
            ...cmd("nbdkit", "-s", "-r", "file", disk),
          ]);
          assert.equal(exportOf(JSON.parse(command.text)).content, expected);
        },
      );
      await t.step(
        "--no-content, and --list without --content: none",
        async () => {
          const no = await runTool("info", ["--no-content", "--json", uri]);
          assert.equal(exportOf(JSON.parse(no.text)).content, undefined);
          const list = await runTool("info", ["--list", "--json", uri]);
          assert.equal(exportOf(JSON.parse(list.text)).content, undefined);
          const listed = await runTool("info", [
            "--list",
            "--content",
            "--json",
            uri,
          ]);
          assert.equal(exportOf(JSON.parse(listed.text)).content, expected);
        },
      );
      await t.step(
        "without file(1) on PATH: left out, as nbdinfo 1.22 does",
        async () => {
          const r = await runToolWith("info", ["--json", uri], {
            PATH: noFile,
          });
          assert.equal(r.code, 0, r.stderr);
          assert.equal(r.stderr, "");
          const ours = JSON.parse(r.text);
          assert.equal(exportOf(ours).content, undefined);
          // The Debian 13 root has no file(1): nbdinfo 1.22 leaves it out too.
          const theirs = JSON.parse(await nbdinfo122(["--json", uri]));
          assert.equal(exportOf(theirs).content, undefined);
          assert.deepEqual(ours, theirs);
          const text = await runToolWith("info", [uri], { PATH: noFile });
          assert.equal(text.text, await nbdinfo122([uri]));
        },
      );
      await t.step('an empty export is "empty"', async () => {
        await Deno.writeFile(`${dir}/empty`, new Uint8Array(0));
        const r = await runTool("info", [
          "--json",
          ...cmd("nbdkit", "-s", "memory", "0"),
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(
          exportOf(JSON.parse(r.text)).content,
          (await run("file", ["-b", `${dir}/empty`])).trimEnd(),
        );
      });
    } finally {
      await server.stop();
      await Deno.remove(noFile, { recursive: true });
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "info --uri prints the URI as nbdinfo 1.22 does, after connecting",
  async fn(t) {
    const server = await nbdkit(["memory", "1M"], { peers: "trixie" });
    try {
      await t.step("text and --json", async () => {
        for (const uri of [server.uri("disk"), server.uri()]) {
          for (const json of [[], ["--json"]]) {
            const ours = await runTool("info", ["--uri", ...json, uri]);
            assert.equal(ours.code, 0, ours.stderr);
            assert.equal(ours.text, await nbdinfo122(["--uri", ...json, uri]));
          }
        }
      });
      await t.step(
        "not with another mode, nor for a server command",
        async () => {
          const both = await runTool("info", ["--uri", "--size", server.uri()]);
          assert.equal(both.code, 1);
          assert.equal(
            (await nbdinfo122Status(["--uri", "--size", server.uri()])).code,
            1,
          );
          // (--list takes one: see "info --list [ CMD ]".)
          const r = await runTool("info", [
            "--uri",
            ...cmd("nbdkit", "-s", "memory", "1M"),
          ]);
          assert.equal(r.code, 1);
          assert.match(r.stderr, /^info: --uri needs a URI/);
        },
      );
      await t.step("a server that cannot be reached", async () => {
        const r = await runTool("info", [
          "--uri",
          `nbd+unix:///?socket=${server.dir}/none.sock`,
        ]);
        assert.equal(r.code, 1);
        assert.equal(r.text, "");
      });
    } finally {
      await server.stop();
    }
  },
});
