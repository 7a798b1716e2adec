/**
 * `NBD_OPT_SET_META_CONTEXT`: contexts the server chooses badly or not at
 * all.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  OPT_SET_META_CONTEXT,
  REP_ACK,
  REP_ERR_UNSUP,
  REP_META_CONTEXT,
} from "../../lib/constants.ts";
import { NbdUnsupportedError } from "../../lib/errors.ts";
import { metaContextPayload, optionReply } from "../support/server.ts";
import {
  config,
  handshakeFails,
  hostileTest,
  WITH_ALLOCATION,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "connect() checks the contexts NBD_OPT_SET_META_CONTEXT chooses",
  async (step) => {
    await step(
      "connect() rejects one metadata context id given to two contexts",
      config({
        onOption: (opt) =>
          opt.option === OPT_SET_META_CONTEXT
            ? [
              optionReply(
                opt.option,
                REP_META_CONTEXT,
                metaContextPayload(1, "base:allocation"),
              ),
              optionReply(
                opt.option,
                REP_META_CONTEXT,
                metaContextPayload(1, "qemu:dirty-bitmap:x"),
              ),
              optionReply(opt.option, REP_ACK),
            ]
            : undefined,
      }),
      (server) => handshakeFails(server, /id 1/, WITH_ALLOCATION),
    );

    await step(
      "connect() goes on without block status when SET_META_CONTEXT is unsupported",
      config({ optionReplies: { [OPT_SET_META_CONTEXT]: REP_ERR_UNSUP } }),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (client) => {
          assert.equal(client.canBlockStatus, false);
          await assert.rejects(
            () => client.blockStatus(0, 512),
            NbdUnsupportedError,
          );
        });
        await server.settled();
        assert.ok(
          !server.log[0]!.requests.some((r) => r.type === CMD_BLOCK_STATUS),
        );
      },
    );
  },
);
