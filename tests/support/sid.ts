/**
 * The Debian sid root `.ci/setup` makes for libnbd 1.24, whose `nbdcopy` is
 * the first with `--blkhash`: the oracle the blkhash tests compare with.
 * As with the Debian 13 root (`servers.ts`), its programs run under
 * `chroot` and work in a directory under the root, which the host reaches at
 * `${SID_ROOT}/…` and the root at `/…`; host paths under the root are
 * translated, so callers pass host paths and host-path URIs throughout.
 *
 * @module
 */

import { output } from "./command.ts";

/** Where the sid root is; `NBD_SID_ROOT` moves it. */
export const SID_ROOT: string = (Deno.env.get("NBD_SID_ROOT") ??
  "/var/cache/nbd-deno/sid-root").replace(/\/+$/, "");

/** The root must be there: a test never skips for want of it. */
function needSid(): void {
  try {
    Deno.statSync(`${SID_ROOT}/.nbd-deno-root`);
  } catch {
    throw new Error(
      `The Debian sid root is missing at ${SID_ROOT}: run "bash .ci/setup" as root`,
    );
  }
}

/** A host path under the root, as the root's programs see it. */
export function insideSid(arg: string): string {
  return arg.replaceAll(`${SID_ROOT}/`, "/");
}

/**
 * A fresh private directory under the root's `/tmp`, where host servers
 * and the root's programs both reach a socket (pass it as a server's
 * `dir`).
 */
export function sidTempDir(): Promise<string> {
  needSid();
  return Deno.makeTempDir({ dir: `${SID_ROOT}/tmp`, prefix: "nbd-test-" });
}

/** What a program of the root produced. */
export interface SidResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `program` from the sid root with a deadline.
 *
 * @param program e.g. `"nbdcopy"`.
 * @param args Its arguments; host paths under the root are translated.
 */
export async function runSid(
  program: string,
  args: string[],
): Promise<SidResult> {
  needSid();
  const out = await output("chroot", [
    SID_ROOT,
    program,
    ...args.map(insideSid),
  ]);
  return { code: out.code, stdout: out.text, stderr: out.stderr };
}

/**
 * `nbdcopy --blkhash…` from libnbd 1.24 over `source` (a host path or URI
 * under the root) into `null:`.
 *
 * @param source What to hash.
 * @param spec `DIGEST[/SIZE]`, or none for nbdcopy's default.
 * @returns The hex digest it printed.
 * @throws {Error} With nbdcopy's stderr when it fails.
 */
export async function sidBlkhash(
  source: string,
  spec?: string,
): Promise<string> {
  const r = await runSid("nbdcopy", [
    spec === undefined ? "--blkhash" : `--blkhash=${spec}`,
    "--",
    source,
    "null:",
  ]);
  if (r.code !== 0) {
    throw new Error(`nbdcopy --blkhash failed with ${r.code}: ${r.stderr}`);
  }
  return r.stdout.trim();
}
