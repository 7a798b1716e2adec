/**
 * `NBD_OPT_STARTTLS` refused or acknowledged without TLS: the client's tls
 * mode decides, and nothing meant for TLS is sent in clear.
 */

import assert from "node:assert/strict";
import {
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_LIST,
  OPT_STARTTLS,
  REP_ACK,
  REP_ERR_POLICY,
} from "../../lib/constants.ts";
import { NbdError } from "../../lib/errors.ts";
import type { TestServer } from "../support/server.ts";
import {
  config,
  DATA,
  hostileTest,
  open,
  optionsSent,
  rejection,
  withClient,
} from "./_helpers.ts";

/**
 * connect() with tls: require fails with an NbdError; returns the options
 * the client sent, once the server has seen the end.
 */
async function requireFails(server: TestServer): Promise<number[]> {
  const e = await rejection(open(server, { tls: "require" }), "connect()");
  assert.ok(e instanceof NbdError, `${e.name}: ${e.message}`);
  await server.settled();
  return optionsSent(server);
}

hostileTest(
  "connect() follows its tls mode when STARTTLS fails",
  async (step) => {
    await step(
      "connect() with tls: require sends no export name in clear when STARTTLS is refused",
      config({ starttls: { reply: REP_ERR_POLICY } }),
      async (server) => {
        const sent = await requireFails(server);
        assert.equal(sent[0], OPT_STARTTLS);
        for (const o of [OPT_EXPORT_NAME, OPT_GO, OPT_LIST, 6, 9, 10]) {
          assert.ok(!sent.includes(o), `option ${o} sent in clear`);
        }
      },
    );

    await step(
      "connect() with tls: prefer goes on in clear when STARTTLS is refused",
      config({ starttls: { reply: REP_ERR_POLICY } }),
      async (server) => {
        await withClient(server, { tls: "prefer" }, async (client) => {
          assert.equal(client.tls, false);
          assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
        });
        await server.settled();
        assert.equal(server.log[0]!.options[0]?.option, OPT_STARTTLS);
      },
    );

    await step(
      "connect() fails cleanly when STARTTLS is acknowledged but no TLS follows",
      config({ starttls: { reply: REP_ACK } }),
      async (server) => {
        const sent = await requireFails(server);
        assert.deepEqual(
          sent,
          [OPT_STARTTLS],
          "nothing sent in clear after ACK",
        );
      },
    );
  },
);
