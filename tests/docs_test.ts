import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);

Deno.test("the README stays a front page that reaches every page", async (t) => {
  const readme = await Deno.readTextFile(new URL("README.md", ROOT));
  await t.step("at most 300 lines", () => {
    assert.ok(readme.split("\n").length <= 300);
  });
  await t.step("links every page of docs/ and CONTRIBUTING.md", async () => {
    const pages = ["CONTRIBUTING.md"];
    for await (const e of Deno.readDir(new URL("docs/", ROOT))) {
      if (e.isFile && e.name.endsWith(".md")) pages.push(`docs/${e.name}`);
    }
    assert.ok(pages.length > 1);
    for (const page of pages) {
      assert.ok(readme.includes(`](${page})`), `README does not link ${page}`);
    }
  });
  await t.step(
    "every relative link of every page points at a file",
    async () => {
      const files = ["README.md", "CONTRIBUTING.md"];
      for await (const e of Deno.readDir(new URL("docs/", ROOT))) {
        if (e.isFile && e.name.endsWith(".md")) files.push(`docs/${e.name}`);
      }
      for (const file of files) {
        const text = await Deno.readTextFile(new URL(file, ROOT));
        for (
          const [, target] of text.matchAll(/\]\(([^)#\s]+)(?:#[^)]*)?\)/g)
        ) {
          if (/^[a-z]+:/.test(target!)) continue;
          const url = new URL(target!, new URL(file, ROOT));
          await Deno.stat(url).catch(() => {
            assert.fail(`${file} links ${target}, which does not exist`);
          });
        }
      }
    },
  );
});
