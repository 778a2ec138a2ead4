// oxvirt admin portal: live updates, actions without reload, confirmation, charts, console.
// Plain ES2017, no build step, no library. Everything is driven by data-* attributes the
// server renders; the pages work without this script (forms post and redirect).
"use strict";
(function () {
  const POLL_MS = 2000;
  const CHART_WINDOW_MS = 5 * 60 * 1000;
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const csrfMeta = $("meta[name=csrf]");
  const csrf = csrfMeta ? csrfMeta.content : null;
  let pollTimer = null;
  let refreshing = false;

  // ---------------------------------------------------------------- confirmation dialog
  function confirmAsk(text) {
    const d = $("#confirm");
    if (!d || typeof d.showModal !== "function") return Promise.resolve(window.confirm(text));
    $(".confirm-text", d).textContent = text;
    return new Promise((resolve) => {
      const done = () => { d.removeEventListener("close", done); resolve(d.returnValue === "ok"); };
      d.addEventListener("close", done);
      d.returnValue = "";
      d.showModal();
      $("#confirm-cancel", d).focus();
    });
  }

  // ---------------------------------------------------------------------------- toasts
  const toasts = new Map(); // action id -> element
  function toast(key, cls, html, sticky) {
    let el = key != null ? toasts.get(key) : null;
    if (!el) {
      el = document.createElement("div");
      el.addEventListener("click", (e) => { if (e.target.tagName !== "A") { el.remove(); toasts.delete(key); } });
      $("#toasts").appendChild(el);
      if (key != null) toasts.set(key, el);
    }
    el.className = "toast " + cls;
    el.replaceChildren(...html);
    if (!sticky) setTimeout(() => { el.remove(); if (key != null) toasts.delete(key); }, 8000);
    return el;
  }
  function text(t) { return document.createTextNode(t); }
  function link(href, t) { const a = document.createElement("a"); a.href = href; a.textContent = t; return a; }

  // --------------------------------------------------------------------------- actions
  const SEEN_KEY = "oxvirt.actions";
  function seen() { try { return JSON.parse(sessionStorage.getItem(SEEN_KEY)) || {}; } catch (e) { return {}; } }
  function saveSeen(s) {
    const ids = Object.keys(s).map(Number).sort((a, b) => a - b);
    while (ids.length > 50) delete s[ids.shift()];
    sessionStorage.setItem(SEEN_KEY, JSON.stringify(s));
  }
  function actionsAfter() {
    const s = seen();
    const ids = Object.keys(s).map(Number);
    if (!ids.length) return null;
    const running = ids.filter((i) => s[i] === "running");
    return running.length ? Math.min(...running) - 1 : Math.max(...ids);
  }
  function showAction(a, jobs) {
    const s = seen();
    const prev = s[a.id];
    if (a.state === "running") {
      const parts = [text(a.label + " …")];
      const j = a.job && jobs[a.job];
      if (j && j.total) {
        const p = document.createElement("progress");
        p.max = j.total; p.value = j.done;
        parts.push(p);
      }
      toast(a.id, "running", parts, true);
    } else if (prev !== a.state) {
      const parts = [text(a.label + (a.state === "done" ? ": done" : " failed: " + a.message))];
      if (a.state === "done" && a.link) { parts.push(text(" · ")); parts.push(link(a.link, "open")); }
      toast(a.id, a.state, parts, a.state === "failed");
    }
    s[a.id] = a.state;
    saveSeen(s);
  }

  async function post(url, body) {
    const params = new URLSearchParams(body || []);
    if (csrf && !params.has("csrf")) params.set("csrf", csrf);
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/x-www-form-urlencoded", "x-portal-fetch": "1" },
      body: params.toString(),
    });
    let j = {};
    try { j = await r.json(); } catch (e) { j = { error: r.status + " " + r.statusText }; }
    if (!r.ok) throw new Error(j.error || r.statusText);
    return j;
  }

  async function runAction(url, body, confirmText, button) {
    if (confirmText && !(await confirmAsk(confirmText))) return false;
    const params = new URLSearchParams(body || []);
    if (confirmText) params.set("confirm", "1");
    if (button) button.disabled = true;
    try {
      const j = await post(url, params);
      const s = seen(); s[j.action] = "running"; saveSeen(s);
      toast(j.action, "running", [text(j.label + " …")], true);
      poll(true);
      return true;
    } catch (e) {
      toast(null, "failed", [text(e.message)], true);
      return false;
    } finally {
      if (button) setTimeout(() => { button.disabled = false; }, 1500);
    }
  }

  document.addEventListener("submit", async (ev) => {
    const f = ev.target;
    if (!(f instanceof HTMLFormElement) || f.method !== "post" || f.id === "login") return;
    if (f.action.endsWith("/portal/logout")) return;
    if (f.closest("dialog")) return;
    ev.preventDefault();
    const btn = ev.submitter || $("button[type=submit]", f);
    const ok = await runAction(f.action, new FormData(f), f.dataset.confirm || null, btn);
    if (ok && (f.closest("details.panel") || f.classList.contains("inline-form"))) f.reset();
  });

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("[data-act]");
    if (!b) return;
    ev.preventDefault();
    runAction(b.dataset.act, null, b.dataset.confirm || null, b);
  });

  // ------------------------------------------------------------ state-dependent buttons
  function applyWhen(box) {
    const state = box.dataset.state, status = box.dataset.status;
    $$("[data-when]", box).forEach((el) => {
      const w = el.dataset.when;
      el.hidden = !(w === "" || w === state || w === status);
    });
  }

  // ------------------------------------------------------------------------ live poll
  function setMembers(table) {
    return $$("tbody > tr[data-id]", table)
      .map((tr) => tr.dataset.id + (tr.dataset.v !== undefined ? "=" + tr.dataset.v : ""))
      .sort();
  }
  function sameList(a, b) { return a.length === b.length && a.every((x, i) => x === b[i]); }

  async function refreshRegions() {
    if (refreshing) return;
    refreshing = true;
    try {
      const r = await fetch(location.href, { credentials: "same-origin" });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      $$("[data-region]").forEach((old) => {
        const fresh = doc.querySelector('[data-region="' + old.dataset.region + '"]');
        if (!fresh) return;
        const before = new Set($$("tr[data-id]", old).map((t) => t.dataset.id));
        old.replaceWith(fresh);
        $$("tr[data-id]", fresh).forEach((t) => { if (before.size && !before.has(t.dataset.id)) t.classList.add("new"); });
      });
      $$("[data-vm-acts]").forEach(applyWhen);
      $$("[data-console]").forEach((c) => { c.dataset.stale = "1"; });
    } finally {
      refreshing = false;
    }
  }

  function setBadge(el, status) {
    if (el.textContent === status) return;
    el.textContent = status;
    el.className = "st st-" + status;
  }

  function fmtBytes(b) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return (i === 0 || b >= 100 || b % 1 < 0.05 ? b.toFixed(0) : b.toFixed(1)) + " " + u[i];
  }

  let lastEventsCheck = 0;
  async function poll(soon) {
    clearTimeout(pollTimer);
    if (soon) { pollTimer = setTimeout(() => poll(false), 300); return; }
    const dot = $(".live-dot");
    try {
      const q = new URLSearchParams();
      const sets = [...new Set($$("[data-live-set]").map((t) => t.dataset.liveSet))];
      if (sets.length) q.set("sets", sets.join(","));
      const jobs = [...new Set($$("[data-job]").map((e) => e.dataset.job))].slice(0, 50);
      if (jobs.length) q.set("jobs", jobs.join(","));
      const ev = $("[data-live-events]");
      if (ev) q.set("events_after", ev.dataset.liveEvents);
      if ($("[data-live-tasks]")) q.set("tasks", "1");
      const aa = actionsAfter();
      if (aa !== null) q.set("actions_after", aa);
      const r = await fetch("/portal/api/live?" + q.toString(), { credentials: "same-origin" });
      if (r.status === 401) { location.href = "/portal/login?next=" + encodeURIComponent(location.pathname + location.search); return; }
      if (!r.ok) throw new Error(r.statusText);
      const d = await r.json();
      apply(d);
      if (dot) dot.className = "live-dot ok";
    } catch (e) {
      if (dot) dot.className = "live-dot bad";
    }
    pollTimer = setTimeout(() => poll(false), POLL_MS);
  }

  function apply(d) {
    let stale = false;
    if ($("[data-live-jobs]")) {
      const shown = new Set($$("[data-job]").map((e) => e.dataset.job));
      if (d.running_jobs.some((id) => !shown.has(id))) stale = true;
      for (const id of shown) {
        const j = d.jobs[id], row = $('[data-job="' + id + '"] .st');
        if (j && row && row.textContent !== j.status) stale = true;
      }
    }
    $$("[data-live]").forEach((el) => {
      const [kind, id] = el.dataset.live.split(":");
      const src = kind === "vm" ? d.vms : kind === "host" ? d.hosts : kind === "job" ? d.jobs : null;
      if (src && src[id]) setBadge(el, src[id].status);
    });
    $$("[data-live-host]").forEach((el) => {
      const v = d.vms[el.dataset.liveHost];
      if (v && el.textContent !== v.host) el.textContent = v.host;
    });
    $$("[data-vm-acts]").forEach((box) => {
      const v = d.vms[box.dataset.vmActs];
      if (!v) return;
      if (box.dataset.state !== v.state || box.dataset.status !== v.status) {
        box.dataset.state = v.state; box.dataset.status = v.status;
        applyWhen(box);
      }
    });
    $$("[data-live-cpu]").forEach((el) => {
      const h = d.hosts[el.dataset.liveCpu];
      if (h) el.textContent = Math.round(h.cpu) + " %";
    });
    $$("[data-live-meter^='hostmem:']").forEach((m) => {
      const h = d.hosts[m.dataset.liveMeter.slice(8)];
      if (!h || !h.mem_total) return;
      m.max = h.mem_total; m.value = h.mem_used;
      m.low = h.mem_total * 0.7; m.high = h.mem_total * 0.9;
      const t = $('[data-live-text="' + m.dataset.liveMeter + '"]');
      if (t) t.textContent = fmtBytes(h.mem_used) + " / " + fmtBytes(h.mem_total);
    });
    $$("[data-live-count]").forEach((el) => {
      const v = d.counts[el.dataset.liveCount];
      if (v !== undefined && el.textContent !== v) el.textContent = v;
    });
    // Jobs: progress in place; a running job the page does not show yet re-renders it.
    for (const [id, j] of Object.entries(d.jobs)) {
      $$('[data-live-progress="' + id + '"]').forEach((p) => { if (j.total) { p.max = j.total; p.value = j.done; } });
      $$('[data-live-steps="' + id + '"]').forEach((s) => { if (j.steps) s.textContent = j.steps; });
    }
    for (const [name, members] of Object.entries(d.sets)) {
      $$('[data-live-set="' + name + '"]').forEach((t) => { if (!sameList(setMembers(t), members)) stale = true; });
    }
    const evBody = $("[data-live-events]");
    if (evBody && d.events.length) {
      for (const e of d.events) {
        const tr = document.createElement("tr");
        tr.className = "new";
        const t = document.createElement("td"); t.textContent = e.time;
        const s = document.createElement("td"); const b = document.createElement("span");
        b.className = "st st-" + e.severity; b.textContent = e.severity; s.appendChild(b);
        const x = document.createElement("td"); x.textContent = e.description;
        tr.append(t, s, x);
        evBody.prepend(tr);
        evBody.dataset.liveEvents = e.id;
      }
      $$("tr", evBody).slice(50).forEach((tr) => tr.remove());
    }
    const tp = $("[data-live-tasks]");
    if (tp) {
      const body = $("tbody", tp);
      body.replaceChildren(...d.tasks.map((t) => {
        const tr = document.createElement("tr");
        tr.dataset.task = t.id;
        const cells = [t.id, t.verb, t.host].map((v) => { const td = document.createElement("td"); td.textContent = v; return td; });
        cells[0].className = "mono";
        const td = document.createElement("td");
        const p = document.createElement("progress");
        p.max = 100; p.value = t.percent;
        td.append(p, text(" " + Math.round(t.percent) + " %"));
        tr.append(...cells, td);
        return tr;
      }));
      tp.hidden = d.tasks.length === 0;
    }
    for (const a of d.actions) showAction(a, d.jobs);
    if (stale) refreshRegions();
    drawCharts(d.now);
    updateConsole();
  }

  // --------------------------------------------------------------------------- charts
  const SVGNS = "http://www.w3.org/2000/svg";
  let chartTick = 0;
  async function drawCharts(now) {
    if (chartTick++ % 2) return; // every other poll: the sampler's interval
    for (const fig of $$("figure[data-chart]")) {
      try {
        const r = await fetch("/portal/api/history?" + fig.dataset.chart + "=" + fig.dataset.id, { credentials: "same-origin" });
        if (!r.ok) continue;
        const pts = (await r.json()).points;
        drawChart(fig, pts, now);
      } catch (e) { /* the next poll retries */ }
    }
  }
  function drawChart(fig, pts, now) {
    const svg = $("svg", fig);
    const end = Math.max(now || 0, pts.length ? pts[pts.length - 1].t : 0);
    // The window grows with the history (one minute at least, five at most), so a fresh
    // chart is not a sliver at the right edge.
    const span = pts.length ? end - pts[0].t : 0;
    const win = Math.min(CHART_WINDOW_MS, Math.max(60 * 1000, span));
    const x = (t) => (300 - ((end - t) / win) * 300).toFixed(1);
    const y = (v) => (100 - Math.max(0, Math.min(100, v))).toFixed(1);
    const visible = pts.filter((p) => end - p.t <= win);
    const cpu = visible.map((p) => x(p.t) + "," + y(p.cpu)).join(" ");
    const mem = visible.map((p) => x(p.t) + "," + y(p.mem_total ? (p.mem * 100) / p.mem_total : 0)).join(" ");
    const mk = (tag, attrs) => { const e = document.createElementNS(SVGNS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); return e; };
    const kids = [];
    if (visible.length > 1) {
      kids.push(mk("polygon", { class: "cpu-area", points: x(visible[0].t) + ",100 " + cpu + " " + x(visible[visible.length - 1].t) + ",100" }));
    }
    kids.push(mk("polyline", { class: "cpu", points: cpu, "vector-effect": "non-scaling-stroke" }));
    kids.push(mk("polyline", { class: "mem", points: mem, "vector-effect": "non-scaling-stroke" }));
    svg.replaceChildren(...kids);
    const last = pts[pts.length - 1];
    const mib = (v) => fmtBytes(v * 1048576);
    $(".chart-now", fig).textContent = !last
      ? "no samples yet"
      : fig.dataset.chart === "vm"
        ? "CPU " + last.cpu.toFixed(0) + " % · QEMU memory " + mib(last.mem) + " (guest " + mib(last.mem_total) + ")"
        : "CPU " + last.cpu.toFixed(0) + " % · memory " + mib(last.mem) + " of " + mib(last.mem_total);
    fig.dataset.points = String(pts.length);
  }

  // -------------------------------------------------------------------------- console
  let consoleBusy = false;
  async function updateConsole() {
    const pre = $("[data-console]");
    if (!pre || consoleBusy) return;
    consoleBusy = true;
    try {
      const r = await fetch("/portal/api/console?vm=" + pre.dataset.console, { credentials: "same-origin" });
      const j = await r.json();
      if (!r.ok) { pre.dataset.error = j.error || r.statusText; return; }
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      const t = j.running ? j.log || "(no output yet)" : pre.dataset.last || "(the VM is " + j.status + ")";
      if (j.running) pre.dataset.last = t;
      if (pre.textContent !== t) {
        pre.textContent = t;
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) { /* next poll */ } finally { consoleBusy = false; }
  }

  // ----------------------------------------------------------------------------- start
  function start() {
    $$("[data-vm-acts]").forEach(applyWhen);
    if (!csrf) return; // the login page
    poll(false);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(true); });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
