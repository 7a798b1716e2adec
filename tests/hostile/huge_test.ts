/**
 * Exports of 2^53 bytes and more: `blockStatus()` and `read()` with bigint
 * offsets, exact to 2^63 - 1 over extended headers, and as strict as the
 * number calls. The scripted server says its export has 2^62 bytes and
 * answers block status and reads at those offsets itself.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  CMD_READ,
  INFO_EXPORT,
  OPT_GO,
  REP_INFO,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_OFFSET_DATA,
} from "../../lib/constants.ts";
import { NbdCommandError } from "../../lib/errors.ts";
import { DEFAULT_BLOCK_SIZE, type ExportInfo } from "../../lib/export.ts";
import { blockStatusCommand } from "../../lib/_request_checks.ts";
import {
  type Action,
  Builder,
  errorOffsetPayload,
  extendedChunk,
  offsetDataPayload,
  type OptionAction,
  type ReceivedOption,
  type ReceivedRequest,
  type TestServerConfig,
} from "../support/server.ts";
import type { OptionContext } from "../support/server/hooks.ts";
import {
  assertProtocol,
  config,
  hostileTest,
  rejection,
  WITH_ALLOCATION,
  withClient,
} from "./_helpers.ts";

const SIZE = 2n ** 62n;
const PAST = 2n ** 53n;

/** Answers NBD_OPT_GO as a correct server would, but for a 2^62-byte export. */
function hugeGo(
  opt: ReceivedOption,
  ctx: OptionContext,
): OptionAction[] | undefined {
  if (opt.option !== OPT_GO) return undefined;
  const replies = ctx.defaultReply().map((r) => {
    const v = new DataView(r.buffer, r.byteOffset, r.byteLength);
    // magic, option, reply type, length; then the info type and the size
    const info = r.length === 20 + 2 + 8 + 2 && v.getUint32(12) === REP_INFO &&
      v.getUint16(20) === INFO_EXPORT;
    if (info) v.setBigUint64(22, SIZE);
    return r;
  });
  return [...replies, "transmission"];
}

/** Extents of `base:allocation` (context id `id`), 64-bit. */
function extents(id: number, list: [bigint, number][]): Uint8Array {
  const b = new Builder().u32(id).u32(list.length);
  for (const [length, flags] of list) b.u64(length).u64(flags);
  return b.done();
}

/** The bytes of a read at `offset`: each byte the low byte of its offset. */
function bytesAt(offset: bigint, n: number): Uint8Array {
  const low = Number(offset & 0xffn);
  return new Uint8Array(n).map((_, i) => (low + i) & 0xff);
}

/** A 2^62-byte export with extended headers, answering `reply`. */
function huge(
  reply: (req: ReceivedRequest, id: number) => Action[] | undefined,
  seen: ReceivedRequest[] = [],
): TestServerConfig {
  return config({
    extendedHeaders: true,
    onOption: hugeGo,
    onCommand: (req, ctx) => {
      seen.push(req);
      const id = ctx.state.log.metaContexts[0]?.id ?? 0;
      return reply(req, id);
    },
  });
}

/** Block status answered with `list` from the request's offset. */
function status(list: [bigint, number][], shift = 0n) {
  return (req: ReceivedRequest, id: number): Action[] | undefined =>
    req.type === CMD_BLOCK_STATUS
      ? [
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS_EXT,
          req.offset + shift,
          extents(id, list),
        ),
      ]
      : undefined;
}

/** Reads answered with one data chunk, its offset moved by `shift`. */
function reads(shift = 0n) {
  return (req: ReceivedRequest): Action[] | undefined =>
    req.type === CMD_READ
      ? [
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          req.offset,
          offsetDataPayload(
            req.offset + shift,
            bytesAt(req.offset + shift, Number(req.length)),
          ),
        ),
      ]
      : undefined;
}

hostileTest(
  "blockStatus() with bigint offsets is exact past 2^53 over extended headers",
  async (step) => {
    const at = PAST + 512n;
    const rest = SIZE - at;
    // Lengths a double cannot hold: 2^53 + 1, then odd ones past it.
    const list: [bigint, number][] = [
      [PAST + 1n, 0],
      [3n, 3],
      [rest - PAST - 4n, 1],
    ];
    const seen: ReceivedRequest[] = [];
    await step(
      "the request carries the offset and the rest of the export exactly, the extents come back as bigints",
      huge(
        (req, id) =>
          req.offset < PAST
            ? status([[req.length, 0]])(req, id)
            : status(list)(req, id),
        seen,
      ),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          assert.equal(nbd.extendedHeaders, true);
          assert.equal(nbd.sizeBigInt, SIZE);
          const map = await nbd.blockStatus(at, rest);
          const sent = seen.filter((r) => r.type === CMD_BLOCK_STATUS);
          assert.equal(sent.length, 1);
          assert.equal(sent[0]!.offset, at);
          assert.equal(sent[0]!.length, rest);
          assert.deepEqual(map["base:allocation"], [
            { offset: at, length: PAST + 1n, flags: 0 },
            { offset: at + PAST + 1n, length: 3n, flags: 3 },
            { offset: at + PAST + 4n, length: rest - PAST - 4n, flags: 1 },
          ]);
          // Numbers below 2^53 on the same export: number extents.
          const small = await nbd.blockStatus(0, 4096);
          assert.deepEqual(small["base:allocation"], [
            { offset: 0, length: 4096, flags: 0 },
          ]);
        });
      },
    );
    await step(
      "the whole 2^62-byte export is asked about in one request",
      huge(status([[2n ** 62n, 1]]), seen),
      async (server) => {
        seen.length = 0;
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          await nbd.blockStatus(0n, SIZE);
          assert.equal(seen.at(-1)!.length, SIZE);
        });
      },
    );
    const broken: [string, TestServerConfig, RegExp][] = [
      [
        "an extent that runs past the end of the export by one byte",
        huge(status([[rest + 1n, 1]])),
        /extent 0 runs past the end of the export/,
      ],
      [
        "an extent of length 0",
        huge(status([[0n, 1]])),
        /extent 0 has length 0/,
      ],
      [
        "a reply that names the request's offset plus one",
        huge(status([[rest, 1]], 1n)),
        new RegExp(`names offset ${at + 1n}, but the request was at ${at}`),
      ],
    ];
    for (const [name, cfg, message] of broken) {
      await step(`${name} is a protocol error`, cfg, async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          const e = await rejection(nbd.blockStatus(at, rest), name);
          assertProtocol(e, "transmission", message);
        });
      });
    }
    await step(
      "an error chunk past 2^53 keeps its offsets exact",
      huge((req) =>
        req.type === CMD_BLOCK_STATUS
          ? [
            extendedChunk(
              req.cookie,
              REPLY_FLAG_DONE,
              REPLY_TYPE_ERROR_OFFSET,
              req.offset,
              errorOffsetPayload(5, "bad sector", req.offset + 7n),
            ),
          ]
          : undefined
      ),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          const e = await rejection(nbd.blockStatus(at, rest), "error");
          assert.ok(e instanceof NbdCommandError, e.message);
          assert.equal(e.offset, at);
          assert.equal(e.length, rest);
          assert.equal(e.errorOffset, at + 7n);
        });
      },
    );
    await step(
      "bad arguments are refused before anything is sent",
      huge(status(list), seen),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          seen.length = 0;
          const refused: [() => Promise<unknown>, ErrorConstructor, RegExp][] =
            [
              [
                () => nbd.blockStatus(at, rest + 1n),
                RangeError,
                /lies beyond the end of the export/,
              ],
              [() => nbd.blockStatus(at, 0n), RangeError, /positive/],
              [() => nbd.blockStatus(-1n, 1n), RangeError, /non-negative/],
              [
                () => nbd.blockStatus<number | bigint>(at, 512),
                TypeError,
                /both be numbers or both bigints/,
              ],
              [
                () => nbd.blockStatus(2 ** 53, 512),
                RangeError,
                /past 2\^53 pass it as a bigint, blockStatus\(9007199254740992n/,
              ],
              [
                () => nbd.read(2 ** 53, 512),
                RangeError,
                /pass it as a bigint, read\(/,
              ],
              [
                () => nbd.read(SIZE, 1),
                RangeError,
                /lies beyond the end of the export/,
              ],
              [
                () => nbd.write(2 ** 53, new Uint8Array(1)),
                RangeError,
                /write\(\) reaches offsets up to Number.MAX_SAFE_INTEGER only/,
              ],
            ];
          for (const [call, type, message] of refused) {
            await assert.rejects(call, (e: Error) => {
              assert.ok(e instanceof type, `${e.name}: ${e.message}`);
              assert.match(e.message, message);
              return true;
            });
          }
          assert.deepEqual(seen, []);
        });
      },
    );
  },
);

hostileTest(
  "read() and readInto() with bigint offsets are exact past 2^53",
  async (step) => {
    const seen: ReceivedRequest[] = [];
    await step(
      "a read at 2^53 + 1 and at the end of a 2^62 export",
      huge(reads(), seen),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          for (const at of [PAST + 1n, SIZE - 4096n]) {
            const data = await nbd.read(at, 4096);
            assert.deepEqual(data, bytesAt(at, 4096));
            assert.equal(seen.at(-1)!.offset, at);
            const into = new Uint8Array(100);
            await nbd.readInto(into, at + 3n);
            assert.deepEqual(into, bytesAt(at + 3n, 100));
          }
        });
      },
    );
    await step(
      "a data chunk one byte off past 2^53 is a protocol error",
      huge(reads(1n)),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (nbd) => {
          const e = await rejection(nbd.read(PAST + 1n, 512), "read()");
          assertProtocol(
            e,
            "transmission",
            new RegExp(`range ${PAST + 2n}\\+512 lies outside the request`),
          );
        });
      },
    );
  },
);

Deno.test("blockStatusCommand() keeps a bigint length to what the header carries", async (t) => {
  const info = (extendedHeaders: boolean, minimum = 1): ExportInfo => ({
    exportName: "",
    description: "",
    size: 2n ** 63n - 1n,
    flags: 1,
    blockSize: { ...DEFAULT_BLOCK_SIZE, minimum },
    blockSizeAdvertised: false,
    protocol: "fixed newstyle",
    structuredReplies: true,
    extendedHeaders,
    tls: false,
    metaContexts: new Map([[1, "base:allocation"]]),
  });
  const effect = (i: ExportInfo, offset: bigint, length: bigint) =>
    blockStatusCommand(i, false, offset, length, false, undefined).length;
  await t.step("with extended headers: 2^63 less a 512-byte block", () => {
    assert.equal(effect(info(true), 0n, 2n ** 63n - 1n), 2n ** 63n - 512n);
    assert.equal(
      effect(info(true, 4096), 0n, 2n ** 63n - 1n),
      2n ** 63n - 4096n,
    );
    assert.equal(effect(info(true), 1n, 2n ** 62n), 2n ** 62n);
  });
  await t.step("without: 2^32 less a 512-byte block", () => {
    assert.equal(effect(info(false), PAST, 2n ** 40n), 2n ** 32n - 512n);
  });
  await t.step("a number request stays numbers", () => {
    const cmd = blockStatusCommand(
      info(true),
      false,
      512,
      4096,
      false,
      undefined,
    );
    assert.equal(cmd.offset, 512);
    assert.equal(cmd.length, 4096);
  });
});
