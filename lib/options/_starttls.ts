/**
 * `NBD_OPT_STARTTLS`: upgrade the connection before anything else is said,
 * so that no option, and no export name, crosses the wire in clear text
 * when TLS is wanted.
 *
 * @module
 */

import {
  OPT_STARTTLS,
  OPTION_NAMES,
  REP_ACK,
  REP_ERR_TLS_REQD,
} from "../constants.ts";
import type { TlsMode } from "../connect_options.ts";
import { NbdError, NbdOptionError } from "../errors.ts";
import { isError, type OptionSession } from "./_session.ts";
import type { ByteStream } from "../transport.ts";

/**
 * Sends `NBD_OPT_STARTTLS` in `require` and `prefer` modes and, on ACK,
 * upgrades the stream under the session.
 *
 * @throws {NbdOptionError} in `require` mode when the server refuses.
 */
export async function negotiateTls(
  session: OptionSession,
  mode: TlsMode,
  upgrade: ((stream: ByteStream) => Promise<ByteStream>) | undefined,
): Promise<void> {
  if (mode === "disable") return;
  if (!upgrade) {
    throw new NbdError(
      `TLS mode "${mode}" needs a TLS upgrade function, and none was given`,
    );
  }
  await session.send(OPT_STARTTLS);
  const reply = await session.reply(OPT_STARTTLS);
  if (reply.type === REP_ACK) {
    const upgraded = await upgrade(session.transport.stream);
    session.transport.replaceStream(upgraded);
    session.tls = true;
    session.trace?.("tls", { established: true });
    return;
  }
  if (!isError(reply.type)) throw session.unexpected(OPT_STARTTLS, reply);
  if (mode === "require" || session.isFatal(reply)) {
    throw session.refusal(
      OPT_STARTTLS,
      reply,
      "TLS is required but the server will not start it",
    );
  }
  session.trace?.("tls", { established: false, reason: "refused by server" });
}

/**
 * Runs the options of `steps`; when `onDemand` is set and the server answers
 * one of them with `NBD_REP_ERR_TLS_REQD`, upgrades with `NBD_OPT_STARTTLS`
 * (verification as configured in `upgrade`) and runs `steps` again from the
 * start, since nothing said in clear text carries over into TLS.
 *
 * @throws {NbdOptionError} when the server refuses, in clear or under TLS.
 */
export async function upgradingOnDemand<T>(
  session: OptionSession,
  onDemand: boolean,
  upgrade: ((stream: ByteStream) => Promise<ByteStream>) | undefined,
  steps: () => Promise<T>,
): Promise<T> {
  try {
    return await steps();
  } catch (e) {
    if (
      !onDemand || upgrade === undefined || session.tls ||
      !(e instanceof NbdOptionError) || e.reply !== REP_ERR_TLS_REQD
    ) {
      throw e;
    }
    session.trace?.("tls", {
      onDemand: true,
      reason: `${OPTION_NAMES[e.option] ?? e.option} needs TLS`,
    });
    await negotiateTls(session, "require", upgrade);
    return await steps();
  }
}
