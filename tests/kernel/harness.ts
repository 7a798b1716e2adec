/**
 * Boots Debian's kernel under qemu to exercise the nbd driver, which the
 * host kernel lacks. See /work/shared/KERNEL-HARNESS.md for the facts this
 * rests on.
 *
 * The guest is an initramfs (busybox, the modules, `init.sh`) plus a second
 * cpio holding the `deno` binary. It mounts the host root read-only over 9p,
 * chroots into it and runs one command; results go to a writable 9p share.
 * There is no network device at all.
 *
 * Run by hand: `deno run -A tests/kernel/harness.ts 'sh tests/kernel/guest.sh'`
 * (`KT_KERNEL=trixie` boots Debian 13's kernel instead of the host's).
 *
 * @module
 */

import assert from "node:assert/strict";
import { TRIXIE_ROOT } from "../support/servers.ts";

const HERE = new URL(".", import.meta.url).pathname;
/** The repository root (tests/kernel/../..). */
export const REPO_ROOT: string = new URL("../../", import.meta.url).pathname
  .replace(/\/$/, "");
const CACHE = `${HERE}.cache`;

/** Modules the guest loads, in order, with their dependencies. */
const MODULES = ["virtio_pci", "9pnet_virtio", "9p", "nbd", "ext4"];
/** Debian packages that make the guest. */
export const PACKAGES = [
  "qemu-system-x86",
  "linux-image-amd64",
  "busybox-static",
];
/** Commands guest.sh uses from the host root, and their Debian packages. */
const GUEST_TOOLS: [string, string][] = [
  ["nbdkit", "nbdkit"],
  ["nbdcopy", "libnbd-bin"],
  ["nbdinfo", "libnbd-bin"],
  ["openssl", "openssl"],
  ["mkfs.ext4", "e2fsprogs"],
  ["blockdev", "util-linux"],
  ["setpriv", "util-linux"],
  ["/usr/bin/python3", "python3"],
  ["xz", "xz-utils"],
  ["cpio", "cpio"],
  ["modprobe", "kmod"],
];

/** What a boot produced. */
export interface BootResult {
  /** The guest command's exit code, or `null` if the guest never wrote one. */
  guestExitCode: number | null;
  /** qemu's exit code (124 when `timeout` stopped it). */
  qemuExitCode: number;
  /** The serial console: kernel messages, init and the command's output. */
  console: string;
  /** Where the writable share is; the command's files are there. */
  resultsDir: string;
  /** Wall time of the boot in milliseconds. */
  wallMs: number;
}

/** Options for {@linkcode boot}. */
export interface BootOptions {
  /** Shell command run in the guest, in the repository root. */
  command: string;
  /** Seconds before the guest powers itself off. */
  guestDeadline: number;
  /** Seconds before the host kills qemu (a little more than the above). */
  hostTimeout: number;
  /** Where results go; a fresh temporary directory by default. */
  resultsDir?: string;
  /** Which kernel to boot: the host's (the default) or Debian 13's. */
  kernel?: KernelChoice;
}

async function run(
  cmd: string,
  args: string[],
  opts: { stdout?: "piped" | "null" } = {},
): Promise<Uint8Array> {
  const out = await new Deno.Command(cmd, {
    args,
    stdout: opts.stdout ?? "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim();
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${err}`);
  }
  return out.stdout;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

async function which(name: string): Promise<string | null> {
  for (const dir of (Deno.env.get("PATH") ?? "/usr/bin:/bin").split(":")) {
    if (await exists(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  for (const dir of ["/usr/sbin", "/sbin"]) {
    if (await exists(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  return null;
}

/** A kernel the guest can boot, with its module tree. */
export interface Kernel {
  /** Whose kernel, for test names: `"Debian 12"`, `"Debian 13"`. */
  distribution: string;
  /** `uname -r` in the guest, e.g. `6.12.117+deb13-amd64`. */
  version: string;
  vmlinuz: string;
  /** The directory holding `lib/modules/<version>` (`modprobe -d`). */
  modulesBase: string;
}

/** Which kernels the tests boot: the host's and Debian 13's. */
export type KernelChoice = "host" | "trixie";

/**
 * The newest kernel under `base`/boot with a module index, by version
 * order: the host's own (`base` "/"), or Debian 13's, which `.ci/setup`
 * unpacks under the Debian 13 root.
 */
export async function findKernel(
  choice: KernelChoice = "host",
): Promise<Kernel> {
  const base = choice === "host" ? "" : `${TRIXIE_ROOT}/opt/nbd-deno-kernel`;
  const versions: string[] = [];
  try {
    for await (const e of Deno.readDir(`${base}/boot`)) {
      const m = /^vmlinuz-(.+)$/.exec(e.name);
      if (m?.[1] && await exists(`${base}/lib/modules/${m[1]}/modules.dep`)) {
        versions.push(m[1]);
      }
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  versions.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  const version = versions.at(-1);
  if (!version) {
    throw new Error(
      choice === "host"
        ? "No /boot/vmlinuz-* with modules under /lib/modules"
        : `No Debian 13 kernel under ${base}: run "bash .ci/setup" as root`,
    );
  }
  return {
    distribution: choice === "host" ? "Debian 12" : "Debian 13",
    version,
    vmlinuz: `${base}/boot/vmlinuz-${version}`,
    modulesBase: base || "/",
  };
}

/**
 * Checks the Debian packages; installs them when running as root under CI,
 * and otherwise fails with the command to run. Never skips.
 */
export async function ensurePackages(): Promise<void> {
  const missing = new Set<string>();
  if (!await which("qemu-system-x86_64")) missing.add("qemu-system-x86");
  if (!await exists("/bin/busybox")) missing.add("busybox-static");
  try {
    await findKernel();
  } catch {
    missing.add("linux-image-amd64");
  }
  // Debian 13's kernel comes with the root .ci/setup makes; say so now
  // rather than after the other packages.
  await findKernel("trixie");
  // What guest.sh runs from the host root it mounts.
  for (const [command, pkg] of GUEST_TOOLS) {
    const found = command.startsWith("/")
      ? await exists(command)
      : await which(command);
    if (!found) missing.add(pkg);
  }
  if (missing.size === 0) return;
  const packages = [...missing];
  const isRoot = Deno.uid() === 0;
  if (!Deno.env.get("CI") || !isRoot) {
    throw new Error(
      `The kernel test needs ${packages.join(", ")}: run ` +
        `"apt-get install -y ${packages.join(" ")}" as root ` +
        `(CI installs them itself)`,
    );
  }
  await run("apt-get", ["update"], { stdout: "null" });
  const out = await new Deno.Command("apt-get", {
    args: ["install", "-y", "--no-install-recommends", ...packages],
    env: { DEBIAN_FRONTEND: "noninteractive" },
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(
      `apt-get install failed: ${new TextDecoder().decode(out.stderr)}`,
    );
  }
}

/**
 * The uncompressed kernel boots about 2 s faster under emulation (PVH
 * entry). Falls back to vmlinuz when no xz stream is found.
 */
async function kernelImage(version: string, vmlinuz: string): Promise<string> {
  const target = `${CACHE}/vmlinux-${version}`;
  if (await exists(target)) return target;
  const image = await Deno.readFile(vmlinuz);
  const magic = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
  let at = -1;
  outer: for (let i = 0; i + magic.length <= image.length; i++) {
    for (let j = 0; j < magic.length; j++) {
      if (image[i + j] !== magic[j]) continue outer;
    }
    at = i;
    break;
  }
  if (at < 0) return vmlinuz;
  const child = new Deno.Command("xz", {
    args: ["-dc", "--single-stream"],
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const writer = child.stdin.getWriter();
  const writing = writer.write(image.subarray(at)).then(() => writer.close())
    .catch(() => {});
  const out = await child.output();
  await writing;
  // An ELF image is what we want; anything else means a different format.
  if (
    out.stdout.length < 4 || out.stdout[0] !== 0x7f || out.stdout[1] !== 0x45
  ) {
    return vmlinuz;
  }
  // Runs may build at once: each writes its own file, then renames.
  await Deno.writeFile(`${target}.part-${Deno.pid}`, out.stdout);
  await Deno.rename(`${target}.part-${Deno.pid}`, target);
  return target;
}

/** The `.ko` files to load, dependencies first, without duplicates. */
async function moduleFiles(kernel: Kernel): Promise<string[]> {
  const files: string[] = [];
  for (const name of MODULES) {
    const text = new TextDecoder().decode(
      await run("modprobe", [
        "-d",
        kernel.modulesBase,
        "-S",
        kernel.version,
        "--show-depends",
        name,
      ]),
    );
    for (const line of text.split("\n")) {
      const m = /^insmod (\S+)/.exec(line.trim());
      if (m?.[1] && !files.includes(m[1])) files.push(m[1]);
    }
  }
  return files;
}

async function decompressedModule(path: string): Promise<Uint8Array> {
  if (path.endsWith(".ko.xz")) return await run("xz", ["-dc", path]);
  if (path.endsWith(".ko.zst")) return await run("zstd", ["-dcq", path]);
  if (path.endsWith(".ko.gz")) return await run("gzip", ["-dc", path]);
  return await Deno.readFile(path);
}

async function cpio(dir: string, out: string): Promise<void> {
  await run("sh", [
    "-c",
    `cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 > "$2"`,
    "sh",
    dir,
    out,
  ]);
}

/**
 * Builds (or reuses) the initramfs: base cpio plus a cpio with deno. The
 * initrd is this run's own file (runs may overlap); the caller removes it.
 */
export async function buildInitramfs(choice: KernelChoice = "host"): Promise<
  { kernel: string; initrd: string; version: string }
> {
  const run_ = `run-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  const base = `${CACHE}/${run_}-base.cpio`;
  await Deno.mkdir(CACHE, { recursive: true });
  const found = await findKernel(choice);
  const version = found.version;
  const kernel = await kernelImage(version, found.vmlinuz);

  // The base part is small: rebuilt every time so init.sh edits show.
  const root = await Deno.makeTempDir({ dir: CACHE, prefix: "root-" });
  try {
    for (
      const d of ["bin", "dev", "proc", "sys", "mnt", "lib/modules", "deno"]
    ) {
      await Deno.mkdir(`${root}/${d}`, { recursive: true });
    }
    await Deno.copyFile("/bin/busybox", `${root}/bin/busybox`);
    await Deno.copyFile(`${HERE}init.sh`, `${root}/init`);
    await Deno.chmod(`${root}/init`, 0o755);
    const order: string[] = [];
    for (const path of await moduleFiles(found)) {
      const base = path.split("/").at(-1)!.replace(/\.ko\.(xz|zst|gz)$/, ".ko");
      await Deno.writeFile(
        `${root}/lib/modules/${base}`,
        await decompressedModule(path),
      );
      order.push(base);
    }
    await Deno.writeTextFile(`${root}/modules.order`, order.join("\n") + "\n");
    await cpio(root, base);
  } finally {
    await Deno.remove(root, { recursive: true });
  }

  // The deno part is large: cached by the binary's identity.
  const denoPath = Deno.execPath();
  const st = await Deno.stat(denoPath);
  const key = `${st.size}-${st.mtime?.getTime() ?? 0}`;
  const denoCpio = `${CACHE}/deno-${key}.cpio`;
  if (!await exists(denoCpio)) {
    for await (const e of Deno.readDir(CACHE)) {
      if (/^deno-.*\.cpio$/.test(e.name)) {
        await Deno.remove(`${CACHE}/${e.name}`);
      }
    }
    const dir = await Deno.makeTempDir({ dir: CACHE, prefix: "deno-" });
    try {
      await Deno.mkdir(`${dir}/deno`);
      await Deno.copyFile(denoPath, `${dir}/deno/deno`);
      await Deno.chmod(`${dir}/deno/deno`, 0o755);
      await cpio(dir, `${denoCpio}.part-${Deno.pid}`);
      await Deno.rename(`${denoCpio}.part-${Deno.pid}`, denoCpio);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }

  const initrd = `${CACHE}/${run_}-initrd.cpio`;
  try {
    await run("sh", [
      "-c",
      `cat "$1" "$2" > "$3"`,
      "sh",
      base,
      denoCpio,
      initrd,
    ]);
  } finally {
    await Deno.remove(base);
  }
  return { kernel, initrd, version };
}

/**
 * Boots the guest, runs `command` in it and waits for power-off, never
 * longer than `hostTimeout` seconds a boot. A guest whose kernel dies
 * before init is ready (seen once in many boots: an `int3` oops in early
 * SMP boot under TCG, before any of this project's code runs) is booted
 * once more; both consoles are kept in `console.log`.
 */
/** Boots of one guest run: a second only when the first never reached init. */
const MAX_BOOTS = 2;

/**
 * Whether a boot's console shows the kernel dying before init.sh was ready
 * to run the command (an oops or a panic, and no "kt-init: ready"): then
 * nothing of this project ran, and booting again is fair. A guest that
 * hangs, or fails after init, is not booted again.
 */
export function diedBeforeInit(console: string): boolean {
  return !/^kt-init: ready after /m.test(console) &&
    /\b(Oops|Kernel panic)\b/.test(console);
}

export async function boot(options: BootOptions): Promise<BootResult> {
  const started = performance.now();
  const { kernel, initrd } = await buildInitramfs(options.kernel);
  const resultsDir = options.resultsDir ??
    await Deno.makeTempDir({ dir: "/var/tmp", prefix: "nbd-kernel-" });
  const sharedRepo = /^\/(tmp|run)(\/|$)/.test(REPO_ROOT) ? REPO_ROOT : "";
  const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;
  await Deno.writeTextFile(
    `${resultsDir}/kt.conf`,
    [
      `KT_REPO=${quote(REPO_ROOT)}`,
      `KT_REPO_SHARE=${quote(sharedRepo)}`,
      `KT_COMMAND=${quote(options.command)}`,
      `KT_DEADLINE=${options.guestDeadline}`,
      "",
    ].join("\n"),
  );
  const fs = (id: string, path: string, tag: string, ro: boolean) => [
    "-fsdev",
    `local,id=${id},path=${path},security_model=none,multidevs=remap${
      ro ? ",readonly=on" : ""
    }`,
    "-device",
    `virtio-9p-pci,fsdev=${id},mount_tag=${tag}`,
  ];
  const args = [
    "--kill-after=5",
    String(options.hostTimeout),
    "qemu-system-x86_64",
    "-nodefaults",
    "-no-user-config",
    "-no-reboot",
    "-machine",
    "pc",
    "-accel",
    "tcg,thread=multi",
    "-cpu",
    "max",
    "-m",
    "2G",
    "-smp",
    "2",
    "-display",
    "none",
    "-monitor",
    "none",
    "-serial",
    "stdio",
    "-nic",
    "none",
    "-kernel",
    kernel,
    "-initrd",
    initrd,
    "-append",
    "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
    ...fs("fsroot", "/", "hostroot", true),
    ...fs("fsrw", resultsDir, "rw", false),
    ...(sharedRepo ? fs("fsrepo", sharedRepo, "repo", true) : []),
  ];
  let out: Deno.CommandOutput;
  let console = "";
  try {
    for (let attempt = 1;; attempt++) {
      out = await new Deno.Command("timeout", {
        args,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout) +
        new TextDecoder().decode(out.stderr);
      console += text;
      if (attempt === MAX_BOOTS || !diedBeforeInit(text)) break;
      const note =
        `kt-harness: the guest kernel died before init was ready (qemu exit ${out.code}); booting once more`;
      console += `\n${note}\n`;
      globalThis.console.error(note);
    }
  } finally {
    await Deno.remove(initrd);
  }
  await Deno.writeTextFile(`${resultsDir}/console.log`, console);
  let guestExitCode: number | null = null;
  try {
    const text = (await Deno.readTextFile(`${resultsDir}/exit-code`)).trim();
    if (/^\d+$/.test(text)) guestExitCode = Number(text);
  } catch {
    // The guest never got that far; the console log says why.
  }
  return {
    guestExitCode,
    qemuExitCode: out.code,
    console,
    resultsDir,
    wallMs: Math.round(performance.now() - started),
  };
}

if (import.meta.main) {
  await ensurePackages();
  const result = await boot({
    kernel: Deno.env.get("KT_KERNEL") === "trixie" ? "trixie" : "host",
    command: Deno.args[0] ?? "echo hello from the guest; uname -r",
    guestDeadline: 240,
    hostTimeout: 270,
  });
  console.log(result.console);
  console.log(
    `guest exit ${result.guestExitCode}, qemu exit ${result.qemuExitCode}, ` +
      `${result.wallMs} ms, results in ${result.resultsDir}`,
  );
  Deno.exit(result.guestExitCode === 0 ? 0 : 1);
}

/** What a guest run left in its results share. */
export interface GuestOutput {
  /** Each file asked for, by name; empty when the guest wrote none. */
  files: Record<string, string>;
  /** Each check `results.txt` reports ("ok …" or "FAIL …"), by name. */
  lines: Map<string, string>;
  /** Where the console log is, with its last lines, for messages. */
  where: string;
}

/**
 * Reads `results.txt` and the other named files of a guest run, and the
 * end of its console.
 *
 * @param result The boot.
 * @param names Files besides `results.txt` to read.
 * @param tailLines How much of the console to quote.
 */
export async function guestOutput(
  result: BootResult,
  names: string[],
  tailLines: number,
): Promise<GuestOutput> {
  const files: Record<string, string> = {};
  for (const name of ["results.txt", ...names]) {
    try {
      files[name] = await Deno.readTextFile(`${result.resultsDir}/${name}`);
    } catch {
      files[name] = ""; // Reported with the console log.
    }
  }
  const lines = new Map<string, string>();
  for (const line of files["results.txt"]!.split("\n")) {
    const m = /^(ok|FAIL) ([\w-]+): ?(.*)$/.exec(line);
    if (m) lines.set(m[2]!, `${m[1]} ${m[3]}`);
  }
  const tail = result.console.split("\n").slice(-tailLines).join("\n");
  return {
    files,
    lines,
    where:
      `console log: ${result.resultsDir}/console.log; last lines:\n${tail}`,
  };
}

/**
 * One step per check the guest script reported ("ok …" or a failure), one
 * that the guest finished in time, and the results folder removed when all
 * passed (a failing run keeps its logs). A check that never reported fails.
 *
 * @param t The test context.
 * @param script What ran in the guest, for messages.
 * @param checks The names the script must report.
 * @param lines What it reported, by name.
 * @param result The boot.
 * @param where The console and results, for failure messages.
 */
export async function reportGuest(
  t: Deno.TestContext,
  script: string,
  checks: readonly string[],
  lines: ReadonlyMap<string, string>,
  result: BootResult,
  where: string,
): Promise<void> {
  for (const name of checks) {
    await t.step(name, () => {
      const line = lines.get(name);
      assert.ok(
        line !== undefined,
        `${script} did not report "${name}"\n${where}`,
      );
      assert.ok(line.startsWith("ok"), `${name}: ${line}\n${where}`);
    });
  }
  await t.step("the guest finished in time", () => {
    assert.equal(
      result.guestExitCode,
      0,
      `guest exit ${result.guestExitCode}, qemu exit ${result.qemuExitCode}\n${where}`,
    );
  });
  if (
    result.guestExitCode === 0 &&
    [...lines.values()].every((l) => l.startsWith("ok"))
  ) {
    await Deno.remove(result.resultsDir, { recursive: true });
  }
}
