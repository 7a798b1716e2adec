/**
 * The tools run as subprocesses, so that exit codes and output are the real
 * ones, and what the reference tools say about an export. The servers they
 * run against come from `tests/support/servers.ts`.
 *
 * @module
 */

import { run } from "../support/servers.ts";

const ROOT = new URL("../../", import.meta.url);

/** What a tool run produced. */
export interface RunResult {
  code: number;
  stdout: Uint8Array;
  stderr: string;
  /** stdout as text. */
  text: string;
}

/**
 * Runs `examples/<tool>.ts` under `deno run -A` with a bounded wait.
 *
 * @param tool `"info"`, `"copy"` or `"nbd"`.
 * @param args The tool's arguments.
 * @param stdin Bytes for its standard input (none by default).
 */
export async function runTool(
  tool: string,
  args: string[],
  stdin?: Uint8Array,
): Promise<RunResult> {
  const script = new URL(`examples/${tool}.ts`, ROOT).pathname;
  const signal = AbortSignal.timeout(60_000);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", script, ...args],
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    signal,
  }).spawn();
  if (stdin) {
    const w = child.stdin.getWriter();
    // A tool that fails early stops reading; that is for the test to judge.
    await w.write(stdin).catch(() => {});
    await w.close().catch(() => {});
  }
  const out = await child.output();
  return {
    code: out.code,
    stdout: out.stdout,
    stderr: new TextDecoder().decode(out.stderr),
    text: new TextDecoder().decode(out.stdout),
  };
}

/** SHA-256 of bytes, in hex. */
export async function sha256(data: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-256",
    data as Uint8Array<ArrayBuffer>,
  );
  return Array.from(
    new Uint8Array(digest),
    (b) => b.toString(16).padStart(2, "0"),
  )
    .join("");
}

/** Reads a whole export with `nbdcopy` (the reference client) and hashes it. */
export async function exportHash(uri: string): Promise<string> {
  const out = await new Deno.Command("nbdcopy", {
    args: [uri, "-"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  if (!out.success) {
    throw new Error(`nbdcopy failed: ${new TextDecoder().decode(out.stderr)}`);
  }
  return await sha256(out.stdout);
}

/** One entry of `nbdinfo --map --json`. */
export interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

/** The reference client's extent map of an export. */
export async function referenceMap(
  uri: string,
  context = "base:allocation",
): Promise<MapEntry[]> {
  return JSON.parse(await run("nbdinfo", [`--map=${context}`, "--json", uri]));
}
