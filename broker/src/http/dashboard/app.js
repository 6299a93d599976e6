// Sandpiper dashboard: plain JavaScript, no build step, no dependencies.
// Talks only to the admin API (docs/admin-api.md). Every string from the API reaches the
// page through textContent / attributes set by createElement, never through innerHTML.
'use strict';
(() => {
  const KEY = 'sandpiper.token';
  const API = 'api/v1/';
  const NEVER = 4294967295;
  const MAXPTS = 120;
  const RX = '#2563eb', TX = '#ea580c'; // received, sent (also in style.css: .key.rx / .key.tx)
  const $ = id => document.getElementById(id);
  const enc = s => encodeURIComponent(s);
  const filters = {}; // filter inputs' values, kept across page changes
  let view = null; // the mounted page: {alive, timers, refresh}
  let confirmOpen = false;
  let errSrc = null;

  // ---- helpers ----------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'class') e.className = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  const nf = new Intl.NumberFormat();
  const rf = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
  const fmtNum = n => (n == null ? '—' : nf.format(n));
  const af = new Intl.NumberFormat(undefined, {maximumFractionDigits: 2}); // chart axis
  const fmtRate = n => rf.format(n);
  const fmtTime = ms => (ms == null ? '—' : new Date(ms).toLocaleString());
  const fmtSecs = s => (s == null ? '—' : s === 0 ? 'off' : `${s} s`);
  const fmtExpiry = s => (s == null ? '—' : s >= NEVER ? 'never' : fmtDur(s));
  const fmtAny = v => (v == null ? '—' : typeof v === 'object' ? JSON.stringify(v) : String(v));
  const yesno = b => (b ? 'yes' : 'no');

  function fmtDur(s) {
    if (s == null) return '—';
    s = Math.floor(s);
    const d = Math.floor(s / 86400), hr = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${m} min ${s % 60} s`;
    if (s < 86400) return `${hr} h ${m} min`;
    return `${d} d ${hr} h`;
  }

  function fmtBytes(n) {
    if (n == null) return '—';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${u[i]}`;
  }

  const clientLink = id => h('a', {href: '#/clients/' + enc(id), class: 'mono'}, id);

  function ask(msg) {
    confirmOpen = true;
    try { return window.confirm(msg); } finally { confirmOpen = false; }
  }

  // A destructive request: asks first (the 5 s refresh waits meanwhile).
  const confirmed = (ctx, msg, method, path, then, btn) => ask(msg) && act(ctx, () => api(method, path), then, btn);

  // ---- errors -----------------------------------------------------------------------

  // The banner remembers who raised it: a later successful refresh clears only its own.
  function showError(msg, src) {
    Object.assign($('error'), {textContent: msg, hidden: false});
    errSrc = src || 'action';
  }

  function clearError(src) {
    if (src && src !== errSrc) return;
    Object.assign($('error'), {textContent: '', hidden: true});
    errSrc = null;
  }

  function report(ctx, e, src) {
    if (!(e && e.silent) && !(ctx && !ctx.alive)) showError(e && e.message ? e.message : String(e), src);
  }

  // ---- API --------------------------------------------------------------------------

  const apiError = (msg, status = 0, silent = false) => Object.assign(new Error(msg), {status, silent});

  const token = () => sessionStorage.getItem(KEY);

  async function api(method, path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v != null && v !== '') q.set(k, v);
    const qs = q.toString();
    const t = token();
    let res, body = null;
    try {
      res = await fetch(API + path + (qs ? '?' + qs : ''),
        {method, cache: 'no-store', headers: {Authorization: 'Bearer ' + (t || '')}});
    } catch {
      throw apiError('cannot reach the broker');
    }
    if (res.status === 401) {
      if (token() === t) logout('token refused'); // not for a request of an older token
      throw apiError('token refused', 401, true);
    }
    try { body = await res.json(); } catch { /* not JSON */ }
    if (res.ok) return body;
    throw apiError(body && body.error ? String(body.error) : `HTTP ${res.status} ${res.statusText}`.trim(), res.status);
  }

  // Runs a changing request; `then` runs on success (usually a refresh).
  async function act(ctx, fn, then, btn) {
    if (btn) btn.disabled = true;
    try {
      await fn();
      if (ctx.alive) { clearError('action'); if (then) then(); }
    } catch (e) {
      report(ctx, e, 'action');
    } finally {
      if (btn) btn.disabled = false;
    }
  }

  // ---- login / layout / routing -----------------------------------------------------

  function stopView() {
    if (view) { view.alive = false; view.timers.forEach(clearInterval); view = null; }
  }

  function showApp(on = true) {
    $('login').hidden = on;
    $('topbar').hidden = $('main').hidden = !on;
  }

  function showLogin(msg) {
    stopView();
    clearError();
    showApp(false);
    $('main').replaceChildren();
    $('login-message').textContent = msg || '';
    $('token').focus();
  }

  function logout(msg) {
    sessionStorage.removeItem(KEY);
    showLogin(msg);
  }

  function mount(name, title, ...kids) {
    $('main').replaceChildren(h('section', {id: 'page-' + name, class: 'page'}, h('h2', {}, title), ...kids));
  }

  function safeDecode(s) {
    try { return decodeURIComponent(s); } catch { return s; }
  }

  function route() {
    if (!token()) return showLogin();
    showApp();
    const m = /^#\/([a-z]+)(?:\/(.*))?$/.exec(location.hash);
    const name = m ? m[1] : '';
    if (!Object.keys(PAGES).includes(name) || (m[2] != null && name !== 'clients')) return location.replace('#/overview');
    stopView(); clearError();
    const ctx = view = {alive: true, timers: [], refresh: null};
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.classList.toggle('active', a.dataset.page === name)) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    if (name === 'clients' && m[2]) pageClient(ctx, safeDecode(m[2])); else PAGES[name](ctx);
    // Lists refresh every 5 s, not while the tab is hidden or a confirm() is open.
    ctx.timers.push(setInterval(() => { if (ctx.refresh && !document.hidden && !confirmOpen) ctx.refresh(); }, 5000));
  }

  // ---- tables -----------------------------------------------------------------------

  const head = cols => h('thead', {}, h('tr', {}, cols.map(c => h('th', {class: c.cls}, c.title))));
  const row = (cols, r, id) => h('tr', {dataset: {id}}, cols.map(c => h('td', {class: c.cls}, c.cell(r))));

  function staticTable(id, cols, rows, rowId) {
    return h('div', {class: 'table-wrap'},
      h('table', {id, class: 'list'}, head(cols), h('tbody', {}, rows.map(r => row(cols, r, rowId(r))))),
      rows.length ? null : h('p', {class: 'empty'}, 'None.'));
  }

  // A paged list: o = {name, path, key, params(), columns, rowId(r), onRow(r)?, selected(r)?}
  function listTable(ctx, o) {
    const tbody = h('tbody');
    const more = h('button', {type: 'button', id: o.name + '-more', class: 'more', hidden: true}, 'More');
    const empty = h('p', {class: 'empty', hidden: true}, 'Nothing to show.');
    const el = h('div', {class: 'table-wrap'},
      h('table', {id: o.name + '-table', class: 'list'}, head(o.columns), tbody), empty, more);
    let rows = [], next = null, pages = 1, gen = 0;
    const page = after => api('GET', o.path, {...(o.params ? o.params() : {}), after});

    function paint() {
      tbody.replaceChildren(...rows.map(r => {
        const tr = row(o.columns, r, o.rowId(r));
        if (o.onRow) tr.addEventListener('click', e => { if (!e.target.closest('button, a')) o.onRow(r); });
        tr.classList.toggle('clickable', !!o.onRow);
        tr.classList.toggle('selected', !!(o.selected && o.selected(r)));
        return tr;
      }));
      more.hidden = !next;
      empty.hidden = rows.length > 0;
    }

    // Only the latest request started is painted (a refresh racing a new filter loses).
    async function run(fn) {
      const g = ++gen;
      try {
        const res = await fn();
        if (g !== gen || !ctx.alive) return;
        ({rows, next, pages} = res);
        paint(); clearError('refresh');
      } catch (e) {
        if (g === gen) report(ctx, e, 'refresh');
      }
    }

    // Loads the first n pages again (a refresh keeps what "More" had shown).
    async function load(n) {
      const acc = [];
      let after = null, i = 0;
      do {
        const d = await page(after);
        acc.push(...(d[o.key] || []));
        after = d.next ?? null;
        i++;
      } while (after && i < n);
      return {rows: acc, next: after, pages: i};
    }

    more.addEventListener('click', () => {
      const r0 = rows, p0 = pages, after = next;
      run(async () => {
        const d = await page(after);
        return {rows: r0.concat(d[o.key] || []), next: d.next ?? null, pages: p0 + 1};
      });
    });

    return {el, reload: () => run(() => load(1)), refresh: () => run(() => load(Math.min(pages, 10))), repaint: paint};
  }

  // A text input whose value survives page changes; `fn` runs 300 ms after typing stops.
  function filterInput(id, placeholder, dflt, fn) {
    const input = h('input', {id, type: 'search', placeholder, 'aria-label': placeholder,
      value: filters[id] ?? dflt ?? '', spellcheck: 'false', autocomplete: 'off'});
    let t;
    input.addEventListener('input', () => { filters[id] = input.value; clearTimeout(t); t = setTimeout(fn, 300); });
    input.addEventListener('keydown', e => { if (e.key === 'Enter') { clearTimeout(t); fn(); } });
    return input;
  }

  // Mounts a list page and makes its table the thing the 5 s timer refreshes.
  function listPage(ctx, name, title, tools, list) {
    mount(name, title, tools.length ? h('div', {class: 'toolbar'}, tools) : null, list.el);
    ctx.refresh = list.refresh;
    list.reload();
  }

  const button = (cls, id, label, onclick) =>
    h('button', {type: 'button', class: cls, dataset: {id}, onclick: e => onclick(e.currentTarget)}, label);

  // ---- overview ---------------------------------------------------------------------

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart(cv, pts) {
    const g = cv.getContext && cv.getContext('2d');
    if (!g) return;
    const dpr = window.devicePixelRatio || 1;
    const w = cv.clientWidth || 600, ht = cv.clientHeight || 240;
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(ht * dpr)) {
      cv.width = Math.round(w * dpr);
      cv.height = Math.round(ht * dpr);
    }
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, ht);
    const L = 64, R = 12, T = 28, B = 24, pw = w - L - R, ph = ht - T - B;
    const max = niceMax(Math.max(0, ...pts.map(p => Math.max(p.rx, p.tx))));
    const line = (x0, y0, x1, y1, style) => {
      g.strokeStyle = style; g.beginPath(); g.moveTo(x0, y0); g.lineTo(x1, y1); g.stroke();
    };
    const text = (str, x0, y0, align, base, fill = '#6b7280') => {
      Object.assign(g, {textAlign: align, textBaseline: base, fillStyle: fill}).fillText(str, x0, y0);
    };
    Object.assign(g, {font: '12px system-ui, sans-serif', lineWidth: 1, lineJoin: 'round'});
    for (let i = 0; i <= 4; i++) { // grid lines and value labels, max at the top
      const y = Math.round(T + (ph * i) / 4) + 0.5;
      line(L, y, L + pw, y, i === 4 ? '#9ca3af' : '#e5e7eb');
      text(af.format((max * (4 - i)) / 4) + '/s', L - 6, y, 'right', 'middle');
    }
    line(L + 0.5, T, L + 0.5, T + ph, '#9ca3af');
    text(`−${MAXPTS} s`, L, T + ph + 6, 'left', 'top');
    text('now', L + pw, T + ph + 6, 'right', 'top');
    const x = i => L + (pw * (MAXPTS - pts.length + i)) / (MAXPTS - 1);
    const y = v => T + ph - (ph * v) / max;
    g.lineWidth = 2;
    for (const [k, col] of [['rx', RX], ['tx', TX]]) {
      g.strokeStyle = col;
      g.beginPath();
      pts.forEach((p, i) => (i ? g.lineTo(x(i), y(p[k])) : g.moveTo(x(i), y(p[k]))));
      g.stroke();
    }
    let lx = L; // legend, above the plot
    for (const [label, col] of [['received/s', RX], ['sent/s', TX]]) {
      g.fillStyle = col;
      g.fillRect(lx, 5, 10, 10);
      text(label, lx + 14, 10, 'left', 'middle', '#374151');
      lx += 28 + g.measureText(label).width;
    }
  }

  function pageOverview(ctx) {
    const defs = [['connections', 'Connections'], ['sessions-online', 'Sessions online'],
      ['sessions-offline', 'Sessions offline'], ['subscriptions', 'Subscriptions'],
      ['retained-messages', 'Retained messages'], ['retained-bytes', 'Retained bytes'], ['store', 'Store']];
    const val = {};
    const cards = h('div', {class: 'cards'}, defs.map(([k, label]) =>
      h('div', {class: 'card', id: 'card-' + k}, h('div', {class: 'label'}, label),
        val[k] = h('div', {class: 'value'}, '…'))));
    const storeSub = h('div', {class: 'sub'});
    val.store.after(storeSub);
    const canvas = h('canvas', {id: 'rate-chart', role: 'img',
      'aria-label': 'Messages received and sent per second over the last two minutes'});
    const rates = h('div', {id: 'rate-now', class: 'rates'});
    const info = h('p', {id: 'overview-info', class: 'muted'});
    mount('overview', 'Overview', info, cards, h('div', {class: 'chart'},
      h('div', {class: 'chart-head'}, h('h3', {}, 'Messages per second'), rates), canvas));

    const pts = [];
    let prev = null, busy = false;

    function show(o) {
      const set = (k, v) => { val[k].textContent = v; };
      set('connections', fmtNum(o.connections));
      set('sessions-online', fmtNum(o.sessions?.online));
      set('sessions-offline', fmtNum(o.sessions?.offline));
      set('subscriptions', fmtNum(o.subscriptions));
      set('retained-messages', fmtNum(o.retained?.messages));
      set('retained-bytes', fmtBytes(o.retained?.bytes));
      const failing = !!o.store?.failing;
      set('store', failing ? 'failing' : 'ok');
      $('card-store').classList.toggle('bad', failing);
      $('card-store').classList.toggle('good', !failing);
      storeSub.textContent = o.store?.committed != null ? `${fmtNum(o.store.committed)} committed` : '';
      info.textContent = `Sandpiper ${o.version ?? '?'} · contract ${o.contract ?? '?'} · up ` +
        `${fmtDur(o.uptime_seconds)} · messages: ${fmtNum(o.messages?.received)} received, ` +
        `${fmtNum(o.messages?.sent)} sent, ${fmtNum(o.messages?.dropped)} dropped · bytes: ` +
        `${fmtBytes(o.bytes?.received)} in, ${fmtBytes(o.bytes?.sent)} out`;
    }

    function sample(o) {
      const t = performance.now(), rx = o.messages?.received ?? 0, tx = o.messages?.sent ?? 0;
      // Totals going down mean the broker restarted: start again from this sample.
      if (prev && rx >= prev.rx && tx >= prev.tx && t > prev.t) {
        const dt = (t - prev.t) / 1000;
        pts.push({rx: (rx - prev.rx) / dt, tx: (tx - prev.tx) / dt});
        if (pts.length > MAXPTS) pts.shift();
      }
      prev = {t, rx, tx};
      const last = pts[pts.length - 1];
      const r = k => (last ? fmtRate(last[k]) : '–');
      rates.replaceChildren(h('span', {class: 'key rx'}, `received ${r('rx')}/s`),
        h('span', {class: 'key tx'}, `sent ${r('tx')}/s`));
      canvas.dataset.points = String(pts.length);
      drawChart(canvas, pts);
    }

    async function poll() {
      if (document.hidden) prev = null; // no sample spans a hidden gap
      if (document.hidden || busy) return;
      busy = true;
      try {
        const o = await api('GET', 'overview');
        if (ctx.alive) { show(o); sample(o); clearError('refresh'); }
      } catch (e) {
        report(ctx, e, 'refresh');
      } finally {
        busy = false;
      }
    }

    drawChart(canvas, pts);
    ctx.redraw = () => drawChart(canvas, pts);
    poll();
    ctx.timers.push(setInterval(poll, 1000));
  }

  // ---- clients ----------------------------------------------------------------------

  const kick = (ctx, id, then, btn) => confirmed(ctx, `Kick client "${id}"?`, 'DELETE', 'clients/' + enc(id), then, btn);

  function pageClients(ctx) {
    const search = filterInput('clients-search', 'client id prefix', '', () => list.reload());
    const list = listTable(ctx, {
      name: 'clients', path: 'clients', key: 'clients',
      params: () => ({prefix: search.value}),
      rowId: c => c.client_id,
      columns: [
        {title: 'Client id', cell: c => clientLink(c.client_id)},
        {title: 'User', cell: c => c.user ?? h('span', {class: 'muted'}, 'anonymous')},
        {title: 'Listener', cell: c => c.listener},
        {title: 'Peer', cls: 'mono', cell: c => c.peer},
        {title: 'Protocol', cell: c => c.protocol},
        {title: 'Keep alive', cls: 'num', cell: c => fmtSecs(c.keep_alive)},
        {title: 'Connected since', cell: c => fmtTime(c.connected_at)},
        {title: 'Queued', cls: 'num', cell: c => fmtNum(c.queued)},
        {title: '', cls: 'actions', cell: c =>
          button('kick', c.client_id, 'Kick', b => kick(ctx, c.client_id, list.refresh, b))},
      ],
    });
    listPage(ctx, 'clients', 'Clients', [search], list);
  }

  const SUB_COLS = [
    {title: 'Filter', cls: 'mono', cell: s => s.filter},
    {title: 'QoS', cls: 'num', cell: s => s.qos},
    {title: 'No local', cell: s => yesno(s.no_local)},
    {title: 'Retain as published', cell: s => yesno(s.retain_as_published)},
    {title: 'Retain handling', cls: 'num', cell: s => s.retain_handling},
    {title: 'Subscription id', cls: 'num', cell: s => s.id ?? '—'},
  ];

  const CLIENT_FIELDS = [
    ['client_id', 'Client id'], ['user', 'User', v => v ?? 'anonymous'], ['listener', 'Listener'],
    ['peer', 'Peer'], ['protocol', 'Protocol'], ['keep_alive', 'Keep alive', fmtSecs],
    ['connected_at', 'Connected since', fmtTime], ['session_expiry', 'Session expiry', fmtExpiry],
    ['queued', 'Queued', fmtNum], ['inflight', 'In flight', fmtNum],
  ];

  function pageClient(ctx, id) {
    const body = h('div', {class: 'detail'}, h('p', {class: 'muted'}, 'Loading…'));
    const kickBtn = h('button', {type: 'button', id: 'kick-button', class: 'kick', dataset: {id},
      onclick: e => kick(ctx, id, () => { location.hash = '#/clients'; }, e.currentTarget)}, 'Kick');
    mount('client', ['Client ', h('span', {class: 'mono'}, id)],
      h('div', {class: 'toolbar'}, h('a', {href: '#/clients'}, '← All clients'), kickBtn), body);

    async function load() {
      try {
        const c = await api('GET', 'clients/' + enc(id));
        if (!ctx.alive) return;
        clearError('refresh');
        kickBtn.disabled = false;
        const dl = h('dl', {id: 'client-fields', class: 'fields'});
        const add = (k, label, v) => dl.append(h('dt', {}, label), h('dd', {dataset: {field: k}}, v ?? '—'));
        const known = new Set(['subscriptions']);
        for (const [k, label, f] of CLIENT_FIELDS) {
          known.add(k);
          if (k in c) add(k, label, f ? f(c[k]) : fmtAny(c[k]));
        }
        for (const [k, v] of Object.entries(c)) if (!known.has(k)) add(k, k.replace(/_/g, ' '), fmtAny(v));
        const subs = c.subscriptions || [];
        body.replaceChildren(dl, h('h3', {}, `Subscriptions (${subs.length})`),
          staticTable('client-subscriptions-table', SUB_COLS, subs, s => s.filter));
      } catch (e) {
        if (!ctx.alive) return;
        if (e.status === 404) {
          kickBtn.disabled = true;
          body.replaceChildren(h('p', {id: 'client-missing', class: 'empty'}, 'This client is not connected.'));
        }
        report(ctx, e, 'refresh');
      }
    }
    ctx.refresh = load;
    load();
  }

  // ---- sessions ---------------------------------------------------------------------

  function pageSessions(ctx) {
    const search = filterInput('sessions-search', 'client id prefix', '', () => list.reload());
    const remove = (id, b) => confirmed(ctx, `Remove the session of "${id}"? Its subscriptions and queued ` +
      'messages are dropped.', 'DELETE', 'sessions/' + enc(id), list.refresh, b);
    const list = listTable(ctx, {
      name: 'sessions', path: 'sessions', key: 'sessions',
      params: () => ({prefix: search.value}),
      rowId: s => s.client_id,
      columns: [
        {title: 'Client id', cell: s => (s.online ? clientLink(s.client_id) : h('span', {class: 'mono'}, s.client_id))},
        {title: 'Online', cell: s => h('span', {class: s.online ? 'badge good' : 'badge'}, yesno(s.online))},
        {title: 'User', cell: s => s.user ?? '—'},
        {title: 'Listener', cell: s => s.listener ?? '—'},
        {title: 'Expiry', cls: 'num', cell: s => fmtExpiry(s.expiry)},
        {title: 'Subscriptions', cls: 'num', cell: s => (s.subscriptions == null
          ? h('span', {class: 'muted', title: 'held by the connection: see the client'}, '—')
          : fmtNum(s.subscriptions))},
        {title: 'Queued', cls: 'num', cell: s => fmtNum(s.queued)},
        {title: '', cls: 'actions', cell: s => button('remove', s.client_id, 'Remove', b => remove(s.client_id, b))},
      ],
    });
    listPage(ctx, 'sessions', 'Sessions', [search], list);
  }

  // ---- subscriptions ----------------------------------------------------------------

  function pageSubscriptions(ctx) {
    const client = filterInput('subscriptions-client', 'client id (exact)', '', () => list.reload());
    const filter = filterInput('subscriptions-filter', 'filter (exact)', '', () => list.reload());
    const list = listTable(ctx, {
      name: 'subscriptions', path: 'subscriptions', key: 'subscriptions',
      params: () => ({client: client.value, filter: filter.value}),
      rowId: s => `${s.client_id} ${s.filter}`,
      columns: [{title: 'Client id', cell: s => clientLink(s.client_id)}, ...SUB_COLS],
    });
    listPage(ctx, 'subscriptions', 'Subscriptions', [client, filter], list);
  }

  // ---- retained ---------------------------------------------------------------------

  function preview(r) {
    if (r.payload == null) return h('span', {class: 'muted'}, `${r.size ?? 0} bytes binary`);
    const text = r.payload.length > 80 ? r.payload.slice(0, 80) + '…' : r.payload;
    return h('span', {title: r.payload.slice(0, 500)}, text);
  }

  function propsList(p) {
    const dl = h('dl', {id: 'retained-properties', class: 'fields'});
    const entries = Object.entries(p || {});
    if (!entries.length) dl.append(h('dt', {}, 'none'), h('dd'));
    for (const [k, v] of entries) {
      const val = k === 'user_properties' && Array.isArray(v)
        ? h('ul', {class: 'plain'}, v.map(([n, x]) => h('li', {}, h('code', {}, fmtAny(n)), ' = ', h('code', {}, fmtAny(x)))))
        : k === 'message_expiry_interval' ? `${fmtDur(v)} left` : fmtAny(v);
      dl.append(h('dt', {}, k.replace(/_/g, ' ')), h('dd', {dataset: {field: k}}, val));
    }
    return dl;
  }

  function pageRetained(ctx) {
    let sel = null;
    const input = filterInput('retained-filter', 'topic filter', '#', () => list.reload());
    const panel = h('aside', {id: 'retained-detail', class: 'panel', hidden: true});

    function close() {
      sel = null;
      panel.hidden = true;
      list.repaint();
    }

    async function open(topic) {
      sel = topic;
      list.repaint();
      try {
        const m = await api('GET', 'retained/' + enc(topic));
        if (!ctx.alive || sel !== topic) return;
        const binary = m.payload == null;
        panel.replaceChildren(
          h('div', {class: 'panel-head'}, h('h3', {class: 'mono'}, m.topic),
            h('button', {type: 'button', id: 'retained-close', onclick: close}, 'Close')),
          h('p', {class: 'muted'}, `QoS ${m.qos} · ${fmtBytes(m.size)} · ${binary ? 'binary, shown as base64' : 'text'}`),
          h('pre', {id: 'retained-payload', class: binary ? 'binary' : null},
            binary ? m.payload_base64 ?? '' : m.payload),
          h('h4', {}, 'Properties'), propsList(m.properties));
        panel.hidden = false;
      } catch (e) {
        report(ctx, e, 'action');
      }
    }

    const del = (topic, b) => confirmed(ctx, `Delete the retained message on "${topic}"?`, 'DELETE',
      'retained/' + enc(topic), () => { if (sel === topic) close(); list.refresh(); }, b);

    const list = listTable(ctx, {
      name: 'retained', path: 'retained', key: 'retained',
      params: () => ({filter: input.value || '#'}),
      rowId: r => r.topic,
      onRow: r => open(r.topic),
      selected: r => r.topic === sel,
      columns: [
        {title: 'Topic', cls: 'mono', cell: r => r.topic},
        {title: 'QoS', cls: 'num', cell: r => r.qos},
        {title: 'Size', cls: 'num', cell: r => fmtBytes(r.size)},
        {title: 'Payload', cls: 'payload', cell: preview},
        {title: '', cls: 'actions', cell: r => button('delete', r.topic, 'Delete', b => del(r.topic, b))},
      ],
    });
    list.el = h('div', {class: 'split'}, list.el, panel); // the message panel goes beside the table
    listPage(ctx, 'retained', 'Retained messages', [input], list);
  }

  // ---- plugins ----------------------------------------------------------------------

  function totals(p) {
    let calls = 0, us = 0; // over all hooks; the mean weighted by calls
    for (const c of Object.values(p.calls || {})) {
      calls += c.calls || 0; us += (c.mean_us || 0) * (c.calls || 0);
    }
    return {calls, failures: p.failures || 0, mean: calls ? us / calls : null};
  }

  const STATE_CLASS = {loaded: 'badge good', failed: 'badge bad', disabled: 'badge'};

  function pagePlugins(ctx) {
    const post = (name, verb, b) => act(ctx, () => api('POST', `plugins/${enc(name)}/${verb}`), list.refresh, b);
    const perHook = p => Object.entries(p.calls || {})
      .map(([k, c]) => `${k}: ${c.calls} calls, ${fmtRate(c.mean_us ?? 0)} µs`).join('\n');
    const list = listTable(ctx, {
      name: 'plugins', path: 'plugins', key: 'plugins',
      rowId: p => p.name,
      columns: [
        {title: 'Name', cls: 'mono', cell: p => p.name},
        {title: 'State', cell: p => h('span', {class: STATE_CLASS[p.state] || 'badge'}, p.state)},
        {title: 'Hooks', cell: p => (p.hooks && p.hooks.length ? p.hooks.join(', ') : '—')},
        {title: 'Priority', cls: 'num', cell: p => p.priority ?? '—'},
        {title: 'Calls', cls: 'num', cell: p => h('span', {title: perHook(p)}, fmtNum(totals(p).calls))},
        {title: 'Failures', cls: 'num', cell: p => fmtNum(totals(p).failures)},
        {title: 'Mean call', cls: 'num', cell: p => (totals(p).mean == null ? '—' : `${fmtRate(totals(p).mean)} µs`)},
        {title: 'Last error', cls: 'error', cell: p => p.last_error ?? '—'},
        {title: 'Sink queued / delivered / dropped', cls: 'num', cell: p => (p.sink
          ? h('span', {title: `retries: ${fmtNum(p.sink.retries)}`},
            `${fmtNum(p.sink.queued)} / ${fmtNum(p.sink.delivered)} / ${fmtNum(p.sink.dropped)}`)
          : '—')},
        {title: 'Sink lag', cls: 'num', cell: p => (p.sink ? `${fmtNum(p.sink.oldest_age_seconds ?? 0)} s` : '—')},
        {title: '', cls: 'actions', cell: p => [
          button('reload', p.name, 'Reload', b => post(p.name, 'reload', b)),
          p.state === 'disabled'
            ? button('enable', p.name, 'Enable', b => post(p.name, 'enable', b))
            : button('disable', p.name, 'Disable', b => post(p.name, 'disable', b)),
        ]},
      ],
    });
    listPage(ctx, 'plugins', 'Plugins', [], list);
  }

  // ---- bridges ----------------------------------------------------------------------

  function pageBridges(ctx) {
    const topics = b => (b.topics || [])
      .map(t => `${t.direction}: ${t.local} ⇄ ${t.remote} (QoS ≤ ${t.qos})`).join('\n');
    const list = listTable(ctx, {
      name: 'bridges', path: 'bridges', key: 'bridges',
      rowId: b => b.name,
      columns: [
        {title: 'Name', cls: 'mono', cell: b => h('span', {title: topics(b)}, b.name)},
        {title: 'Remote', cls: 'mono', cell: b => b.address},
        {title: 'Protocol', cell: b => b.protocol},
        {title: 'State', cell: b => h('span', {class: b.connected ? 'badge good' : 'badge bad'},
          b.connected ? 'connected' : 'disconnected')},
        {title: 'Queued', cls: 'num', cell: b => fmtNum(b.queued)},
        {title: 'Sent', cls: 'num', cell: b => fmtNum(b.sent)},
        {title: 'Received', cls: 'num', cell: b => fmtNum(b.received)},
        {title: 'Dropped', cls: 'num', cell: b => fmtNum(b.dropped)},
        {title: 'Reconnects', cls: 'num', cell: b => fmtNum(b.reconnects)},
      ],
    });
    listPage(ctx, 'bridges', 'Bridges', [], list);
  }

  const PAGES = {overview: pageOverview, clients: pageClients, sessions: pageSessions,
    subscriptions: pageSubscriptions, retained: pageRetained, plugins: pagePlugins,
    bridges: pageBridges};

  // ---- start ------------------------------------------------------------------------

  $('login-form').addEventListener('submit', async e => {
    e.preventDefault();
    const t = $('token').value.trim();
    if (!t) return;
    sessionStorage.setItem(KEY, t);
    $('login-button').disabled = true;
    // Check the token first; any answer but 401 (or none at all) means it was accepted.
    const err = await api('GET', 'overview').then(() => null, x => x);
    $('login-button').disabled = false;
    if (err && err.status === 401) return; // api() already went back to the form
    if (err && !err.status) { // broker unreachable: stay on the form
      sessionStorage.removeItem(KEY);
      $('login-message').textContent = err.message;
      return;
    }
    $('token').value = $('login-message').textContent = '';
    route();
    if (err) showError(err.message, 'refresh');
  });

  $('logout-button').addEventListener('click', () => logout());
  $('error').addEventListener('click', () => clearError());
  window.addEventListener('hashchange', route);
  window.addEventListener('resize', () => { if (view && view.redraw) view.redraw(); });
  document.addEventListener('visibilitychange', () => { if (!document.hidden && view && view.refresh) view.refresh(); });
  route();
})();
