// dnbd3-server status page: polls status.json every 2 s and draws the
// cache maps of incomplete images from status/map. No external assets.
"use strict";
(function () {
  const PAGE = 50, CLIENT_PAGE = 100, MAP_CELLS = 4096, MAP_ROW = 256;
  const state = { ioff: 0, coff: 0, iq: "", cq: "", prev: null };
  const canvases = new Map(); // image id -> canvas (kept across refreshes)
  const rttHistory = new Map(); // alt server -> average RTT per refresh
  const { $, el, fmtBytes, fmtDuration, getJSON } = UI;

  function fmtRTT(us) { return us >= 1000 ? (us / 1000).toFixed(1) + " ms" : us + " µs"; }
  const problemNames = { 1: "read", 2: "write", 4: "changed", 8: "no uplink", 16: "uplink busy" };

  function pager(div, page, size, onGo) {
    div.replaceChildren();
    if (!page || page.total <= size) { if (page) div.append(el("span", { text: page.total + " total" })); return; }
    const from = page.offset + 1, to = Math.min(page.offset + size, page.total);
    const prev = el("button", { type: "button", text: "‹ Previous" }), next = el("button", { type: "button", text: "Next ›" });
    prev.disabled = page.offset === 0; next.disabled = to >= page.total;
    prev.onclick = () => onGo(Math.max(0, page.offset - size));
    next.onclick = () => onGo(page.offset + size);
    div.append(el("span", { text: from + "–" + to + " of " + page.total }), prev, next);
  }

  function progress(ratio) {
    const pct = Math.floor(ratio * 1000) / 10;
    return UI.progress(pct, pct + " %");
  }

  function renderSummary(d) {
    $("version").textContent = "version " + d.version;
    $("uptime").textContent = fmtDuration(d.uptimeSeconds);
    $("imageCount").textContent = d.imageCount;
    $("clientCount").textContent = d.clientCount;
    $("serverCount").textContent = d.serverCount;
    $("bytesSent").textContent = fmtBytes(d.bytesSent);
    $("bytesReceived").textContent = fmtBytes(d.bytesReceived);
    const now = performance.now();
    if (state.prev) {
      const dt = (now - state.prev.t) / 1000;
      if (dt > 0) {
        $("rateSent").textContent = fmtBytes(Math.max(0, d.bytesSent - state.prev.sent) / dt) + "/s";
        $("rateRecv").textContent = fmtBytes(Math.max(0, d.bytesReceived - state.prev.recv) / dt) + "/s";
      }
    }
    state.prev = { t: now, sent: d.bytesSent, recv: d.bytesReceived };
  }

  function renderImages(page) {
    $("imagesDenied").hidden = !!page;
    $("images").hidden = !page;
    const body = $("images").tBodies[0];
    const rows = [], want = [];
    for (const img of (page ? page.items : [])) {
      const tr = el("tr", { "data-image": img.name, "data-rid": String(img.rid) });
      const probs = el("td");
      for (const [bit, name] of Object.entries(problemNames)) if (img.problems & bit) probs.append(el("span", { class: "tag bad", text: name }));
      const upl = el("td");
      if (img.uplink) {
        upl.append(el("span", { class: "tag up", text: img.uplink }));
        if (img.uplinkRttMicros) upl.append(el("span", { class: "muted", text: " " + fmtRTT(img.uplinkRttMicros) }));
        if (img.fetching) upl.append(el("span", { class: "muted", text: " · " + img.fetching + " in flight" }));
      }
      tr.append(el("td", { text: img.name }), el("td", { text: String(img.rid) }), el("td", { class: "num", text: fmtBytes(img.size) }),
        el("td", { class: "num", text: String(img.users) }), el("td", {}, progress(img.complete)), upl, probs);
      rows.push(tr);
      if (img.complete < 1) {
        let c = canvases.get(img.id);
        if (!c) { c = el("canvas", { class: "cachemap", "data-image": img.name, "data-id": String(img.id) }); c.width = 1; c.height = 1; canvases.set(img.id, c); }
        const info = c.nextInfo || (c.nextInfo = el("div", { class: "mapinfo" }));
        const td = el("td", { colspan: "7" }, c, info);
        rows.push(el("tr", { class: "maprow" }, td));
        want.push(img.id);
      }
    }
    body.replaceChildren(...rows);
    for (const id of [...canvases.keys()]) if (!want.includes(id)) canvases.delete(id);
    pager($("imagesPager"), page, PAGE, (off) => { state.ioff = off; refresh(); });
    return want;
  }

  function drawMap(c, m) {
    const raw = atob(m.cells), n = raw.length; // percent present per cell
    const cells = new Uint8Array(n);
    for (let i = 0; i < n; i++) cells[i] = raw.charCodeAt(i);
    const cols = Math.min(n, MAP_ROW), rows = Math.ceil(n / cols);
    if (c.width !== cols || c.height !== rows) { c.width = cols; c.height = rows; }
    const ctx = c.getContext("2d"), img = ctx.createImageData(cols, rows), px = img.data;
    const fetching = new Uint8Array(n);
    for (const [a, b] of m.fetching) for (let i = a; i < b && i < n; i++) fetching[i] = 1;
    const abs = [0xc9, 0xce, 0xd8], pre = [0x2f, 0xa3, 0x6b], fet = [0xf0, 0xa0, 0x20];
    let present = 0;
    for (let i = 0; i < cols * rows; i++) {
      const o = i * 4;
      if (i >= n) { px[o + 3] = 0; continue; }
      const p = cells[i] / 100;
      present += cells[i];
      const col = fetching[i] && p < 1 ? fet : [0, 1, 2].map((k) => Math.round(abs[k] + (pre[k] - abs[k]) * p));
      px[o] = col[0]; px[o + 1] = col[1]; px[o + 2] = col[2]; px[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    c.dataset.present = String(present);
    c.dataset.fetching = String(m.fetching.length);
    const kib = m.blocksPerCell * 4;
    c.nextInfo.textContent = "cache map: " + n + " cells of " + (kib >= 1024 ? (kib / 1024) + " MiB" : kib + " KiB") +
      (m.fetching.length ? " · " + m.fetching.length + " ranges being fetched" : "");
  }

  function renderClients(page) {
    $("clientsDenied").hidden = !!page;
    $("clients").hidden = !page;
    const body = $("clients").tBodies[0];
    body.replaceChildren(...(page ? page.items : []).map((c) => el("tr", { "data-address": c.address },
      el("td", { text: c.address }), el("td", { text: c.image }),
      el("td", {}, el("span", { class: "tag", text: c.isServer ? "proxy" : c.protocol })),
      el("td", { class: "num", text: fmtBytes(c.bytesSent) }))));
    pager($("clientsPager"), page, CLIENT_PAGE, (off) => { state.coff = off; refresh(); });
  }

  function sparkline(rtt) {
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 160 24"); svg.setAttribute("preserveAspectRatio", "none");
    const vals = rtt.filter((v) => v > 0);
    if (vals.length > 1) {
      const max = Math.max(...vals), min = Math.min(...vals), span = Math.max(1, max - min);
      const pts = vals.map((v, i) => (i * 160 / (vals.length - 1)).toFixed(1) + "," + (22 - (v - min) * 20 / span).toFixed(1));
      const pl = document.createElementNS(ns, "polyline"); pl.setAttribute("points", pts.join(" "));
      svg.append(pl);
    }
    return svg;
  }

  function renderAlts(list) {
    $("altDenied").hidden = !!list;
    $("alts").hidden = !list || list.length === 0;
    $("altNone").hidden = !list || list.length > 0;
    $("alts").tBodies[0].replaceChildren(...(list || []).map((a) => {
      const vals = a.rtt.filter((v) => v > 0), avg = vals.length ? Math.round(vals.reduce((x, y) => x + y, 0) / vals.length) : 0;
      // the server keeps the last few probes; the page keeps a longer
      // history of their average, one point per refresh
      const hist = rttHistory.get(a.host) || [];
      if (avg) hist.push(avg);
      if (hist.length > 90) hist.splice(0, hist.length - 90);
      rttHistory.set(a.host, hist);
      const flags = el("td");
      if (a.isPrivate) flags.append(el("span", { class: "tag", text: "private" }));
      if (a.isClientOnly) flags.append(el("span", { class: "tag", text: "client only" }));
      return el("tr", { "data-host": a.host }, el("td", { text: a.host }), el("td", { text: a.comment }), flags,
        el("td", { class: "num", text: avg ? fmtRTT(avg) : "–" }), el("td", { title: "average RTT per refresh, last " + hist.length }, sparkline(hist.length > 1 ? hist : a.rtt)),
        el("td", { class: "num", text: String(a.numFails) }), el("td", { class: "num", text: a.uplinks + " images" }));
    }));
  }

  async function update() {
    const q = new URLSearchParams({ ioff: state.ioff, ilim: PAGE, iq: state.iq, coff: state.coff, clim: CLIENT_PAGE, cq: state.cq });
    const d = await getJSON("status.json?" + q);
    renderSummary(d);
    const maps = renderImages(d.images);
    renderClients(d.clients);
    renderAlts(d.altservers);
    await Promise.all(maps.map(async (id) => {
      const m = await getJSON("status/map?id=" + id + "&cells=" + MAP_CELLS);
      const c = canvases.get(id);
      if (c) drawMap(c, m);
    }));
  }

  function debounce(f) { let t = 0; return () => { clearTimeout(t); t = setTimeout(f, 250); }; }
  $("imageFilter").addEventListener("input", debounce(() => { state.iq = $("imageFilter").value; state.ioff = 0; refresh(); }));
  $("clientFilter").addEventListener("input", debounce(() => { state.cq = $("clientFilter").value; state.coff = 0; refresh(); }));
  const refresh = UI.poll(update);
})();
