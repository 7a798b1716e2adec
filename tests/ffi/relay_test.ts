import assert from "node:assert/strict";
import { FdStream } from "../../ffi/_fd_stream.ts";
import { socketPair, startRelay } from "../../ffi/_relay.ts";
import { readExact, writeAll } from "../support/io.ts";
import { libc } from "../../ffi/_libc.ts";

// ffi/ opens libc once per process and keeps it (by design): open it
// before any test, so that the resource sanitizer counts it as no test's.
libc();

Deno.test("startRelay() copies both ways and ends when the server's side closes", async () => {
  // kernel <-> [ours | relay | server stream] <-> server
  const [kernelFd, oursFd] = socketPair();
  const [serverStreamFd, serverFd] = socketPair();
  const kernel = new FdStream(kernelFd);
  const server = new FdStream(serverFd);
  const relay = startRelay(new FdStream(oursFd), new FdStream(serverStreamFd));
  try {
    const request = new Uint8Array(300_000).map((_, i) => i % 251);
    const writing = writeAll(kernel, request);
    assert.deepEqual(await readExact(server, request.length), request);
    await writing;
    const reply = new Uint8Array(70_000).map((_, i) => (i * 3) % 256);
    const replying = writeAll(server, reply);
    assert.deepEqual(await readExact(kernel, reply.length), reply);
    await replying;

    server.close();
    await relay.done;
    // The kernel sees the server go: end of stream on its socket.
    assert.equal(await kernel.read(new Uint8Array(1)), null);
    assert.equal(relay.error, undefined);
  } finally {
    relay.stop();
    await relay.done;
    kernel.close();
    server.close();
  }
});

Deno.test("startRelay() stops both sides when the kernel's side closes", async () => {
  const [kernelFd, oursFd] = socketPair();
  const [serverStreamFd, serverFd] = socketPair();
  const kernel = new FdStream(kernelFd);
  const server = new FdStream(serverFd);
  const relay = startRelay(new FdStream(oursFd), new FdStream(serverStreamFd));
  kernel.close();
  await relay.done;
  assert.equal(await server.read(new Uint8Array(1)), null);
  server.close();
});
