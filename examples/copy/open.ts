/**
 * Picks the endpoint kind a command-line word names.
 *
 * @module
 */

import { type ServerCommand, UsageError } from "../_cli.ts";
import type { Destination, Settings, Source } from "./endpoint.ts";
import { FileEndpoint } from "./file.ts";
import { isNbdUri, NbdEndpoint } from "./nbd.ts";
import { NullDestination } from "./null.ts";
import { StreamDestination, StreamSource } from "./stream.ts";

/**
 * One end as the command line names it: a word (`-`, `null:`, a path, a
 * URI) or a server to start.
 */
export type End = string | ServerCommand;

/**
 * Opens what `word` names as the source: `-`, an NBD URI, a path or a
 * server to start.
 */
export async function openSource(
  word: End,
  s: Settings,
  signal: AbortSignal,
): Promise<Source> {
  if (typeof word !== "string") {
    return await NbdEndpoint.open(word, "source", s, signal);
  }
  if (word === "-") return new StreamSource("stdin", Deno.stdin);
  if (word === "null:") throw new UsageError("null: can only be a destination");
  if (isNbdUri(word)) return await NbdEndpoint.open(word, "source", s, signal);
  return await FileEndpoint.openSource(word);
}

/**
 * Opens what `word` names as the destination: `-`, `null:`, an NBD URI, a
 * path or a server to start.
 */
export async function openDestination(
  word: End,
  s: Settings,
  signal: AbortSignal,
): Promise<Destination> {
  if (word === "-") return new StreamDestination("stdout", Deno.stdout);
  if (word === "null:") return new NullDestination();
  if (typeof word !== "string" || isNbdUri(word)) {
    return await NbdEndpoint.open(word, "destination", s, signal);
  }
  return await FileEndpoint.openDestination(word, s);
}

/**
 * Opens what `word` names as the destination of an incremental copy: an
 * earlier full copy of a `size`-byte source, a file, block device or NBD
 * export (at a URI or behind a server to start) of exactly that size,
 * which is updated in place.
 *
 * @throws {Error} One line when it is missing or has another size.
 */
export async function openExistingDestination(
  word: End,
  size: number,
  s: Settings,
  signal: AbortSignal,
): Promise<Destination> {
  if (word === "-" || word === "null:") {
    throw new UsageError(
      "--dirty needs a DESTINATION that is a file, a block device or an NBD URI",
    );
  }
  if (typeof word === "string" && !isNbdUri(word)) {
    return await FileEndpoint.openExisting(word, size);
  }
  const dst = await NbdEndpoint.open(word, "destination", s, signal);
  if (dst.size !== size) {
    await dst.close(signal);
    const name = typeof word === "string" ? word : word.text;
    throw new Error(
      `${name} has ${dst.size} bytes and the source ${size}: --dirty updates a copy of the same size`,
    );
  }
  return dst;
}

/** Whether a word names a path (rather than `-`, `null:` or a URI). */
function isPath(word: string): boolean {
  return word !== "-" && word !== "null:" && !isNbdUri(word);
}

/** `stat` (following links), or `undefined` when there is nothing there. */
async function statIfAny(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch {
    // Missing or unreadable: opening it will say so, with the reason.
    return undefined;
  }
}

/**
 * Whether two `stat`s are one file whose copy onto itself would destroy
 * it: one inode on one device (a link, a symbolic link, another spelling
 * of the path), or two device nodes for the same block device.
 */
function sameFile(a: Deno.FileInfo, b: Deno.FileInfo): boolean {
  if (!(a.isFile || a.isBlockDevice) || !(b.isFile || b.isBlockDevice)) {
    return false;
  }
  if (a.dev !== null && a.ino !== null && a.dev === b.dev && a.ino === b.ino) {
    return true;
  }
  return a.isBlockDevice === true && b.isBlockDevice === true &&
    a.rdev !== null && a.rdev === b.rdev;
}

/**
 * Refuses a copy of a file or block device onto itself, as `cp` does,
 * before anything is opened: replacing the destination would first
 * truncate the source. `-` as the source is checked through `/dev/stdin`.
 *
 * @throws {Error} "'a' and 'b' are the same file".
 */
export async function refuseSameFile(
  source: string,
  destination: string,
): Promise<void> {
  if (!isPath(destination)) return;
  const from = source === "-" ? "/dev/stdin" : isPath(source) ? source : null;
  if (from === null) return;
  const [a, b] = await Promise.all([statIfAny(from), statIfAny(destination)]);
  if (a && b && sameFile(a, b)) {
    throw new Error(`'${source}' and '${destination}' are the same file`);
  }
}
