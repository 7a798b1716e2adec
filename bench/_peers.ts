/**
 * libnbd's tools beside our client: the installs found (the host's and the
 * Debian 13 root's), and `nbdsh` running `bench/_libnbd.py`, which warms up
 * and times each run itself.
 *
 * @module
 */

import {
  type BenchContext,
  type Contender,
  has,
  type Libnbd,
  type Run,
  versionOf,
} from "./_harness.ts";
import { insideRoot, TRIXIE_ROOT } from "../tests/support/servers.ts";

/**
 * nbdcopy reading `uri` into `null:` as our client reads it: `request`
 * bytes a request, `depth` in flight, one connection.
 *
 * @param uri The export.
 * @param request The request size in bytes.
 * @param depth The queue depth.
 * @returns The command line, to pass through a libnbd install's `wrap()`.
 */
export function nbdcopyMatched(
  uri: string,
  request: number,
  depth: number,
): string[] {
  return [
    "nbdcopy",
    `--request-size=${request}`,
    `--requests=${depth}`,
    "--connections=1",
    uri,
    "null:",
  ];
}

/** libnbd's version as `nbdcopy --version` prints it ("1.22.2" -> "1.22"). */
async function libnbdVersion(
  wrap: (argv: string[]) => string[],
): Promise<string> {
  const [cmd, ...args] = wrap(["nbdcopy", "--version"]);
  const line = await versionOf(cmd!, args);
  return /(\d+\.\d+)\.\d+/.exec(line)?.[1] ?? "?";
}

/**
 * The host's libnbd, then the root's when `.ci/setup` made it (the
 * benchmark directory must be under the root for that one to reach it).
 */
export async function libnbds(
  dir: string,
  enabled: boolean,
): Promise<Libnbd[]> {
  const off = "--no-libnbd";
  const host = (argv: string[]) => argv;
  const hostEnv = enabled ? await nbdshEnv(dir) : null;
  const out: Libnbd[] = [{
    version: enabled ? await libnbdVersion(host) : "host",
    wrap: host,
    nbdcopy: enabled && await has("nbdcopy"),
    nbdshEnv: hostEnv !== null && await has("nbdsh", hostEnv) ? hostEnv : null,
    missing: enabled ? "not found on the host" : off,
  }];
  const rooted = dir.startsWith(`${TRIXIE_ROOT}/`);
  const root = (argv: string[]) => [
    "chroot",
    TRIXIE_ROOT,
    ...argv.map(insideRoot),
  ];
  // Inside the root, its own PATH, whatever the host's holds.
  const rootEnv = { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" };
  const usable = enabled && rooted;
  out.push({
    version: usable ? await libnbdVersion(root) : "1.22",
    wrap: root,
    nbdcopy: usable && await has("chroot", undefined, [
      TRIXIE_ROOT,
      "nbdcopy",
      "--version",
    ]),
    nbdshEnv: usable &&
        await has("chroot", rootEnv, [TRIXIE_ROOT, "nbdsh", "--version"])
      ? rootEnv
      : null,
    missing: !enabled
      ? off
      : rooted
      ? "not found in the Debian 13 root"
      : `no Debian 13 root at ${TRIXIE_ROOT} (run .ci/setup)`,
  });
  return out;
}

/**
 * nbdsh runs `python3 -m nbd` from PATH; where the first python3 on PATH
 * (a pyenv shim, say) lacks the module, put the system one first.
 */
async function nbdshEnv(dir: string): Promise<Record<string, string> | null> {
  const path = Deno.env.get("PATH") ?? "/usr/bin:/bin";
  const imports = async (python: string) => {
    try {
      const r = await new Deno.Command(python, {
        args: ["-c", "import nbd"],
        stdout: "null",
        stderr: "null",
      }).output();
      return r.success;
    } catch {
      return false;
    }
  };
  if (await imports("python3")) return { PATH: path };
  for (const python of ["/usr/bin/python3", "/usr/local/bin/python3"]) {
    if (await imports(python)) {
      const bin = `${dir}/bin`;
      await Deno.mkdir(bin, { recursive: true });
      await Deno.symlink(python, `${bin}/python3`);
      return { PATH: `${bin}:${path}` };
    }
  }
  return null;
}

/** What `bench/_libnbd.py` is asked to do. */
export interface NbdshJob {
  mode: "seq" | "rand";
  /** Write instead of read. */
  write?: boolean;
  request: number;
  depth: number;
  runs: number;
  seconds: number;
  size?: number;
  warmSize?: number;
  count?: number;
  warmCount?: number;
  offsetsFile?: string;
}

/**
 * Runs bench/_libnbd.py inside nbdsh; it warms up and times each run.
 * `script` is a copy of it where `lib`'s nbdsh can read it.
 */
async function runNbdsh(
  uri: string,
  lib: Libnbd,
  script: string,
  job: NbdshJob,
): Promise<Run[]> {
  const env = lib.nbdshEnv!;
  const vars: Record<string, string> = {
    ...env,
    NBD_BENCH_MODE: job.mode,
    NBD_BENCH_REQUEST: String(job.request),
    NBD_BENCH_QD: String(job.depth),
    NBD_BENCH_RUNS: String(job.runs),
    NBD_BENCH_SECONDS: String(job.seconds),
    NBD_BENCH_SIZE: String(job.size ?? 0),
    NBD_BENCH_WARM_SIZE: String(job.warmSize ?? 0),
    NBD_BENCH_COUNT: String(job.count ?? 0),
    NBD_BENCH_WRITE: job.write ? "1" : "0",
    NBD_BENCH_WARM_COUNT: String(job.warmCount ?? 0),
    NBD_BENCH_OFFSETS: lib.wrap([job.offsetsFile ?? ""]).at(-1)!,
  };
  const [cmd, ...args] = lib.wrap([
    "nbdsh",
    "-u",
    uri,
    "-c",
    `exec(open(${JSON.stringify(script)}).read())`,
  ]);
  const r = await new Deno.Command(cmd!, {
    args,
    env: vars,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout).trim();
  if (!r.success) {
    throw new Error(
      `nbdsh failed (exit ${r.code}): ${
        new TextDecoder().decode(r.stderr).trim()
      }`,
    );
  }
  const last = text.split("\n").at(-1) ?? "";
  return (JSON.parse(last) as { runs: Run[] }).runs;
}

/**
 * The `skip`, `warm` and `once` of a contender that runs `job` with `lib`'s
 * nbdsh against `uri`: the warm-up is a run of the script with no timed
 * runs, each timed run a script run with no warm-up.
 */
export function nbdshContender(
  ctx: BenchContext,
  lib: Libnbd,
  job: Omit<NbdshJob, "runs">,
  uri: string,
): Pick<Contender, "skip" | "warm" | "once"> {
  const script = lib.wrap([ctx.script]).at(-1)!;
  return {
    ...(lib.nbdshEnv ? {} : { skip: `nbdsh ${lib.missing}` }),
    warm: () => runNbdsh(uri, lib, script, { ...job, runs: 0 }),
    once: async () => {
      const [run] = await runNbdsh(uri, lib, script, {
        ...job,
        runs: 1,
        warmSize: 0,
        warmCount: 0,
      });
      return run!;
    },
  };
}
