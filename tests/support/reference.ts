/**
 * What libnbd's tools, the reference client, see of an export: its bytes
 * (`nbdcopy`), their hash, and its extent map (`nbdinfo --map`). Tests
 * compare the client, the tools and the scripted server against these.
 *
 * @module
 */

import type { Extent } from "../../mod.ts";
import { type Peers, run, runBytes } from "./servers.ts";

/** SHA-256 of bytes, in hex. */
export async function sha256(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-256",
    bytes as Uint8Array<ArrayBuffer>,
  );
  return Array.from(
    new Uint8Array(digest),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
}

/** SHA-256 of a file's bytes, in hex. */
export async function fileHash(path: string): Promise<string> {
  return await sha256(await Deno.readFile(path));
}

/** The whole export as `nbdcopy` (the host's, or the Debian 13 root's) reads it. */
export function referenceBytes(
  uri: string,
  peers: Peers = "host",
): Promise<Uint8Array> {
  return runBytes("nbdcopy", [uri, "-"], peers);
}

/** The SHA-256 of the whole export as `nbdcopy` reads it. */
export async function exportHash(
  uri: string,
  peers: Peers = "host",
): Promise<string> {
  return await sha256(await referenceBytes(uri, peers));
}

/** One entry of `nbdinfo --map --json`. */
interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/**
 * The reference client's map of one context, neighbours of the same type
 * merged as the client merges them, with the type as `flags`.
 */
export async function referenceMap(
  uri: string,
  context = "base:allocation",
  peers: Peers = "host",
): Promise<Extent[]> {
  const map: MapEntry[] = JSON.parse(
    await run("nbdinfo", [`--map=${context}`, "--json", uri], peers),
  );
  const out: Extent[] = [];
  for (const m of map) {
    const last = out.at(-1);
    if (last && last.flags === m.type) last.length += m.length;
    else out.push({ offset: m.offset, length: m.length, flags: m.type });
  }
  return out;
}
