// MQTT.js in a real headless Chromium (Debian's chromium, driven by playwright-core), on a page
// served from a local HTTP server, subscribes over Sandpiper's WebSocket listener and receives a
// message that mosquitto_pub publishes over plain TCP; a page of an origin the listener does not
// list cannot connect. Run by tests/run; alone: `cd tests/browser && npm ci && npm test` after
// `cargo build -p sandpiper --bin sandpiper` (SANDPIPER_BIN overrides the binary).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { listening, startBroker as startWith } from './broker.mjs';

const require = createRequire(import.meta.url);
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const MQTT_JS = join(dirname(require.resolve('mqtt/package.json')), 'dist', 'mqtt.min.js');

/** Serves an empty page on 127.0.0.1; resolves with the server and its origin. */
async function pageServer() {
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>sandpiper browser test</title>');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

/** Starts the broker with a TCP and a WebSocket listener (plus `wsLines` on the latter);
 *  resolves with their ports. */
function startBroker(dir, wsLines = []) {
  return startWith(dir, [
    '[[listener]]', 'name = "tcp"', 'bind = "127.0.0.1:0"', '',
    '[[listener]]', 'name = "ws"', 'kind = "ws"', 'bind = "127.0.0.1:0"', 'path = "/mqtt"', ...wsLines, '',
    '[log]', 'level = "info"', '',
  ], (log) => {
    const found = listening(log);
    return found.tcp && found.ws ? found : null;
  });
}

const launch = (dir) => chromium.launchPersistentContext(join(dir, 'profile'), {
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

for (const protocolVersion of [4, 5]) {
  test(`MQTT.js ${protocolVersion === 5 ? '5.0' : '3.1.1'} in Chromium over ws:// receives mosquitto_pub's message`,
    { timeout: 60000 }, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'sandpiper-browser-'));
      const site = await pageServer();
      const broker = startBroker(dir, [`allowed_origins = ["${site.origin}"]`]);
      let context;
      try {
        const { tcp, ws } = await broker.ports;
        context = await launch(dir);
        const page = context.pages()[0] ?? await context.newPage();
        await page.goto(`${site.origin}/`);
        await page.addScriptTag({ path: MQTT_JS });
        const topic = `browser/${protocolVersion}/${Date.now()}`;
        // Connect and subscribe; resolves once the SUBACK is in.
        const granted = await page.evaluate(({ url, topic, protocolVersion }) => new Promise((resolve, reject) => {
          window.received = [];
          const client = window.mqtt.connect(url, { protocolVersion, clientId: `chromium-${protocolVersion}`, reconnectPeriod: 0 });
          window.client = client;
          client.on('error', (e) => reject(String(e)));
          client.on('message', (t, payload) => window.received.push([t, payload.toString()]));
          client.on('connect', () => client.subscribe(topic, { qos: 1 }, (err, granted) => (err ? reject(String(err)) : resolve(granted))));
        }), { url: `ws://127.0.0.1:${ws}/mqtt`, topic, protocolVersion });
        assert.equal(granted[0].qos, 1);

        await promisify(execFile)('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(tcp), '-q', '1', '-t', topic, '-m', 'hello browser'], { timeout: 15000 });

        await page.waitForFunction(() => window.received.length > 0, null, { timeout: 10000 });
        const received = await page.evaluate(() => window.received);
        assert.deepEqual(received, [[topic, 'hello browser']]);
        await page.evaluate(() => new Promise((resolve) => window.client.end(false, resolve)));
      } catch (e) {
        throw new Error(`${e.stack ?? e}\nbroker log:\n${broker.log()}`);
      } finally {
        await context?.close();
        site.server.close();
        broker.proc.kill('SIGTERM');
        rmSync(dir, { recursive: true, force: true });
      }
    });
}

/** Whether a page at `origin` can open a WebSocket to `url` ('open' or 'refused'). */
async function tryOpen(context, origin, url) {
  const page = await context.newPage();
  try {
    await page.goto(`${origin}/`);
    return await page.evaluate((url) => new Promise((resolve) => {
      const ws = new WebSocket(url, 'mqtt');
      ws.onopen = () => { ws.close(); resolve('open'); };
      ws.onerror = () => resolve('refused');
    }), url);
  } finally {
    await page.close();
  }
}

test('a page of an origin the listener does not allow cannot connect', { timeout: 60000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sandpiper-browser-'));
  const [listed, other] = [await pageServer(), await pageServer()];
  const brokers = [];
  let context;
  try {
    context = await launch(dir);
    // A listener that lists one origin: that page connects, another page does not.
    brokers.push(startBroker(join(dir, 'a'), [`allowed_origins = ["${listed.origin}"]`]));
    // An anonymous listener without allowed_origins: no page connects.
    brokers.push(startBroker(join(dir, 'b')));
    const [a, b] = await Promise.all(brokers.map((x) => x.ports));
    assert.equal(await tryOpen(context, listed.origin, `ws://127.0.0.1:${a.ws}/mqtt`), 'open');
    assert.equal(await tryOpen(context, other.origin, `ws://127.0.0.1:${a.ws}/mqtt`), 'refused');
    assert.equal(await tryOpen(context, listed.origin, `ws://127.0.0.1:${b.ws}/mqtt`), 'refused');
    // The broker writes its log through a queue of its own and the pipe is read as it
    // comes: the refusal's line may trail the refusal the page saw.
    for (const x of brokers) {
      for (let waited = 0; waited < 5000 && !/allowed_origins: refused/.test(x.log()); waited += 50) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.match(x.log(), /allowed_origins: refused/);
    }
  } catch (e) {
    throw new Error(`${e.stack ?? e}\nbroker logs:\n${brokers.map((x) => x.log()).join('\n')}`);
  } finally {
    await context?.close();
    listed.server.close();
    other.server.close();
    for (const x of brokers) x.proc.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
});
