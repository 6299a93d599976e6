// js-transform: rewrites JSON object payloads published to Sandpiper, in JavaScript.
//
// The component exports only the `transform` hook (world `sandpiper:plugin/transformer`).
// Its settings are the `[config]` table of its sidecar `js-transform.toml`, read through
// the `config` host import (see rewrite.js and the README).

import { get } from 'sandpiper:plugin/config@0.1.1';
import { log } from 'sandpiper:plugin/log@0.1.1';

import { rewrite, settingsFrom } from './rewrite.js';

// Read on the first call of each instance, not when the module is evaluated:
// componentize-js evaluates it while building the component, when there is no broker
// to ask. A changed sidecar reloads the plugin, and so brings fresh instances.
let settings = null;

export const transform = {
  /** One outcome per message, in order. */
  transform(publisher, messages) {
    if (settings === null) {
      try {
        settings = settingsFrom(get);
      } catch (e) {
        // Bad settings: messages pass unchanged; said once per instance.
        settings = { error: String(e?.message ?? e) };
        log('error', 'js-transform: bad [config]; messages pass unchanged', [['error', settings.error]]);
      }
    }
    if (settings.error !== undefined) return messages.map(() => ({ tag: 'keep' }));
    return messages.map((m) => rewrite(settings, publisher.clientId, m));
  },
};
