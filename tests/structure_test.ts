/**
 * The shape of the code: no import cycle among the modules either entry
 * point loads, and no module of lib/, ffi/, examples/ or bench/ past 700
 * lines (a module that long is usually two concepts). Reads
 * `deno info --json`, so it needs --allow-run.
 */

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);

/** Local module graph of `entry`: each module's local imports. */
async function graph(entry: string): Promise<Map<string, string[]>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", entry],
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  const info = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    modules: {
      specifier: string;
      dependencies?: {
        code?: { specifier?: string };
        type?: { specifier?: string };
      }[];
    }[];
  };
  const edges = new Map<string, string[]>();
  for (const m of info.modules) {
    if (!m.specifier.startsWith("file:")) continue;
    const deps = (m.dependencies ?? [])
      .flatMap((d) => [d.code?.specifier, d.type?.specifier])
      .filter((s): s is string => s?.startsWith("file:") === true);
    edges.set(m.specifier, [...new Set(deps)]);
  }
  return edges;
}

/** The cycles of `edges`, each as the path that closes it. */
function cycles(edges: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const state = new Map<string, "open" | "done">();
  const path: string[] = [];
  const visit = (v: string): void => {
    state.set(v, "open");
    path.push(v);
    for (const w of edges.get(v) ?? []) {
      const s = state.get(w);
      if (s === "open") found.push([...path.slice(path.indexOf(w)), w]);
      else if (s === undefined) visit(w);
    }
    path.pop();
    state.set(v, "done");
  };
  for (const v of edges.keys()) if (!state.has(v)) visit(v);
  return found;
}

function short(specifier: string): string {
  return specifier.slice(ROOT.href.length);
}

Deno.test("the module graph has no import cycle", async (t) => {
  for (const entry of ["mod.ts", "ffi/mod.ts"]) {
    await t.step(entry, async () => {
      const edges = await graph(entry);
      assert.ok(edges.size > 10, `${entry} loads ${edges.size} modules`);
      assert.deepEqual(
        cycles(edges).map((c) => c.map(short).join(" -> ")),
        [],
      );
    });
  }
  await t.step("the check finds a cycle when there is one", () => {
    const edges = new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]]]);
    assert.deepEqual(cycles(edges), [["a", "b", "c", "a"]]);
  });
});

/**
 * Past 700 lines in this round; split by their own owners (issue 18: the
 * TLS layer into lib/tls/). Remove each once it is split.
 */
const BEING_SPLIT = new Set<string>([]);

Deno.test("no module of lib/, ffi/, examples/ or bench/ is over 700 lines", async () => {
  const long: string[] = [];
  const walk = async (dir: URL, prefix: string): Promise<void> => {
    for await (const e of Deno.readDir(dir)) {
      if (e.isDirectory) {
        await walk(new URL(`${e.name}/`, dir), `${prefix}${e.name}/`);
      } else if (e.name.endsWith(".ts") && !BEING_SPLIT.has(prefix + e.name)) {
        const text = await Deno.readTextFile(new URL(e.name, dir));
        const lines = text.split("\n").length - 1;
        if (lines > 700) long.push(`${prefix}${e.name}: ${lines}`);
      }
    }
  };
  for (const top of ["lib", "ffi", "examples", "bench"]) {
    await walk(new URL(`${top}/`, ROOT), `${top}/`);
  }
  assert.deepEqual(long, []);
});
