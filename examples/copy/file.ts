/**
 * A regular file or a block device as a copy's source or destination.
 *
 * @module
 */

import { writeAll } from "../_cli.ts";
import type {
  Destination,
  Extent,
  LaneSpec,
  Settings,
  Source,
  ZeroMode,
} from "./endpoint.ts";
import { StreamDestination, StreamSource } from "./stream.ts";

/** A regular file or a block device, read or written at offsets. */
export class FileEndpoint implements Source, Destination {
  readonly name: string;
  readonly sequential = false;
  readonly hasExtents = false;
  readonly alignment = 1;
  readonly preferred = 4096;
  readonly maxLanes = Infinity;
  readonly zeroMode: ZeroMode;
  #file: Deno.FsFile;
  /**
   * The size is the destination's own and never changes: a block device,
   * or an earlier copy that `--dirty` updates in place.
   */
  #fixed: boolean;
  #size: number | undefined;
  #knownSize = false;
  #write: boolean;
  // Deno has no pread/pwrite: a seek and a read must not interleave with
  // another's. Each lane has its own descriptor (its own file position),
  // and requests on one descriptor go one at a time.
  #handles: Array<{ file: Deno.FsFile; lock: Promise<void> }>;

  constructor(
    path: string,
    file: Deno.FsFile,
    fixed: boolean,
    size: number | undefined,
    zeroMode: ZeroMode,
    writable: boolean,
  ) {
    this.name = path;
    this.#file = file;
    this.#handles = [{ file, lock: Promise.resolve() }];
    this.#write = writable;
    this.#fixed = fixed;
    this.#size = size;
    this.zeroMode = zeroMode;
  }

  get size(): number | undefined {
    return this.#size;
  }

  #locked<T>(lane: number, fn: (file: Deno.FsFile) => Promise<T>): Promise<T> {
    const h = this.#handles[lane % this.#handles.length]!;
    const run = h.lock.then(() => fn(h.file));
    h.lock = run.then(() => {}, () => {});
    return run;
  }

  extents(): Promise<Extent[]> {
    return Promise.reject(new Error("files have no extent map here"));
  }

  read(
    offset: number,
    length: number,
    lane: number,
    _signal: AbortSignal,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    return this.#locked(lane, async (file) => {
      await file.seek(offset, Deno.SeekMode.Start);
      const buf = !into
        ? new Uint8Array(length)
        : into.length === length
        ? into
        : into.subarray(0, length);
      let got = 0;
      while (got < length) {
        const n = await file.read(buf.subarray(got));
        if (n === null) {
          throw new Error(
            `${this.name}: file ended at ${offset + got}, expected ${
              offset + length
            } bytes`,
          );
        }
        got += n;
      }
      return buf;
    });
  }

  next(): Promise<Uint8Array | null> {
    throw new Error("not a stream");
  }

  async prepare(size: number | undefined): Promise<void> {
    if (this.#fixed) {
      if (size !== undefined && this.#size !== undefined && size > this.#size) {
        throw new Error(
          `destination is too small: ${this.#size} bytes, the source has ${size}`,
        );
      }
      return;
    }
    // A new (truncated) file: extending it leaves a hole, so every zero
    // region that is never written stays unallocated.
    if (size !== undefined) {
      await this.#file.truncate(size);
      this.#knownSize = true;
    }
  }

  write(offset: number, data: Uint8Array, lane: number): Promise<void> {
    return this.#locked(lane, async (file) => {
      await file.seek(offset, Deno.SeekMode.Start);
      await writeAll(file, data);
    });
  }

  zero(): Promise<void> {
    return Promise.reject(new Error("files are zeroed by leaving holes"));
  }

  async finish(total: number, flush: boolean): Promise<void> {
    // From a stream the size was only known now; skipped zeroes at the end
    // are a hole that the file must still cover.
    if (!this.#fixed && !this.#knownSize) await this.#file.truncate(total);
    if (flush) await this.#file.sync();
  }

  async addLanes(n: number): Promise<void> {
    // Reopened without create or truncate: the first open did those.
    while (this.#handles.length < n) {
      const file = await Deno.open(
        this.name,
        this.#write ? { write: true } : { read: true },
      );
      this.#handles.push({ file, lock: Promise.resolve() });
    }
  }

  lane(): LaneSpec {
    return {
      kind: "file",
      path: this.name,
      role: this.#write ? "destination" : "source",
      zeroMode: this.zeroMode,
      size: this.#size,
    };
  }

  /**
   * Opens a lane of a file that another thread's endpoint opened (and, as
   * a destination, prepared): never created or truncated here.
   */
  static async openLane(
    spec: LaneSpec & { kind: "file" },
  ): Promise<FileEndpoint> {
    const write = spec.role === "destination";
    const file = await Deno.open(spec.path, write ? { write } : { read: true });
    return new FileEndpoint(
      spec.path,
      file,
      true,
      spec.size,
      spec.zeroMode,
      write,
    );
  }

  async close(): Promise<void> {
    // Wait for I/O still queued on a descriptor before closing it.
    for (const h of this.#handles) {
      await h.lock;
      h.file.close();
    }
  }

  static async openSource(path: string): Promise<Source> {
    const file = await Deno.open(path, { read: true });
    try {
      const info = await file.stat();
      if (info.isFile) {
        return new FileEndpoint(path, file, false, info.size, "write", false);
      }
      if (info.isBlockDevice) {
        const size = await file.seek(0, Deno.SeekMode.End);
        return new FileEndpoint(path, file, true, size, "write", false);
      }
      return new StreamSource(path, file);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  static async openDestination(
    path: string,
    settings: Settings,
  ): Promise<Destination> {
    let info: Deno.FileInfo | undefined;
    try {
      info = await Deno.stat(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (info?.isBlockDevice) {
      const file = await Deno.open(path, { write: true });
      const size = await file.seek(0, Deno.SeekMode.End);
      return new FileEndpoint(
        path,
        file,
        true,
        size,
        settings.destinationIsZero && !settings.allocated ? "skip" : "write",
        true,
      );
    }
    if (info && !info.isFile) {
      // A pipe, a character device, a socket: bytes in order.
      const file = await Deno.open(path, { write: true });
      return new StreamDestination(path, file);
    }
    // Like cp: a regular file is replaced, which makes it new and sparse.
    const file = await Deno.open(path, {
      write: true,
      create: true,
      truncate: true,
    });
    return new FileEndpoint(
      path,
      file,
      false,
      undefined,
      settings.allocated ? "write" : "skip",
      true,
    );
  }

  /**
   * Opens an earlier copy for `--dirty` to update in place: it must exist,
   * be a regular file or a block device, and have exactly `size` bytes.
   * Nothing is created or truncated, and it is opened for writing only
   * after those checks.
   *
   * @throws {Error} One line saying which check failed.
   */
  static async openExisting(path: string, size: number): Promise<Destination> {
    let info: Deno.FileInfo;
    try {
      info = await Deno.stat(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new Error(
          `${path}: no such file; --dirty updates an earlier full copy of the source`,
        );
      }
      throw e;
    }
    if (!info.isFile && !info.isBlockDevice) {
      throw new Error(
        `${path}: not a regular file or a block device; --dirty updates an earlier full copy`,
      );
    }
    const sizeOf = async (file: Deno.FsFile, i: Deno.FileInfo) =>
      i.isBlockDevice ? await file.seek(0, Deno.SeekMode.End) : i.size;
    const check = (actual: number) => {
      if (actual !== size) {
        throw new Error(
          `${path} has ${actual} bytes and the source ${size}: --dirty updates a copy of the same size`,
        );
      }
    };
    if (info.isFile) check(info.size);
    else {
      const probe = await Deno.open(path, { read: true });
      try {
        check(await sizeOf(probe, info));
      } finally {
        probe.close();
      }
    }
    const file = await Deno.open(path, { write: true });
    try {
      // Checked again on what was opened, in case the path changed since.
      const opened = await file.stat();
      if (opened.isFile !== info.isFile) {
        throw new Error(`${path}: changed while it was being opened`);
      }
      check(await sizeOf(file, opened));
      return new FileEndpoint(path, file, true, size, "write", true);
    } catch (e) {
      file.close();
      throw e;
    }
  }
}
