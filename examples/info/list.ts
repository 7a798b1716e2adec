/**
 * `--list`: every export a server lists, each described as for one export.
 *
 * @module
 */

import {
  connect,
  type ListedExport,
  listExports,
  probeExports,
} from "../../mod.ts";
import {
  errorLine,
  type ServerCommand,
  tlsEngineOption,
  warn,
} from "../_cli.ts";
import {
  cannotHaggle,
  CONNECT_TIMEOUT_MS,
  contentOf,
  type ExportFacts,
  gather,
  probeFacts,
  type SessionFacts,
  type Target,
} from "./facts.ts";
import {
  exportJson,
  exportText,
  exportUri,
  jsonText,
  sessionJson,
  sessionText,
} from "./show.ts";

/**
 * `--list` for a server run as `[ CMD ]`: one start lists and describes
 * every export (`probeExports()`); the content, when asked for, needs a
 * connection, so a start of its own, per export.
 */
async function listCommandOutput(
  command: ServerCommand,
  json: boolean,
  content: boolean,
  signal: AbortSignal,
): Promise<{ text: string; ok: boolean }> {
  let listed: ListedExport[];
  let ok = true;
  const shown: ExportFacts[] = [];
  let session: SessionFacts | undefined;
  try {
    // Bounded as a URI's list is: a server that never speaks costs one
    // timeout, not a hang.
    listed = await probeExports(command.options, {
      ...await tlsEngineOption(command.options),
      signal,
      connectTimeout: CONNECT_TIMEOUT_MS,
    });
  } catch (e) {
    // An oldstyle server has exactly one export and no list, as for a URI;
    // telling it takes a second start.
    if (!cannotHaggle(e)) throw e;
    const one = await gather(command, undefined, signal, content);
    if (one.session.protocol !== "oldstyle") throw e;
    session = one.session;
    shown.push(one.export);
    listed = [];
  }
  for (const item of listed) {
    if (!item.probe) {
      ok = false;
      warn(`${errorLine("info", item.error)} for export: ${item.name}`);
      continue;
    }
    let said: string | null = null;
    if (content) {
      const nbd = await connect({
        ...command.options,
        ...await tlsEngineOption(command.options),
        exportName: item.name,
        signal,
        connectTimeout: CONNECT_TIMEOUT_MS,
      });
      try {
        said = await contentOf(nbd, signal);
      } finally {
        await nbd.close();
      }
    }
    const facts = probeFacts(item.probe, said);
    session ??= facts.session;
    if (item.description && !facts.export.description) {
      facts.export.description = item.description;
    }
    shown.push(facts.export);
  }
  return {
    text: listReport(
      session,
      shown.map((facts) => ({ uri: null, facts })),
      json,
    ),
    ok,
  };
}

/** Everything `--list` shows: one probe per listed export. */
export async function listOutput(
  target: Target,
  json: boolean,
  content: boolean,
  signal: AbortSignal,
): Promise<{
  text: string;
  ok: boolean;
}> {
  if (typeof target !== "string") {
    return await listCommandOutput(target, json, content, signal);
  }
  const uri = target;
  let listed: Array<{ name: string; description?: string }>;
  try {
    listed = await listExports(uri, { ...await tlsEngineOption(uri), signal });
  } catch (e) {
    // An oldstyle server has exactly one export and no list.
    const one = await gather(uri, undefined, signal).catch(() => {
      throw e;
    });
    if (one.session.protocol !== "oldstyle") throw e;
    listed = [{ name: one.export.exportName }];
  }
  let session: SessionFacts | undefined;
  const shown: Array<{ uri: string | null; facts: ExportFacts }> = [];
  let ok = true;
  for (const item of listed) {
    try {
      const g = await gather(uri, item.name, signal, content);
      session ??= g.session;
      if (item.description && !g.export.description) {
        g.export.description = item.description;
      }
      shown.push({ uri: exportUri(uri, item.name), facts: g.export });
    } catch (e) {
      ok = false;
      warn(`${errorLine("info", e)} for export: ${item.name}`);
    }
  }
  return { text: listReport(session, shown, json), ok };
}

/** The `--list` report of the exports that answered, text or JSON. */
function listReport(
  session: SessionFacts | undefined,
  shown: Array<{ uri: string | null; facts: ExportFacts }>,
  json: boolean,
): string {
  if (json) {
    const doc = {
      ...(session ? sessionJson(session) : {}),
      exports: shown.map((s) => exportJson(s.uri, s.facts)),
    };
    return jsonText(doc, 2) + "\n";
  }
  let text = session ? sessionText(session) : "";
  for (const s of shown) text += exportText(s.uri, s.facts);
  return text;
}
