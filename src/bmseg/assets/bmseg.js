// bmseg annotation pages: labels in localStorage, keyboard labelling, export/import, server sync.
// User text only ever reaches the page through textContent / attributes, never innerHTML.
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("bmseg-data").textContent);
  const LABELS = ["yes", "no", "unsure"];
  const KEY_LABELS = "bmseg:" + data.site + ":labels";
  const KEY_PENDING = "bmseg:" + data.site + ":pending";
  const KEY_REFUSED = "bmseg:" + data.site + ":refused";
  const KEY_ANNOTATOR = "bmseg:annotator";
  const KEY_CONTOURS = "bmseg:contours";
  const SEP = "\u001f";
  const API = data.root + "api/labels";
  const $ = (id) => document.getElementById(id);

  function readJSON(key, fallback) {
    try {
      const text = localStorage.getItem(key);
      return text ? JSON.parse(text) : fallback;
    } catch (error) {
      return fallback;
    }
  }

  function notice(text, isWarning) {
    const box = $("notice");
    box.textContent = text;
    box.classList.toggle("warn", Boolean(isWarning));
  }

  // ---- the label store: {annotator SEP cell_uid: record}, newest record wins -------------------
  const store = {
    records: readJSON(KEY_LABELS, {}),
    pending: readJSON(KEY_PENDING, {}), // key -> time of the record the server has not acknowledged
    refused: readJSON(KEY_REFUSED, {}), // key -> the server's reason; kept here, not retried
    save() {
      try {
        localStorage.setItem(KEY_LABELS, JSON.stringify(this.records));
        localStorage.setItem(KEY_PENDING, JSON.stringify(this.pending));
        localStorage.setItem(KEY_REFUSED, JSON.stringify(this.refused));
        return true;
      } catch (error) {
        notice("This browser's storage is full: export your labels now.", true);
        return false;
      }
    },
    reload() {
      this.records = readJSON(KEY_LABELS, {});
      this.pending = readJSON(KEY_PENDING, {});
      this.refused = readJSON(KEY_REFUSED, {});
    },
    put(record) {
      const key = record.annotator + SEP + record.cell_uid;
      const old = this.records[key];
      if (old && old.time > record.time) return false;
      if (old && old.time === record.time && old.label === record.label) return false;
      this.records[key] = record;
      return true;
    },
    label(uid) {
      const record = this.records[annotator() + SEP + uid];
      return record ? record.label : null;
    },
  };

  function annotator() {
    return ($("annotator").value || "").trim();
  }

  function validRecord(record) {
    return (
      record !== null &&
      typeof record === "object" &&
      typeof record.cell_uid === "string" && record.cell_uid.length > 0 &&
      LABELS.includes(record.label) &&
      typeof record.annotator === "string" && record.annotator.trim().length > 0 &&
      typeof record.time === "string" && !Number.isNaN(Date.parse(record.time))
    );
  }

  // ---- server sync (only when served over http by `bmseg annotate serve`) -----------------------
  const server = { on: false, busy: false, failures: 0, timer: null };

  function setSync() {
    const box = $("sync");
    const waiting = Object.keys(store.pending).length;
    const refused = Object.keys(store.refused).length;
    let text;
    let state;
    if (!server.on) {
      text = "Saved in this browser · export to keep a copy";
      state = "local";
    } else if (refused && !waiting) {
      text = refused + " label(s) refused by the server, kept in this browser · export them";
      state = "refused";
    } else if (!waiting) {
      text = "All labels saved on the server";
      state = "saved";
    } else if (server.failures) {
      text = "Server unreachable · " + waiting + " label(s) kept here, retrying";
      state = "offline";
    } else {
      text = "Saving " + waiting + " label(s)…";
      state = "saving";
    }
    box.textContent = text;
    box.dataset.state = state;
  }

  async function detectServer() {
    if (!/^https?:$/.test(location.protocol)) return setSync();
    let doc;
    try {
      const response = await fetch(API, { cache: "no-store" });
      if (!response.ok) return setSync();
      doc = await response.json();
    } catch (error) {
      return setSync();
    }
    if (!doc || doc.version !== 1 || !Array.isArray(doc.labels)) return setSync();
    server.on = true;
    const onServer = {};
    for (const record of doc.labels) {
      if (!validRecord(record)) continue;
      const key = record.annotator + SEP + record.cell_uid;
      onServer[key] = record.time;
      store.put(record);
    }
    store.pending = {};
    for (const [key, record] of Object.entries(store.records)) {
      if (key in store.refused) continue; // refused before: kept here, not retried
      if (!(key in onServer) || onServer[key] < record.time) store.pending[key] = record.time;
    }
    store.save();
    refresh();
    flush();
  }

  // Apply the server's answer for each posted record: "saved" (kept on disk) and "superseded"
  // (the server holds a newer label, adopted here) leave the queue; "refused" is kept in this
  // browser with the reason and not retried. A record relabelled since it was posted stays queued.
  function acknowledge(batch, results) {
    let refusedNow = 0;
    let firstReason = "";
    batch.forEach((record, index) => {
      const key = record.annotator + SEP + record.cell_uid;
      const result = results[index] || {};
      if (store.pending[key] !== record.time) return;
      if (result.status === "saved") {
        delete store.pending[key];
      } else if (result.status === "superseded") {
        delete store.pending[key];
        if (validRecord(result.by)) store.put(result.by);
      } else if (result.status === "refused") {
        delete store.pending[key];
        store.refused[key] = String(result.error || "refused");
        refusedNow += 1;
        firstReason = firstReason || store.refused[key];
      }
    });
    if (refusedNow) notice("The server refused " + refusedNow + " label(s): " + firstReason, true);
  }

  async function flush() {
    if (!server.on || server.busy) return setSync();
    const keys = Object.keys(store.pending).slice(0, 500);
    if (!keys.length) return setSync();
    server.busy = true;
    setSync();
    const batch = keys.map((key) => store.records[key]).filter(Boolean);
    let delay = 0;
    try {
      const response = await fetch(API, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ version: 1, labels: batch }),
      });
      const body = await response.json().catch(() => ({}));
      const results = Array.isArray(body.results) && body.results.length === batch.length;
      if (results) {
        acknowledge(batch, body.results);
        server.failures = 0;
      } else if (!response.ok) {
        // refused as a whole, not per record: nothing is known saved, so everything stays queued
        if (response.status < 500) notice("The server refused labels: " + (body.error || response.status), true);
        throw new Error("server answered " + response.status);
      } else {
        throw new Error("the server did not answer per label");
      }
      store.save();
    } catch (error) {
      server.failures += 1;
      delay = Math.min(30000, 500 * 2 ** server.failures);
    } finally {
      server.busy = false;
    }
    setSync();
    if (Object.keys(store.pending).length) {
      clearTimeout(server.timer);
      server.timer = setTimeout(flush, delay);
    }
  }

  // ---- labelling -----------------------------------------------------------------------------
  function requireAnnotator() {
    if (annotator()) return true;
    notice("Type your name in the Annotator box first: labels are kept per annotator.", true);
    $("annotator").focus();
    return false;
  }

  function setLabels(uids, label) {
    if (!requireAnnotator()) return false;
    const time = new Date().toISOString();
    for (const uid of uids) {
      const record = { cell_uid: uid, label: label, annotator: annotator(), time: time };
      const key = record.annotator + SEP + uid;
      if (store.put(record)) {
        store.pending[key] = time;
        delete store.refused[key]; // a new label of this cell is tried again
      }
    }
    store.save();
    refresh();
    flush();
    return true;
  }

  // ---- export / import -----------------------------------------------------------------------
  function exportLabels() {
    const labels = Object.values(store.records).sort((a, b) =>
      a.time < b.time ? -1 : a.time > b.time ? 1 : 0
    );
    const text = JSON.stringify({ version: 1, labels: labels }, null, 1);
    const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    const link = document.createElement("a");
    const stamp = new Date().toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-");
    link.href = url;
    link.download = "bmseg-labels-" + stamp + ".json";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    notice("Exported " + labels.length + " label(s).");
  }

  function importLabels(file) {
    const reader = new FileReader();
    reader.onload = () => {
      let doc;
      try {
        doc = JSON.parse(reader.result);
      } catch (error) {
        return notice(file.name + " is not JSON: choose a file exported from these pages.", true);
      }
      if (!doc || doc.version !== 1 || !Array.isArray(doc.labels) || !doc.labels.every(validRecord)) {
        return notice(file.name + ' is not a bmseg labels file ({"version": 1, "labels": [...]}).', true);
      }
      let added = 0;
      for (const record of doc.labels) {
        const clean = {
          cell_uid: record.cell_uid, label: record.label,
          annotator: record.annotator.trim(), time: record.time,
        };
        if (store.put(clean)) {
          const key = clean.annotator + SEP + clean.cell_uid;
          store.pending[key] = clean.time;
          delete store.refused[key];
          added += 1;
        }
      }
      store.save();
      refresh();
      flush();
      notice("Imported " + added + " new or newer label(s) from " + file.name + ".");
    };
    reader.readAsText(file);
  }

  // ---- counting ------------------------------------------------------------------------------
  // cell_uid is {slide_id}:{cell_type}:{cx}:{cy}, so labels can be counted per slide and type.
  function countByGroup() {
    const counts = {};
    const me = annotator();
    for (const record of Object.values(store.records)) {
      if (record.annotator !== me) continue;
      const parts = record.cell_uid.split(":");
      if (parts.length < 4) continue;
      const group = parts.slice(0, -3).join(":") + SEP + parts[parts.length - 3];
      const entry = counts[group] || (counts[group] = { yes: 0, no: 0, unsure: 0 });
      entry[record.label] += 1;
    }
    return counts;
  }

  // ---- the gallery page ----------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  const cards = [];
  let focused = 0;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgNode(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  function buildCard(cell, index) {
    const card = element("article", "card");
    card.dataset.index = index;
    card.dataset.uid = cell.u;
    const crop = element("div", "crop");
    const image = element("img");
    image.src = cell.i;
    image.alt = "cell " + cell.u;
    image.width = cell.w;
    image.height = cell.h;
    image.loading = "lazy"; // the first screen shows at once, the rest as you scroll

    crop.appendChild(image);
    const overlay = svgNode("svg", {
      viewBox: "0 0 " + cell.w + " " + cell.h, preserveAspectRatio: "xMidYMid meet",
      class: "overlay", "aria-hidden": "true",
    });
    if (cell.c) overlay.appendChild(svgNode("path", { d: cell.c, class: "contour" }));
    if (cell.b) {
      const unit = Math.max(cell.w, cell.h) / 160;
      const x0 = 6 * unit;
      const y0 = cell.h - 7 * unit;
      overlay.appendChild(svgNode("line", { x1: x0, y1: y0, x2: x0 + cell.b[0], y2: y0, class: "bar" }));
      const label = svgNode("text", {
        x: x0, y: y0 - 4 * unit, class: "bar-label", "font-size": 11 * unit,
      });
      label.textContent = cell.b[1];
      overlay.appendChild(label);
    }
    crop.appendChild(overlay);
    const badge = element("span", "badge");
    crop.appendChild(badge);
    card.appendChild(crop);
    const meta = element("div", "meta");
    const uid = element("div", "uid", cell.u);
    uid.title = cell.u;
    const slide = element("div", "slide", cell.s);
    slide.title = cell.s;
    meta.append(uid, slide, element("div", "area", cell.a === null ? "area unknown" : cell.a.toLocaleString() + " µm²"));
    card.appendChild(meta);
    const buttons = element("div", "buttons");
    for (const [value, text] of [["yes", "Yes"], ["no", "No"], ["unsure", "?"]]) {
      const button = element("button", value, text);
      button.type = "button";
      button.dataset.label = value;
      button.title = value + " (" + value[0].toUpperCase() + ")";
      buttons.appendChild(button);
    }
    card.appendChild(buttons);
    card.addEventListener("click", (event) => {
      const value = event.target.dataset && event.target.dataset.label;
      focus(index, false);
      if (value) setLabels([cell.u], value);
    });
    return card;
  }

  function focus(index, scroll) {
    if (!cards.length) return;
    focused = Math.max(0, Math.min(cards.length - 1, index));
    cards.forEach((card, i) => card.classList.toggle("focused", i === focused));
    if (scroll !== false) cards[focused].scrollIntoView({ block: "nearest" });
  }

  function columns() {
    const top = cards[0].offsetTop;
    let count = 0;
    while (count < cards.length && cards[count].offsetTop === top) count += 1;
    return Math.max(1, count);
  }

  function refreshGallery() {
    const tally = { yes: 0, no: 0, unsure: 0, open: 0 };
    for (const card of cards) {
      const label = store.label(card.dataset.uid);
      card.dataset.label = label || "";
      card.querySelector(".badge").textContent = label ? label.toUpperCase() : "";
      for (const button of card.querySelectorAll("button")) {
        button.setAttribute("aria-pressed", String(button.dataset.label === label));
      }
      tally[label || "open"] += 1;
    }
    for (const [name, value] of Object.entries(tally)) {
      document.querySelector('[data-count="' + name + '"]').textContent = value;
    }
    const done = cards.length - tally.open;
    $("progress-fill").style.width = (cards.length ? (100 * done) / cards.length : 0) + "%";
    let typeDone = 0;
    for (const [group, entry] of Object.entries(countByGroup())) {
      if (group.split(SEP)[1] === data.cellType) typeDone += entry.yes + entry.no + entry.unsure;
    }
    $("type-total").textContent =
      done + " / " + cards.length + " on this page · " + typeDone + " " + data.cellType + " labelled in all";
  }

  function initGallery() {
    const grid = $("grid");
    const fragment = document.createDocumentFragment();
    data.cells.forEach((cell, index) => {
      const card = buildCard(cell, index);
      cards.push(card);
      fragment.appendChild(card);
    });
    grid.appendChild(fragment);
    document.body.classList.toggle("no-contours", localStorage.getItem(KEY_CONTOURS) === "off");
    for (const button of document.querySelectorAll("[data-rest]")) {
      button.addEventListener("click", () => {
        const open = cards.filter((card) => !store.label(card.dataset.uid));
        if (setLabels(open.map((card) => card.dataset.uid), button.dataset.rest)) {
          notice("Labelled " + open.length + " remaining cell(s) " + button.dataset.rest + ".");
        }
      });
    }
    document.addEventListener("keydown", onKey);
    focus(0, false);
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) {
      if (event.key === "Enter" || event.key === "Escape") target.blur();
      return;
    }
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(), ArrowDown: columns() };
    const labels = { y: "yes", n: "no", u: "unsure" };
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (key in moves) {
      focus(focused + moves[key]);
    } else if (key in labels) {
      if (setLabels([cards[focused].dataset.uid], labels[key])) focus(focused + 1);
    } else if (key === "c") {
      const off = document.body.classList.toggle("no-contours");
      localStorage.setItem(KEY_CONTOURS, off ? "off" : "on");
    } else {
      return;
    }
    event.preventDefault();
  }

  // ---- the index page ------------------------------------------------------------------------
  function refreshIndex() {
    const counts = countByGroup();
    data.rows.forEach((row, index) => {
      const entry = counts[row.slide + SEP + row.type] || { yes: 0, no: 0, unsure: 0 };
      const tr = document.querySelector('tr[data-row="' + index + '"]');
      const labelled = entry.yes + entry.no + entry.unsure;
      tr.querySelector(".labelled").textContent = labelled + " / " + row.cells;
      for (const name of LABELS) tr.querySelector("." + name).textContent = entry[name];
      tr.classList.toggle("complete", labelled >= row.cells);
    });
    data.types.forEach((entry, index) => {
      let labelled = 0;
      for (const [group, tally] of Object.entries(counts)) {
        if (group.split(SEP)[1] === entry.type) labelled += tally.yes + tally.no + tally.unsure;
      }
      const section = document.querySelector('section[data-type="' + index + '"] .labelled');
      section.textContent = labelled + " / " + entry.cells;
    });
  }

  function refresh() {
    if (data.view === "gallery") refreshGallery();
    else refreshIndex();
    setSync();
  }

  // ---- start ---------------------------------------------------------------------------------
  const nameBox = $("annotator");
  nameBox.value = localStorage.getItem(KEY_ANNOTATOR) || "";
  nameBox.addEventListener("input", () => {
    localStorage.setItem(KEY_ANNOTATOR, annotator());
    notice("");
    refresh();
  });
  $("export").addEventListener("click", exportLabels);
  $("import").addEventListener("change", (event) => {
    if (event.target.files.length) importLabels(event.target.files[0]);
    event.target.value = "";
  });
  window.addEventListener("storage", (event) => {
    if (event.key === KEY_LABELS || event.key === KEY_PENDING) {
      store.reload();
      refresh();
    }
  });
  window.addEventListener("online", flush);
  if (data.view === "gallery") initGallery();
  refresh();
  if (!annotator()) notice("Type your name in the Annotator box to start labelling.");
  performance.mark("bmseg-interactive");
  document.body.dataset.ready = "1";
  detectServer();
})();
