/**
 * `Deno.dlopen` with the two failures a user can fix told apart: no
 * `--allow-ffi`, and a library that is not there.
 *
 * @module
 */

import { NbdError } from "../lib/errors.ts";

/**
 * Opens `file` with `symbols`, turning a failure into an {@linkcode NbdError}
 * that says how to fix it.
 *
 * @param file The library's file name, for `dlopen(3)`.
 * @param symbols The functions to bind.
 * @param user Who needs it, as the start of a sentence ("The kernel
 *   handoff"): without `--allow-ffi` the message is `<user> calls <what>
 *   through FFI: run Deno with --allow-ffi`.
 * @param what The library as the first message names it ("libc").
 * @param cannotOpen The start of the message when the library cannot be
 *   opened; the system's reason follows it after a colon.
 * @returns The opened library.
 * @throws {NbdError} without `--allow-ffi`, or when the library is missing.
 */
export function openLibrary<S extends Deno.ForeignLibraryInterface>(
  file: string,
  symbols: S,
  user: string,
  what: string,
  cannotOpen: string,
): Deno.DynamicLibrary<S> {
  try {
    return Deno.dlopen(file, symbols);
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable) {
      throw new NbdError(
        `${user} calls ${what} through FFI: run Deno with --allow-ffi`,
        { cause: e },
      );
    }
    throw new NbdError(
      `${cannotOpen}: ${e instanceof Error ? e.message : String(e)}`,
      { cause: e },
    );
  }
}
