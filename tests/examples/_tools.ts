/**
 * The tools run as subprocesses, so that exit codes and output are the real
 * ones. The servers they run against come from `tests/support/servers.ts`,
 * what the reference client sees from `tests/support/reference.ts`.
 *
 * @module
 */

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
