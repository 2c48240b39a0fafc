// The case page: image viewer (window/level, zoom, pan, heatmap overlay, optic disc) and keyboard decisions.
// Plain script, no dependencies; data comes from the page's JSON block (CSP forbids inline script).
"use strict";

(function () {
  const data = JSON.parse(document.getElementById("case-data").textContent);
  const images = data.images;
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const note = document.getElementById("image-note");
  const readout = document.getElementById("readout");
  const heatToggle = document.getElementById("heatmap-toggle");
  const heatModel = document.getElementById("heatmap-model");
  const opacity = document.getElementById("opacity");
  const discToggle = document.getElementById("disc-toggle");
  const help = document.getElementById("help");
  const form = document.getElementById("decision");
  const PRESETS = {
    default: { center: 128, width: 256 },
    contrast: { center: 128, width: 128 },
    soft: { center: 128, width: 384 },
  };
  const PRESET_ORDER = ["default", "contrast", "soft"];

  const state = {
    index: 0,
    center: 128,
    width: 256,
    invert: false,
    preset: "default",
    zoom: 1,
    panX: 0,
    panY: 0,
  };
  const cache = {}; // index -> { pixels: ImageData, rendered: canvas, heat: {model: canvas}, grey: bool }

  function loadImage(url) {
    return new Promise(function (resolve, reject) {
      const img = new Image();
      img.onload = function () { resolve(img); };
      img.onerror = function () { reject(new Error("cannot load " + url)); };
      img.src = url;
    });
  }

  function offscreen(w, h) {
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    return c;
  }

  function jet(v) { // 0..1 -> [r, g, b]
    const r = Math.min(Math.max(1.5 - Math.abs(4 * v - 3), 0), 1);
    const g = Math.min(Math.max(1.5 - Math.abs(4 * v - 2), 0), 1);
    const b = Math.min(Math.max(1.5 - Math.abs(4 * v - 1), 0), 1);
    return [r * 255, g * 255, b * 255];
  }

  async function prepare(index) {
    if (cache[index]) return cache[index];
    const info = images[index];
    if (!info.display_url) return null;
    const img = await loadImage(info.display_url);
    const base = offscreen(img.naturalWidth, img.naturalHeight);
    const bctx = base.getContext("2d");
    bctx.drawImage(img, 0, 0);
    const pixels = bctx.getImageData(0, 0, base.width, base.height);
    const entry = { pixels: pixels, rendered: offscreen(base.width, base.height), heat: {}, grey: isGrey(pixels) };
    for (const [model, url] of Object.entries(info.heatmaps || {})) {
      try {
        const h = await loadImage(url);
        const hc = offscreen(h.naturalWidth, h.naturalHeight);
        const hctx = hc.getContext("2d");
        hctx.drawImage(h, 0, 0);
        const hd = hctx.getImageData(0, 0, hc.width, hc.height);
        for (let i = 0; i < hd.data.length; i += 4) {
          const v = hd.data[i] / 255;
          const [r, g, b] = jet(v);
          hd.data[i] = r; hd.data[i + 1] = g; hd.data[i + 2] = b;
          hd.data[i + 3] = Math.round(255 * Math.min(1, v * 1.6)); // cold areas stay clear
        }
        hctx.putImageData(hd, 0, 0);
        entry.heat[model] = hc;
      } catch (e) {
        // a missing heatmap leaves the image readable
      }
    }
    cache[index] = entry;
    return entry;
  }

  function isGrey(pixels) {
    const d = pixels.data;
    const step = Math.max(4, Math.floor(d.length / 4 / 5000) * 4);
    for (let i = 0; i < d.length; i += step) {
      if (d[i] !== d[i + 1] || d[i] !== d[i + 2]) return false;
    }
    return true;
  }

  function applyWindow(entry) {
    const src = entry.pixels.data;
    const out = new ImageData(entry.pixels.width, entry.pixels.height);
    const dst = out.data;
    const lut = new Uint8ClampedArray(256);
    const lo = state.center - state.width / 2;
    for (let v = 0; v < 256; v++) {
      let y = entry.grey ? ((v - lo) / state.width) * 255 : v;
      if (state.invert) y = 255 - y;
      lut[v] = y;
    }
    for (let i = 0; i < src.length; i += 4) {
      dst[i] = lut[src[i]];
      dst[i + 1] = lut[src[i + 1]];
      dst[i + 2] = lut[src[i + 2]];
      dst[i + 3] = 255;
    }
    entry.rendered.getContext("2d").putImageData(out, 0, 0);
  }

  function fitCanvas() {
    const stage = document.getElementById("stage");
    const w = Math.max(200, stage.clientWidth);
    const h = Math.max(200, Math.min(window.innerHeight - 220, w));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
  }

  function draw() {
    fitCanvas();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const entry = cache[state.index];
    if (!entry) return;
    const iw = entry.rendered.width;
    const ih = entry.rendered.height;
    const fit = Math.min(canvas.width / iw, canvas.height / ih);
    const scale = fit * state.zoom;
    const x0 = (canvas.width - iw * scale) / 2 + state.panX;
    const y0 = (canvas.height - ih * scale) / 2 + state.panY;
    ctx.setTransform(scale, 0, 0, scale, x0, y0);
    ctx.imageSmoothingEnabled = state.zoom < 2;
    ctx.drawImage(entry.rendered, 0, 0);
    const model = heatModel.value;
    if (heatToggle.checked && entry.heat[model]) {
      ctx.globalAlpha = opacity.value / 100;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(entry.heat[model], 0, 0, iw, ih);
      ctx.globalAlpha = 1;
    }
    const disc = images[state.index].disc;
    if (disc && discToggle.checked) {
      ctx.lineWidth = 2 / scale;
      ctx.strokeStyle = "#39ff14";
      const half = disc.crop_side / 2;
      if (disc.kind === "full") {
        ctx.strokeRect(disc.x - half, disc.y - half, disc.crop_side, disc.crop_side);
      }
      ctx.beginPath();
      ctx.arc(disc.x, disc.y, Math.max(4, disc.crop_side / 6), 0, 2 * Math.PI);
      ctx.stroke();
    }
    const wl = entry.grey ? "W " + Math.round(state.width) + " / L " + Math.round(state.center) + (state.invert ? " inverted" : "") + " · " : "";
    readout.textContent = wl + "zoom " + state.zoom.toFixed(2) + "× · image " + (state.index + 1) + " of " + images.length;
  }

  async function show(index) {
    if (index < 0 || index >= images.length) return;
    state.index = index;
    state.zoom = 1; state.panX = 0; state.panY = 0;
    document.querySelectorAll(".image-decisions").forEach(function (el) {
      el.hidden = Number(el.dataset.index) !== index;
    });
    document.querySelectorAll(".thumb").forEach(function (el) {
      el.classList.toggle("current", Number(el.dataset.index) === index);
    });
    const info = images[index];
    heatModel.replaceChildren();
    for (const model of Object.keys(info.heatmaps || {})) {
      const opt = document.createElement("option");
      opt.value = model;
      opt.textContent = model;
      heatModel.appendChild(opt);
    }
    heatModel.hidden = heatModel.options.length < 2;
    document.querySelectorAll(".disc-only").forEach(function (el) { el.hidden = !info.disc; });
    note.textContent = info.display_url ? "" : (info.note || "The image is being prepared: reload in a moment.");
    const entry = await prepare(index).catch(function (e) { note.textContent = e.message; return null; });
    if (state.index !== index) return; // another image was chosen while this one loaded
    // the window/level may have changed on another image since this one was rendered
    if (entry) applyWindow(entry);
    document.querySelectorAll(".wl-only").forEach(function (el) { el.hidden = !(entry && entry.grey); });
    canvas.dataset.ready = entry ? "1" : "0";
    draw();
  }

  function setWindow(center, width) {
    state.center = center;
    state.width = Math.max(1, width);
    const entry = cache[state.index];
    if (entry) applyWindow(entry);
    draw();
  }

  function preset(name) {
    if (name === "invert") {
      state.invert = !state.invert;
      setWindow(state.center, state.width);
      return;
    }
    state.preset = name;
    setWindow(PRESETS[name].center, PRESETS[name].width);
  }

  // mouse: drag = window/level (greyscale), shift/middle drag = pan, wheel = zoom
  let drag = null;
  canvas.addEventListener("mousedown", function (e) {
    drag = { x: e.clientX, y: e.clientY, pan: e.shiftKey || e.button === 1, center: state.center, width: state.width, panX: state.panX, panY: state.panY };
    e.preventDefault();
  });
  window.addEventListener("mousemove", function (e) {
    if (!drag) return;
    const dx = e.clientX - drag.x;
    const dy = e.clientY - drag.y;
    const entry = cache[state.index];
    if (drag.pan || !(entry && entry.grey)) {
      state.panX = drag.panX + dx;
      state.panY = drag.panY + dy;
      draw();
    } else {
      setWindow(drag.center + dy * 0.5, drag.width + dx);
    }
  });
  window.addEventListener("mouseup", function () { drag = null; });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    state.zoom = Math.min(16, Math.max(0.25, state.zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)));
    draw();
  }, { passive: false });

  document.querySelectorAll("[data-preset]").forEach(function (b) {
    b.addEventListener("click", function () { preset(b.dataset.preset); });
  });
  document.getElementById("reset").addEventListener("click", function () {
    state.zoom = 1; state.panX = 0; state.panY = 0; state.invert = false;
    preset("default");
  });
  heatToggle.addEventListener("change", draw);
  heatModel.addEventListener("change", draw);
  opacity.addEventListener("input", draw);
  discToggle.addEventListener("change", draw);
  document.querySelectorAll(".thumb").forEach(function (b) {
    b.addEventListener("click", function () { show(Number(b.dataset.index)); });
  });
  document.getElementById("help-button").addEventListener("click", function () { help.hidden = !help.hidden; });
  help.addEventListener("click", function () { help.hidden = true; });
  window.addEventListener("resize", draw);

  function currentBlock() {
    return document.querySelector('.image-decisions[data-index="' + state.index + '"]');
  }

  function confirmAll() {
    currentBlock().querySelectorAll("fieldset.finding").forEach(function (fs) {
      const radio = fs.querySelector('input[type=radio][value="' + fs.dataset.ai + '"]');
      if (radio) radio.checked = true;
    });
  }

  function notAssessable() {
    const block = currentBlock();
    block.querySelectorAll("input.not-assessable").forEach(function (r) { r.checked = true; });
    const reason = block.querySelector(".reason-input");
    if (reason) reason.focus();
  }

  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") {
      help.hidden = true;
      if (document.activeElement) document.activeElement.blur();
      return;
    }
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "range"].includes(t.type)));
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key;
    let handled = true;
    if (key === "?") help.hidden = !help.hidden;
    else if (key === "a" || key === "A") confirmAll();
    else if (/^[1-9]$/.test(key)) {
      const radio = currentBlock().querySelector('input[data-key="' + key + '"]');
      if (radio) radio.checked = true;
    } else if (key === "n" || key === "N") notAssessable();
    else if (key === "f" || key === "F") {
      const flag = document.getElementById("flagged");
      flag.checked = !flag.checked;
    } else if (key === " ") {
      heatToggle.checked = !heatToggle.checked;
      draw();
    } else if (key === "w" || key === "W") {
      preset(PRESET_ORDER[(PRESET_ORDER.indexOf(state.preset) + 1) % PRESET_ORDER.length]);
    } else if (key === "i" || key === "I") preset("invert");
    else if (key === "r" || key === "R") document.getElementById("reset").click();
    else if (key === "j" || key === "J") show(Math.min(images.length - 1, state.index + 1));
    else if (key === "k" || key === "K") show(Math.max(0, state.index - 1));
    else if (key === "Enter") form.requestSubmit(document.getElementById("save-next"));
    else handled = false;
    if (handled) e.preventDefault();
  });

  show(0);
})();
