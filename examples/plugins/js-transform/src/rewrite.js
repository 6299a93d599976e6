// What js-transform does to one message, without any binding to the broker (so it can
// be tested with plain Node.js).

import { parseTomlValue } from './toml-value.js';

const decoder = new TextDecoder('utf-8', { fatal: true });
const encoder = new TextEncoder();

/**
 * The settings of the `[config]` table, read through `get` (the host import
 * `config.get`: a key's value rendered as TOML, a string without quotes, or undefined).
 * Throws an Error saying what is wrong.
 */
export function settingsFrom(get) {
  const rename = tableOf(get, 'rename');
  for (const [from, to] of Object.entries(rename)) {
    if (typeof to !== 'string' || to === '') {
      throw new Error(`rename.${from}: expected a member name, got ${JSON.stringify(to)}`);
    }
  }
  const add = tableOf(get, 'add');
  const publisherKey = get('publisher_key') ?? null;
  if (publisherKey === '') throw new Error('publisher_key: expected a member name');
  // Added in name order, whatever order the table was written in.
  const added = Object.entries(add).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return { rename: new Map(Object.entries(rename)), add: added, publisherKey };
}

// The inline table under `key` (absent: empty).
function tableOf(get, key) {
  const text = get(key);
  if (text === undefined) return {};
  const value = parseTomlValue(text);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new Error(`${key}: expected a table such as { a = "b" }`);
  }
  return value;
}

/**
 * The outcome for `message` (the WIT record `message`: topic, payload as a Uint8Array,
 * qos, retain, properties) published by the client `publisherId`: `{ tag: 'keep' }` or
 * `{ tag: 'replace', val: message }` with the rewritten JSON payload and everything else
 * as it was.
 */
export function rewrite(settings, publisherId, message) {
  let doc;
  try {
    doc = JSON.parse(decoder.decode(message.payload));
  } catch {
    return { tag: 'keep' };
  }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) {
    return { tag: 'keep' };
  }
  let changed = false;
  const out = {};
  for (const [k, v] of Object.entries(doc)) {
    const to = settings.rename.get(k);
    if (to !== undefined) changed = true;
    out[to ?? k] = v;
  }
  for (const [k, v] of settings.add) {
    out[k] = v;
    changed = true;
  }
  if (settings.publisherKey !== null) {
    out[settings.publisherKey] = publisherId;
    changed = true;
  }
  if (!changed) return { tag: 'keep' };
  return { tag: 'replace', val: { ...message, payload: encoder.encode(JSON.stringify(out)) } };
}
