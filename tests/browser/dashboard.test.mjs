// The web dashboard (served by the broker's [http] listener at /) in a real headless Chromium:
// log in with a token made by `sandpiper token new`, see every page, see a client that
// MQTT.js (in Node) connected appear, kick it and see it go, see the plugin list. Saves a
// screenshot of each page under target/dashboard-screenshots/ (SCREENSHOTS overrides).
// Run by tests/run after the Rust tests (which build plugins/dist); alone: `cd tests/browser
// && npm ci && npm test` after `cargo build -p sandpiper --bin sandpiper` and `plugins/build`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, copyFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import mqtt from 'mqtt';
import { BIN, listening, startBroker as startWith } from './broker.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOTS ?? join(root, 'target', 'dashboard-screenshots');
const ACL = join(root, 'plugins', 'dist', 'acl.wasm');

/** Starts a broker with an admin token and the acl plugin (allow by default); resolves with
 *  the MQTT and HTTP ports. */
function startBroker(dir, tokenLines) {
  mkdirSync(join(dir, 'plugins'), { recursive: true });
  writeFileSync(join(dir, 'plugins', 'acl.toml'), '[config]\ndefault = "allow"\n');
  copyFileSync(ACL, join(dir, 'plugins', 'acl.wasm'));
  return startWith(dir, [
    '[[listener]]', 'name = "tcp"', 'bind = "127.0.0.1:0"', '',
    '[log]', 'level = "info"', '',
    '[http]', 'bind = "127.0.0.1:0"', '', tokenLines, '',
    // A bridge to a closed port, for the bridges page.
    '[[bridge]]', 'name = "nowhere"', 'address = "mqtt://127.0.0.1:9"', '',
    '[[bridge.topic]]', 'direction = "out"', 'filter = "dash/#"', '',
  ], (log) => {
    const tcp = listening(log).tcp;
    const http = log.match(/endpoints up.*http=\S+:(\d+)/);
    return tcp && http && /plugin loaded/.test(log) ? { tcp, http: Number(http[1]) } : null;
  }, 30000);
}

test('the dashboard: log in, every page, a client appears and is kicked, the plugins',
  { timeout: 120000, skip: existsSync(ACL) ? false : `no ${ACL} (run plugins/build)` }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sandpiper-dashboard-'));
    mkdirSync(SHOTS, { recursive: true });
    const made = execFileSync(BIN, ['token', 'new', 'dashboard-test']).toString();
    const [token, ...tomlLines] = made.split('\n');
    const broker = startBroker(dir, tomlLines.join('\n'));
    let context;
    let client;
    try {
      const { tcp, http } = await broker.ports;
      const base = `http://127.0.0.1:${http}/`;
      // A real MQTT client, which does not reconnect once kicked.
      client = mqtt.connect(`mqtt://127.0.0.1:${tcp}`, { clientId: 'dash-client', protocolVersion: 5, reconnectPeriod: 0 });
      const closed = new Promise((resolve) => client.on('close', resolve));
      const disconnect = new Promise((resolve) => client.on('disconnect', (p) => resolve(p.reasonCode)));
      await new Promise((resolve, reject) => { client.on('connect', resolve); client.on('error', reject); });
      await client.subscribeAsync('dash/#', { qos: 1 });
      await client.publishAsync('dash/retained', 'kept for the browser', { qos: 1, retain: true });

      context = await chromium.launchPersistentContext(join(dir, 'profile'), {
        executablePath: CHROMIUM,
        headless: true,
        viewport: { width: 1280, height: 800 },
        args: ['--no-sandbox', '--disable-gpu', '--no-first-run',
          '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      });
      const page = context.pages()[0] ?? await context.newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      page.on('dialog', (d) => d.accept());
      const shot = (name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

      // A wrong token is refused; the right one opens the overview with its live chart.
      await page.goto(base);
      await page.fill('#token', 'sp_wrong');
      await page.click('#login-button');
      await page.waitForFunction(() => /refused/.test(document.querySelector('#login-message')?.textContent ?? ''));
      await shot('login-refused');
      await page.fill('#token', token);
      await page.click('#login-button');
      await page.waitForSelector('#page-overview');
      await page.waitForFunction(() => Number(document.querySelector('#card-connections .value')?.textContent) >= 1);
      await page.waitForFunction(() => Number(document.querySelector('#rate-chart')?.dataset.points) >= 2, null, { timeout: 15000 });
      await shot('overview');

      // Clients: ours is there; kick it and see it go (MQTT 5 DISCONNECT 0x98).
      await page.goto(`${base}#/clients`);
      await page.waitForSelector('#clients-table tr[data-id="dash-client"]');
      await shot('clients');
      await page.goto(`${base}#/clients/dash-client`);
      await page.waitForSelector('#page-client #client-subscriptions-table tr[data-id="dash/#"]');
      await shot('client');
      await page.click('#kick-button');
      assert.equal(await disconnect, 0x98);
      await closed;
      await page.goto(`${base}#/clients`);
      await page.waitForSelector('#clients-table');
      await page.waitForFunction(() => !document.querySelector('#clients-table tr[data-id="dash-client"]'), null, { timeout: 10000 });

      for (const [name, row] of [['sessions', null], ['subscriptions', null], ['retained', 'dash/retained']]) {
        await page.goto(`${base}#/${name}`);
        await page.waitForSelector(`#page-${name} #${name}-table`);
        if (row) await page.waitForSelector(`#${name}-table tr[data-id="${row}"]`);
        await shot(name);
      }
      // Plugins: the acl is loaded, with its hook.
      await page.goto(`${base}#/plugins`);
      await page.waitForSelector('#plugins-table tr[data-id="acl"]');
      const text = await page.textContent('#plugins-table tr[data-id="acl"]');
      assert.match(text, /loaded/);
      assert.match(text, /authorize/);
      await shot('plugins');
      // Bridges: the one to a closed port, not connected.
      await page.goto(`${base}#/bridges`);
      await page.waitForSelector('#bridges-table tr[data-id="nowhere"]');
      assert.match(await page.textContent('#bridges-table tr[data-id="nowhere"]'), /disconnected/);
      await shot('bridges');
      assert.deepEqual(errors, [], 'no script errors on any page');
    } catch (e) {
      throw new Error(`${e.stack ?? e}\nbroker log:\n${broker.log()}`);
    } finally {
      client?.end(true);
      await context?.close();
      broker.proc.kill('SIGTERM');
      rmSync(dir, { recursive: true, force: true });
    }
  });
