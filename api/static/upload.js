// Upload page: files by drag-and-drop or picker, an optic-disc crop box per fundus photograph (proposed by the
// server's localiser, moved and resized by the user), upload with progress, then the result without a reload.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const maxBytes = Number(form.dataset.maxBytes), maxFiles = Number(form.dataset.maxFiles);
  const canPropose = form.dataset.propose === "1", csrf = form.dataset.csrf;
  const list = document.getElementById("file-list"), input = document.getElementById("files");
  const drop = document.getElementById("drop"), send = document.getElementById("send");
  const bar = document.getElementById("progress"), message = document.getElementById("message");
  const result = document.getElementById("result");
  let entries = [];

  function headers() { return csrf ? { "X-CSRF-Token": csrf } : {}; }
  function kind() { return form.querySelector("input[name=kind]:checked").value; }
  function isImage(file) { return /\.(jpe?g|png)$/i.test(file.name) || /^image\/(jpeg|png)$/.test(file.type); }
  function say(text, bad) { message.textContent = text; message.classList.toggle("error", !!bad); }

  function add(files) {
    for (const file of files) {
      if (entries.length >= maxFiles) { say("At most " + maxFiles + " files per upload.", true); break; }
      entries.push({ file: file, crop: null, useCrop: false, width: 0, height: 0 });
    }
    render();
  }

  function render() {
    list.replaceChildren();
    entries.forEach(function (entry, index) {
      const li = document.createElement("li");
      li.className = "file";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = entry.file.name + " (" + (entry.file.size / 1048576).toFixed(1) + " MB)";
      const remove = document.createElement("button");
      remove.type = "button"; remove.textContent = "Remove"; remove.className = "remove";
      remove.addEventListener("click", function () { entries.splice(index, 1); render(); });
      li.append(name, remove);
      if (entry.file.size > maxBytes) {
        const warn = document.createElement("span");
        warn.className = "error"; warn.textContent = " larger than the limit";
        li.append(warn);
      }
      if (kind() === "fundus" && isImage(entry.file)) li.append(cropper(entry));
      list.append(li);
    });
    send.disabled = entries.length === 0;
  }

  function cropper(entry) {
    const wrap = document.createElement("div");
    wrap.className = "crop";
    const toggle = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = entry.useCrop; box.className = "use-crop";
    box.addEventListener("change", function () { entry.useCrop = box.checked; frame.hidden = !box.checked; });
    toggle.append(box, " Crop the optic disc (the model reads the crop)");
    const stage = document.createElement("div");
    stage.className = "stage";
    const img = document.createElement("img");
    img.alt = "preview of " + entry.file.name;
    img.src = URL.createObjectURL(entry.file);
    const frame = document.createElement("div");
    frame.className = "crop-box"; frame.hidden = !entry.useCrop;
    const handle = document.createElement("div");
    handle.className = "crop-handle";
    frame.append(handle);
    stage.append(img, frame);
    wrap.append(toggle, stage);

    function scale() { return img.clientWidth / (entry.width || 1); }
    function place() {
      if (!entry.crop) return;
      const s = scale();
      frame.style.left = entry.crop.x * s + "px";
      frame.style.top = entry.crop.y * s + "px";
      frame.style.width = frame.style.height = entry.crop.size * s + "px";
    }
    img.addEventListener("load", function () {
      entry.width = img.naturalWidth; entry.height = img.naturalHeight;
      if (entry.crop) { place(); return; }
      const side = Math.round(Math.min(entry.width, entry.height) / 3);
      entry.crop = { x: Math.round((entry.width - side) / 2), y: Math.round((entry.height - side) / 2), size: side };
      place();
      if (!canPropose) return;
      const body = new FormData();
      body.append("file", entry.file);
      fetch("/api/upload/disc", { method: "POST", body: body, headers: headers(), credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (p) {
          if (!p) return;
          entry.crop = { x: p.x, y: p.y, size: p.size };
          entry.useCrop = box.checked = true; frame.hidden = false;
          place();
        });
    });
    let drag = null;
    frame.addEventListener("pointerdown", function (e) {
      e.preventDefault();
      frame.setPointerCapture(e.pointerId);
      drag = { resize: e.target === handle, x: e.clientX, y: e.clientY, start: Object.assign({}, entry.crop) };
    });
    frame.addEventListener("pointermove", function (e) {
      if (!drag) return;
      const s = scale(), dx = (e.clientX - drag.x) / s, dy = (e.clientY - drag.y) / s, c = drag.start;
      if (drag.resize) {
        const size = Math.max(32, Math.round(c.size + Math.max(dx, dy)));
        entry.crop.size = Math.min(size, entry.width - c.x, entry.height - c.y);
      } else {
        entry.crop.x = Math.round(Math.min(Math.max(0, c.x + dx), entry.width - c.size));
        entry.crop.y = Math.round(Math.min(Math.max(0, c.y + dy), entry.height - c.size));
      }
      place();
    });
    frame.addEventListener("pointerup", function () { drag = null; });
    window.addEventListener("resize", place);
    return wrap;
  }

  function showResult(study) {
    const done = function (data) {
      result.replaceChildren();
      const h = document.createElement("h2");
      h.textContent = "Result";
      const ul = document.createElement("ul");
      (data.predictions || []).forEach(function (p) {
        const li = document.createElement("li");
        li.className = "finding";
        li.textContent = p.assessable
          ? p.model + " " + p.version + ": " + String(p.finding).replace(/_/g, " ") + " " +
            (p.label === "present" ? "present" : "absent") + " (p = " + Number(p.probability).toFixed(2) +
            ", threshold " + Number(p.threshold).toFixed(2) + ")"
          : p.model + " " + p.version + ": not assessable — " + (p.reason || "");
        ul.append(li);
      });
      const link = document.createElement("a");
      link.href = study.case_url; link.className = "case-link"; link.textContent = "Open the case";
      const notice = document.createElement("p");
      notice.className = "notice-inline";
      notice.textContent = "Research decision support only; results are not a diagnosis.";
      result.append(h, ul, link, notice);
      say("Done.");
    };
    let tries = 0;
    (function poll() {
      fetch(study.study_url, { credentials: "same-origin", headers: headers() })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          const finished = data && (data.jobs || []).some(function (j) {
            return j.kind === "process_study" && (j.status === "done" || j.status === "failed");
          });
          if (finished) { done(data); return; }
          if (++tries > 180) { say("Still processing: open the case later.", true); return; }
          setTimeout(poll, 1000);
        });
    })();
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (!entries.length) return;
    const body = new FormData();
    entries.forEach(function (entry) { body.append("files", entry.file, entry.file.name); });
    for (const field of ["kind", "patient_id", "patient_name", "birth_date", "sex", "laterality", "accession_number"]) {
      const el = form.elements[field];
      body.append(field, field === "kind" ? kind() : (el.value || ""));
    }
    body.append("crops", JSON.stringify(entries.map(function (entry) {
      return kind() === "fundus" && entry.useCrop && entry.crop ? entry.crop : null;
    })));
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/upload");
    if (csrf) xhr.setRequestHeader("X-CSRF-Token", csrf);
    bar.hidden = false; bar.value = 0; send.disabled = true; result.replaceChildren();
    say("Uploading…");
    xhr.upload.addEventListener("progress", function (ev) {
      if (ev.lengthComputable) bar.value = Math.round(100 * ev.loaded / ev.total);
    });
    xhr.addEventListener("load", function () {
      send.disabled = false;
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (err) { data = null; }
      if (xhr.status !== 201) {
        const detail = data && data.detail;
        say("Not uploaded: " + (typeof detail === "string" ? detail : "error " + xhr.status), true);
        return;
      }
      bar.value = 100;
      entries = []; render();
      say("Uploaded; the models are reading the images…");
      data.studies.forEach(showResult);
    });
    xhr.addEventListener("error", function () { send.disabled = false; say("The upload failed: network error.", true); });
    xhr.send(body);
  });

  input.addEventListener("change", function () { add(input.files); input.value = ""; });
  form.querySelectorAll("input[name=kind]").forEach(function (r) { r.addEventListener("change", render); });
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) { add(e.dataTransfer.files); });
})();
