// Unit tests of rewrite.js and toml-value.js on plain Node.js: node --test test/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { rewrite, settingsFrom } from '../src/rewrite.js';
import { parseTomlValue } from '../src/toml-value.js';

const config = (table) => (key) => table[key];
const message = (payload) => ({
  topic: 'sensors/1',
  payload: new TextEncoder().encode(payload),
  qos: 'at-least-once',
  retain: false,
  properties: { payloadUtf8: true, userProperties: [{ name: 'k', value: 'v' }] },
});
const text = (outcome) => new TextDecoder().decode(outcome.val.payload);

test('renames members, adds fields and the publisher, keeps the rest of the message', () => {
  const s = settingsFrom(
    config({ rename: '{ temp = "temperature" }', add: '{ v = 2, site = "plant-7" }', publisher_key: 'device' }),
  );
  const out = rewrite(s, 'dev-1', message('{"temp":21.5,"unit":"C","site":"forged"}'));
  assert.equal(out.tag, 'replace');
  assert.deepEqual(JSON.parse(text(out)), { temperature: 21.5, unit: 'C', site: 'plant-7', v: 2, device: 'dev-1' });
  assert.equal(out.val.topic, 'sensors/1');
  assert.equal(out.val.qos, 'at-least-once');
  assert.deepEqual(out.val.properties.userProperties, [{ name: 'k', value: 'v' }]);
});

test('other payloads and untouched objects are kept', () => {
  const s = settingsFrom(config({ rename: '{ temp = "temperature" }' }));
  for (const p of ['[1,2]', '"temp"', '42', 'null', 'not json', '{"hum": 40}']) {
    assert.deepEqual(rewrite(s, 'c', message(p)), { tag: 'keep' }, p);
  }
  const bad = { ...message(''), payload: new Uint8Array([0x7b, 0xff, 0x7d]) };
  assert.deepEqual(rewrite(s, 'c', bad), { tag: 'keep' });
  assert.deepEqual(rewrite(settingsFrom(config({})), 'c', message('{"a":1}')), { tag: 'keep' });
});

test('bad settings are refused with the key', () => {
  assert.throws(() => settingsFrom(config({ rename: '{ a = 1 }' })), /rename\.a/);
  assert.throws(() => settingsFrom(config({ add: '[1]' })), /add: expected a table/);
  assert.throws(() => settingsFrom(config({ add: '{ a = ' })), /TOML value/);
  assert.throws(() => settingsFrom(config({ publisher_key: '' })), /publisher_key/);
});

test('TOML values as the broker renders them', () => {
  const cases = [
    ['"a\\"b\\\\c\\n\\u00e9"', 'a"b\\c\né'],
    ["'C:\\\\path'", 'C:\\\\path'],
    ['"""\nline 1\nline ""2"""""', 'line 1\nline ""2""'],
    ["'''it's'''", "it's"],
    ['1_000', 1000],
    ['0xff', 255],
    ['0o17', 15],
    ['0b101', 5],
    ['-3.5e2', -350],
    ['+inf', Infinity],
    ['true', true],
    ['1979-05-27T07:32:00Z', '1979-05-27T07:32:00Z'],
    ['1979-05-27 07:32:00', '1979-05-27 07:32:00'],
    ['[1, "two", [3], { four = 4 },]', [1, 'two', [3], { four: 4 }]],
    ['{ a = 1, "b c" = "d", e.f = true, g = { h = [] } }', { a: 1, 'b c': 'd', e: { f: true }, g: { h: [] } }],
    ['{}', {}],
  ];
  for (const [input, want] of cases) assert.deepEqual(parseTomlValue(input), want, input);
  assert.ok(Number.isNaN(parseTomlValue('nan')));
  for (const bad of ['', '"open', '{ a = 1', '[1 2]', 'yes', '1 2', '"\\q"', '{ = 1 }']) {
    assert.throws(() => parseTomlValue(bad), /TOML value/, bad);
  }
});
