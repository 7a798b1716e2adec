import assert from "node:assert/strict";
import {
  NbdConnectionClosedError,
  NbdError,
  NbdProtocolError,
} from "../lib/errors.ts";
import { type ByteStream, Transport } from "../lib/transport.ts";
import { ScriptedStream } from "./support/byte_script.ts";

const bytes = (...b: number[]) => Uint8Array.from(b);

Deno.test("Transport.readInto()", async (t) => {
  await t.step(
    "fills the buffer across pieces and says how a message ended early",
    async () => {
      const transport = new Transport(
        new ScriptedStream(bytes(1, 2, 3, 4, 5, 6, 7), [1, 3]),
      );
      const head = new Uint8Array(4);
      assert.ok(await transport.readInto(head, "a header"));
      assert.deepEqual([...head], [1, 2, 3, 4]);
      await assert.rejects(
        transport.readInto(new Uint8Array(16), "a simple reply"),
        (e: unknown) =>
          e instanceof NbdProtocolError &&
          e.message ===
            "Connection closed after 3 of 16 bytes of a simple reply",
      );
      transport.close();
    },
  );
  await t.step(
    "EOF between messages is a closed connection, or false when allowed",
    async () => {
      const a = new Transport(new ScriptedStream(new Uint8Array(0)));
      assert.equal(
        await a.readInto(new Uint8Array(4), "a header", true),
        false,
      );
      await assert.rejects(
        a.readInto(new Uint8Array(4), "a reply"),
        (e: unknown) =>
          e instanceof NbdConnectionClosedError &&
          /while waiting for a reply/.test(e.message),
      );
      a.close();
    },
  );
  await t.step("skip() drops bytes without allocating them all", async () => {
    const data = new Uint8Array(200_000).fill(9);
    data[199_999] = 1;
    const transport = new Transport(new ScriptedStream(data, [70_000]));
    await transport.skip(199_999, "padding");
    const last = new Uint8Array(1);
    await transport.readInto(last, "the last byte");
    assert.equal(last[0], 1);
    transport.close();
  });
});

Deno.test("Transport.write()", async (t) => {
  await t.step(
    "writes the parts of a message in order, joining small ones",
    async () => {
      const stream = new ScriptedStream(new Uint8Array(0), [], true);
      const transport = new Transport(stream);
      await transport.write(bytes(1, 2), bytes(3));
      await transport.write(new Uint8Array(100_000).fill(7), bytes(8));
      assert.deepEqual([...stream.written[0]!], [1, 2, 3]);
      assert.equal(stream.written[1]!.length, 100_000);
      assert.deepEqual([...stream.written[2]!], [8]);
      transport.close();
    },
  );
  await t.step("loops over partial writes", async () => {
    const written: number[] = [];
    const stream: ByteStream = {
      read: () => Promise.resolve(null),
      write: (p) => {
        written.push(p[0]!);
        return Promise.resolve(1);
      },
      close: () => {},
    };
    const transport = new Transport(stream);
    await transport.write(bytes(5, 6, 7));
    assert.deepEqual(written, [5, 6, 7]);
    transport.close();
  });
  await t.step(
    "a failing stream becomes NbdConnectionClosedError; NBD errors pass through",
    async () => {
      const failing = (error: Error): ByteStream => ({
        read: () => Promise.reject(error),
        write: () => Promise.reject(error),
        close: () => {},
      });
      const plain = new Transport(failing(new Error("EPIPE")));
      await assert.rejects(
        plain.write(bytes(1)),
        (e: unknown) =>
          e instanceof NbdConnectionClosedError &&
          e.message === "Connection failed while writing: EPIPE",
      );
      await assert.rejects(
        plain.readInto(new Uint8Array(1), "x"),
        /Connection failed while reading: EPIPE/,
      );
      const tls = new NbdError("TLS alert: bad certificate");
      const precise = new Transport(failing(tls));
      await assert.rejects(precise.write(bytes(1)), (e: unknown) => e === tls);
    },
  );
});

Deno.test("Transport corking", async (t) => {
  await t.step(
    "holds writes while the reader works and sends them in one write before it waits",
    async () => {
      const stream = new ScriptedStream(bytes(1, 2), [], true);
      const transport = new Transport(stream);
      transport.cork();
      const a = transport.write(bytes(10, 11));
      const b = transport.write(bytes(12), bytes(13));
      assert.equal(stream.written.length, 0, "held: no reader is waiting");
      // The reader needs the server now: the held writes go out first, joined.
      await transport.readInto(new Uint8Array(2), "a reply");
      await Promise.all([a, b]);
      assert.deepEqual(stream.written.map((w) => [...w]), [[10, 11, 12, 13]]);
      // While the reader waits for the server, a write goes out at once.
      const waiting = transport.readInto(new Uint8Array(1), "another reply");
      await transport.write(bytes(14));
      assert.deepEqual([...stream.written[1]!], [14]);
      stream.feed(bytes(3));
      await waiting;
      transport.close();
    },
  );
  await t.step("drain() sends what is held", async () => {
    const stream = new ScriptedStream(new Uint8Array(0), [], true);
    const transport = new Transport(stream);
    transport.cork();
    const held = transport.write(bytes(1));
    await transport.drain();
    await held;
    assert.deepEqual([...stream.written[0]!], [1]);
    transport.close();
  });
  await t.step("close() fails what is held", async () => {
    const stream = new ScriptedStream(new Uint8Array(0), [], true);
    const transport = new Transport(stream);
    transport.cork();
    const held = transport.write(bytes(1));
    transport.close(new NbdConnectionClosedError("gone"));
    await assert.rejects(held, /gone/);
    assert.equal(stream.written.length, 0);
  });
});

Deno.test("Transport.replaceStream() refuses bytes sent ahead of TLS", async () => {
  const transport = new Transport(new ScriptedStream(bytes(1, 2, 3)));
  await transport.readInto(new Uint8Array(1), "an ack");
  const other = new ScriptedStream(new Uint8Array(0));
  assert.throws(
    () => transport.replaceStream(other),
    /Server sent 2 unexpected bytes before the TLS handshake/,
  );
  transport.close();
});
