/**
 * TLS-PSK key files as libnbd, nbdkit, qemu and GnuTLS's `psktool` write
 * them: one `username:hexkey` line per user.
 *
 * @module
 */

import { NbdTlsError } from "../../lib/tls/error.ts";

/** One user's pre-shared key. */
export interface PskKey {
  /** The identity sent to the server. */
  username: string;
  /** The key in hex, as in the file. */
  hexKey: string;
}

/**
 * Finds `username`'s key in the text of a PSK file.
 *
 * @param text The file's contents.
 * @param username The user whose line to use.
 * @param file The file's name, for messages.
 * @returns The user's key.
 * @throws {NbdTlsError} when a line is malformed, or no line is the user's.
 *
 * @example
 * ```ts
 * import { findPskKey } from "@nbd/client/ffi";
 *
 * const key = findPskKey("alice:0123abcd\n", "alice", "keys.psk");
 * console.log(key.hexKey); // "0123abcd"
 * ```
 */
export function findPskKey(
  text: string,
  username: string,
  file: string,
): PskKey {
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, "");
    if (line.trim() === "") continue;
    const colon = line.indexOf(":");
    const hexKey = line.slice(colon + 1);
    if (colon <= 0 || !/^(?:[0-9a-fA-F]{2})+$/.test(hexKey)) {
      throw new NbdTlsError(
        `TLS-PSK file "${file}" line ${
          i + 1
        } is not "username:hexkey" (a name, a colon, then an even number of hex digits)`,
      );
    }
    if (line.slice(0, colon) === username) return { username, hexKey };
  }
  throw new NbdTlsError(
    `TLS-PSK file "${file}" has no key for user "${username}"; set tlsUsername (tls-username=) to a user the file has`,
  );
}
