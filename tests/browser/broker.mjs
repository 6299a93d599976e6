// Starts the broker for the browser tests: writes `lines` as its configuration in `dir`,
// runs SANDPIPER_BIN (default target/debug/sandpiper) on it, and resolves `ports` with what
// `ready(log)` finds in its log (null: not yet), within `timeoutMs`.

import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SANDPIPER_BIN ?? join(here, '..', '..', 'target', 'debug', 'sandpiper');

/** The ports of the listeners the log says are listening, by name. */
export function listening(log) {
  const found = {};
  for (const m of log.matchAll(/listening name=(\w+).*addr=\S+:(\d+)/g)) found[m[1]] = Number(m[2]);
  return found;
}

export function startBroker(dir, lines, ready, timeoutMs = 20000) {
  mkdirSync(dir, { recursive: true });
  const config = join(dir, 'sandpiper.toml');
  writeFileSync(config, lines.join('\n'));
  // RUST_LOG would override the config's level and could hide the `listening` lines.
  const { RUST_LOG: _ignored, ...env } = process.env;
  const proc = spawn(BIN, ['--config', config, '--data-dir', join(dir, 'data')], {
    env: { ...env, NO_COLOR: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  const ports = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`broker did not start:\n${log}`)), timeoutMs);
    proc.stderr.on('data', (chunk) => {
      log += chunk;
      const found = ready(log);
      if (found) { clearTimeout(timer); resolve(found); }
    });
    proc.on('exit', (code) => reject(new Error(`broker exited (${code}):\n${log}`)));
  });
  return { proc, ports, log: () => log };
}
