// Shared by the status pages of dnbd3-server and dnbd3-merger: served
// ahead of each page's own script in status.js. No external assets.
"use strict";
const UI = (function () {
  const INTERVAL = 2000;
  const $ = (id) => document.getElementById(id);
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    if (props) for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  }
  function fmtBytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + u[i];
  }
  function fmtDuration(s) {
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d > 0) return d + "d " + h + "h";
    if (h > 0) return h + "h " + m + "m";
    return m + "m " + (s % 60) + "s";
  }
  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(url + ": " + r.status + " " + (await r.text()));
    return r.json();
  }
  // progress is a bar filled to pct percent, labelled text.
  function progress(pct, text) {
    const bar = el("div", { class: "progress", role: "progressbar", "aria-valuenow": String(pct) });
    const fill = el("div"); fill.style.width = pct + "%";
    bar.append(fill, el("span", { text: text }));
    return bar;
  }
  // poll runs the async update now and every INTERVAL ms until the header's
  // Pause button stops it, shows its failures in the footer and counts its
  // successes in body's data-polls. It returns refresh, which updates at
  // once (for filters and pagers).
  function poll(update) {
    let paused = false, polls = 0, timer = 0;
    async function refresh() {
      clearTimeout(timer);
      try {
        await update();
        $("error").textContent = "";
        $("live").classList.remove("stale");
        polls++;
        document.body.dataset.polls = String(polls);
      } catch (e) {
        $("error").textContent = "refresh failed: " + e.message;
        $("live").classList.add("stale");
      }
      if (!paused) timer = setTimeout(refresh, INTERVAL);
    }
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      $("live").classList.toggle("paused", paused);
      $("live").textContent = paused ? "paused" : "live";
      if (!paused) refresh(); else clearTimeout(timer);
    });
    refresh();
    return refresh;
  }
  return { $, el, fmtBytes, fmtDuration, getJSON, progress, poll };
})();
