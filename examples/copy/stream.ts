/**
 * stdin, stdout, pipes and character devices: bytes in order, no offsets.
 *
 * @module
 */

import { writeAll } from "../_cli.ts";
import type { Destination, Extent, Source, ZeroMode } from "./endpoint.ts";

/** stdin, a pipe or a character device: bytes in order, length unknown. */
export class StreamSource implements Source {
  readonly name: string;
  readonly size = undefined;
  readonly alignment = 1;
  readonly maxLanes = Infinity;
  readonly hasExtents = false;
  #reader: { read(p: Uint8Array): Promise<number | null>; close?(): void };

  constructor(
    name: string,
    reader: { read(p: Uint8Array): Promise<number | null>; close?(): void },
  ) {
    this.name = name;
    this.#reader = reader;
  }

  extents(): Promise<Extent[]> {
    return Promise.reject(new Error("streams have no extent map"));
  }

  read(): Promise<Uint8Array> {
    return Promise.reject(new Error("streams cannot be read at offsets"));
  }

  async next(length: number): Promise<Uint8Array | null> {
    const buf = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const n = await this.#reader.read(buf.subarray(got));
      if (n === null) break;
      got += n;
    }
    return got === 0 ? null : buf.subarray(0, got);
  }

  addLanes(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    if (this.#reader !== Deno.stdin) this.#reader.close?.();
    return Promise.resolve();
  }
}

/** stdout or a pipe: every byte written, in order. */
export class StreamDestination implements Destination {
  readonly name: string;
  readonly size = undefined;
  readonly sequential = true;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  readonly zeroMode: ZeroMode = "write";
  #writer: { write(p: Uint8Array): Promise<number>; close?(): void };
  #position = 0;

  constructor(
    name: string,
    writer: { write(p: Uint8Array): Promise<number>; close?(): void },
  ) {
    this.name = name;
    this.#writer = writer;
  }

  prepare(): Promise<void> {
    return Promise.resolve();
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (offset !== this.#position) {
      throw new Error(
        `internal error: stream write at ${offset}, expected ${this.#position}`,
      );
    }
    await writeAll(this.#writer, data);
    this.#position += data.length;
  }

  zero(): Promise<void> {
    return Promise.reject(new Error("streams take zero bytes"));
  }

  finish(): Promise<void> {
    return Promise.resolve();
  }

  addLanes(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    if (this.#writer !== Deno.stdout) this.#writer.close?.();
    return Promise.resolve();
  }
}
