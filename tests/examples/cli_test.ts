import assert from "node:assert/strict";
import {
  clock,
  errorLine,
  exactSize,
  humanBytes,
  parseArgs,
  parseCount,
  parseSize,
  parseSparse,
  UsageError,
  visible,
} from "../../examples/_cli.ts";
import { Progress } from "../../examples/_progress.ts";
import { isZero } from "../../examples/copy.ts";
import { extentDescription } from "../../examples/info.ts";
import { within } from "../support/wait.ts";
import { runTool } from "./_tools.ts";

const SPECS = [
  { name: "json", kind: "flag" as const },
  { name: "map", kind: "optional" as const },
  { name: "connections", kind: "value" as const, short: "C" },
  { name: "progress", kind: "optional" as const, short: "p" },
  { name: "verbose", kind: "flag" as const, short: "v" },
];

Deno.test("parseArgs() reads options the getopt_long way", async (t) => {
  await t.step("options before, between and after positionals", () => {
    const r = parseArgs(["--json", "a", "-C", "3", "b", "--map=qemu:x"], SPECS);
    assert.deepEqual(r.positionals, ["a", "b"]);
    assert.equal(r.options.get("json"), true);
    assert.equal(r.options.get("connections"), "3");
    assert.equal(r.options.get("map"), "qemu:x");
  });
  await t.step("an optional value never takes the next word", () => {
    const r = parseArgs(["--map", "nbd://x"], SPECS);
    assert.equal(r.options.get("map"), true);
    assert.deepEqual(r.positionals, ["nbd://x"]);
  });
  await t.step("short clusters, attached values, -- and a lone -", () => {
    const r = parseArgs(["-vpC4", "-", "--", "--json"], SPECS);
    assert.equal(r.options.get("verbose"), true);
    assert.equal(r.options.get("progress"), true);
    assert.equal(r.options.get("connections"), "4");
    assert.deepEqual(r.positionals, ["-", "--json"]);
  });
  await t.step("mistakes are UsageErrors", () => {
    assert.throws(() => parseArgs(["--nope"], SPECS), UsageError);
    assert.throws(() => parseArgs(["-x"], SPECS), /unknown option -x/);
    assert.throws(() => parseArgs(["--connections"], SPECS), /needs a value/);
    assert.throws(() => parseArgs(["--json=1"], SPECS), /takes no value/);
  });
});

Deno.test("parseSize() and parseCount() take what people type", () => {
  assert.equal(parseSize("4096", "x"), 4096);
  assert.equal(parseSize("256k", "x"), 256 * 1024);
  assert.equal(parseSize("32M", "x"), 32 * 1024 * 1024);
  assert.equal(parseSize("1GiB", "x"), 1024 ** 3);
  assert.throws(() => parseSize("1.5M", "--request-size"), /--request-size/);
  assert.throws(() => parseSize("-1", "x"), UsageError);
  assert.equal(parseCount("8", "x", 1, 64), 8);
  assert.throws(() => parseCount("0", "-C", 1, 64), /from 1 to 64/);
  assert.throws(() => parseCount("4x", "-C", 1, 64), UsageError);
});

Deno.test("exactSize() writes sizes as nbdinfo's export-size-str", () => {
  // Values checked against nbdinfo --json on nbdkit null of these sizes.
  const cases: Array<[number, string, boolean]> = [
    [0, "0", false],
    [1000, "1000", false],
    [1024, "1K", true],
    [1536, "1536", false],
    [3145728, "3M", true],
    [1073741824, "1G", true],
    [2125119488, "2075312K", true],
  ];
  for (const [n, text, scaled] of cases) {
    assert.deepEqual(exactSize(n), { text, scaled }, String(n));
  }
});

Deno.test("humanBytes() and clock() round for people", () => {
  assert.equal(humanBytes(512), "512 B");
  assert.equal(humanBytes(1536), "1.50 KiB");
  assert.equal(humanBytes(111 * 1024 * 1024 + 5), "111 MiB");
  assert.equal(clock(5), "0:05");
  assert.equal(clock(3725), "1:02:05");
});

Deno.test("errorLine() is one line and keeps the cause", () => {
  const e = new Error("reading x", { cause: new Error("EIO\nmore") });
  assert.equal(errorLine("copy", e), "copy: reading x: EIO more");
  assert.equal(errorLine("info", "plain"), "info: plain");
});

Deno.test("Progress", async (t) => {
  const sink = () => {
    const lines: string[] = [];
    return {
      lines,
      out: {
        writeSync(p: Uint8Array) {
          lines.push(new TextDecoder().decode(p));
          return p.length;
        },
        close() {},
      },
    };
  };
  await t.step("fd mode writes N/100 when N changes, ending at 100", () => {
    const s = sink();
    const p = new Progress({ kind: "fd", out: s.out, owned: false }, 1000);
    p.add(500); // first draw happens at once
    p.add(1);
    p.finish(true);
    assert.deepEqual(s.lines, ["50/100\n", "100/100\n"]);
  });
  await t.step("a failed job never reports 100", () => {
    const s = sink();
    const p = new Progress({ kind: "fd", out: s.out, owned: false }, 1000);
    p.add(300);
    p.finish(false);
    assert.deepEqual(s.lines, ["30/100\n"]);
  });
  await t.step("bar mode redraws one line and ends it", () => {
    const s = sink();
    const p = new Progress({ kind: "bar", out: s.out, width: 80 }, 2048);
    p.add(1024);
    p.finish(true);
    assert.match(s.lines[0]!, /^\r 50% \[#+\.+\] 1\.00 KiB \/ 2\.00 KiB/);
    assert.match(
      s.lines.at(-1)!,
      /^\r100% \[#+\] 2\.00 KiB \/ 2\.00 KiB .*\n$/,
    );
  });
});

Deno.test("isZero() checks every byte at any alignment", () => {
  const buf = new Uint8Array(4099);
  for (let start = 0; start < 4; start++) {
    const view = buf.subarray(start, start + 4093);
    assert.equal(isZero(view), true);
    for (const at of [0, 1, 2, 3, 100, 4092]) {
      view[at] = 7;
      assert.equal(isZero(view), false, `start ${start}, byte ${at}`);
      view[at] = 0;
    }
  }
  assert.equal(isZero(new Uint8Array(0)), true);
});

Deno.test("extentDescription() uses nbdinfo's words", () => {
  assert.equal(extentDescription("base:allocation", 0), "data");
  assert.equal(extentDescription("base:allocation", 3), "hole,zero");
  assert.equal(extentDescription("qemu:dirty-bitmap:b0", 1), "dirty");
  assert.equal(
    extentDescription("qemu:allocation-depth", 2),
    "backing depth 2",
  );
  assert.equal(extentDescription("other:ctx", 5), null);
});

/**
 * Runs `body` as a script in a child Deno, with `withInterrupt` imported,
 * and hands back its stdout line by line; disposing of it kills what is
 * left of the child and waits for it.
 */
function scriptWithInterrupt(body: string): AsyncDisposable & {
  child: Deno.ChildProcess;
  lines: AsyncIterator<string>;
} {
  const cli = new URL("../../examples/_cli.ts", import.meta.url).href;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `import { withInterrupt } from ${JSON.stringify(cli)};\n${body}`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const lines = child.stdout
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(
      new TransformStream<string, string>(
        {
          buffer: "",
          transform(chunk, out) {
            this.buffer += chunk;
            const parts = this.buffer.split("\n");
            this.buffer = parts.pop()!;
            for (const p of parts) out.enqueue(p);
          },
        } as Transformer<string, string> & { buffer: string },
      ),
    )[Symbol.asyncIterator]();
  return {
    child,
    lines,
    async [Symbol.asyncDispose]() {
      try {
        child.kill("SIGKILL");
      } catch { /* already gone */ }
      await child.status;
    },
  };
}

/** The next line, within a bounded wait. */
async function nextLine(lines: AsyncIterator<string>): Promise<string> {
  const r = await within(10_000, "a line from the child", lines.next());
  return r.done ? "(end)" : r.value;
}

Deno.test("withInterrupt() turns SIGINT and SIGTERM into one abort", async (t) => {
  // The work waits at most 10 s for the signal, so a child never lingers.
  const waitForSignal = `{
    let timer;
    const late = new Promise((r) => timer = setTimeout(r, 10_000));
    await Promise.race([i.stopped, late]);
    clearTimeout(timer);
  }`;
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    await t.step(
      `the first ${signal} aborts with its reason; the listeners go after`,
      async () => {
        await using script = scriptWithInterrupt(`
        const said = await withInterrupt(async (i) => {
          console.log("ready");
          ${waitForSignal}
          return i.signal.reason === i.reason ? "aborted" : "not aborted";
        });
        console.log(said);
        // The tool's listeners are gone: the default action ends it now.
        Deno.kill(Deno.pid, "SIGINT");
        await new Promise((r) => setTimeout(r, 10_000));
        console.log("still running");`);
        const { child, lines } = script;
        assert.equal(await nextLine(lines), "ready");
        child.kill(signal);
        assert.equal(await nextLine(lines), "aborted");
        const status = await within(10_000, "the child's exit", child.status);
        assert.equal(status.signal, "SIGINT", "ended by the default action");
        assert.equal(await nextLine(lines), "(end)");
      },
    );
  }
  await t.step("a second signal exits at once with status 130", async () => {
    await using script = scriptWithInterrupt(`
      await withInterrupt(async (i) => {
        console.log("ready");
        ${waitForSignal}
        // Stopping takes long: the user will not wait for it.
        console.log("stopping");
        ${waitForSignal.replace("i.stopped, ", "")}
        console.log("stopped by itself");
      });`);
    const { child, lines } = script;
    assert.equal(await nextLine(lines), "ready");
    child.kill("SIGINT");
    assert.equal(await nextLine(lines), "stopping");
    const started = performance.now();
    child.kill("SIGTERM");
    const status = await within(5_000, "the child's exit", child.status);
    assert.equal(status.code, 130);
    assert.equal(status.signal, null, "exited by itself, not killed");
    assert.ok(performance.now() - started < 5_000);
    assert.equal(await nextLine(lines), "(end)");
  });
});

Deno.test("copy -S/--sparse takes what nbdcopy 1.22 takes: 0 or a power of 2 from 512 to 2^31", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-cli-sparse-" });
  try {
    const source = `${dir}/source.img`;
    await Deno.writeFile(source, new Uint8Array(64 * 1024).fill(1));
    for (const value of ["1", "7", "256", "768", "4G"]) {
      await t.step(
        `-S ${value} is refused before anything is opened`,
        async () => {
          const r = await runTool("copy", ["-S", value, source, `${dir}/out`]);
          assert.equal(r.code, 1, r.stderr);
          assert.match(r.stderr, /^copy: --sparse: must be 0 or a power of 2/);
          await assert.rejects(Deno.stat(`${dir}/out`), Deno.errors.NotFound);
        },
      );
    }
    for (const value of ["0", "512", "4k", "64k"]) {
      await t.step(`-S ${value} copies`, async () => {
        const out = `${dir}/out-${value}`;
        const r = await runTool("copy", ["-S", value, source, out]);
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(await Deno.readFile(out), await Deno.readFile(source));
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("visible() escapes C0, DEL and C1 controls, and nothing else", () => {
  assert.equal(
    visible("\x1b]0;t\x07\x1b[2J\x00\x7f\u009b\u0080\u009f"),
    "\\u001b]0;t\\u0007\\u001b[2J\\u0000\\u007f\\u009b\\u0080\\u009f",
  );
  assert.equal(visible("a\tb\nc\rd"), "a\\tb\\nc\\rd");
  const plain = 'é ü 日本 "q" \\ ~ \u00a0 \u{1f600}';
  assert.equal(visible(plain), plain);
  const once = visible("\x1b[31m\u009b");
  assert.equal(visible(once), once, "idempotent");
});

Deno.test("errorLine() escapes what a server said", () => {
  const e = new Error("refused", { cause: new Error("\x1b[2Jgone\u009b") });
  assert.equal(errorLine("info", e), "info: refused: \\u001b[2Jgone\\u009b");
});

Deno.test("parseSparse() takes 0 or a power of 2 from 512 to 2^31, as nbdcopy 1.22", () => {
  for (
    const [text, n] of [["0", 0], ["512", 512], ["4k", 4096], [
      "2G",
      2 ** 31,
    ]] as const
  ) {
    assert.equal(parseSparse(text), n);
  }
  for (const text of ["1", "7", "256", "511", "513", "768", "3k", "4G", "x"]) {
    assert.throws(() => parseSparse(text), UsageError, text);
  }
});
