// One TOML value, as the broker renders an entry of the sidecar's `[config]` table
// (host import `config.get`): strings (basic, literal, multi-line), integers, floats,
// booleans, arrays and inline tables; a date-time comes back as its text. Integers beyond
// 2^53 lose precision, as JavaScript numbers do.

/** The value of `text` (one TOML value); throws an Error saying what is wrong. */
export function parseTomlValue(text) {
  const p = { s: text, i: 0 };
  const v = value(p);
  skip(p);
  if (p.i !== p.s.length) fail(p, 'trailing characters');
  return v;
}

function fail(p, what) {
  throw new Error(`TOML value ${JSON.stringify(p.s)}: ${what} at ${p.i}`);
}

// Skips spaces, newlines and comments.
function skip(p) {
  for (;;) {
    while (p.i < p.s.length && ' \t\r\n'.includes(p.s[p.i])) p.i++;
    if (p.s[p.i] !== '#') return;
    while (p.i < p.s.length && p.s[p.i] !== '\n') p.i++;
  }
}

function value(p) {
  skip(p);
  const c = p.s[p.i];
  if (c === '"' || c === "'") return string(p);
  if (c === '[') return array(p);
  if (c === '{') return inlineTable(p);
  const m = /^[^\s,\]}#]+/.exec(p.s.slice(p.i));
  if (!m) fail(p, 'a value expected');
  p.i += m[0].length;
  return scalar(p, m[0]);
}

function scalar(p, word) {
  if (word === 'true') return true;
  if (word === 'false') return false;
  const w = word.replaceAll('_', '');
  if (/^[+-]?(inf|nan)$/.test(w)) return w.includes('nan') ? NaN : w.startsWith('-') ? -Infinity : Infinity;
  if (/^0x[0-9a-f]+$/i.test(w)) return parseInt(w.slice(2), 16);
  if (/^0o[0-7]+$/.test(w)) return parseInt(w.slice(2), 8);
  if (/^0b[01]+$/.test(w)) return parseInt(w.slice(2), 2);
  if (/^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$/.test(w)) return Number(w);
  // A date-time (the space form's second half is a separate word: take it too).
  if (/^\d{4}-\d{2}-\d{2}/.test(word) || /^\d{2}:\d{2}/.test(word)) {
    const rest = /^ \d{2}:[^\s,\]}#]+/.exec(p.s.slice(p.i));
    if (rest) p.i += rest[0].length;
    return rest ? word + rest[0] : word;
  }
  return fail(p, `unknown value ${JSON.stringify(word)}`);
}

function string(p) {
  const q = p.s[p.i];
  const multi = p.s.startsWith(q.repeat(3), p.i);
  p.i += multi ? 3 : 1;
  if (multi && p.s[p.i] === '\n') p.i++;
  else if (multi && p.s.startsWith('\r\n', p.i)) p.i += 2;
  let out = '';
  for (;;) {
    if (p.i >= p.s.length) fail(p, 'unterminated string');
    const c = p.s[p.i];
    if (multi ? p.s.startsWith(q.repeat(3), p.i) : c === q) {
      p.i += multi ? 3 : 1;
      // Up to two more quotes right before the closing ones belong to the content.
      for (let extra = 0; multi && extra < 2 && p.s[p.i] === q; extra++) {
        out += q;
        p.i++;
      }
      return out;
    }
    if (c === '\\' && q === '"') {
      p.i++;
      out += escape(p, multi);
      continue;
    }
    if (!multi && c === '\n') fail(p, 'newline in a string');
    out += c;
    p.i++;
  }
}

const ESCAPES = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', e: '\x1b', '"': '"', '\\': '\\' };

function escape(p, multi) {
  const c = p.s[p.i];
  if (c in ESCAPES) {
    p.i++;
    return ESCAPES[c];
  }
  const width = { x: 2, u: 4, U: 8 }[c];
  if (width !== undefined) {
    const hex = p.s.slice(p.i + 1, p.i + 1 + width);
    if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== width) fail(p, 'bad escape');
    p.i += 1 + width;
    return String.fromCodePoint(parseInt(hex, 16));
  }
  if (multi && /[ \t\r\n]/.test(c)) {
    // A line-ending backslash trims the whitespace that follows.
    while (p.i < p.s.length && ' \t\r\n'.includes(p.s[p.i])) p.i++;
    return '';
  }
  return fail(p, 'bad escape');
}

function array(p) {
  p.i++;
  const out = [];
  for (;;) {
    skip(p);
    if (p.s[p.i] === ']') {
      p.i++;
      return out;
    }
    out.push(value(p));
    skip(p);
    if (p.s[p.i] === ',') p.i++;
    else if (p.s[p.i] !== ']') fail(p, "',' or ']' expected");
  }
}

function inlineTable(p) {
  p.i++;
  const out = {};
  for (;;) {
    skip(p);
    if (p.s[p.i] === '}') {
      p.i++;
      return out;
    }
    // A dotted key sets a member of nested tables.
    const path = [key(p)];
    skip(p);
    while (p.s[p.i] === '.') {
      p.i++;
      skip(p);
      path.push(key(p));
      skip(p);
    }
    if (p.s[p.i] !== '=') fail(p, "'=' expected");
    p.i++;
    let t = out;
    for (const k of path.slice(0, -1)) {
      if (!Object.hasOwn(t, k)) t[k] = {};
      t = t[k];
    }
    t[path[path.length - 1]] = value(p);
    skip(p);
    if (p.s[p.i] === ',') p.i++;
    else if (p.s[p.i] !== '}') fail(p, "',' or '}' expected");
  }
}

function key(p) {
  const c = p.s[p.i];
  if (c === '"' || c === "'") return string(p);
  const m = /^[A-Za-z0-9_-]+/.exec(p.s.slice(p.i));
  if (!m) fail(p, 'a key expected');
  p.i += m[0].length;
  return m[0];
}
