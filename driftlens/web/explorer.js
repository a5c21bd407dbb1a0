// driftlens report viewer: heatmap, per-layer curves, readout, contrasts, attributes.
// One ES module, no dependencies, no network. Used two ways:
//  - in the self-contained HTML page (driftlens report --html): render({model: staticModel(data, state), el});
//  - in Jupyter as an anywidget (driftlens.explore): the same render() with the widget's model, whose
//    "state" trait Python and the page share (a click here moves Python's selection, Explorer.set moves this).
// The model needs get(name), set(name, value), save_changes(), on("change:state", callback).

const SVGNS = "http://www.w3.org/2000/svg";
// matplotlib's cividis, 16 stops (the heatmap colours of every driftlens figure)
const CIVIDIS = ["#00224e", "#002e6c", "#1e3a6f", "#35456c", "#47516c", "#575d6d", "#666970", "#757575",
                 "#848279", "#948e77", "#a59c74", "#b7a96e", "#c8b866", "#dbc75a", "#eed649", "#fee838"];

function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }

function cividis(t) {
  if (!Number.isFinite(t)) return "#d9d9d9";
  const x = Math.min(1, Math.max(0, t)) * (CIVIDIS.length - 1);
  const i = Math.min(CIVIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = hexRgb(CIVIDIS[i]), b = hexRgb(CIVIDIS[i + 1]);
  return `rgb(${a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",")})`;
}

function light(color) {   // black or white text on a cell of this colour
  const m = color.match(/\d+/g).map(Number);
  return 0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2] > 127;
}

const isNum = (v) => typeof v === "number" && Number.isFinite(v);
export function fmt(v, d) { return isNum(v) ? v.toFixed(d) : "–"; }
export function fmtP(p) {
  if (!isNum(p)) return "–";
  return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

// a model for the static page: the same interface as an anywidget model, in memory
export function staticModel(data, state) {
  const values = { data, state };
  const listeners = {};
  return {
    get: (name) => values[name],
    set: (name, value) => { values[name] = value; (listeners["change:" + name] || []).forEach((f) => f()); },
    save_changes: () => {},
    on: (event, f) => { (listeners[event] = listeners[event] || []).push(f); },
  };
}

function cellKey(meta, state) {
  const parts = [];
  if (meta.has_site) parts.push(state.site);
  if (meta.has_modality) parts.push(state.modality);
  return parts.join("|");
}

// fewer cluster resamples than this and a percentile interval is not called "95%" (as driftlens.plot)
const MIN_DRAWS_FOR_LEVEL = 100;

function intervalLabel(meta, level) {
  if (meta.n_draws && meta.n_draws < MIN_DRAWS_FOR_LEVEL) {
    return `rough interval (only ${meta.n_draws} cluster resamples; probe sampling)`;
  }
  return `${level}% interval (probe sampling${meta.n_draws ? `, ${meta.n_draws} cluster resamples` : ""})`;
}

// the values of one (metric, site, modality, checkpoint, layer) cell, as label/value rows
export function readoutRows(data, state, ck, layer) {
  const meta = data.metrics[state.metric];
  const cell = meta.cells[cellKey(meta, state)];
  if (!cell) return [];
  const i = data.checkpoints.indexOf(ck), j = data.layers.indexOf(layer);
  const d = meta.decimals, level = Math.round(100 * data.level);
  const at = (key) => (cell[key] ? cell[key][i][j] : null);
  const runs = data.runs.length > 0;
  const rows = [];
  const units = meta.units && meta.units !== "1" ? ` ${meta.units}` : "";
  rows.push([runs ? `effect (mean of ${data.runs.length} runs)` : "effect", fmt(at("effect"), d) + units, "effect"]);
  if (cell.lo) {
    rows.push([runs ? `${level}% interval, across runs (runs, then clusters)` : intervalLabel(meta, level),
               `[${fmt(at("lo"), d)}, ${fmt(at("hi"), d)}]`, "interval"]);
  }
  if (cell.sd) rows.push(["sd over runs", fmt(at("sd"), d), "sd"]);
  if (cell.p) rows.push(["p (any change; cluster sign flips)", fmtP(at("p")), "p"]);
  if (cell.q) rows.push(["q (adjusted)", fmtP(at("q")), "q"]);
  if (cell.pmin) rows.push([`p (effect > ${meta.min_effect})`, fmtP(at("pmin")), "pmin"]);
  const mod = meta.has_modality ? state.modality : "";
  const n = data.n_clusters[mod] !== undefined ? data.n_clusters[mod] : data.n_clusters[""];
  if (n !== null && n !== undefined) rows.push(["clusters (probe-set units)", String(n), "clusters"]);
  if (runs && cell.per_run) {
    const pr = cell.per_run;
    data.runs.forEach((r, k) => {
      const v = pr.effect ? pr.effect[k][i][j] : null;
      const lo = pr.lo ? pr.lo[k][i][j] : null, hi = pr.hi ? pr.hi[k][i][j] : null;
      rows.push([`run ${r}`, `${fmt(v, d)}` + (pr.lo ? ` [${fmt(lo, d)}, ${fmt(hi, d)}]` : ""), "run"]);
    });
  }
  if (meta.total) {
    const t = meta.total, td = meta.total_decimals;
    rows.push(["MIR total (this checkpoint, log10)", fmt(t.effect[i], td) +
               (t.lo ? ` [${fmt(t.lo[i], td)}, ${fmt(t.hi[i], td)}]` : ""), "total"]);
  }
  return rows;
}

function contrastRows(data, state, label, layer) {
  const con = data.contrasts[state.metric];
  if (!con) return [];
  const meta = data.metrics[state.metric];
  const cell = con.cells[cellKey(meta, state)];
  const k = con.labels.indexOf(label), j = data.layers.indexOf(layer), d = con.decimals;
  const level = Math.round(100 * data.level);
  const rows = [];
  if (cell.runs) {
    const r = cell.runs, at = (key) => (r[key] ? r[key][k][j] : null);
    rows.push([`mean of ${data.runs.length} runs`, fmt(at("effect"), d)]);
    rows.push([`${level}% interval across runs`, `[${fmt(at("lo"), d)}, ${fmt(at("hi"), d)}]`]);
    if (r.p) rows.push(["p over runs (t test)", fmtP(at("p"))]);
    if (r.needed) rows.push(["runs for 80% power", isNum(at("needed")) ? String(at("needed")) : "∞"]);
    const w = cell.within;
    if (w.effect) {
      data.runs.forEach((name, m) => {
        rows.push([`run ${name}`, `${fmt(w.effect[m][k][j], d)}` +
                   (w.lo ? ` [${fmt(w.lo[m][k][j], d)}, ${fmt(w.hi[m][k][j], d)}]` : "")]);
      });
    }
  } else {
    const w = cell.within, at = (key) => (w[key] ? w[key][k][j] : null);
    rows.push(["difference a - b", fmt(at("effect"), d)]);
    if (w.lo) rows.push([`${level}% interval (probe sampling only)`, `[${fmt(at("lo"), d)}, ${fmt(at("hi"), d)}]`]);
    if (w.p) rows.push(["p (two-sided, paired draws)", fmtP(at("p"))]);
  }
  return rows;
}

export function render({ model, el: root }) {
  const data = model.get("data");
  let state = Object.assign({}, model.get("state"));
  root.classList.add("dl-root");
  root.innerHTML = "";

  const header = el("div", { class: "dl-header" });
  header.append(el("h1", {}, data.title));
  const sub = data.reference ? `reference ${data.reference}; ` : "";
  header.append(el("p", { class: "dl-note" }, sub + (data.runs.length
    ? `${data.runs.length} runs (${data.runs.join(", ")}): cells show the mean over runs, intervals cover runs then clusters`
    : "one run: intervals and p-values cover probe sampling only, not run-to-run variation")));
  const controls = el("div", { class: "dl-controls" });
  const select = (name, options, label) => {
    const wrap = el("label", { class: "dl-control" }, label + " ");
    const s = el("select", { "data-control": name, "aria-label": label });
    options.forEach((o) => s.append(el("option", { value: o }, name === "metric" ? data.metrics[o].label : o)));
    s.addEventListener("change", () => choose({ [name]: s.value }));
    wrap.append(s);
    controls.append(wrap);
    return s;
  };
  const metricSel = select("metric", Object.keys(data.metrics), "metric");
  const siteSel = select("site", data.sites.length ? data.sites : [""], "site");
  const modSel = select("modality", data.modalities.length ? data.modalities : [""], "modality");
  const status = el("span", { class: "dl-status", role: "status" });
  controls.append(status);

  const grid = el("div", { class: "dl-grid" });
  const heatBox = el("div", { class: "dl-panel dl-heat" });
  const curveBox = el("div", { class: "dl-panel dl-curves" });
  const readBox = el("div", { class: "dl-panel dl-readout", "data-testid": "readout" });
  const conBox = el("div", { class: "dl-panel dl-contrasts" });
  grid.append(heatBox, curveBox, readBox, conBox);
  const attrs = el("details", { class: "dl-attrs" });
  attrs.append(el("summary", {}, "report attributes (how it was computed)"));
  const table = el("table");
  Object.entries(data.attrs).forEach(([k, v]) => {
    const tr = el("tr");
    tr.append(el("th", {}, k), el("td", {}, v));
    table.append(tr);
  });
  attrs.append(table);
  const tip = el("div", { class: "dl-tooltip", role: "tooltip", "data-testid": "tooltip" });
  tip.style.display = "none";
  root.append(header, controls, grid, attrs,
              el("p", { class: "dl-note" }, `driftlens ${data.driftlens_version}`), tip);

  function choose(changes) {
    state = Object.assign({}, state, changes);
    model.set("state", state);
    model.save_changes();
    draw();
  }

  function showTip(evt, title, rows) {
    tip.innerHTML = "";
    tip.append(el("div", { class: "dl-tip-title" }, title));
    const t = el("table");
    rows.forEach(([k, v]) => { const tr = el("tr"); tr.append(el("th", {}, k), el("td", {}, v)); t.append(tr); });
    tip.append(t);
    tip.style.display = "block";
    const box = root.getBoundingClientRect();
    tip.style.left = `${evt.clientX - box.left + 14}px`;
    tip.style.top = `${evt.clientY - box.top + 14}px`;
  }
  const hideTip = () => { tip.style.display = "none"; };

  function drawControls() {
    const meta = data.metrics[state.metric];
    metricSel.value = state.metric;
    siteSel.value = state.site;
    modSel.value = state.modality;
    siteSel.disabled = !meta.has_site || data.sites.length < 2;
    modSel.disabled = !meta.has_modality || data.modalities.length < 2;
    modSel.title = meta.has_modality ? "" : `${meta.label} compares visual with text tokens: no modality to choose`;
    siteSel.title = meta.has_site ? "" : `${meta.label} is read at the hidden site only`;
    status.textContent = `selected: ${state.checkpoint}, layer ${state.layer}`;
  }

  function drawHeatmap() {
    const meta = data.metrics[state.metric];
    const cell = meta.cells[cellKey(meta, state)];
    heatBox.innerHTML = "";
    heatBox.append(el("h2", {}, `${meta.label}${meta.vs_reference && data.reference ? " vs " + data.reference : ""}` +
                   ` (${[meta.has_site ? state.site : null, meta.has_modality ? state.modality : null]
                     .filter(Boolean).join(", ")})`));
    const nC = data.checkpoints.length, nL = data.layers.length;
    const cw = Math.max(26, Math.min(56, 520 / nL)), ch = 22, left = 64, top = 8;
    const svg = el("svg:svg", { width: left + nL * cw + 8, height: top + nC * ch + 34, class: "dl-heatmap" });
    const vals = cell.effect.flat().filter(isNum);
    const lo = Math.min(...vals), hi = Math.max(...vals);
    data.checkpoints.forEach((ck, i) => {
      svg.append(el("svg:text", { x: left - 6, y: top + i * ch + ch / 2 + 4, "text-anchor": "end", class: "dl-tick" }, ck));
      data.layers.forEach((layer, j) => {
        const v = cell.effect[i][j];
        const color = cividis(hi > lo ? (v - lo) / (hi - lo) : 0.5);
        const g = el("svg:g", { class: "dl-cell", "data-checkpoint": ck, "data-layer": layer,
                                "data-testid": `cell-${ck}-${layer}` });
        g.append(el("svg:rect", { x: left + j * cw, y: top + i * ch, width: cw - 1, height: ch - 1,
                                  fill: isNum(v) ? color : "#d9d9d9" }));
        const star = cell.pmin && isNum(cell.pmin[i][j]) && cell.pmin[i][j] <= 0.05 ? "*" : "";
        if (cw >= 30) {
          g.append(el("svg:text", { x: left + j * cw + cw / 2, y: top + i * ch + ch / 2 + 4, "text-anchor": "middle",
                                    class: "dl-val", fill: isNum(v) && light(color) ? "#000" : "#fff" },
                      fmt(v, meta.decimals) + star));
        }
        if (ck === state.checkpoint && layer === state.layer) {
          g.append(el("svg:rect", { x: left + j * cw + 1, y: top + i * ch + 1, width: cw - 3, height: ch - 3,
                                    class: "dl-selected", fill: "none" }));
          g.classList.add("selected");
        }
        g.addEventListener("mousemove", (evt) => showTip(evt, `${ck}, layer ${layer}`,
                                                         readoutRows(data, state, ck, layer)));
        g.addEventListener("mouseleave", hideTip);
        g.addEventListener("click", () => choose({ checkpoint: ck, layer }));
        svg.append(g);
      });
    });
    data.layers.forEach((layer, j) => svg.append(el("svg:text", { x: left + j * cw + cw / 2, y: top + nC * ch + 14,
                                                                 "text-anchor": "middle", class: "dl-tick" }, layer)));
    svg.append(el("svg:text", { x: left + (nL * cw) / 2, y: top + nC * ch + 30, "text-anchor": "middle",
                                class: "dl-axis" }, "decoder layer"));
    heatBox.append(svg);
    heatBox.append(el("p", { class: "dl-note" }, `colour: ${fmt(lo, meta.decimals)} (dark) to ${fmt(hi, meta.decimals)}` +
                      ` (light)${meta.units && meta.units !== "1" ? ", " + meta.units : ""}` +
                      (cell.pmin ? `; * effect > ${meta.min_effect} (one-sided p ≤ 0.05)` : "") +
                      "; hover a cell for its values, click to select it"));
  }

  function linePlot(box, series, opts) {
    // series: [{label, color, y: [..], lo, hi, strong, dots: [[..], ..]}]; x = data.layers
    const W = 460, H = 250, L = 54, R = 10, T = 10, B = 34;
    const xs = data.layers;
    const all = [];
    series.forEach((s) => {
      all.push(...s.y.filter(isNum));
      if (s.lo && s.strong) all.push(...s.lo.filter(isNum), ...s.hi.filter(isNum));
      (s.dots || []).forEach((row) => all.push(...row.filter(isNum)));
    });
    if (opts.zero) all.push(0);
    let ymin = Math.min(...all), ymax = Math.max(...all);
    if (!(ymax > ymin)) { ymin -= 1; ymax += 1; }
    const pad = 0.06 * (ymax - ymin);
    ymin -= pad; ymax += pad;
    const X = (x) => L + (xs.length > 1 ? (x - xs[0]) / (xs[xs.length - 1] - xs[0]) : 0.5) * (W - L - R);
    const Y = (y) => T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B);
    const svg = el("svg:svg", { width: W, height: H, class: "dl-lines" });
    for (let k = 0; k <= 4; k++) {
      const y = ymin + (k / 4) * (ymax - ymin);
      svg.append(el("svg:line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "dl-grid" }));
      svg.append(el("svg:text", { x: L - 4, y: Y(y) + 4, "text-anchor": "end", class: "dl-tick" }, fmt(y, opts.decimals)));
    }
    xs.forEach((x) => svg.append(el("svg:text", { x: X(x), y: H - B + 14, "text-anchor": "middle", class: "dl-tick" }, x)));
    svg.append(el("svg:text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "dl-axis" }, "decoder layer"));
    if (opts.zero && ymin < 0 && ymax > 0) svg.append(el("svg:line", { x1: L, x2: W - R, y1: Y(0), y2: Y(0), class: "dl-zero" }));
    if (opts.marker !== undefined) {
      svg.append(el("svg:line", { x1: X(opts.marker), x2: X(opts.marker), y1: T, y2: H - B, class: "dl-marker" }));
    }
    const path = (ys) => ys.map((y, k) => (isNum(y) ? `${k && isNum(ys[k - 1]) ? "L" : "M"}${X(xs[k])},${Y(y)}`
      : "")).join("");
    series.filter((s) => !s.strong).concat(series.filter((s) => s.strong)).forEach((s) => {
      const g = el("svg:g", { class: "dl-series" + (s.strong ? " strong" : ""), "data-series": s.label });
      if (s.strong && s.lo) {
        const up = xs.map((x, k) => [X(x), Y(s.hi[k])]).filter((p) => isNum(p[1]));
        const down = xs.map((x, k) => [X(x), Y(s.lo[k])]).filter((p) => isNum(p[1])).reverse();
        if (up.length) {
          g.append(el("svg:path", { d: "M" + up.concat(down).map((p) => p.join(",")).join("L") + "Z",
                                    fill: s.color, "fill-opacity": 0.18, stroke: "none" }));
        }
      }
      g.append(el("svg:path", { d: path(s.y), stroke: s.color, fill: "none", "stroke-width": s.strong ? 2.6 : 1.3,
                                "stroke-opacity": s.strong ? 1 : 0.45 }));
      (s.dots || []).forEach((row, r) => row.forEach((y, k) => {
        if (isNum(y)) {
          g.append(el("svg:circle", { cx: X(xs[k]) + 4 * (r - (s.dots.length - 1) / 2), cy: Y(y), r: 2.2,
                                      fill: s.color, "fill-opacity": 0.6 }));
        }
      }));
      s.y.forEach((y, k) => {
        if (!isNum(y)) return;
        const c = el("svg:circle", { cx: X(xs[k]), cy: Y(y), r: s.strong ? 4 : 3, fill: s.color,
                                     "fill-opacity": s.strong ? 1 : 0.5, class: "dl-point",
                                     "data-testid": `point-${s.label}-${xs[k]}` });
        c.addEventListener("mousemove", (evt) => showTip(evt, opts.tipTitle(s.label, xs[k]), opts.tipRows(s.label, xs[k])));
        c.addEventListener("mouseleave", hideTip);
        if (opts.onClick) c.addEventListener("click", () => opts.onClick(s.label, xs[k]));
        g.append(c);
      });
      svg.append(g);
    });
    box.append(svg);
    const legend = el("div", { class: "dl-legend" });
    series.forEach((s) => {
      const item = el("span", { class: "dl-legend-item" + (s.strong ? " strong" : ""), "data-series": s.label });
      item.append(el("span", { class: "dl-swatch", style: `background:${s.color}` }), document.createTextNode(s.label));
      if (opts.onLegend) item.addEventListener("click", () => opts.onLegend(s.label));
      legend.append(item);
    });
    box.append(legend);
  }

  function drawCurves() {
    const meta = data.metrics[state.metric];
    const cell = meta.cells[cellKey(meta, state)];
    curveBox.innerHTML = "";
    const runs = data.runs.length > 0;
    curveBox.append(el("h2", {}, `${meta.label} by layer`));
    const series = [];
    data.checkpoints.forEach((ck, i) => {
      const y = cell.effect[i];
      if (meta.vs_reference && ck === data.reference && y.every((v) => !isNum(v) || v === 0)) return;
      const strong = ck === state.checkpoint;
      series.push({ label: ck, color: data.colors[ck] || "#555", y, strong,
                    lo: cell.lo ? cell.lo[i] : null, hi: cell.hi ? cell.hi[i] : null,
                    dots: strong && runs && cell.per_run && cell.per_run.effect ? cell.per_run.effect.map((r) => r[i]) : [] });
    });
    linePlot(curveBox, series, {
      decimals: meta.decimals, zero: meta.vs_reference, marker: state.layer,
      tipTitle: (ck, layer) => `${ck}, layer ${layer}`, tipRows: (ck, layer) => readoutRows(data, state, ck, layer),
      onClick: (ck, layer) => choose({ checkpoint: ck, layer }), onLegend: (ck) => choose({ checkpoint: ck }),
    });
    const level = Math.round(100 * data.level);
    curveBox.append(el("p", { class: "dl-note" }, `the selected checkpoint in full colour with its band ` +
      (runs ? `(${level}% across-run interval; dots: one run)` : cell.lo ? `(${intervalLabel(meta, level)})` : "") +
      "; click a line's point or legend entry to select it"));
  }

  function drawReadout() {
    const meta = data.metrics[state.metric];
    readBox.innerHTML = "";
    readBox.append(el("h2", {}, `selected: ${state.checkpoint}, layer ${state.layer}`));
    readBox.append(el("p", { class: "dl-note" }, `${meta.long_name}` +
                      `${meta.has_site ? ", " + state.site : ""}${meta.has_modality ? ", " + state.modality : ""}`));
    const t = el("table", { class: "dl-readout-table" });
    readoutRows(data, state, state.checkpoint, state.layer).forEach(([k, v, key]) => {
      const tr = el("tr", { "data-key": key });
      tr.append(el("th", {}, k), el("td", {}, v));
      t.append(tr);
    });
    readBox.append(t);
  }

  function drawContrasts() {
    const con = data.contrasts[state.metric];
    conBox.innerHTML = "";
    conBox.style.display = con ? "" : "none";
    if (!con) return;
    const meta = data.metrics[state.metric];
    const cell = con.cells[cellKey(meta, state)];
    const runs = !!cell.runs;
    const src = runs ? cell.runs : cell.within;
    conBox.append(el("h2", {}, `contrasts: excess ${meta.label} (a - b)`));
    const palette = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"];
    const series = con.labels.map((label, k) => ({
      label, color: palette[k % palette.length], y: src.effect[k], strong: true,
      lo: src.lo ? src.lo[k] : null, hi: src.hi ? src.hi[k] : null,
      dots: runs && cell.within.effect ? cell.within.effect.map((r) => r[k]) : [] }));
    linePlot(conBox, series, { decimals: con.decimals, zero: true, marker: state.layer,
                               tipTitle: (label, layer) => `${label}, layer ${layer}`,
                               tipRows: (label, layer) => contrastRows(data, state, label, layer),
                               onClick: (label, layer) => choose({ layer }) });
    const level = Math.round(100 * data.level);
    conBox.append(el("p", { class: "dl-note" }, runs
      ? `mean over ${data.runs.length} runs, bands: ${level}% across-run interval (runs, then clusters), dots: one run`
      : `one run; bands: ${level}% within-run interval (probe sampling only, not run-to-run variation)`));
    conBox.append(el("h2", {}, `at the selected layer ${state.layer}`));
    const t = el("table", { class: "dl-contrast-table", "data-testid": "contrast-table" });
    const rows = con.labels.map((label) => contrastRows(data, state, label, state.layer));
    const head = el("tr");
    head.append(el("th", {}, "a - b"));
    rows[0].forEach(([k]) => head.append(el("th", {}, k)));
    t.append(head);
    con.labels.forEach((label, k) => {
      const tr = el("tr", { "data-contrast": label });
      tr.append(el("th", {}, label));
      rows[k].forEach(([, v]) => tr.append(el("td", {}, v)));
      t.append(tr);
    });
    conBox.append(t);
  }

  function draw() {
    drawControls();
    drawHeatmap();
    drawCurves();
    drawReadout();
    drawContrasts();
  }

  model.on("change:state", () => {
    const next = model.get("state");
    if (JSON.stringify(next) !== JSON.stringify(state)) {
      state = Object.assign({}, next);
      draw();
    }
  });
  draw();
}

export default { render };
