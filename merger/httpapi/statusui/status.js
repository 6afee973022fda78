// dnbd3-merger status page: polls status.json every 2 s. No external assets.
"use strict";
(function () {
  const PAGE = 50, CLUSTER = 1310720;
  const state = { off: 0, q: "", st: "", last: null };
  const { $, el, fmtBytes, fmtDuration } = UI;
  function ago(t) {
    const s = Math.max(0, Math.round((Date.now() - Date.parse(t)) / 1000));
    return fmtDuration(s) + " ago";
  }
  function progress(done, total, st) {
    let ratio = total > 0 ? done / total : (st === "Done" ? 1 : 0);
    if (st === "Active") ratio = 0;
    const pct = Math.floor(ratio * 1000) / 10;
    return UI.progress(pct, st === "Active" ? "not started" : done + " / " + total + " (" + pct + " %)");
  }
  function render(d) {
    $("version").textContent = d.version ? "version " + d.version : "";
    $("uptime").textContent = fmtDuration(d.uptimeSeconds);
    const n = { Active: 0, Copying: 0, Merging: 0, Done: 0, Failed: 0 };
    for (const s of d.sessions) n[s.state] = (n[s.state] || 0) + 1;
    $("n-Active").textContent = n.Active; $("n-Merging").textContent = n.Copying + n.Merging;
    $("n-Done").textContent = n.Done; $("n-Failed").textContent = n.Failed;
    const q = state.q.toLowerCase();
    const sel = d.sessions.filter((s) => (!state.st || s.state === state.st) &&
      (!q || s.imageName.toLowerCase().includes(q) || s.uuid.includes(q)));
    if (state.off >= sel.length) state.off = Math.max(0, Math.floor((sel.length - 1) / PAGE) * PAGE);
    const page = sel.slice(state.off, state.off + PAGE);
    $("sessions").tBodies[0].replaceChildren(...page.map((s) => el("tr", { "data-uuid": s.uuid, "data-state": s.state },
      el("td", { class: "uuid", title: s.uuid, text: s.uuid.slice(0, 8) }),
      el("td", { text: s.imageName }),
      el("td", { text: "r" + s.originalImageVersion + (s.newImageVersion > 0 ? " → r" + s.newImageVersion : "") }),
      el("td", {}, el("span", { class: "state " + s.state, text: s.state })),
      el("td", { class: "num", title: fmtBytes(s.totalClusters * CLUSTER) + " at most", text: String(s.totalClusters) }),
      el("td", {}, progress(s.mergedClusters, s.totalClusters, s.state)),
      el("td", { title: s.updated, text: ago(s.updated) }),
      el("td", { class: "err", text: s.error || "" }))));
    $("none").hidden = sel.length > 0;
    const pager = $("pager");
    pager.replaceChildren(el("span", { text: sel.length ? (state.off + 1) + "–" + (state.off + page.length) + " of " + sel.length : "" }));
    if (sel.length > PAGE) {
      const prev = el("button", { type: "button", text: "‹ Previous" }), next = el("button", { type: "button", text: "Next ›" });
      prev.disabled = state.off === 0; next.disabled = state.off + PAGE >= sel.length;
      prev.onclick = () => { state.off = Math.max(0, state.off - PAGE); render(state.last); };
      next.onclick = () => { state.off += PAGE; render(state.last); };
      pager.append(prev, next);
    }
  }
  $("filter").addEventListener("input", () => { state.q = $("filter").value; state.off = 0; if (state.last) render(state.last); });
  $("stateFilter").addEventListener("change", () => { state.st = $("stateFilter").value; state.off = 0; if (state.last) render(state.last); });
  UI.poll(async () => {
    state.last = await UI.getJSON("status.json");
    render(state.last);
  });
})();
