import assert from "node:assert/strict";
import {
  readableFrom,
  type StreamableClient,
  writableTo,
} from "../lib/streams.ts";
import { connect } from "../mod.ts";
import { pattern } from "./support/pattern.ts";
import { exportHash, sha256 } from "./support/reference.ts";
import { concat } from "./support/server.ts";
import { nbdkit } from "./support/servers.ts";

/**
 * An export in memory that enforces what a strict client would: bounds,
 * alignment to the minimum block size, the maximum payload. Requests finish
 * out of order (after a random number of microtasks) like a real server's.
 */
class MemoryExport implements StreamableClient {
  readonly data: Uint8Array;
  readonly blockSize: { minimum: number; preferred: number; maximum: number };
  readonly canFlush = true;
  readonly canFua = true;
  inFlight = 0;
  maxSeen = 0;
  flushes = 0;
  reads: Array<[number, number]> = [];
  writes: Array<[number, number, boolean]> = [];
  failAt: number | undefined;

  constructor(size: number, minimum = 1, maximum = 1 << 20) {
    this.data = new Uint8Array(size);
    this.blockSize = { minimum, preferred: 4096, maximum };
  }

  get size(): number {
    return this.data.length;
  }

  /**
   * Waits (bounded) until no request is in flight: a stream that errors or
   * is cancelled leaves its read-ahead or write-behind requests running.
   */
  async settled(): Promise<void> {
    for (let i = 0; i < 200 && this.inFlight > 0; i++) {
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.equal(this.inFlight, 0, "requests still in flight");
  }

  async #request<T>(
    offset: number,
    length: number,
    signal: AbortSignal | undefined,
    op: () => T,
  ): Promise<T> {
    const { minimum, maximum } = this.blockSize;
    if (offset % minimum || length % minimum) {
      throw new RangeError(`unaligned request ${offset}+${length}`);
    }
    if (length > maximum) throw new RangeError(`too big: ${length}`);
    if (offset + length > this.size) throw new RangeError("out of bounds");
    this.inFlight++;
    this.maxSeen = Math.max(this.maxSeen, this.inFlight);
    try {
      const ticks = Math.floor(Math.random() * 5);
      for (let i = 0; i < ticks; i++) await Promise.resolve();
      await new Promise((r) => setTimeout(r, 0));
      signal?.throwIfAborted();
      if (
        this.failAt !== undefined && offset <= this.failAt &&
        this.failAt < offset + length
      ) {
        throw new Error(`EIO at ${offset}`);
      }
      return op();
    } finally {
      this.inFlight--;
    }
  }

  read(
    offset: number,
    length: number,
    options?: { signal?: AbortSignal },
  ): Promise<Uint8Array> {
    this.reads.push([offset, length]);
    return this.#request(
      offset,
      length,
      options?.signal,
      () => this.data.slice(offset, offset + length),
    );
  }

  write(
    offset: number,
    data: Uint8Array,
    options?: { fua?: boolean; signal?: AbortSignal },
  ): Promise<void> {
    this.writes.push([offset, data.length, options?.fua ?? false]);
    return this.#request(
      offset,
      data.length,
      options?.signal,
      () => this.data.set(data, offset),
    );
  }

  flush(): Promise<void> {
    this.flushes++;
    return Promise.resolve();
  }
}

/** The same export, with the `readInto()` the library's client has. */
class ReadIntoExport extends MemoryExport {
  readIntos = 0;
  readInto(
    buffer: Uint8Array,
    offset: number,
    options?: { signal?: AbortSignal },
  ): Promise<void> {
    this.readIntos++;
    return this.read(offset, buffer.length, options).then((d) => buffer.set(d));
  }
}

/** Reads a stream with a BYOB reader, through buffers of `size` bytes. */
async function collectByob(
  stream: ReadableStream<Uint8Array>,
  size: number,
): Promise<Uint8Array> {
  const reader = stream.getReader({ mode: "byob" });
  const parts: Uint8Array[] = [];
  for (let i = 0; i < 10_000; i++) {
    const { value, done } = await reader.read(new Uint8Array(size));
    if (done) return concat(...parts);
    parts.push(value.slice());
  }
  throw new Error("the stream did not end within 10,000 reads");
}

async function collect(
  stream: ReadableStream<Uint8Array>,
): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const part of stream) parts.push(part);
  return concat(...parts);
}

Deno.test("readableFrom()", async (t) => {
  await t.step(
    "yields the range in order, with reads in flight ahead",
    async () => {
      const exp = new MemoryExport(1 << 20);
      exp.data.set(pattern(1 << 20));
      const got = await collect(
        readableFrom(exp, { offset: 4096, length: 600_000, chunkSize: 65536 }),
      );
      assert.deepEqual(got, exp.data.subarray(4096, 4096 + 600_000));
      assert.ok(exp.maxSeen > 1, `reads were pipelined (max ${exp.maxSeen})`);
      assert.ok(
        exp.maxSeen <= 4,
        `no more than readAhead (max ${exp.maxSeen})`,
      );
    },
  );

  await t.step(
    "serves a BYOB reader with buffers smaller than a request",
    async () => {
      const exp = new MemoryExport(200_000);
      exp.data.set(pattern(200_000, 3));
      const reader = readableFrom(exp, { chunkSize: 65536 }).getReader({
        mode: "byob",
      });
      const out = new Uint8Array(200_000);
      let at = 0;
      let buf = new Uint8Array(10_000);
      for (;;) {
        const { value, done } = await reader.read(buf);
        if (done) break;
        out.set(value, at);
        at += value.length;
        buf = new Uint8Array(value.buffer);
      }
      assert.equal(at, 200_000);
      assert.deepEqual(out, exp.data);
    },
  );

  await t.step(
    "reads ahead into its own buffers through readInto() and hands a BYOB reader whole ones",
    async (t) => {
      const size = 5 * 65536 + 4096;
      for (
        const [label, bufSize] of [
          ["a reader buffer the size of a request (swapped)", 65536],
          ["a smaller reader buffer (copied)", 10_000],
          ["a larger reader buffer (copied)", 100_000],
        ] as const
      ) {
        await t.step(label, async () => {
          const exp = new ReadIntoExport(size);
          exp.data.set(pattern(size, 5));
          const reader = readableFrom(exp, { chunkSize: 65536 }).getReader({
            mode: "byob",
          });
          const out = new Uint8Array(size);
          let at = 0;
          let buf = new Uint8Array(bufSize);
          for (;;) {
            const { value, done } = await reader.read(buf);
            if (done) break;
            out.set(value, at);
            at += value.length;
            buf = new Uint8Array(value.buffer);
            // The reader may write into what it was given: the stream no
            // longer uses it.
            buf.fill(0xee);
          }
          assert.equal(at, size);
          assert.deepEqual(out, exp.data);
          assert.equal(exp.readIntos, 6, "every request went to readInto()");
        });
      }
    },
  );

  await t.step("keeps requests on the minimum block size", async () => {
    const exp = new MemoryExport(10 * 512, 512, 4096);
    exp.data.set(pattern(10 * 512));
    const got = await collect(readableFrom(exp, { chunkSize: 1000 }));
    assert.deepEqual(got, exp.data);
    for (const [off, len] of exp.reads) assert.equal((off | len) % 512, 0);
  });

  await t.step("errors the stream when a read fails", async () => {
    const exp = new MemoryExport(1 << 20);
    exp.failAt = 300_000;
    await assert.rejects(
      collect(readableFrom(exp, { chunkSize: 65536 })),
      /EIO at 262144/,
    );
    await exp.settled();
  });

  await t.step("rejects an offset off the minimum block size", () => {
    const exp = new MemoryExport(4096, 512, 4096);
    assert.throws(
      () => readableFrom(exp, { offset: 100 }),
      /minimum block size 512/,
    );
  });

  // One rule with writableTo(): the offset is aligned, the length need not
  // be; the last block is read whole and the stream ends where asked.
  await t.step(
    "reads a length off the minimum block size, as writableTo() writes one",
    async () => {
      // Plain reads, and readInto() into the stream's own buffers handed to
      // a BYOB reader whole (1024) or copied (700).
      const shapes = [
        { exp: new MemoryExport(8 * 512, 512, 2048), byob: 0 },
        { exp: new ReadIntoExport(8 * 512, 512, 2048), byob: 1024 },
        { exp: new ReadIntoExport(8 * 512, 512, 2048), byob: 700 },
      ];
      for (const { exp, byob } of shapes) {
        exp.data.set(pattern(8 * 512));
        for (const [offset, length] of [[0, 1000], [1024, 1636], [0, 1]]) {
          exp.reads.length = 0;
          const stream = readableFrom(exp, {
            offset: offset!,
            length: length!,
            chunkSize: 1024,
          });
          const got = byob
            ? await collectByob(stream, byob)
            : await collect(stream);
          assert.deepEqual(
            got,
            exp.data.slice(offset, offset! + length!),
            `${length} bytes at ${offset}, BYOB buffer ${byob}`,
          );
          for (const [off, len] of exp.reads) {
            assert.equal((off | len) % 512, 0);
          }
        }
      }
      const exp = new MemoryExport(8 * 512, 512, 2048);
      const src = pattern(3 * 512 + 100);
      await ReadableStream.from([src])
        .pipeTo(writableTo(exp, { offset: 512, flush: false }));
      assert.deepEqual(
        await collect(readableFrom(exp, { offset: 512, length: src.length })),
        src,
      );
    },
  );

  await t.step("refuses a length that ends inside a partial last block", () => {
    const exp = new MemoryExport(4096 + 100, 512, 4096);
    assert.throws(
      () => readableFrom(exp, { offset: 4096 }),
      /ends inside the export's last partial block/,
    );
  });

  await t.step("rejects a range beyond the end", () => {
    const exp = new MemoryExport(4096);
    assert.throws(
      () => readableFrom(exp, { offset: 4000, length: 97 }),
      RangeError,
    );
  });

  await t.step("an empty range is an empty stream", async () => {
    const exp = new MemoryExport(4096);
    assert.equal(
      (await collect(readableFrom(exp, { offset: 4096 }))).length,
      0,
    );
  });

  await t.step("cancel stops reading", async () => {
    const exp = new MemoryExport(1 << 20);
    const reader = readableFrom(exp, { chunkSize: 4096 }).getReader();
    await reader.read();
    await reader.cancel("enough");
    assert.ok(exp.reads.length <= 6, `${exp.reads.length} reads`);
    await exp.settled();
  });
});

Deno.test("writableTo()", async (t) => {
  await t.step(
    "writes chunks of any size in order and flushes on close",
    async () => {
      const exp = new MemoryExport(1 << 20);
      const src = pattern(700_001, 5);
      const w = writableTo(exp, { offset: 100, chunkSize: 65536 }).getWriter();
      const sizes = [1, 7, 65535, 65536, 65537, 200_000, 3, 303_382];
      let at = 0;
      for (const n of sizes) {
        const piece = src.slice(at, at + n);
        await w.write(piece);
        piece.fill(0xee); // the writer may reuse its buffer at once
        at += n;
      }
      assert.equal(at, src.length);
      await w.close();
      assert.deepEqual(exp.data.subarray(100, 100 + src.length), src);
      assert.equal(exp.data[99], 0);
      assert.equal(exp.data[100 + src.length], 0);
      assert.equal(exp.flushes, 1);
      assert.ok(exp.maxSeen > 1 && exp.maxSeen <= 4, `max ${exp.maxSeen}`);
      for (const [, len] of exp.writes) assert.ok(len <= 65536);
    },
  );

  await t.step("merges an unaligned tail with the export's bytes", async () => {
    const exp = new MemoryExport(8 * 512, 512, 2048);
    exp.data.fill(0xaa);
    const src = pattern(3 * 512 + 100);
    await ReadableStream.from([src.subarray(0, 700), src.subarray(700)])
      .pipeTo(writableTo(exp, { offset: 1024, flush: false }));
    assert.deepEqual(exp.data.subarray(1024, 1024 + src.length), src);
    assert.ok(exp.data.subarray(1024 + src.length).every((b) => b === 0xaa));
    assert.ok(exp.data.subarray(0, 1024).every((b) => b === 0xaa));
    for (const [off, len] of exp.writes) assert.equal((off | len) % 512, 0);
    assert.equal(exp.flushes, 0);
  });

  await t.step("sets FUA when asked and the export supports it", async () => {
    const exp = new MemoryExport(8192);
    await ReadableStream.from([new Uint8Array(8192)]).pipeTo(
      writableTo(exp, { fua: true }),
    );
    assert.ok(exp.writes.every(([, , fua]) => fua));
  });

  await t.step("errors the stream when a write fails", async () => {
    const exp = new MemoryExport(1 << 20);
    exp.failAt = 500_000;
    const chunks = Array.from({ length: 16 }, () => new Uint8Array(65536));
    await assert.rejects(
      ReadableStream.from(chunks).pipeTo(writableTo(exp, { chunkSize: 65536 })),
      /EIO at 458752/,
    );
    assert.equal(exp.flushes, 0);
    await exp.settled();
  });

  await t.step("fails a write past the end of the export", async () => {
    const exp = new MemoryExport(4096);
    await assert.rejects(
      ReadableStream.from([new Uint8Array(5000)]).pipeTo(writableTo(exp)),
      RangeError,
    );
  });

  await t.step("rejects an unaligned start offset", () => {
    const exp = new MemoryExport(4096, 512, 4096);
    assert.throws(() => writableTo(exp, { offset: 100 }), /minimum block size/);
  });

  await t.step("readable pipes into writable between two exports", async () => {
    const a = new MemoryExport(3 << 20);
    a.data.set(pattern(3 << 20, 9));
    const b = new MemoryExport(3 << 20, 512, 1 << 20);
    await readableFrom(a).pipeTo(writableTo(b));
    assert.deepEqual(b.data, a.data);
  });
});

Deno.test({
  name: "streams pipe between a file and an nbdkit export",
  async fn(t) {
    // A minimum block size of 512 makes writableTo merge the file's odd tail.
    const server = await nbdkit([
      "--filter=blocksize-policy",
      "memory",
      "4M",
      "blocksize-minimum=512",
      "blocksize-preferred=4096",
      "blocksize-maximum=65536",
    ]);
    const source = `${server.dir}/in.bin`;
    const copy = `${server.dir}/out.bin`;
    const data = pattern(3 * 1024 * 1024 + 333, 11);
    await Deno.writeFile(source, data);
    const nbd = await connect(server.uri());
    try {
      await t.step("file.readable.pipeTo(writableTo(nbd))", async () => {
        using file = await Deno.open(source);
        await file.readable.pipeTo(writableTo(nbd, { offset: 4096 }));
        const back = await nbd.read(4096, 3 * 1024 * 1024 + 512);
        assert.deepEqual(back.subarray(0, data.length), data);
        assert.ok(back.subarray(data.length).every((b) => b === 0));
      });
      await t.step("readableFrom(nbd).pipeTo(file.writable)", async () => {
        const file = await Deno.create(copy);
        await readableFrom(nbd, { offset: 4096, length: 3 * 1024 * 1024 })
          .pipeTo(file.writable);
        const got = await Deno.readFile(copy);
        assert.deepEqual(got, data.subarray(0, 3 * 1024 * 1024));
      });
      await t.step("the same through the reference client", async () => {
        const hash = await exportHash(server.uri());
        const all = new Uint8Array(4 * 1024 * 1024);
        all.set(data, 4096);
        assert.equal(hash, await sha256(all));
      });
    } finally {
      await nbd.close();
      await server.stop();
    }
  },
});
