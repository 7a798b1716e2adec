/**
 * Real servers for the tools' tests: nbdkit and qemu-nbd on private Unix
 * sockets in a fresh temporary directory, and the tools themselves run as
 * subprocesses so that exit codes and output are the real ones.
 *
 * @module
 */

const ROOT = new URL("../../", import.meta.url);

/** A running server; stop it in `finally`. */
export interface Server {
  /** The socket's path. */
  socket: string;
  /** The directory holding the socket (and anything else the test makes). */
  dir: string;
  /** An `nbd+unix://` URI for an export of this server. */
  uri(exportName?: string): string;
  /** Stops the server and removes its directory. */
  stop(): Promise<void>;
}

/** Whether a program is installed, so tests can be skipped when it is not. */
export function have(program: string): boolean {
  try {
    const r = new Deno.Command("sh", {
      args: ["-c", `command -v ${program}`],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    return r.success;
  } catch {
    return false;
  }
}

async function waitForSocket(
  path: string,
  child: Deno.ChildProcess,
  stderr: Promise<string>,
): Promise<void> {
  const deadline = Date.now() + 10_000;
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  while (Date.now() < deadline) {
    try {
      const info = await Deno.stat(path);
      if (info.isSocket) return;
    } catch {
      // Not there yet.
    }
    if (exited) {
      const s = await status;
      throw new Error(`server exited with ${s.code}: ${await stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`server socket ${path} did not appear within 10 s`);
}

async function start(
  program: string,
  args: (socket: string, dir: string) => string[],
  dir?: string,
): Promise<Server> {
  const ownDir = dir === undefined;
  const d = dir ?? await Deno.makeTempDir({ prefix: "nbd-tools-" });
  const socket = `${d}/nbd-${crypto.randomUUID().slice(0, 8)}.sock`;
  const child = new Deno.Command(program, {
    args: args(socket, d),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stop = async () => {
    try {
      child.kill("SIGTERM");
    } catch {
      // Already gone.
    }
    await child.status;
    await stderr;
    if (ownDir) await Deno.remove(d, { recursive: true }).catch(() => {});
    else await Deno.remove(socket).catch(() => {});
  };
  try {
    await waitForSocket(socket, child, stderr);
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    socket,
    dir: d,
    uri: (name = "") =>
      `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    stop,
  };
}

/**
 * Starts `nbdkit` in the foreground on a private socket.
 *
 * @param args Plugin, filters and parameters, e.g. `["memory", "1M"]`.
 * @param dir Put the socket here instead of in a new temporary directory.
 */
export function nbdkit(args: string[], dir?: string): Promise<Server> {
  return start(
    "nbdkit",
    (socket) => ["-f", "--exit-with-parent", "-U", socket, ...args],
    dir,
  );
}

/**
 * Starts `qemu-nbd` serving an image on a private socket, for any number of
 * connections (`--persistent`), with `--shared` so that multi-conn works.
 */
export function qemuNbd(args: string[], dir?: string): Promise<Server> {
  return start(
    "qemu-nbd",
    (socket) => ["--persistent", "--shared=8", "-k", socket, ...args],
    dir,
  );
}

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

/** Runs a program and returns stdout, failing the test if it fails. */
export async function sh(program: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(
      `${program} ${args.join(" ")} failed with ${out.code}: ${
        new TextDecoder().decode(out.stderr)
      }`,
    );
  }
  return text;
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
  return JSON.parse(await sh("nbdinfo", [`--map=${context}`, "--json", uri]));
}
