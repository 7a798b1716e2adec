/**
 * `nbd`: the tools as one program, for `deno compile`.
 *
 * ```sh
 * deno task compile          # writes dist/nbd
 * dist/nbd info --json nbd+unix:///?socket=/tmp/nbd.sock
 * dist/nbd copy nbd://127.0.0.1/ disk.img
 * dist/nbd dump -n 512 nbd://127.0.0.1/
 * dist/nbd connect --help
 * ```
 *
 * Each subcommand is the matching example's `main()`; this file only picks
 * one. Unknown or missing subcommands print the list and exit 1.
 *
 * @module
 */

import { main as copy } from "./copy.ts";
import { main as dump } from "./dump.ts";
import { main as info } from "./info.ts";
import { errorLine, versionText, warn, writeAll } from "./_cli.ts";

/** A subcommand: arguments in, exit status out. */
type Tool = (args: string[]) => Promise<number>;

const TOOLS: Readonly<Record<string, { run: Tool; summary: string }>> = {
  info: { run: info, summary: "show an export or server (like nbdinfo)" },
  copy: {
    run: copy,
    summary: "copy to, from or between exports (like nbdcopy)",
  },
  dump: { run: dump, summary: "hexdump an export (like nbddump)" },
  connect: {
    // Loaded on demand: only `connect` needs FFI, the others never pay for it.
    run: async (args) => {
      const connect: { main?: Tool } = await import("./connect.ts");
      if (!connect.main) {
        warn("nbd: this build has no connect command");
        return 1;
      }
      return await connect.main(args);
    },
    summary: "attach an export to a kernel /dev/nbdX device",
  },
  fuse: {
    // Loaded on demand, as connect is: it needs FFI.
    run: async (args) => {
      const fuse: { main?: Tool } = await import("./fuse.ts");
      if (!fuse.main) {
        warn("nbd: this build has no fuse command");
        return 1;
      }
      return await fuse.main(args);
    },
    summary: "mount an export as a file through FUSE (like nbdfuse)",
  },
};

const USAGE = `Usage: nbd COMMAND [ARGS...]

Commands:
${
  Object.entries(TOOLS).map(([name, t]) => `  ${name.padEnd(9)}${t.summary}`)
    .join("\n")
}

Run "nbd COMMAND --help" for a command's options.
`;

/**
 * Runs the subcommand named by the first argument.
 *
 * @param args Command-line arguments, without the program name.
 * @returns The subcommand's exit status; 1 for an unknown one.
 */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === "--help" || name === "-h" || name === "help") {
    await writeAll(Deno.stdout, USAGE);
    return 0;
  }
  if (name === "--version" || name === "-V") {
    await writeAll(Deno.stdout, versionText("nbd"));
    return 0;
  }
  const tool = name === undefined ? undefined : TOOLS[name];
  if (!tool) {
    warn(
      name === undefined
        ? "nbd: a command is required"
        : `nbd: unknown command "${name}"`,
    );
    warn(USAGE.trimEnd());
    return 1;
  }
  try {
    return await tool.run(rest);
  } catch (e) {
    // Each tool reports its own failures; this is the net under a tool
    // whose main() lets one escape.
    warn(errorLine(name!, e));
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
