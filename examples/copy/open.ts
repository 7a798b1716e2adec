/**
 * Picks the endpoint kind a command-line word names.
 *
 * @module
 */

import { UsageError } from "../_cli.ts";
import type { Destination, Settings, Source } from "./endpoint.ts";
import { FileEndpoint } from "./file.ts";
import { isNbdUri, NbdEndpoint } from "./nbd.ts";
import { NullDestination } from "./null.ts";
import { StreamDestination, StreamSource } from "./stream.ts";

/** Opens what `word` names as the source: `-`, an NBD URI or a path. */
export async function openSource(word: string, s: Settings): Promise<Source> {
  if (word === "-") return new StreamSource("stdin", Deno.stdin);
  if (word === "null:") throw new UsageError("null: can only be a destination");
  if (isNbdUri(word)) return await NbdEndpoint.open(word, "source", s);
  return await FileEndpoint.openSource(word);
}

/**
 * Opens what `word` names as the destination: `-`, `null:`, an NBD URI or
 * a path.
 */
export async function openDestination(
  word: string,
  s: Settings,
): Promise<Destination> {
  if (word === "-") return new StreamDestination("stdout", Deno.stdout);
  if (word === "null:") return new NullDestination();
  if (isNbdUri(word)) return await NbdEndpoint.open(word, "destination", s);
  return await FileEndpoint.openDestination(word, s);
}
