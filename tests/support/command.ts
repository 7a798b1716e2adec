/**
 * A program run to its end with a deadline, its output captured: the one
 * way the tests run a tool they only look at afterwards.
 *
 * @module
 */

/** What a program run left. */
export interface Output {
  /** The exit code. */
  code: number;
  /** Its standard output, as bytes. */
  stdout: Uint8Array;
  /** Its standard output, as text. */
  text: string;
  /** Its standard error, as text. */
  stderr: string;
}

/** How to run it. */
export interface OutputOptions {
  /** Variables added to (and overriding) the test's environment. */
  env?: Record<string, string>;
  /** Where to run it. */
  cwd?: string;
  /** The deadline; 60 s unless given. */
  timeoutMs?: number;
}

/**
 * Runs `program` with stdin closed and waits for it, bounded; a failing
 * exit is for the caller to judge.
 *
 * @param program The program, looked up on PATH.
 * @param args Its arguments.
 * @param options Environment, directory and deadline.
 * @returns Its exit code and output.
 * @throws {Error} when it cannot be started or the deadline passes.
 * @example
 * ```ts
 * const out = await output(Deno.execPath(), ["--version"]);
 * assert.equal(out.code, 0, out.stderr);
 * ```
 */
export async function output(
  program: string,
  args: string[],
  options: OutputOptions = {},
): Promise<Output> {
  const out = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(options.timeoutMs ?? 60_000),
    ...(options.env ? { env: options.env } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
  }).output();
  const text = new TextDecoder();
  return {
    code: out.code,
    stdout: out.stdout,
    text: text.decode(out.stdout),
    stderr: text.decode(out.stderr),
  };
}
