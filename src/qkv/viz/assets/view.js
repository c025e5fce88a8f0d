// qkv attention view: head view (token lines in SVG) and model view (layers × heads thumbnails).
// Data: the JSON in #qkv-data, {title, kinds: [{name, tokens, key_tokens, layers, heads, causal, attention}]}
// with attention[layer][head][i][j] the weight of attending token i on attended-to token j; in a causal kind
// token i sees tokens j <= i + S - L only (S = key_tokens.length, L = tokens.length).
// State can be preselected with a URL fragment or query: #kind=cross&layer=2&heads=0,3&token=5 (or key=5).
(function () {
  "use strict";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Matplotlib's tab10, so head colors match the static plots; further heads get evenly spaced hues.
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];
  const ROW = 20;        // px per token row in the head view
  const GAP = 220;       // px between the two token columns, where the lines run
  const TOP = 24;        // px above the first token, for the column headings
  const MASKED_GREY = 230;  // thumbnail cells a causal mask hides
  const FONT = "13px system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif";

  const $ = (id) => document.getElementById(id);
  const data = JSON.parse($("qkv-data").textContent);
  // token / key: the pinned attending / attended-to token (or null); hover overrides them while it lasts.
  const state = { kind: 0, layer: 0, heads: new Set(), token: null, key: null, hover: null };

  function headColor(h, heads) {
    if (heads <= PALETTE.length) return PALETTE[h];
    return "hsl(" + Math.round((360 * h) / heads) + ", 70%, 45%)";
  }

  function colorToRgb(color) {
    // Thumbnails need numeric channels; hsl() colors are converted by a 1-pixel canvas.
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.fillStyle = color;
    ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2]];
  }

  function kind() { return data.kinds[state.kind]; }

  // Whether attending token i can see attended-to token j at all (a causal kind masks the later ones).
  function visible(k, i, j) { return !k.causal || j <= i + k.key_tokens.length - k.tokens.length; }

  function el(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- state from / to the URL ------------------------------------------------------------------------------

  function readLocation() {
    const text = location.hash.replace(/^#/, "") || location.search.replace(/^\?/, "");
    const params = new URLSearchParams(text);
    const wanted = params.get("kind");
    if (wanted !== null) {
      const byName = data.kinds.findIndex((k) => k.name === wanted);
      const byIndex = /^\d+$/.test(wanted) ? Number(wanted) : -1;
      if (byName >= 0) state.kind = byName;
      else if (byIndex >= 0 && byIndex < data.kinds.length) state.kind = byIndex;
    }
    const k = kind();
    const layer = intParam(params, "layer");
    state.layer = layer !== null && layer < k.layers ? layer : 0;
    state.heads = new Set(range(k.heads));
    if (params.has("heads")) {
      const heads = params.get("heads").split(",").filter((s) => /^\d+$/.test(s)).map(Number);
      state.heads = new Set(heads.filter((h) => h < k.heads));
    }
    const token = intParam(params, "token");
    const key = intParam(params, "key");
    state.token = token !== null && token < k.tokens.length ? token : null;
    state.key = state.token === null && key !== null && key < k.key_tokens.length ? key : null;
  }

  function intParam(params, name) {
    const value = params.get(name);
    return value !== null && /^\d+$/.test(value) ? Number(value) : null;
  }

  function writeLocation() {
    const parts = [];
    if (data.kinds.length > 1) parts.push("kind=" + encodeURIComponent(kind().name));
    parts.push("layer=" + state.layer, "heads=" + [...state.heads].sort((a, b) => a - b).join(","));
    if (state.token !== null) parts.push("token=" + state.token);
    if (state.key !== null) parts.push("key=" + state.key);
    try {
      history.replaceState(null, "", "#" + parts.join("&"));
    } catch (e) {
      // Some browsers refuse history changes on file:// pages; the view works without it.
    }
  }

  function range(n) { return Array.from({ length: n }, (_, i) => i); }

  // ---- controls ---------------------------------------------------------------------------------------------

  function buildControls() {
    const kindSelect = $("kind");
    kindSelect.replaceChildren(...data.kinds.map((k, i) => new Option(k.name, String(i))));
    kindSelect.value = String(state.kind);
    $("kind-control").hidden = data.kinds.length < 2;
    kindSelect.onchange = () => {
      state.kind = Number(kindSelect.value);
      state.layer = 0;
      state.heads = new Set(range(kind().heads));
      state.token = state.key = state.hover = null;
      buildControls();
      buildThumbs();
      update();
    };

    const k = kind();
    const layerSelect = $("layer");
    layerSelect.replaceChildren(...range(k.layers).map((l) => new Option("Layer " + l, String(l))));
    layerSelect.value = String(state.layer);
    layerSelect.onchange = () => { state.layer = Number(layerSelect.value); update(); };

    const heads = $("heads");
    heads.replaceChildren(...range(k.heads).map((h) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "head-toggle";
      box.dataset.head = String(h);
      box.checked = state.heads.has(h);
      box.onchange = () => {
        if (box.checked) state.heads.add(h); else state.heads.delete(h);
        update();
      };
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = headColor(h, k.heads);
      label.append(box, swatch, String(h));
      return label;
    }));
    $("heads-all").onclick = () => { state.heads = new Set(range(k.heads)); update(); };
    $("heads-none").onclick = () => { state.heads = new Set(); update(); };
  }

  // The default* properties mirror the state into the selected/checked attributes, so a saved or dumped DOM
  // shows what is selected, not only the live form state.
  function syncControls() {
    for (const option of $("layer").options) option.defaultSelected = option.selected = Number(option.value) === state.layer;
    for (const box of document.querySelectorAll(".head-toggle")) {
      box.defaultChecked = box.checked = state.heads.has(Number(box.dataset.head));
    }
    for (const option of $("kind").options) option.defaultSelected = option.selected = Number(option.value) === state.kind;
  }

  // ---- head view --------------------------------------------------------------------------------------------

  function textWidth(strings) {
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = FONT;
    return Math.ceil(Math.max(40, ...strings.map((s) => ctx.measureText(s).width)));
  }

  let layout = null;

  function buildHeadView() {
    const k = kind();
    const svg = $("head-svg");
    const leftWidth = textWidth(k.tokens);
    const rightWidth = textWidth(k.key_tokens);
    const leftX = leftWidth + 4;               // right edge of the left tokens (text-anchor end)
    const rightX = leftX + GAP;                // left edge of the right tokens
    const rows = Math.max(k.tokens.length, k.key_tokens.length);
    layout = { x1: leftX + 6, x2: rightX - 6 };
    svg.setAttribute("width", String(rightX + rightWidth + 8));
    svg.setAttribute("height", String(TOP + rows * ROW + 4));
    svg.replaceChildren();
    const note = $("kind-note");
    note.hidden = !k.causal;
    note.textContent = k.causal ? "Causal: each token attends only to itself and the tokens before it. " +
      "Focus a token to grey out the tokens it cannot see." : "";
    svg.append(el("text", { class: "heading", x: leftX, y: 8, "text-anchor": "end" }, "attending"));
    svg.append(el("text", { class: "heading", x: rightX, y: 8, "text-anchor": "start" }, "attended to"));
    svg.append(el("g", { id: "lines" }));
    for (const [side, tokens, x, anchor] of [["left", k.tokens, leftX, "end"], ["right", k.key_tokens, rightX, "start"]]) {
      tokens.forEach((token, i) => {
        const text = el("text", { class: "token " + side, x: x, y: y(i), "text-anchor": anchor, "data-index": i }, token);
        text.addEventListener("mouseenter", () => { state.hover = { side: side, index: i }; drawLines(); });
        text.addEventListener("mouseleave", () => { state.hover = null; drawLines(); });
        text.addEventListener("click", () => {
          const pinned = side === "left" ? state.token : state.key;
          state.token = side === "left" && pinned !== i ? i : null;
          state.key = side === "right" && pinned !== i ? i : null;
          update();
        });
        svg.append(text);
      });
    }
  }

  function y(i) { return TOP + i * ROW + ROW / 2; }

  function focus() {
    if (state.hover) return state.hover;
    if (state.token !== null) return { side: "left", index: state.token };
    if (state.key !== null) return { side: "right", index: state.key };
    return null;
  }

  function drawLines() {
    const k = kind();
    const matrices = k.attention[state.layer];
    const target = focus();
    const group = $("lines");
    const lines = [];
    const heads = [...state.heads].sort((a, b) => a - b);
    for (const h of heads) {
      const color = headColor(h, k.heads);
      const rows = target && target.side === "left" ? [target.index] : range(k.tokens.length);
      for (const i of rows) {
        const cols = target && target.side === "right" ? [target.index] : range(k.key_tokens.length);
        for (const j of cols) {
          const w = matrices[h][i][j];
          if (!(w > 0)) continue;
          lines.push(el("line", {
            class: "attn", x1: layout.x1, y1: y(i), x2: layout.x2, y2: y(j), stroke: color,
            "stroke-opacity": w, "data-head": h, "data-from": i, "data-to": j,
          }));
        }
      }
    }
    group.replaceChildren(...lines);
    for (const text of document.querySelectorAll("#head-svg text.token")) {
      const side = text.classList.contains("left") ? "left" : "right";
      const index = Number(text.dataset.index);
      text.classList.toggle("active", !!target && target.side === side && target.index === index);
      // Masked, not merely weak: the focused token and this one are on opposite sides of the causal mask.
      const masked = !!target && target.side !== side &&
        !(side === "right" ? visible(k, target.index, index) : visible(k, index, target.index));
      text.classList.toggle("masked", masked);
    }
    const what = target ? (target.side === "left" ? "attending token " : "attended-to token ") + target.index : "all tokens";
    $("summary").textContent = k.name + ", layer " + state.layer + ", heads [" + heads.join(", ") + "], " + what +
      ": " + lines.length + " lines";
    $("summary").dataset.lines = String(lines.length);
  }

  // ---- model view -------------------------------------------------------------------------------------------

  function buildThumbs() {
    const k = kind();
    const grid = $("thumbs");
    grid.style.gridTemplateColumns = "auto repeat(" + k.heads + ", auto)";
    const cells = [];
    for (let l = 0; l < k.layers; l++) {
      const label = document.createElement("div");
      label.className = "row-label";
      label.textContent = "Layer " + l;
      cells.push(label);
      for (let h = 0; h < k.heads; h++) cells.push(thumb(k, l, h));
    }
    grid.replaceChildren(...cells);
  }

  function thumb(k, l, h) {
    const rows = k.tokens.length;
    const cols = k.key_tokens.length;
    const figure = document.createElement("figure");
    figure.className = "thumb";
    figure.dataset.layer = String(l);
    figure.dataset.head = String(h);
    figure.title = k.name + ", layer " + l + ", head " + h;
    const canvas = document.createElement("canvas");
    canvas.width = cols;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(cols, rows);
    const [r, g, b] = colorToRgb(headColor(h, k.heads));
    const matrix = k.attention[l][h];
    // Each row is scaled by its largest weight so the pattern is visible even when attention is spread thin;
    // cells a causal mask hides are light grey, so the triangle reads as "cannot see", not "weight 0".
    for (let i = 0; i < rows; i++) {
      const top = Math.max(...matrix[i]) || 1;
      for (let j = 0; j < cols; j++) {
        const p = 4 * (i * cols + j);
        if (!visible(k, i, j)) {
          image.data[p] = image.data[p + 1] = image.data[p + 2] = MASKED_GREY;
          image.data[p + 3] = 255;
          continue;
        }
        image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = b;
        image.data[p + 3] = Math.round((255 * matrix[i][j]) / top);
      }
    }
    ctx.putImageData(image, 0, 0);
    const caption = document.createElement("figcaption");
    caption.textContent = "L" + l + " H" + h;
    figure.append(canvas, caption);
    figure.addEventListener("click", () => {
      state.layer = l;
      state.heads = new Set([h]);
      update();
    });
    return figure;
  }

  function markThumbs() {
    for (const figure of document.querySelectorAll(".thumb")) {
      const selected = Number(figure.dataset.layer) === state.layer && state.heads.has(Number(figure.dataset.head));
      figure.classList.toggle("selected", selected);
    }
  }

  // ---- putting it together ----------------------------------------------------------------------------------

  function update() {
    syncControls();
    buildHeadViewIfNeeded();
    drawLines();
    markThumbs();
    writeLocation();
  }

  let builtFor = -1;
  function buildHeadViewIfNeeded() {
    if (builtFor !== state.kind) { buildHeadView(); builtFor = state.kind; }
  }

  function showError(message) {
    const box = $("error");
    box.hidden = false;
    box.textContent = "Error: " + message;
    document.body.dataset.status = "error";
    document.body.dataset.error = String(message);
  }

  window.addEventListener("error", (event) => showError(event.message));
  window.addEventListener("hashchange", () => { readLocation(); buildControls(); buildThumbs(); builtFor = -1; update(); });

  try {
    readLocation();
    buildControls();
    buildThumbs();
    update();
    document.body.dataset.status = "ready";
  } catch (e) {
    showError(e && e.message ? e.message : String(e));
  }
})();
