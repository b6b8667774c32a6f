// rfloc-serve map page: receivers, predicted position and uncertainty ellipse in plain SVG.
// No tiles and no third-party script: everything is drawn from this app's own JSON.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, never fetched
  const W = 960;
  const H = 640;
  const PAD = 36;
  const KM_PER_DEG_LAT = 110.574;
  const KM_PER_DEG_LON_EQ = 111.320;
  const GRID_STEPS_DEG = [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5];

  const state = { receivers: [], origin: null, result: null, truth: null };
  const $ = (id) => document.getElementById(id);

  function el(name, attrs, parent, text) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // Equirectangular projection around the network's centroid: [east km, north km].
  function project(lon, lat) {
    const o = state.origin;
    const kx = KM_PER_DEG_LON_EQ * Math.cos((o.latitude * Math.PI) / 180);
    return [(lon - o.longitude) * kx, (lat - o.latitude) * KM_PER_DEG_LAT];
  }

  function unproject(x, y) {
    const o = state.origin;
    const kx = KM_PER_DEG_LON_EQ * Math.cos((o.latitude * Math.PI) / 180);
    return [o.longitude + x / kx, o.latitude + y / KM_PER_DEG_LAT];
  }

  function ellipseRings(result) {
    const f = result.geojson.features.find((x) => x.properties.kind === "uncertainty_ellipse");
    if (!f) return [];
    const g = f.geometry;
    return g.type === "Polygon" ? [g.coordinates[0]] : g.coordinates.map((p) => p[0]);
  }

  // A view that holds the receivers, the ellipse and the truth, keeping 1 km = 1 km.
  function makeView() {
    const pts = state.receivers.map((r) => project(r.longitude, r.latitude));
    if (state.result) {
      for (const ring of ellipseRings(state.result)) {
        for (const [lon, lat] of ring) pts.push(project(lon, lat));
      }
      const p = state.result.position;
      pts.push(project(p.longitude, p.latitude));
    }
    if (state.truth) pts.push(project(state.truth.longitude, state.truth.latitude));
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const [x, y] of pts) {
      x0 = Math.min(x0, x); x1 = Math.max(x1, x);
      y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    }
    const margin = 0.1 * Math.max(x1 - x0, y1 - y0) + 10;
    x0 -= margin; x1 += margin; y0 -= margin; y1 += margin;
    const s = Math.min((W - 2 * PAD) / (x1 - x0), (H - 2 * PAD) / (y1 - y0));
    const cx = (x0 + x1) / 2;
    const cy = (y0 + y1) / 2;
    const toPx = ([x, y]) => [W / 2 + (x - cx) * s, H / 2 - (y - cy) * s];
    const fromPx = (px, py) => [cx + (px - W / 2) / s, cy - (py - H / 2) / s];
    return { s, toPx, fromPx, geo: (lon, lat) => toPx(project(lon, lat)) };
  }

  function fmt(v, digits) {
    return Number(v).toFixed(digits);
  }

  function drawGraticule(svg, view) {
    const g = el("g", { class: "graticule" }, svg);
    const [lonA, latA] = unproject(...view.fromPx(0, H));
    const [lonB, latB] = unproject(...view.fromPx(W, 0));
    const span = Math.max(lonB - lonA, latB - latA);
    const step = GRID_STEPS_DEG.find((d) => span / d <= 10) || 10;
    const digits = step < 0.1 ? 2 : step < 1 ? 1 : 0;
    for (let lon = Math.ceil(lonA / step) * step; lon <= lonB; lon += step) {
      const [x] = view.geo(lon, latA);
      el("line", { x1: x, y1: 0, x2: x, y2: H }, g);
      el("text", { x: x + 4, y: H - 8, class: "grid-label" }, g, `${fmt(lon, digits)}°E`);
    }
    for (let lat = Math.ceil(latA / step) * step; lat <= latB; lat += step) {
      const [, y] = view.geo(lonA, lat);
      el("line", { x1: 0, y1: y, x2: W, y2: y }, g);
      el("text", { x: 6, y: y - 4, class: "grid-label" }, g, `${fmt(lat, digits)}°N`);
    }
  }

  function drawScaleBar(svg, view) {
    const targetPx = 140;
    const raw = targetPx / view.s;
    const nice = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000].find((k) => k >= raw * 0.6)
      || 1000;
    const len = nice * view.s;
    const g = el("g", { class: "scalebar", transform: `translate(${W - PAD - len - 10},${H - 28})` }, svg);
    el("rect", { x: -8, y: -18, width: len + 16, height: 30, rx: 4, class: "scale-bg" }, g);
    el("line", { x1: 0, y1: 0, x2: len, y2: 0 }, g);
    el("line", { x1: 0, y1: -5, x2: 0, y2: 5 }, g);
    el("line", { x1: len, y1: -5, x2: len, y2: 5 }, g);
    el("text", { x: len / 2, y: -6, "text-anchor": "middle" }, g, `${nice} km`);
  }

  function drawNorth(svg) {
    const g = el("g", { class: "north", transform: `translate(${W - 30},${44})` }, svg);
    el("path", { d: "M0,-18 L7,6 L0,1 L-7,6 Z" }, g);
    el("text", { x: 0, y: 22, "text-anchor": "middle" }, g, "N");
  }

  // Greedy label placement: the first of eight spots around a marker that overlaps no label.
  function placeLabels(layer, items) {
    const boxes = [];
    const spots = [[10, 4, "start"], [-10, 4, "end"], [0, -12, "middle"], [0, 20, "middle"],
      [9, -9, "start"], [-9, -9, "end"], [9, 16, "start"], [-9, 16, "end"]];
    const overlaps = (b) => boxes.some((o) => b.x0 < o.x1 && b.x1 > o.x0 && b.y0 < o.y1 && b.y1 > o.y0);
    for (const it of items) {
      const w = 7.2 * it.text.length;
      let chosen = null;
      for (const [dx, dy, anchor] of spots) {
        const x = it.x + dx;
        const y = it.y + dy;
        const x0 = anchor === "start" ? x : anchor === "end" ? x - w : x - w / 2;
        const b = { x0, x1: x0 + w, y0: y - 12, y1: y + 3 };
        if (!overlaps(b)) { chosen = { x, y, anchor, b }; break; }
      }
      if (!chosen) {
        const b = { x0: it.x + 10, x1: it.x + 10 + w, y0: it.y - 8, y1: it.y + 7 };
        chosen = { x: it.x + 10, y: it.y + 4, anchor: "start", b };
      }
      boxes.push(chosen.b);
      el("text", { x: chosen.x, y: chosen.y, "text-anchor": chosen.anchor, class: `rx-label ${it.cls}` },
        layer, it.text);
    }
  }

  function draw() {
    const svg = $("map");
    svg.replaceChildren();
    if (!state.origin) return;
    const view = makeView();
    el("rect", { x: 0, y: 0, width: W, height: H, class: "bg" }, svg);
    drawGraticule(svg, view);

    const res = state.result;
    if (res) {
      const g = el("g", { id: "prediction" }, svg);
      ellipseRings(res).forEach((ring, i) => {
        const pts = ring.map(([lon, lat]) => view.geo(lon, lat).map((v) => v.toFixed(1)).join(","));
        el("polygon", { id: i === 0 ? "ellipse" : `ellipse-${i}`, class: "ellipse", points: pts.join(" ") }, g);
      });
      const [px, py] = view.geo(res.position.longitude, res.position.latitude);
      el("circle", { id: "position", class: "position", cx: px, cy: py, r: 6 }, g);
      el("circle", { class: "position-halo", cx: px, cy: py, r: 11 }, g);
    }
    if (state.truth) {
      const [tx, ty] = view.geo(state.truth.longitude, state.truth.latitude);
      const g = el("g", { id: "truth", class: "truth", transform: `translate(${tx},${ty})` }, svg);
      el("path", { d: "M-6,-6 L6,6 M-6,6 L6,-6" }, g);
    }

    const used = new Set(res ? res.receivers_used : state.receivers.map((r) => r.id));
    const layer = el("g", { id: "receivers" }, svg);
    const labels = [];
    for (const r of state.receivers) {
      const [x, y] = view.geo(r.longitude, r.latitude);
      const cls = used.has(r.id) ? "used" : "unused";
      const g = el("g", { class: `receiver ${cls}`, "data-id": r.id, transform: `translate(${x},${y})` }, layer);
      el("path", { d: "M0,-8 L7,5 L-7,5 Z" }, g);
      el("title", {}, g, `${r.name} (${r.id}) ${fmt(r.latitude, 3)}, ${fmt(r.longitude, 3)}`);
      labels.push({ x, y, text: r.name, cls });
    }
    placeLabels(el("g", { class: "rx-labels" }, svg), labels);
    drawScaleBar(svg, view);
    drawNorth(svg);
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(err) {
    const box = $("error");
    box.hidden = false;
    box.textContent = err;
  }

  // Distance on a sphere: good enough to show the error against the truth on this page.
  function haversineKm(a, b) {
    const rad = Math.PI / 180;
    const dLat = (b.latitude - a.latitude) * rad;
    const dLon = (b.longitude - a.longitude) * rad;
    const h = Math.sin(dLat / 2) ** 2
      + Math.cos(a.latitude * rad) * Math.cos(b.latitude * rad) * Math.sin(dLon / 2) ** 2;
    return 2 * 6371.0088 * Math.asin(Math.sqrt(h));
  }

  function insideRing(ring, p) {
    let inside = false;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      const [xi, yi] = ring[i];
      const [xj, yj] = ring[j];
      if ((yi > p[1]) !== (yj > p[1]) && p[0] < ((xj - xi) * (p[1] - yi)) / (yj - yi) + xi) {
        inside = !inside;
      }
    }
    return inside;
  }

  function showResult(res, clientMs) {
    const u = res.uncertainty;
    $("r-pos").textContent = `${fmt(res.position.latitude, 4)}°, ${fmt(res.position.longitude, 4)}°`;
    $("r-level").textContent = `${fmt(100 * u.confidence_level, 1)} %`;
    $("r-axes").textContent = `${fmt(u.semi_major_m / 1000, 1)} × ${fmt(u.semi_minor_m / 1000, 1)} km`;
    $("r-orient").textContent = `${fmt(u.orientation_deg, 1)}° from north`;
    $("r-area").textContent = `${fmt(u.area_m2 / 1e6, 0)} km²`;
    $("r-sigma").textContent =
      `${fmt(u.sigma_x / 1000, 1)} km, ${fmt(u.sigma_y / 1000, 1)} km, ${fmt(u.rho, 2)}`;
    $("r-used").textContent = `${res.receivers_used.length} of ${state.receivers.length}`;
    const truthRow = $("r-truth-row");
    truthRow.hidden = !state.truth;
    if (state.truth) {
      const km = haversineKm(res.position, state.truth);
      const t = [state.truth.longitude, state.truth.latitude];
      const inside = ellipseRings(res).some((ring) => insideRing(ring, t));
      $("r-truth").textContent = `${fmt(km, 1)} km, ${inside ? "inside" : "outside"} the ellipse`;
    }
    $("m-name").textContent = res.model.name;
    $("m-version").textContent = res.model.version;
    $("m-alias").textContent = res.model.alias || "(pinned)";
    $("m-cache").textContent = res.cache_hit ? "hit" : "miss";
    const rows = [["preprocess", "preprocess"], ["inference", "inference"],
      ["postprocess", "postprocess"], ["total (server)", "total"]];
    const table = $("timings");
    table.replaceChildren();
    for (const [label, key] of rows) {
      if (res.timing_ms[key] === undefined) continue;
      const tr = table.insertRow();
      tr.insertCell().outerHTML = `<th>${label}</th>`;
      tr.insertCell().textContent = `${fmt(res.timing_ms[key], 1)} ms`;
    }
    if (res.cache_hit) {
      const hit = table.insertRow();
      hit.insertCell().outerHTML = "<th>stages</th>";
      hit.insertCell().textContent = "none: answered from the cache";
    }
    const tr = table.insertRow();
    tr.insertCell().outerHTML = "<th>round trip (browser)</th>";
    tr.insertCell().textContent = `${fmt(clientMs, 1)} ms`;
    $("r-meta").textContent = `request ${res.request_id} · ${res.timestamp}`;
    $("result").hidden = false;
  }

  async function getJson(url) {
    const r = await fetch(url, { headers: { accept: "application/json" } });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(describeError(r.status, body));
    return body;
  }

  function describeError(status, body) {
    const e = body && body.error;
    if (e) return `${status}: ${e.field ? `${e.field}: ` : ""}${e.message}`;
    return `HTTP ${status}`;
  }

  async function localize(request, truth, source) {
    $("error").hidden = true;
    const body = { ...request, confidence_level: Number($("confidence").value) };
    setStatus(`Localizing the ${source}…`);
    const t0 = performance.now();
    const r = await fetch("predict", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const clientMs = performance.now() - t0;
    const out = await r.json().catch(() => ({}));
    if (!r.ok) {
      setStatus(`The ${source} was refused.`);
      showError(describeError(r.status, out));
      return;
    }
    state.result = out;
    state.truth = truth || null;
    draw();
    showResult(out, clientMs);
    setStatus(`Localized the ${source} with ${out.receivers_used.length} receivers.`);
  }

  async function onSample() {
    const btn = $("sample-btn");
    btn.disabled = true;
    try {
      const sample = await getJson("map/sample");
      await localize(sample.request, sample.truth, "sample capture");
    } catch (err) {
      showError(String(err.message || err));
    } finally {
      btn.disabled = false;
    }
  }

  async function onFile(ev) {
    const file = ev.target.files[0];
    if (!file) return;
    try {
      const parsed = JSON.parse(await file.text());
      // A batch file (rfloc simulate --n > 1): draw its first capture.
      const request = Array.isArray(parsed.captures) ? parsed.captures[0] : parsed;
      await localize(request, null, `capture in ${file.name}`);
    } catch (err) {
      setStatus(`Could not read ${file.name}.`);
      showError(String(err.message || err));
    } finally {
      ev.target.value = "";
    }
  }

  async function init() {
    $("sample-btn").addEventListener("click", onSample);
    $("file-input").addEventListener("change", onFile);
    try {
      const net = await getJson("receivers");
      state.receivers = net.receivers;
      state.origin = net.enu_origin;
      draw();
      setStatus(`${net.receivers.length} receivers. Submit a capture, or try the sample.`);
    } catch (err) {
      setStatus("Could not load the receiver network.");
      showError(String(err.message || err));
    }
    try {
      const h = await getJson("health");
      const m = h.model || {};
      $("served").textContent = `model: ${m.name} v${m.version}${m.alias ? ` @${m.alias}` : ""}`;
    } catch (err) {
      $("served").textContent = `model: not ready (${err.message || err})`;
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();
