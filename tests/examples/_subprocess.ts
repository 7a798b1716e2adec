/**
 * For the tests of `[ CMD ARGS … ]` targets: a tool run with another PATH
 * or stopped halfway, and a look through /proc for a server that outlived
 * the tool that started it (found by a marker word on its command line).
 *
 * @module
 */

import assert from "node:assert/strict";
import type { RunResult } from "./_tools.ts";
import { output } from "../support/command.ts";

const ROOT = new URL("../../", import.meta.url);

/** The `deno run` command line of a tool. */
function toolArgs(tool: string, args: string[]): string[] {
  const script = new URL(`examples/${tool}.ts`, ROOT).pathname;
  return ["run", "-A", "--quiet", script, ...args];
}

/**
 * Runs `examples/<tool>.ts` as `runTool` does, with `env` added to (and
 * overriding) the test's environment.
 */
export async function runToolWith(
  tool: string,
  args: string[],
  env: Record<string, string>,
): Promise<RunResult> {
  return await output(Deno.execPath(), toolArgs(tool, args), { env });
}

/** Starts a tool and leaves it running, for a test that signals it. */
export function spawnTool(tool: string, args: string[]): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: toolArgs(tool, args),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).spawn();
}

/** `[ words… ]` as separate arguments: a `[ CMD ARGS … ]` target. */
export function cmd(...words: string[]): string[] {
  return ["[", ...words, "]"];
}

/** A word no other process has on its command line. */
export function marker(): string {
  return `nbdmark${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
}

/** The pids of the processes (but this one) with `word` in their arguments. */
export function processesWith(word: string): number[] {
  const found: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    const pid = Number(entry.name);
    if (pid === Deno.pid) continue;
    let cmdline: string;
    try {
      cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`);
    } catch {
      continue; // exited meanwhile
    }
    if (cmdline.split("\0").some((arg) => arg.includes(word))) {
      found.push(pid);
    }
  }
  return found;
}

/**
 * Asserts that no process with `word` on its command line is left, as soon
 * as the tool has exited: the tool stops its server before exiting. A
 * zombie the kernel has not reaped yet still has its command line for a
 * moment, so this looks a few times, for at most half a second.
 */
export async function assertNoneLeft(word: string, where: string) {
  let left: number[] = [];
  for (let i = 0; i < 10; i++) {
    left = processesWith(word).filter((pid) => !isZombie(pid));
    if (left.length === 0) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.deepEqual(left, [], `${where}: the server outlived the tool`);
}

function isZombie(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return true; // gone
  }
}

/**
 * Waits (bounded) until a process with `word` on its command line runs,
 * other than `tool` (the tool that has the word among its own arguments).
 */
export async function untilRunning(
  word: string,
  tool: number,
  ms = 10_000,
): Promise<void> {
  const end = Date.now() + ms;
  while (processesWith(word).filter((pid) => pid !== tool).length === 0) {
    if (Date.now() > end) {
      throw new Error(`no process with ${word} started within ${ms} ms`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * ^C halfway: starts `tool`, waits until the server marked by `word` runs
 * and `settleMs` more, sends SIGINT, and asserts that the tool exits with
 * 130 and leaves no server behind.
 */
export async function interruptOnceRunning(
  tool: string,
  args: string[],
  word: string,
  settleMs: number,
): Promise<void> {
  const child = spawnTool(tool, args);
  await untilRunning(word, child.pid);
  await new Promise((r) => setTimeout(r, settleMs));
  child.kill("SIGINT");
  const out = await child.output();
  assert.equal(out.code, 130, new TextDecoder().decode(out.stderr));
  await assertNoneLeft(word, "after ^C");
}
