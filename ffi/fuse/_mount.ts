/**
 * Where the file goes and the `mount(2)`/`umount2(2)` calls: the path
 * `MOUNTPOINT[/FILENAME]` split as nbdfuse splits it, the checks that turn
 * a busy, stale or wrong mount point into one line naming the fix, and the
 * FUSE mount itself (`fuse.SUBTYPE`, `fd=N,rootmode=40000,...`).
 *
 * @module
 */

import { NbdSystemCallError } from "../errors.ts";
import { cString } from "../_libc.ts";
import { NbdFuseError } from "./errors.ts";
import {
  EACCES,
  EBUSY,
  EINVAL,
  ENOENT,
  EPERM,
  errno,
  MNT_DETACH,
  MS_NODEV,
  MS_NOSUID,
  MS_RDONLY,
  sys,
} from "./_sys.ts";

/** The file name used when the path names only a directory. */
export const DEFAULT_FILE_NAME = "nbd";

/** Where the export appears. */
export interface Target {
  /** The directory the FUSE file system is mounted on, absolute. */
  mountpoint: string;
  /** The one file's name inside it. */
  fileName: string;
}

const ENOTCONN_TEXT = /os error 107\b|not connected/i;

function unmountHint(dir: string): string {
  return `run: fusermount3 -u ${dir}`;
}

function statOrNull(path: string): Deno.FileInfo | null {
  try {
    return Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    if (e instanceof Error && ENOTCONN_TEXT.test(e.message)) {
      throw new NbdFuseError(
        "stale",
        `${path} is a FUSE mount whose server has gone (transport endpoint is not connected); ${
          unmountHint(path)
        }`,
        { cause: e },
      );
    }
    throw new NbdFuseError(
      "other",
      `Cannot use ${path}: ${e instanceof Error ? e.message : String(e)}`,
      { cause: e },
    );
  }
}

function absolute(path: string): string {
  const joined = path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
  const parts: string[] = [];
  for (const p of joined.split("/")) {
    if (p === "" || p === ".") continue;
    if (p === "..") parts.pop();
    else parts.push(p);
  }
  return "/" + parts.join("/");
}

/**
 * Splits `MOUNTPOINT[/FILENAME]`: an existing directory is the mount point
 * and the file is `nbd`; a path that does not exist names the file, and
 * its parent directory is the mount point.
 *
 * @param path As the user gave it.
 * @returns The mount point (absolute) and the file name.
 * @throws {NbdFuseError} `"not-directory"`, `"not-found"` or `"stale"`.
 */
export function resolveTarget(path: string): Target {
  if (path === "") {
    throw new NbdFuseError("not-found", "The mount point is an empty path");
  }
  const full = absolute(path);
  const info = statOrNull(full);
  if (info?.isDirectory) {
    return { mountpoint: full, fileName: DEFAULT_FILE_NAME };
  }
  if (info) {
    throw new NbdFuseError(
      "not-directory",
      `${full} is not a directory; give a directory to mount on (MOUNTPOINT) or a new name inside one (MOUNTPOINT/FILENAME)`,
    );
  }
  // "dir/" names a directory: one that is missing is not a file name to
  // serve in its parent (which would cover the parent).
  if (/\/\.?$/.test(path)) {
    throw new NbdFuseError(
      "not-found",
      `${full} does not exist; create the mount point first: mkdir ${full}`,
    );
  }
  const slash = full.lastIndexOf("/");
  const parent = slash <= 0 ? "/" : full.slice(0, slash);
  const fileName = full.slice(slash + 1);
  const dir = statOrNull(parent);
  if (!dir) {
    throw new NbdFuseError(
      "not-found",
      `Neither ${full} nor its directory ${parent} exists; create the mount point first: mkdir ${full}`,
    );
  }
  if (!dir.isDirectory) {
    throw new NbdFuseError(
      "not-directory",
      `${parent} is not a directory, so it cannot hold ${fileName}`,
    );
  }
  return { mountpoint: parent, fileName };
}

/** One line of /proc/self/mountinfo: where, and what. */
interface MountEntry {
  /** `major:minor` of the file system (a FUSE mount's bdi is named so). */
  device: string;
  mountpoint: string;
  fstype: string;
  source: string;
}

function unescape(s: string): string {
  return s.replace(
    /\\([0-7]{3})/g,
    (_, o) => String.fromCharCode(parseInt(o, 8)),
  );
}

/** The mounts of this process's namespace, from /proc/self/mountinfo. */
export function mounts(): MountEntry[] {
  let text: string;
  try {
    text = Deno.readTextFileSync("/proc/self/mountinfo");
  } catch {
    return [];
  }
  const out: MountEntry[] = [];
  for (const line of text.split("\n")) {
    const fields = line.split(" ");
    const dash = fields.indexOf("-");
    if (dash < 0 || fields.length < dash + 3) continue;
    out.push({
      device: fields[2]!,
      mountpoint: unescape(fields[4]!),
      fstype: fields[dash + 1]!,
      source: unescape(fields[dash + 2]!),
    });
  }
  return out;
}

/** Whether `dir` is a mount point now (the last mount on it counts). */
export function mountedAt(dir: string): MountEntry | undefined {
  return mounts().findLast((m) => m.mountpoint === dir);
}

/**
 * Refuses a mount point that already has something mounted on it: a live
 * mount (busy) or a FUSE mount whose server died (stale). Mounting over
 * either would hide it and leave two to clean up.
 *
 * @throws {NbdFuseError} `"busy"` or `"stale"`, naming the fix.
 */
export function checkMountpoint(dir: string): void {
  statOrNull(dir); // throws "stale" for a dead FUSE server
  const m = mountedAt(dir);
  if (!m) return;
  const fuse = m.fstype === "fuse" || m.fstype.startsWith("fuse.");
  throw new NbdFuseError(
    "busy",
    `${dir} is already a mount point (${m.fstype} from ${m.source}); unmount it first: ${
      fuse ? `fusermount3 -u ${dir}` : `umount ${dir}`
    }`,
  );
}

/**
 * Mounts the FUSE file system on `dir`, served through descriptor `fd`.
 *
 * @param fd An open `/dev/fuse`.
 * @param dir The mount point, absolute.
 * @param readOnly Mount read-only (`MS_RDONLY`).
 * @param source What /proc/mounts shows as the source.
 * @throws {NbdFuseError} `"permission"` without CAP_SYS_ADMIN, `"busy"`,
 *   `"other"` with the errno otherwise.
 */
export function mountFuseFs(
  fd: number,
  dir: string,
  readOnly: boolean,
  source: string,
): void {
  const uid = sys().getuid();
  const gid = sys().getgid();
  const data = `fd=${fd},rootmode=40000,user_id=${uid},group_id=${gid}`;
  const flags = MS_NOSUID | MS_NODEV | (readOnly ? MS_RDONLY : 0);
  const rc = sys().mount(
    cString(source),
    cString(dir),
    cString("fuse.nbd"),
    BigInt(flags),
    cString(data),
  );
  if (rc === 0) return;
  const e = errno();
  const cause = new NbdSystemCallError("mount", e, `Cannot mount on ${dir}`);
  if (e === EPERM || e === EACCES) {
    throw new NbdFuseError(
      "permission",
      `${cause.message}. Mounting FUSE this way needs root (CAP_SYS_ADMIN)`,
      { cause },
    );
  }
  throw new NbdFuseError(e === EBUSY ? "busy" : "other", cause.message, {
    cause,
  });
}

/**
 * Unmounts `dir`: at once if nothing uses it, else lazily (detached from
 * the tree now, gone when the last user closes the file).
 *
 * @returns `"unmounted"`, `"detached"` (lazy), or `"not-mounted"`.
 * @throws {NbdSystemCallError} when even the lazy unmount fails.
 */
export function unmountFs(
  dir: string,
  device?: string,
): "unmounted" | "detached" | "not-mounted" {
  // Unmounting goes by path: never take down what has since been mounted
  // on top of ours, or a mount that replaced ours after it went.
  if (device !== undefined && mountedAt(dir)?.device !== device) {
    return "not-mounted";
  }
  const path = cString(dir);
  if (sys().umount2(path, 0) === 0) return "unmounted";
  let e = errno();
  if (e === EINVAL || e === ENOENT) return "not-mounted";
  if (e === EBUSY) {
    if (sys().umount2(path, MNT_DETACH) === 0) return "detached";
    e = errno();
    if (e === EINVAL || e === ENOENT) return "not-mounted";
  }
  throw new NbdSystemCallError("umount2", e, `Cannot unmount ${dir}`);
}

/**
 * Sets the read-ahead of the FUSE mount on `dir` (its own backing device,
 * `/sys/class/bdi/MAJ:MIN/read_ahead_kb`). The kernel starts a FUSE mount
 * at 128 KiB, which caps buffered reads at 128 KiB requests; larger ones
 * halve the round trips of a sequential read.
 *
 * @returns Whether it was set (not without sysfs or permission).
 */
export function setReadahead(dir: string, kib: number): boolean {
  const m = mountedAt(dir);
  if (!m) return false;
  try {
    Deno.writeTextFileSync(
      `/sys/class/bdi/${m.device}/read_ahead_kb`,
      `${kib}\n`,
    );
    return true;
  } catch {
    return false;
  }
}
